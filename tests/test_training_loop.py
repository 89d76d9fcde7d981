"""The guard keeps the torch.optim contract in real training loops.

The reference is the plain loop `zero_grad(); loss.backward(); opt.step()`. A `LossGuard` whose two components are
the same optimizer twice proposes two equal candidates, keeps the fallback's (ties go to it) and must then follow
the plain loop exactly: parameters, optimizer states, module buffers, gradients, random state. Every habit of a
training loop is checked that way, and every failure inside a step must leave everything as the call found it.
"""
import copy
import functools
from collections import OrderedDict

import pytest
import torch
from torch import nn

from lgl2o import GradientGuard, LearnedOptimizer, LossGuard, load_pretrained
from lgl2o.guards import Guard
from lgl2o.learned import build_net

GUARDS = [LossGuard, GradientGuard]


@pytest.fixture(autouse=True, params=[None, 0.02], ids=['paper-rule', 'shadow'])
def shadow(request, monkeypatch):
    "Every test runs with each rule: the paper's alone, and with the fallback's shadow run (whose resets must not show either)"
    init = Guard.__init__
    def with_rule(self, *args, **kw):
        kw.setdefault('shadow', request.param)
        init(self, *args, **kw)
    monkeypatch.setattr(Guard, '__init__', with_rule)
    return request.param


def regression_batches(n=12, batch=16, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, d, generator=g), torch.randn(batch, 1, generator=g)) for _ in range(n)]


def mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def plain_run(model, opt, batches, loss=mse, before_step=None):
    "The reference loop"
    for b in batches:
        opt.zero_grad()
        loss(model, b).backward()
        if before_step: before_step(model)
        opt.step()


def guarded_run(model, guard, batches, loss=mse):
    for b in batches: guard.step(lambda: loss(model, b))


def same_twice(make_opt, model, **guard_kw):
    "A LossGuard over two copies of one optimizer: it must behave as that optimizer alone"
    return LossGuard(make_opt(model.parameters()), make_opt(model.parameters()), **guard_kw)


def assert_same_tensors(a, b, exact=True):
    a, b = list(a), list(b)
    assert len(a) == len(b)
    for s, t in zip(a, b):
        if s is None or t is None: assert s is None and t is None; continue
        assert s.device == t.device
        if s.is_sparse: s, t = s.to_dense(), t.to_dense()
        if exact: assert torch.equal(s, t), (s - t).abs().max()
        else: torch.testing.assert_close(s, t)


def fallback_state(guard): return guard.fallback.state_dict()['state']


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].keys() == b[k].keys()
        for kk in a[k]: assert torch.equal(torch.as_tensor(a[k][kk]), torch.as_tensor(b[k][kk])), (k, kk)


def everything(model, guard) -> dict:
    "What a failed call must leave as it was"
    return dict(params=[p.detach().clone() for p in model.parameters()],
                grads=[None if p.grad is None else p.grad.clone() for p in model.parameters()],
                buffers=[b.clone() for b in model.buffers()],
                learned=copy.deepcopy(guard.learned.state_dict()), fallback=copy.deepcopy(guard.fallback.state_dict()),
                guard=copy.deepcopy(guard.state_dict()['guard']), rng=torch.get_rng_state(),
                history=len(guard.history))


def assert_unchanged(before: dict, after: dict):
    assert_same_tensors(before['params'], after['params'])
    assert_same_tensors(before['grads'], after['grads'])
    assert_same_tensors(before['buffers'], after['buffers'])
    for k in ('learned', 'fallback'): assert_same_state(before[k]['state'], after[k]['state'])
    g0, g1 = before['guard'], after['guard']
    tensors = ('candidates', 'shadow')
    assert {k: v for k, v in g0.items() if k not in tensors} == {k: v for k, v in g1.items() if k not in tensors}
    if 'candidates' in g0:
        for c in g0['candidates']: assert_same_tensors(g0['candidates'][c], g1['candidates'][c])
    assert (g0.get('shadow') is None) == (g1.get('shadow') is None)
    if g0.get('shadow') is not None:
        s0, s1 = g0['shadow'], g1['shadow']
        assert_same_tensors(s0['params'], s1['params'])
        assert_same_state(s0['optimizer']['state'], s1['optimizer']['state'])
        assert s0['smoothed'] == s1['smoothed']
    assert torch.equal(before['rng'], after['rng']) and before['history'] == after['history']


