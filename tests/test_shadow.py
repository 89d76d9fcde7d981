"""The shadow rule: a run of the fallback alone beside the guarded run, and a reset to it when the guarded run falls behind.

Its promise is about whole runs: the guarded run ends no worse than the fallback optimizer run alone (up to the
tolerance), where the paper's one-step rule can end far above it. The shadow itself must be exactly the fallback alone.
"""
import copy
import functools
import io
import math

import pytest
import torch
from torch import nn

from lgl2o import GradientGuard, LearnedOptimizer, LossGuard, load_pretrained
from lgl2o.bench import tune_lr, scenarios, _evaluate
from lgl2o.guards import ShadowRun


def regression(n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)) for _ in range(n)]


def net(seed=0, dropout=0.2):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 1))


def mse(model, b): return nn.functional.mse_loss(model(b[0]), b[1])


@pytest.mark.parametrize('guard_cls', [LossGuard, GradientGuard])
@pytest.mark.parametrize('compare', ['next', 'same'])
def test_the_shadow_is_the_fallback_alone_exactly(guard_cls, compare):
    "Parameters at every step equal a plain Adam loop's (same dropout masks, same LR schedule), whatever the guarded run does"
    batches = regression()
    plain = net()
    opt = torch.optim.Adam(plain.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    model = net()
    guard = guard_cls(torch.optim.SGD(model.parameters(), lr=0.3), torch.optim.Adam(model.parameters(), lr=0.01),
                      compare=compare, shadow=0.02)
    gsched = torch.optim.lr_scheduler.StepLR(guard, step_size=5, gamma=0.5)
    torch.manual_seed(1)
    plain_points = []
    for b in batches:
        opt.zero_grad(); mse(plain, b).backward(); opt.step(); sched.step()
        plain_points.append([p.detach().clone() for p in plain.parameters()])
    torch.manual_seed(1)
    for b, expected in zip(batches, plain_points):
        guard.step(lambda: mse(model, b)); gsched.step()
        for s, p in zip(guard._shadow.params, expected): assert torch.equal(s, p)
    assert guard.counts['learned'] > 0   # the guarded run did take learned steps: it is not the shadow


def spirals_runs(shadow, steps=300, seed=0):
    sc = scenarios()['spirals']
    task = sc.make_task()
    lr = tune_lr(task, 'adam', 200)[0]
    net_ = load_pretrained('lstm-mnist')
    out = {}
    for name in ('adam alone', 'paper rule', 'shadow'):
        m = task.init(seed)
        ps = list(m.parameters())
        adam = torch.optim.Adam(ps, lr=lr)
        opt = adam if name == 'adam alone' else LossGuard(LearnedOptimizer(ps, net_), adam, shadow=0.02 if name == 'shadow' else None)
        batches = task.batches(seed)
        for _ in range(steps):
            b = next(batches)
            if opt is adam:
                adam.zero_grad(); task.loss(m, b).backward(); adam.step()
            else: opt.step(task.closure(m, b))
        if opt is not adam:
            b = next(batches); opt.resolve(task.closure(m, b))
        out[name] = (_evaluate(task, m)['train_loss'], opt)
    return out


def test_never_worse_than_the_fallback_alone_where_the_paper_rule_is():
    "Two spirals, LSTM optimizer guarded by tuned Adam: the paper's rule ends far above Adam alone, the shadow rule does not"
    r = spirals_runs(0.02)
    adam, paper, (shadow, guard) = r['adam alone'][0], r['paper rule'][0], r['shadow']
    assert paper > 1.3 * adam                 # the paper's rule falls behind its own fallback ...
    assert shadow <= 1.05 * adam              # ... the shadow rule does not
    assert guard.resets >= 1 and guard.counts['learned'] > 0   # it got there by resets, not by never taking a learned step


def test_never_worse_on_relu_with_the_mlp_optimizer():
    sc = scenarios()['relu']
    task = sc.make_task()
    lr = tune_lr(task, 'adam', 100)[0]
    net_ = load_pretrained('mlp-mnist')
    finals = {}
    for seed in (0, 2):
        for shadow in (None, 0.02, 'alone'):
            m = task.init(seed); ps = list(m.parameters())
            adam = torch.optim.Adam(ps, lr=lr)
            guard = None if shadow == 'alone' else LossGuard(LearnedOptimizer(ps, net_), adam, shadow=shadow)
            batches = task.batches(seed)
            for _ in range(100):
                b = next(batches)
                if guard is None: adam.zero_grad(); task.loss(m, b).backward(); adam.step()
                else: guard.step(task.closure(m, b))
            if guard is not None: guard.resolve(task.closure(m, next(batches)))
            finals[seed, shadow] = _evaluate(task, m)['train_loss']
    for seed in (0, 2):
        assert finals[seed, None] > 1.1 * finals[seed, 'alone']     # the paper's rule is worse than Adam alone here
        assert finals[seed, 0.02] <= 1.05 * finals[seed, 'alone']   # the shadow rule is not


def test_a_reset_takes_the_shadows_point_gradient_and_fallback_state():
    "In the step of a reset the fallback's candidate is made from the shadow's point, gradient and state: it equals the shadow's next point"
    batches = regression(60)
    model = net(dropout=0.0)
    guard = LossGuard(torch.optim.SGD(model.parameters(), lr=1e-3), torch.optim.Adam(model.parameters(), lr=0.05),
                      shadow=0.0, record=True)
    for b in batches:
        guard.step(lambda: mse(model, b))
        if guard.history[-1].get('reset'): break
    else: pytest.fail('no reset happened')
    run = guard._shadow
    for v, s in zip(guard._buf['fallback'].views, run.params): assert torch.equal(v, s)
    mine, shadow = guard.fallback.state_dict()['state'], run.opt.state_dict()['state']
    assert mine.keys() == shadow.keys()
    for i in mine:
        for k in mine[i]: assert torch.equal(torch.as_tensor(mine[i][k]), torch.as_tensor(shadow[i][k]))
    assert guard.resets == 1


def test_behind_smooths_and_compares_relatively():
    run = object.__new__(ShadowRun); run.smoothed = None
    assert not run.behind(1.0, 1.0, 0.02, 0.9)
    assert not run.behind(1.1, 1.0, 0.02, 0.9)              # smoothed 1.01 vs 1.0: within 2%
    assert run.smoothed == pytest.approx((1.01, 1.0))
    assert run.behind(1.2, 1.0, 0.02, 0.9)                  # 0.9 * 1.01 + 0.1 * 1.2 = 1.029: behind
    assert run.smoothed == (1.0, 1.0)                        # the guarded run goes on from the shadow's point
    run.smoothed = None
    assert not run.behind(-1.0, -1.0, 0.1, 0.5)             # negative losses: the tolerance is relative to |shadow|
    assert not run.behind(-0.9, -1.0, 0.1, 0.5)             # -0.95 vs -1.0: within 0.1
    assert run.behind(-0.5, -1.0, 0.1, 0.5)                 # -0.725 vs -1.0: behind
    run.smoothed = None
    assert run.behind(math.nan, 1.0, 0.02, 0.9)             # a non-finite guarded loss is always behind


def test_arguments_are_checked():
    m = nn.Linear(2, 1)
    make = lambda **kw: LossGuard(torch.optim.SGD(m.parameters(), lr=0.1), torch.optim.SGD(m.parameters(), lr=0.1), **kw)
    for bad in (1.0, -0.1, True, '0.02'):
        with pytest.raises(ValueError, match='shadow must be None or a tolerance'): make(shadow=bad)
    with pytest.raises(ValueError, match='smoothing must be'): make(shadow=0.02, smoothing=1.0)


@pytest.mark.parametrize('compare', ['next', 'same'])
def test_a_checkpoint_resumes_the_shadow_identically(compare):
    batches = regression(24)
    def make():
        m = net(dropout=0.0)
        return m, LossGuard(torch.optim.SGD(m.parameters(), lr=0.3), torch.optim.Adam(m.parameters(), lr=0.01), compare=compare, shadow=0.0)
    m1, g1 = make()
    for b in batches[:12]: g1.step(lambda: mse(m1, b))
    buf = io.BytesIO(); torch.save({'m': m1.state_dict(), 'g': g1.state_dict()}, buf); buf.seek(0)
    for b in batches[12:]: g1.step(lambda: mse(m1, b))
    m2, g2 = make()
    ck = torch.load(buf, weights_only=False)
    m2.load_state_dict(ck['m']); g2.load_state_dict(ck['g'])
    for b in batches[12:]: g2.step(lambda: mse(m2, b))
    assert g1.resets == g2.resets and g1.counts == g2.counts
    for a, b in zip(m1.parameters(), m2.parameters()): assert torch.equal(a, b)
    for a, b in zip(g1._shadow.params, g2._shadow.params): assert torch.equal(a, b)


@pytest.mark.parametrize('compare', ['next', 'same'])
def test_moving_the_parameters_from_outside_restarts_the_shadow_there(compare):
    "Loading other weights between steps: a later reset must never jump back to the old trajectory"
    batches = regression(10)
    m = net(dropout=0.0)
    g = LossGuard(torch.optim.SGD(m.parameters(), lr=0.3), torch.optim.Adam(m.parameters(), lr=0.01), compare=compare, shadow=0.0, record=True)
    for b in batches[:4]: g.step(lambda: mse(m, b))
    old = [s.clone() for s in g._shadow.params]
    with torch.no_grad():
        for p in m.parameters(): p.data.mul_(0.5)   # a `.data` write leaves no version behind
    moved = [p.detach().clone() for p in m.parameters()]
    g.step(lambda: mse(m, batches[4]))
    h = g.history[-1]
    assert h.get('dropped') == 3 if compare == 'next' else h.get('shadow_restarted')
    dist = lambda xs, ys: max((x - y).abs().max().item() for x, y in zip(xs, ys))
    assert dist(g._shadow.params, moved) <= 0.05 < dist(old, moved) / 4   # one Adam step from the moved point


@pytest.mark.parametrize('compare', ['next', 'same'])
def test_a_shadow_step_costs_one_forward_and_one_backward_more(compare):
    batches = regression(12)
    m = net(dropout=0.0)
    g = LossGuard(torch.optim.SGD(m.parameters(), lr=0.3), torch.optim.SGD(m.parameters(), lr=0.05), compare=compare, shadow=0.02, record=True)
    for b in batches: g.step(lambda: mse(m, b))
    per_call = [(h['forward'], h['backward']) for h in g.history]
    assert per_call[0] == ((1, 1) if compare == 'next' else (3, 1))   # the shadow starts at the same point: nothing to evaluate
    if compare == 'same': assert set(per_call[1:]) == {(4, 2)}        # gradient, two candidates, the shadow
    else: assert set(per_call[1:]) <= {(3, 2), (4, 2)}                 # as the paper rule (2 or 3 forwards), plus the shadow's


def test_resolve_resets_to_the_shadow_when_behind():
    "The last decision of a run (resolve) also checks the shadow: a run behind at its end ends at the fallback alone's point"
    batches = regression(12)
    m = net(dropout=0.0)
    g = LossGuard(torch.optim.SGD(m.parameters(), lr=0.3), torch.optim.Adam(m.parameters(), lr=0.01), shadow=0.02, record=True)
    for b in batches[:10]: g.step(lambda: mse(m, b))
    assert g.pending
    g.shadow_run.smoothed = (10.0, 1.0)   # as if the guarded run had fallen far behind
    loss = g.resolve(lambda: mse(m, batches[10]))
    assert g.history[-1]['reset'] and g.resets == 1
    for p, s in zip(m.parameters(), g.shadow_run.params): assert torch.equal(p, s)
    with torch.no_grad(): assert loss.item() == mse(m, batches[10]).item() == g.history[-1]['loss_shadow']
    g.step(lambda: mse(m, batches[11]))                  # training goes on from there: no outside change is detected
    assert not g.history[-1].get('shadow_restarted')


def test_resolve_keeps_the_choice_when_not_behind():
    batches = regression(12)
    m = net(dropout=0.0)
    g = LossGuard(torch.optim.SGD(m.parameters(), lr=0.3), torch.optim.Adam(m.parameters(), lr=0.01), shadow=0.02, record=True)
    for b in batches[:10]: g.step(lambda: mse(m, b))
    g.shadow_run.smoothed = (1.0, 10.0)   # far ahead
    g.resolve(lambda: mse(m, batches[10]))
    h = g.history[-1]
    assert not h.get('reset') and g.resets == 0 and 'loss_shadow' in h
    held = g._buf[h['choice']]
    for p, v in zip(held.params, held.views): assert torch.equal(p, v)


class Boom(Exception): pass


class FailingAdam(torch.optim.Adam):
    fail = False
    def step(self, closure=None):
        if self.fail: raise Boom()
        return super().step(closure)


def test_a_failing_shadow_step_changes_nothing_else_and_the_shadow_starts_again():
    batches = regression(8)
    m = net(dropout=0.0)
    g = LossGuard(torch.optim.SGD(m.parameters(), lr=0.3), FailingAdam(m.parameters(), lr=0.01), shadow=0.02, record=True)
    for b in batches[:4]: g.step(lambda: mse(m, b))
    g.shadow_run.opt.fail = True   # only the shadow's copy fails
    params = [p.detach().clone() for p in m.parameters()]
    grads = [p.grad.clone() for p in m.parameters()]
    states = copy.deepcopy((g.learned.state_dict(), g.fallback.state_dict()))
    counts, steps, history = dict(g.counts), g.steps, len(g.history)
    with pytest.raises(Boom): g.step(lambda: mse(m, batches[4]))
    assert all(torch.equal(a, b) for a, b in zip(params, m.parameters()))
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, m.parameters()))
    for before, opt in zip(states, (g.learned, g.fallback)):
        after = opt.state_dict()['state']
        for i in before['state']:
            for k in before['state'][i]: assert torch.equal(torch.as_tensor(before['state'][i][k]), torch.as_tensor(after[i][k]))
    assert (g.counts, g.steps, len(g.history), g.shadow_run) == (counts, steps, history, None)
    g.step(lambda: mse(m, batches[4]))   # the loop goes on; the shadow starts again where the parameters are
    assert g.shadow_run is not None and not g.shadow_run.opt.fail


def test_the_tolerance_is_relative_to_the_loss_above_its_floor():
    "A loss with a large offset (a quadratic's raw value near -5000) would make 2% of it a huge margin; above its floor it is not"
    run = object.__new__(ShadowRun); run.smoothed = None
    assert not run.behind(-5000.0, -5000.0, 0.02, 0.9, floor=-5060.0)
    assert run.behind(-4990.0, -5000.0, 0.02, 0.0, floor=-5060.0)      # 10 above a shadow 60 above the floor: behind
    run.smoothed = None
    assert not run.behind(-4990.0, -5000.0, 0.02, 0.0)                 # with the default floor 0 it would pass (10 < 100)
    lin = nn.Linear(1, 1)
    with pytest.raises(ValueError, match='loss_floor must be a finite number'):
        LossGuard(torch.optim.SGD(lin.parameters(), lr=0.1), torch.optim.SGD(lin.parameters(), lr=0.1), loss_floor=math.nan)