def small_net(seed=0, bn=False, dropout=0.0):
    torch.manual_seed(seed)
    layers = [nn.Linear(4, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.ReLU()]
    layers += [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(*layers, nn.Linear(8, 1))


SGD = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-2)
ADAM = functools.partial(torch.optim.Adam, lr=0.01)


# 1. an exception inside a step changes nothing ---------------------------------------------------------------------

class Boom(Exception): pass


BOTH_GRAPHS = functools.partial(LossGuard, keep_both_graphs=True)   # no third forward: the first candidate's graph is kept


@pytest.mark.parametrize('guard_cls,fail_at', [(LossGuard, 1), (LossGuard, 2), (LossGuard, 3), (BOTH_GRAPHS, 1), (BOTH_GRAPHS, 2),
                                                (GradientGuard, 1), (GradientGuard, 2)],
                         ids=['LossGuard-1', 'LossGuard-2', 'LossGuard-3', 'LossGuard-both-graphs-1', 'LossGuard-both-graphs-2',
                              'GradientGuard-1', 'GradientGuard-2'])
def test_closure_failing_at_any_call_changes_nothing_and_the_loop_goes_on(guard_cls, fail_at):
    "A loop that catches the error and skips the batch continues exactly as a loop that never saw that batch"
    batches = regression_batches(10)
    bad = (torch.randn(16, 4), torch.randn(16, 1))

    def calls_made(model, guard, batch) -> int:
        "How many closure calls a step on `batch` makes, tried on copies"
        m, g = copy.deepcopy((model, guard))
        n = [0]
        def counting():
            n[0] += 1
            return mse(m, batch)
        state = torch.get_rng_state()
        g.step(counting)
        torch.set_rng_state(state)
        return n[0]

    def run(inject: bool):
        model = small_net(bn=True, dropout=0.2)
        guard = guard_cls(ADAM(model.parameters()), SGD(model.parameters()), record=True)
        torch.manual_seed(1)
        failed = False
        for i, b in enumerate(batches):
            bad = batches[i - 1]
            if inject and i >= 5 and not failed and calls_made(model, guard, bad) >= fail_at:
                calls = [0]
                def failing():
                    calls[0] += 1
                    if calls[0] == fail_at: raise Boom()
                    return mse(model, bad)
                before = everything(model, guard)
                assert guard.pending
                with pytest.raises(Boom): guard.step(failing)
                assert calls[0] == fail_at
                assert_unchanged(before, everything(model, guard))
                failed = True
            guard.step(lambda: mse(model, b))
        assert failed or not inject, f'no step made {fail_at} closure calls'
        guard.resolve(lambda: mse(model, batches[0]))
        return model, guard

    (m1, g1), (m2, g2) = run(inject=True), run(inject=False)
    assert_same_tensors(m1.parameters(), m2.parameters())
    assert_same_tensors(m1.buffers(), m2.buffers())
    assert g1.counts == g2.counts and g1.history == g2.history


def test_failure_after_the_first_evaluated_candidate_wins_changes_nothing(shadow):
    "When the candidate evaluated first wins, its kept graph and buffer effects are taken up; a failure after that still undoes all"
    batches = regression_batches(12)
    model, fail = small_net(bn=True, dropout=0.2), [False]
    def hook(grads):
        if fail[0]: raise Boom()
    guard = BOTH_GRAPHS(ADAM(model.parameters()), SGD(model.parameters()), record=True, grad_hook=hook)
    torch.manual_seed(1)
    for b in batches:
        probe_model, probe = copy.deepcopy((model, guard))
        held, state = guard._provisional, torch.get_rng_state()
        probe.step(lambda: mse(probe_model, b))
        torch.set_rng_state(state)
        if guard.pending and probe.last_choice != held: break   # on this batch the candidate evaluated first wins
        guard.step(lambda: mse(model, b))
    else: pytest.fail('the provisional candidate won every decision')
    before = everything(model, guard)
    fail[0] = True
    with pytest.raises(Boom): guard.step(lambda: mse(model, b))
    assert_unchanged(before, everything(model, guard))
    fail[0] = False
    guard.step(lambda: mse(model, b))   # the retry is the step the probe took
    assert_same_tensors([*model.parameters(), *model.buffers()], [*probe_model.parameters(), *probe_model.buffers()])
    assert guard.history[-1]['forward'] == 2 + (shadow is not None)   # no third forward (the shadow run has its own)


@pytest.mark.parametrize('guard_cls', GUARDS)
def test_torch_optim_closure_convention_is_refused_in_one_line_before_anything_changes(guard_cls):
    "zero_grad(); loss.backward(); return loss -- LBFGS's and Lightning's automatic-optimization closure"
    model = small_net()
    guard = guard_cls(ADAM(model.parameters()), SGD(model.parameters()))
    batches = regression_batches(3)
    guard.step(lambda: mse(model, batches[0]))
    assert guard.pending

    def torch_closure():
        guard.zero_grad()
        loss = mse(model, batches[1])
        loss.backward()
        return loss

    before = everything(model, guard)
    with pytest.raises(ValueError, match='called backward') as e: guard.step(torch_closure)
    assert '\n' not in str(e.value) and 'manual optimization' in str(e.value)
    assert_unchanged(before, everything(model, guard))
    # on a guard with no pending decision (the first step) too
    fresh = guard_cls(ADAM(model.parameters()), SGD(model.parameters()))
    with pytest.raises(ValueError, match='called backward'): fresh.step(torch_closure)


class FailingAfter(torch.optim.SGD):
    "An optimizer whose step raises halfway, after writing into its state and the parameters"
    def __init__(self, params, fail=False, **kw):
        super().__init__(params, **kw)
        self.fail = fail

    def step(self, closure=None):
        super().step(closure)
        if self.fail: raise Boom()


@pytest.mark.parametrize('which', ['learned', 'fallback'])
def test_an_optimizer_failing_inside_its_step_changes_nothing(which):
    model = small_net()
    learned = FailingAfter(model.parameters(), lr=0.1, momentum=0.9)
    fallback = FailingAfter(model.parameters(), lr=0.05, momentum=0.5)
    guard = LossGuard(learned, fallback)
    batches = regression_batches(4)
    for b in batches[:2]: guard.step(lambda: mse(model, b))
    getattr(guard, which).fail = True
    before = everything(model, guard)
    with pytest.raises(Boom): guard.step(lambda: mse(model, batches[2]))
    assert_unchanged(before, everything(model, guard))


class Lookahead(torch.optim.Optimizer):
    "A wrapper optimizer as users bring them (Zhang et al., NeurIPS 2019): its state lives in the inner optimizer and in its own slow weights"
    def __init__(self, inner, k=2, alpha=0.5):
        self.inner, self.k, self.alpha, self.calls = inner, k, alpha, 0
        self.param_groups, self.defaults, self.state = inner.param_groups, inner.defaults, inner.state
        self.slow = [p.detach().clone() for g in inner.param_groups for p in g['params']]
        for kind in ('step_pre', 'step_post', 'state_dict_pre', 'state_dict_post', 'load_state_dict_pre', 'load_state_dict_post'):
            setattr(self, f'_optimizer_{kind}_hooks', OrderedDict())

    @torch.no_grad()
    def step(self, closure=None):
        self.inner.step()
        self.calls += 1
        if self.calls % self.k == 0:
            for s, p in zip(self.slow, (p for g in self.param_groups for p in g['params'])):
                s.add_(p - s, alpha=self.alpha); p.copy_(s)


def test_a_wrapper_optimizers_inner_state_is_restored_when_a_step_fails():
    "A failed step puts back what a wrapper optimizer keeps beside `state`: its inner optimizer's state and its own attributes"
    model = small_net()
    learned = FailingAfter(model.parameters(), lr=0.1, momentum=0.9)
    guard = LossGuard(learned, Lookahead(torch.optim.Adam(model.parameters(), lr=0.01)))
    batches = regression_batches(4)
    for b in batches[:3]: guard.step(lambda: mse(model, b))
    learned.fail = True   # after the fallback's step: the wrapper has moved its inner Adam, its counter and maybe its slow weights
    before = everything(model, guard), copy.deepcopy(guard.fallback.inner.state_dict()), guard.fallback.calls, [s.clone() for s in guard.fallback.slow]
    with pytest.raises(Boom): guard.step(lambda: mse(model, batches[3]))
    assert_unchanged(before[0], everything(model, guard))
    assert_same_state(before[1]['state'], guard.fallback.inner.state_dict()['state'])
    assert guard.fallback.calls == before[2]
    assert_same_tensors(before[3], guard.fallback.slow)


def test_a_failed_check_after_the_proposals_restores_both_optimizers_states():
    "Both candidates non-finite: before, the optimizers' states had advanced; now the step is undone entirely"
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    guard = LossGuard(torch.optim.SGD([w], lr=3e38, momentum=0.9), torch.optim.SGD([w], lr=3e38, momentum=0.5))
    before_f = copy.deepcopy(guard.fallback.state_dict())
    with pytest.raises(FloatingPointError, match='both candidates'): guard.step(lambda: (w ** 2).sum() * 100)
    assert torch.equal(w.detach(), torch.tensor([1.0, 2.0]))
    assert guard.fallback.state_dict() == before_f and not guard.learned.state


# 2. parameters that take no part in a step are left alone ------------------------------------------------------------

class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 1), nn.Linear(6, 1)

    def forward(self, x, head):
        return getattr(self, head)(torch.tanh(self.body(x)))


def head_loss(model, batch, head): return nn.functional.mse_loss(model(batch[0], head), batch[1])


@pytest.mark.parametrize('learned', ['adam', 'lstm-mnist'])
def test_an_unused_head_does_not_move(learned):
    "Head b used for 4 steps, then only head a: plain SGD(momentum, weight decay) leaves b alone, and so must the guard"
    model = TwoHeads()
    learned_opt = ADAM(model.parameters()) if learned == 'adam' else LearnedOptimizer(model.parameters(), load_pretrained(learned))
    guard = LossGuard(learned_opt, SGD(model.parameters()))
    batches = regression_batches(8)
    for b in batches[:4]: guard.step(lambda: head_loss(model, b, 'b'))
    guard.step(lambda: head_loss(model, batches[4], 'a'))   # decides the last head-b step
    held_b = [p.detach().clone() for p in model.b.parameters()]
    for b in batches[5:]: guard.step(lambda: head_loss(model, b, 'a'))
    assert_same_tensors(model.b.parameters(), held_b)
    assert all(p.grad is None for p in model.b.parameters())


def test_unused_parameters_follow_the_plain_loop_exactly():
    batches = regression_batches(8)
    heads = ['b'] * 4 + ['a'] * 4
    plain, guarded = TwoHeads(), TwoHeads()
    opt = SGD(plain.parameters())
    for b, h in zip(batches, heads):
        opt.zero_grad(); head_loss(plain, b, h).backward(); opt.step()
    guard = same_twice(SGD, guarded)
    for b, h in zip(batches, heads): guard.step(lambda: head_loss(guarded, b, h))
    assert_same_tensors(plain.parameters(), guarded.parameters())
    assert_same_state(opt.state_dict()['state'], fallback_state(guard))
    assert_same_tensors([p.grad for p in plain.parameters()], [p.grad for p in guarded.parameters()])


def test_freezing_and_unfreezing_after_the_guard_is_built_follows_the_plain_loop():
    "Gradual unfreezing in fine-tuning: requires_grad is read at every step"
    batches = regression_batches(12)
    def schedule(model, i):
        model[0].weight.requires_grad_(i >= 8)   # frozen from the start until step 8
        model[2].bias.requires_grad_(i < 4)      # trained for 4 steps, then frozen

    plain, guarded = small_net(), small_net()
    opt = ADAM(plain.parameters())
    for i, b in enumerate(batches):
        schedule(plain, i)
        opt.zero_grad(); mse(plain, b).backward(); opt.step()
    guard = same_twice(ADAM, guarded)
    for i, b in enumerate(batches):
        schedule(guarded, i)
        guard.step(lambda: mse(guarded, b))
    assert_same_tensors(plain.parameters(), guarded.parameters())
    assert_same_state(opt.state_dict()['state'], fallback_state(guard))


def test_a_layer_unfrozen_later_starts_at_its_own_step_count_as_in_torch_optim():
    "torch.optim counts steps per parameter: a vector unfrozen at step 5 gets Adam's bias correction of step 1, also from a learned optimizer"
    # CeloNet moves vectors by Adam's step (eps inside the root; no schedule here), so torch.optim.Adam is its reference loop
    net = build_net('celo', hidden=4, layers=1, decays=(0.9,), beta2=0.999, lr_1d=0.01, timescales=(), eps=1e-8)
    start = [torch.randn(5, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]

    def run(make_opt):
        a, b = (nn.Parameter(t.clone()) for t in start)
        opt = make_opt([a, b])
        for i in range(12):
            b.requires_grad_(i >= 5)   # frozen for the first 5 steps
            opt.zero_grad()
            loss = ((a - 1) ** 2).sum() + ((3 * (b + 2) ** 2).sum() if b.requires_grad else 0)
            loss.backward(); opt.step()
        return [a.detach(), b.detach()], [float(opt.state[p]['step']) for p in (a, b)]

    (got, got_steps), (want, want_steps) = run(lambda ps: LearnedOptimizer(ps, net)), run(lambda ps: torch.optim.Adam(ps, lr=0.01))
    assert got_steps == want_steps == [12.0, 7.0]
    for g, w in zip(got, want): torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_a_learned_optimizer_with_frozen_layers_moves_only_the_trainable_ones():
    model = small_net()
    model[0].requires_grad_(False)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    guard = LossGuard(LearnedOptimizer(model.parameters(), load_pretrained('lstm-mnist')), SGD(model.parameters()))
    guarded_run(model, guard, regression_batches(6))
    assert_same_tensors(model[0].parameters(), frozen)
    assert sum(guard.counts.values()) == 5


# 3. buffers and random state --------------------------------------------------------------------------------------------

@pytest.mark.parametrize('guard_kw', [dict(compare='next'), dict(compare='same'), dict(compare='next', cls=GradientGuard)])
def test_batchnorm_tracks_one_batch_per_step(guard_kw):
    kw = dict(guard_kw)
    cls = kw.pop('cls', LossGuard)
    model = small_net(bn=True)
    guard = cls(ADAM(model.parameters()), SGD(model.parameters()), **kw)
    guarded_run(model, guard, regression_batches(10))
    assert model[1].num_batches_tracked.item() == 10


@pytest.mark.parametrize('compare', ['next', 'same'])
def test_batchnorm_and_dropout_follow_the_plain_loop(compare):
    "Running statistics, dropout masks and the random stream afterwards are the plain loop's"
    batches = regression_batches(10)
    plain, guarded = small_net(bn=True, dropout=0.3), small_net(bn=True, dropout=0.3)
    torch.manual_seed(7)
    plain_run(plain, SGD(plain.parameters()), batches)
    after_plain = torch.rand(3)
    torch.manual_seed(7)
    guard = same_twice(SGD, guarded, compare=compare)
    guarded_run(guarded, guard, batches)
    assert_same_tensors(plain.parameters(), guarded.parameters())
    assert_same_tensors(plain.buffers(), guarded.buffers())
    assert torch.equal(after_plain, torch.rand(3))


def test_both_candidates_of_a_decision_see_the_same_dropout_masks():
    "Two equal candidates evaluated under the same masks have bit-equal losses; unpaired masks would differ"
    model = small_net(dropout=0.5)
    guard = same_twice(ADAM, model, record=True)
    guarded_run(model, guard, regression_batches(8))
    decided = [h for h in guard.history if 'choice' in h]
    assert len(decided) == 7
    assert all(h['loss_learned'] == h['loss_fallback'] and h['choice'] == 'fallback' for h in decided)


@pytest.mark.parametrize('keep_both_graphs', [True, False])
def test_the_chosen_candidates_graph_forward_reproduces_its_evaluation(keep_both_graphs):
    "When the provisional candidate lost, the graph the winner's gradient comes from (kept, or a third forward) has the evaluation's masks"
    model = small_net(dropout=0.5)
    guard = LossGuard(torch.optim.SGD(model.parameters(), lr=0.3), torch.optim.SGD(model.parameters(), lr=0.01), record=True,
                      keep_both_graphs=keep_both_graphs)
    guarded_run(model, guard, regression_batches(12))
    held = [None, 'fallback'] + [h.get('choice') for h in guard.history[1:-1]]
    switched = [h for h, p in zip(guard.history, held) if 'choice' in h and h['choice'] != p]
    assert switched, 'no step where the provisional candidate lost'
    for h in switched: assert h['loss'] == pytest.approx(h['loss_' + h['choice']], rel=1e-6)


# 4. the habits of a training loop --------------------------------------------------------------------------------------

def test_gradient_clipping_through_grad_hook_follows_the_plain_loop():
    batches = regression_batches(8)
    plain, guarded = small_net(), small_net()
    clip = lambda m: nn.utils.clip_grad_norm_(m.parameters(), 0.05)
    plain_run(plain, SGD(plain.parameters()), batches, before_step=clip)
    guard = same_twice(SGD, guarded, grad_hook=lambda ps: nn.utils.clip_grad_norm_(ps, 0.05))
    guarded_run(guarded, guard, batches)
    assert_same_tensors(plain.parameters(), guarded.parameters(), exact=False)
    unclipped = small_net()
    guarded_run(unclipped, same_twice(SGD, unclipped), batches)
    assert not torch.allclose(unclipped[0].weight, guarded[0].weight)


def test_autocast_around_the_step_evaluates_each_candidate_at_its_own_weights():
    "autocast caches low-precision copies of the weights; the guard must not compare two candidates through one copy"
    model = small_net()
    guard = LossGuard(torch.optim.SGD(model.parameters(), lr=0.2), torch.optim.SGD(model.parameters(), lr=0.001), record=True)
    for b in regression_batches(10):
        with torch.autocast('cpu', dtype=torch.bfloat16): guard.step(lambda: mse(model, b))
    decided = [h for h in guard.history if 'choice' in h]
    assert sum(h['loss_learned'] != h['loss_fallback'] for h in decided) >= len(decided) - 1
    assert guard.counts['learned'] > 0


def test_bf16_autocast_inside_the_closure_follows_the_plain_loop():
    batches = regression_batches(6)
    plain, guarded = small_net(), small_net()
    def amp_loss(model, b):
        with torch.autocast('cpu', dtype=torch.bfloat16): return mse(model, b)
    plain_run(plain, ADAM(plain.parameters()), batches, loss=amp_loss)
    guarded_run(guarded, same_twice(ADAM, guarded), batches, loss=amp_loss)
    assert_same_tensors(plain.parameters(), guarded.parameters())


def test_grad_scaler_is_refused_in_one_line_and_changes_nothing():
    model = small_net()
    guard = LossGuard(ADAM(model.parameters()), SGD(model.parameters()))
    batches = regression_batches(3)
    guard.step(lambda: mse(model, batches[0]))
    scaler = torch.amp.GradScaler('cpu')
    scaler.scale(mse(model, batches[1]))   # a loop written for a scaler scales its loss
    before = everything(model, guard)
    with pytest.raises(RuntimeError, match='GradScaler') as e: scaler.step(guard, lambda: mse(model, batches[1]))
    assert '\n' not in str(e.value) and 'bfloat16' in str(e.value)
    assert_unchanged(before, everything(model, guard))
    assert not hasattr(guard, 'found_inf')
    guard.step(lambda: mse(model, batches[1]))   # the guard still works without the scaler


def test_gradient_accumulation_over_micro_batches_follows_the_plain_loop():
    "The closure returns the mean of the micro-batch losses; the plain loop calls backward on each loss / k"
    micro, k = regression_batches(12, batch=8), 3
    steps = [micro[i:i + k] for i in range(0, len(micro), k)]
    plain, guarded = small_net(bn=True), small_net(bn=True)
    opt = SGD(plain.parameters())
    for group in steps:
        opt.zero_grad()
        for b in group: (mse(plain, b) / k).backward()
        opt.step()
    guard = same_twice(SGD, guarded)
    for group in steps: guard.step(lambda: sum(mse(guarded, b) for b in group) / k)
    assert_same_tensors(plain.parameters(), guarded.parameters(), exact=False)
    assert_same_tensors(plain.buffers(), guarded.buffers(), exact=False)


@pytest.mark.parametrize('which', ['learned', 'fallback'])
def test_an_optimizer_that_needs_a_closure_is_refused_in_one_line(which):
    model = small_net()
    opts = dict(learned=ADAM(model.parameters()), fallback=SGD(model.parameters()))
    opts[which] = torch.optim.LBFGS(model.parameters())
    with pytest.raises(TypeError, match='first-order optimizer') as e: LossGuard(**opts)
    assert '\n' not in str(e.value) and 'LBFGS' in str(e.value)


# 6. the rest of the Optimizer protocol --------------------------------------------------------------------------------

@pytest.mark.parametrize('guard_cls', GUARDS)
def test_state_dict_hooks_run_as_in_torch_optim(guard_cls):
    model = small_net()
    guard = guard_cls(ADAM(model.parameters()), SGD(model.parameters()))
    guarded_run(model, guard, regression_batches(3))
    calls = []
    guard.register_state_dict_pre_hook(lambda opt: calls.append(('pre', opt is guard)))
    guard.register_state_dict_post_hook(lambda opt, sd: {**sd, 'note': 'added'})
    guard.register_load_state_dict_pre_hook(lambda opt, sd: calls.append(('load_pre', sd.get('note'))))
    guard.register_load_state_dict_post_hook(lambda opt: calls.append(('load_post', opt is guard)))
    sd = guard.state_dict()
    assert sd['note'] == 'added'
    guard.load_state_dict(sd)
    assert calls == [('pre', True), ('load_pre', 'added'), ('load_post', True)]


def embedding_model(sparse):
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(20, 4, sparse=sparse), nn.Flatten(), nn.Linear(12, 1))


def token_batches(n=8):
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 20, (16, 3), generator=g), torch.randn(16, 1, generator=g)) for _ in range(n)]


def test_sparse_gradients_follow_the_plain_loop():
    "nn.Embedding(sparse=True) under a guard over two sparse-capable optimizers"
    batches = token_batches()
    plain, guarded = embedding_model(True), embedding_model(True)
    plain_run(plain, torch.optim.SGD(plain.parameters(), lr=0.1), batches)
    guard = same_twice(functools.partial(torch.optim.SGD, lr=0.1), guarded)
    guarded_run(guarded, guard, batches)
    assert_same_tensors(plain.parameters(), guarded.parameters())
    assert guarded[0].weight.grad.is_sparse
    other = embedding_model(True)
    both = LossGuard(torch.optim.Adagrad(other.parameters(), lr=0.1), torch.optim.SGD(other.parameters(), lr=0.1))
    guarded_run(other, both, batches)
    assert sum(both.counts.values()) == len(batches) - 1
    gg = GradientGuard(torch.optim.Adagrad(other.parameters(), lr=0.1), torch.optim.SGD(other.parameters(), lr=0.1))
    guarded_run(other, gg, batches)
    assert sum(gg.counts.values()) == len(batches) - 1


def test_a_learned_optimizer_refuses_sparse_gradients_with_its_own_message_and_nothing_changes():
    model = embedding_model(True)
    guard = LossGuard(LearnedOptimizer(model.parameters(), load_pretrained('lstm-mnist')), torch.optim.SGD(model.parameters(), lr=0.1))
    before = everything(model, guard)
    with pytest.raises(RuntimeError, match='LearnedOptimizer does not support sparse gradients') as e:
        guard.step(lambda: mse(model, token_batches(1)[0]))
    assert '\n' not in str(e.value) and 'sparse=False' in str(e.value)
    assert_unchanged(before, everything(model, guard))
    dense = embedding_model(False)   # the fix the message names works
    guarded_run(dense, LossGuard(LearnedOptimizer(dense.parameters(), load_pretrained('lstm-mnist')),
                                 torch.optim.SGD(dense.parameters(), lr=0.1)), token_batches(3))


def test_complex_parameters_follow_the_plain_loop():
    target = torch.randn(5, dtype=torch.complex64, generator=torch.Generator().manual_seed(1))
    w_plain = nn.Parameter(torch.randn(5, dtype=torch.complex64, generator=torch.Generator().manual_seed(0)))
    w_guard = nn.Parameter(w_plain.detach().clone())
    loss = lambda w: (w - target).abs().pow(2).sum()
    opt = ADAM([w_plain])
    for _ in range(6):
        opt.zero_grad(); loss(w_plain).backward(); opt.step()
    guard = LossGuard(ADAM([w_guard]), ADAM([w_guard]))
    for _ in range(6): guard.step(lambda: loss(w_guard))
    assert torch.equal(w_plain.detach(), w_guard.detach())


@pytest.mark.parametrize('dtype', [torch.complex64, torch.float16, torch.bfloat16, torch.float64])
def test_a_learned_optimizer_refuses_parameters_it_cannot_update_with_a_fix_that_works(dtype):
    "Every refusal names a fix that works: float64 by converting the net; complex and half precision otherwise"
    w = nn.Parameter(torch.ones(3, dtype=dtype))
    with pytest.raises(TypeError) as e: LearnedOptimizer([w], build_net('lstm'))
    msg = str(e.value)
    assert '\n' not in msg
    if dtype == torch.float64:
        assert 'net.to(torch.float64)' in msg
        opt = LearnedOptimizer([w], build_net('lstm').to(dtype))
        w.grad = torch.ones_like(w)
        opt.step()
        assert torch.isfinite(w).all()
    else: assert ('view_as_complex' if dtype.is_complex else 'torch.autocast') in msg and 'net.to' not in msg


def test_sharded_parameters_are_refused_in_one_line():
    w = nn.Parameter(torch.ones(3))
    w._fsdp_flattened = True   # what FSDP marks its flattened parameters with
    with pytest.raises(TypeError, match='DistributedDataParallel'): LossGuard(ADAM([w]), SGD([w]))


# found by trying to break it -------------------------------------------------------------------------------------------

def test_add_param_group_takes_a_generator_as_torch_optim_does():
    body, head = nn.Linear(3, 3), nn.Linear(3, 1)
    guard = LossGuard(torch.optim.SGD(head.parameters(), lr=0.1), torch.optim.SGD(head.parameters(), lr=0.1))
    guard.add_param_group({'params': body.parameters()})
    assert len(guard.param_groups[1]['params']) == 2 and len(guard.learned.param_groups[1]['params']) == 2
    w = body.weight.detach().clone()
    x = torch.randn(4, 3)
    for _ in range(3): guard.step(lambda: head(body(x)).pow(2).mean())
    assert not torch.equal(w, body.weight)


def test_writes_through_p_data_between_steps_drop_the_pending_decision():
    "Weight clipping as in WGAN (p.data.clamp_) leaves no version behind; the guard must still see it"
    def run(guarded):
        w = nn.Parameter(torch.tensor([1.0]))
        opt = same_twice(functools.partial(torch.optim.SGD, lr=0.1), nn.ParameterList([w])) if guarded else torch.optim.SGD([w], lr=0.1)
        for _ in range(3):
            if guarded: opt.step(lambda: (w ** 2).sum())
            else: opt.zero_grad(); (w ** 2).sum().backward(); opt.step()
            w.data.clamp_(-0.01, 0.01)
        return w.detach()
    assert torch.equal(run(True), run(False))


def test_parameters_renormalised_inside_the_forward_follow_the_plain_loop():
    "nn.Embedding(max_norm=...) renormalises its rows in place during the forward"
    def run(guarded):
        torch.manual_seed(0)
        m = nn.Embedding(5, 3, max_norm=1.0)
        make = functools.partial(torch.optim.SGD, lr=2.0)
        opt = same_twice(make, m) if guarded else make(m.parameters())
        idx = torch.tensor([0, 1, 2])
        for _ in range(4):
            closure = lambda: (m(idx) - 5).pow(2).mean()
            if guarded: opt.step(closure)
            else: opt.zero_grad(); closure().backward(); opt.step()
        return m.weight.detach()
    assert torch.equal(run(True), run(False))


def sparse_embedding_beside(guard_cls, device='cpu'):
    "A SparseAdam embedding beside a head under `guard_cls` over SGD twice, and the plain loop: both runs' embedding and head weights"
    def run(guarded):
        torch.manual_seed(0)
        emb, head = nn.Embedding(10, 4, sparse=True).to(device), nn.Linear(4, 1).to(device)
        sparse_opt = torch.optim.SparseAdam(emb.parameters(), lr=0.1)
        make = functools.partial(torch.optim.SGD, lr=0.1)
        dense = guard_cls(make(head.parameters()), make(head.parameters())) if guarded else make(head.parameters())
        idx, y = torch.tensor([1, 2, 3], device=device), torch.ones(3, 1, device=device)
        for _ in range(3):
            closure = lambda: nn.functional.mse_loss(head(emb(idx)), y)
            sparse_opt.zero_grad()
            if guarded: dense.step(closure)
            else: dense.zero_grad(); closure().backward(); dense.step()
            sparse_opt.step()
        return emb.weight.detach(), head.weight.detach()
    return run(False), run(True)


@pytest.mark.parametrize('guard_cls', GUARDS)
def test_leaves_outside_the_guard_get_their_gradient_as_in_the_plain_loop(guard_cls):
    "A sparse embedding trained by SparseAdam beside a guarded head, and an input gradient (saliency, FGSM)"
    plain, guarded = sparse_embedding_beside(guard_cls)
    assert torch.equal(plain[0], guarded[0])
    if guard_cls is LossGuard: assert torch.equal(plain[1], guarded[1])
    x = torch.randn(4, 3, requires_grad=True)
    m = nn.Linear(3, 1)
    guard_cls(ADAM(m.parameters()), SGD(m.parameters())).step(lambda: m(x).pow(2).mean())
    assert x.grad is not None


class ReplacesBuffer(nn.Module):
    "Keeps the last output in a buffer by replacing the buffer object, not writing into it"
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.register_buffer('last', torch.zeros(0))

    def forward(self, x):
        self.last = x.detach()   # aliases the caller's batch
        return self.lin(x)


def test_a_replaced_buffer_is_put_back_without_writing_into_the_new_object():
    m = ReplacesBuffer()
    guard = same_twice(functools.partial(torch.optim.SGD, lr=0.1), m)
    batches = [torch.full((n, 4), float(i)) for i, n in enumerate((8, 8, 5, 8))]   # a smaller last-but-one batch
    kept = [b.clone() for b in batches]
    for b in batches: guard.step(lambda: m(b).pow(2).mean())
    assert all(torch.equal(a, b) for a, b in zip(batches, kept))   # the user's batches are untouched
    assert sum(guard.counts.values()) == 3


def test_a_closure_that_differentiates_inside_is_evaluated_with_a_graph():
    "A PINN residual (torch.autograd.grad in the loss) under a guard over one optimizer twice follows the plain loop"
    x = torch.linspace(0, 1, 16).unsqueeze(1).requires_grad_()
    def residual(u):
        du = torch.autograd.grad(u(x).sum(), x, create_graph=True)[0]
        return (du - torch.cos(x)).pow(2).mean()
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    a, b = net(), net()
    opt = ADAM(a.parameters())
    for _ in range(4):
        opt.zero_grad(); residual(a).backward(); opt.step()
    guard = same_twice(ADAM, b)
    for _ in range(4): guard.step(lambda: residual(b))
    assert_same_tensors(a.parameters(), b.parameters())


def test_a_failed_call_restores_a_parameter_frozen_while_a_decision_was_pending():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    fail = [False]
    def hook(params):
        if fail[0]: raise Boom()
    guard = LossGuard(torch.optim.SGD([a, b], lr=0.5), torch.optim.SGD([a, b], lr=0.01), grad_hook=hook)
    loss = lambda: (a - 1).pow(2).sum() + (b - 1).pow(2).sum()
    guard.step(loss)
    b.requires_grad_(False)
    fail[0] = True
    held = (a.item(), b.item())
    with pytest.raises(Boom): guard.step(loss)
    assert (a.item(), b.item()) == held and guard.pending


def test_a_failed_call_restores_values_an_optimizer_keeps_in_its_param_groups():
    "Prodigy, D-Adaptation and schedule-free keep running values in param_groups"
    class CountingSGD(torch.optim.SGD):
        def step(self, closure=None):
            for g in self.param_groups: g['k'] = g.get('k', 0) + 1; g['lr'] = 0.1 / g['k']
            return super().step(closure)
    w = nn.Parameter(torch.ones(3))
    guard = LossGuard(CountingSGD([w], lr=0.1), CountingSGD([w], lr=0.1), compare='same')
    guard.step(lambda: (w ** 2).sum())
    before = [dict(g, params=None) for g in guard.fallback.param_groups + guard.learned.param_groups]
    calls = [0]
    def closure():
        calls[0] += 1
        if calls[0] == 2: raise Boom()
        return (w ** 2).sum()
    with pytest.raises(Boom): guard.step(closure)
    assert [dict(g, params=None) for g in guard.fallback.param_groups + guard.learned.param_groups] == before


@pytest.mark.parametrize('compare', ['next', 'same'])
def test_a_backward_inside_the_closure_is_caught_when_gradients_already_exist(compare):
    "Accumulating into an existing p.grad keeps the object: the guard must still see the backward"
    torch.manual_seed(0)
    m = nn.Linear(3, 1)
    x = torch.randn(4, 3)
    guard = LossGuard(torch.optim.SGD(m.parameters(), lr=0.1), torch.optim.SGD(m.parameters(), lr=0.05), compare=compare)
    guard.step(lambda: m(x).pow(2).mean())
    before = everything(m, guard)
    def closure():
        loss = m(x).pow(2).mean(); loss.backward(); return loss
    with pytest.raises(ValueError, match='called backward'): guard.step(closure)
    assert_unchanged(before, everything(m, guard))


def test_a_copy_of_a_guard_with_a_scheduler_steps_only_itself_and_pickles():
    import io
    torch.manual_seed(0)
    m = nn.Linear(3, 1)
    x = torch.randn(4, 3)
    guard = LossGuard(torch.optim.SGD(m.parameters(), lr=0.1), torch.optim.SGD(m.parameters(), lr=0.1))
    torch.optim.lr_scheduler.StepLR(guard, step_size=10)
    guard.register_step_post_hook(lambda *a: None)
    m2, guard2 = copy.deepcopy((m, guard))
    guard2.step(lambda: m2(x).pow(2).mean())
    assert guard.steps == 0 and not guard.pending and guard2.steps == 1
    torch.save(guard, io.BytesIO())


def test_torch_draws_in_the_closure_follow_the_plain_loop():
    "Noise drawn with torch inside the closure: both candidates see the same draw, and the stream is the plain loop's"
    def run(guarded):
        torch.manual_seed(0)
        m = nn.Linear(3, 1)
        x, y = torch.randn(8, 3), torch.randn(8, 1)
        make = functools.partial(torch.optim.SGD, lr=0.1)
        opt = same_twice(make, m) if guarded else make(m.parameters())
        for _ in range(4):
            closure = lambda: nn.functional.mse_loss(m(x + 0.1 * torch.randn(8, 3)), y)
            if guarded: opt.step(closure)
            else: opt.zero_grad(); closure().backward(); opt.step()
        return m.weight.detach(), torch.rand(2)
    a, b = run(False), run(True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
