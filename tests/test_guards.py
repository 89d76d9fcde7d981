"""Behaviour of lgl2o.guards: Theorem 1 against adversaries, non-finite handling, the deferred comparison, checkpoints, costs."""
import copy
import io

import pytest
import torch
from hypothesis import example, HealthCheck, given, settings, strategies as st

from conftest import NBS
from lgl2o.guards import (ADVERSARIES, GradientGuard, Guard, LossGuard, MU_SCHEMES, check_same_params, theorem1_lr,
                          float64_quadratic as quadratic)
from lgl2o.tasks import MLPTask, QuadraticTask, spirals

GUARDS = [LossGuard, GradientGuard]


class NaNProposer(torch.optim.Optimizer):
    "Adversary: proposes NaN everywhere (or only in the entries of `mask` of the last parameter)"
    def __init__(self, params, value=float('nan'), only_last=False):
        super().__init__(params, {})
        self.value, self.only_last = value, only_last

    @torch.no_grad()
    def step(self, closure=None):
        ps = [p for g in self.param_groups for p in g['params']]
        for p in ps[-1:] if self.only_last else ps: p.view(-1)[0] = self.value


class GradScribbler(torch.optim.SGD):
    "Adversary: an SGD that overwrites p.grad with garbage after its step"
    @torch.no_grad()
    def step(self, closure=None):
        super().step()
        for g in self.param_groups:
            for p in g['params']: p.grad.mul_(-1e6)


def spiral_task():
    return MLPTask(data=spirals(n=256, n_test=64), hidden=(8,), batch_size=32, init_std=None)


def run_guard(guard, model, task, batches):
    losses = []
    for x, y in batches: losses.append(guard.step(lambda: task.loss(model, (x, y))).item())
    return losses


# --- the notebook's numbers ------------------------------------------------------------------------

def test_guards_notebook_results(run_notebook):
    "Theorem 1 on quadratics, which data decides on MNIST, and the cost of guarding the LSTM optimizer"
    _, r = run_notebook(NBS / '02_guards.ipynb')
    q = r['quadratic']
    assert set(q['final_distance']['LossGuard']) == {'diverging SGD', 'gradient ascent', 'NaN', 'untrained LSTM'}
    for adv in q['final_distance']['LossGuard']:
        assert q['final_distance']['LossGuard'][adv] < 1e-6 * q['initial_distance'], adv
        assert q['final_distance']['GradientGuard'][adv] < 1e-4 * q['initial_distance'], adv
        assert not q['final_distance']['learned alone'][adv] < 0.1 * q['initial_distance'], adv
    agg, good = r['mnist']['aggressive'], r['mnist']['good']
    assert agg['LossGuard (next)']['test_loss'] < 0.6 * agg['LossGuard (same)']['test_loss']   # same-batch keeps over-fitted steps
    assert good['LossGuard (next)']['test_loss'] < 1.1 * good['learned alone']['test_loss']    # keeps a good optimizer's speed
    for sc in (agg, good):   # LossGuard: one gradient per step; GradientGuard: up to two
        assert sc['LossGuard (next)']['backward_per_step'] == 1.0
        assert sc['LossGuard (next)']['backward_per_step'] < sc['GradientGuard (same)']['backward_per_step']
    ratio = {(row['case'], row['method']): row['ratio to fallback alone'] for row in r['shadow']['table']}
    assert ratio['LSTM optimizer guarded by Adam', 'paper rule'] > 1.3 and ratio['LSTM optimizer guarded by Adam', 'shadow run'] <= 1.05
    t = r['timing']
    assert all(t[k]['ratio_to_unguarded'] > 0 for k in ('LossGuard', 'GradientGuard'))   # the figures exist; the target is lgl2o-bench's to print
    assert t['LossGuard']['evaluations']['backward'] < t['GradientGuard']['evaluations']['backward']


# --- Theorem 1: convergence whatever the learned optimizer proposes ----------------------------------

def _converges(guard_cls, adversary, dim, condition, seed, compare, steps, tol=1e-6, shadow=None):
    "Final distance / (1 + initial distance) after at most `steps` guarded steps (stopping once far below `tol`) and a resolve"
    q = quadratic(dim, condition, seed)
    m = q.init(seed).double()
    learned = ADVERSARIES[adversary](list(m.parameters()), q)
    fallback = torch.optim.SGD(m.parameters(), lr=theorem1_lr(q.mu, q.L))
    guard = guard_cls(learned, fallback, compare=compare, shadow=shadow)
    closure = lambda: q.loss(m, (None, None))
    scale = 1 + (m.w.detach() - q.minimizer).norm().item()
    for _ in range(steps):
        guard.step(closure)
        assert torch.isfinite(m.w).all()
        if (m.w.detach() - q.minimizer).norm().item() < 1e-3 * tol * scale: break
    guard.resolve(closure)
    return (m.w.detach() - q.minimizer).norm().item() / scale


@pytest.mark.parametrize('guard_cls', GUARDS, ids=lambda c: c.__name__)
@pytest.mark.parametrize('adversary', ['diverging SGD', 'gradient ascent', 'NaN'])
@pytest.mark.parametrize('shadow', [None, 0.02], ids=['paper-rule', 'shadow'])
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dim=st.integers(1, 8), condition=st.floats(1.0, 8.0), seed=st.integers(0, 10**5), compare=st.sampled_from(['next', 'same']))
def test_theorem1_convergence(guard_cls, adversary, shadow, dim, condition, seed, compare):
    "A GD fallback inside Theorem 1's step range makes both guards converge to the minimiser"
    # LossGuard does at least as well per step as GD (~kappa steps per e-fold). GL2O has no such rate: it lets adversarial
    # steps through while the gradient norm is below mu, a level that only falls on accepted steps, so it gets a larger budget.
    steps = int(25 * condition) + 40 if guard_cls is LossGuard else int(300 * condition) + 1000
    assert _converges(guard_cls, adversary, dim, condition, seed, compare, steps, shadow=shadow) <= 1e-6


@pytest.mark.parametrize('guard_cls', GUARDS, ids=lambda c: c.__name__)
@pytest.mark.parametrize('shadow', [None, 0.02], ids=['paper-rule', 'shadow'])
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dim=st.integers(1, 6), condition=st.floats(1.0, 5.0), seed=st.integers(0, 10**5))
@example(dim=6, condition=1.05, seed=0)   # GL2O's slowest case found so far: 2.7e-4 after 1315 steps
def test_theorem1_untrained_lstm(guard_cls, shadow, dim, condition, seed):
    "The same against Andrychowicz et al.'s LSTM optimizer with random weights"
    steps = int(25 * condition) + 40 if guard_cls is LossGuard else int(300 * condition) + 1000
    # GL2O converges without a rate: the LSTM's tiny steps pass its test for long stretches, so it gets a looser bound
    assert _converges(guard_cls, 'untrained LSTM', dim, condition, seed, 'next', steps, shadow=shadow) <= (1e-6 if guard_cls is LossGuard else 1e-3)


# --- non-finite candidates and losses ----------------------------------------------------------------

@pytest.mark.parametrize('guard_cls', GUARDS, ids=lambda c: c.__name__)
@pytest.mark.parametrize('compare', ['next', 'same'])
@pytest.mark.parametrize('value', [float('nan'), float('inf')])
def test_nonfinite_candidate_never_accepted(guard_cls, compare, value):
    "Even a single NaN/inf entry in a parameter the loss does not use disqualifies a candidate"
    task = spiral_task()
    model = task.init(0)
    unused = torch.nn.Parameter(torch.zeros(3))          # the loss never sees it: only a parameter check can catch it
    params = [*model.parameters(), unused]
    guard = guard_cls(NaNProposer(params, value, only_last=True), torch.optim.SGD(params, lr=0.5), compare=compare, record=True)
    batches = task.batches(0)
    for _ in range(8):
        x, y = next(batches)
        guard.step(lambda: task.loss(model, (x, y)))
        assert all(torch.isfinite(p).all() for p in params)
    x, y = next(batches)
    guard.resolve(lambda: task.loss(model, (x, y)))
    assert guard.counts == {'learned': 0, 'fallback': 8}
    assert all(h['choice'] == 'fallback' for h in guard.history if 'choice' in h)


@pytest.mark.parametrize('guard_cls', GUARDS, ids=lambda c: c.__name__)
def test_nonfinite_loss_raises_and_leaves_params(guard_cls):
    task = spiral_task()
    model = task.init(0)
    guard = guard_cls(torch.optim.SGD(model.parameters(), lr=3.0), torch.optim.SGD(model.parameters(), lr=0.5))
    x, y = next(task.batches(0))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match='the loss at the current parameters is nan'):
        guard.step(lambda: task.loss(model, (x, y)) * float('nan'))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    # deferred: both candidates' losses on the next minibatch are non-finite -> raise, parameters stay at the provisional one
    guard.step(lambda: task.loss(model, (x, y)))
    held = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match='left as they were'):
        guard.step(lambda: task.loss(model, (x, y)) + float('inf'))
    assert all(torch.equal(p, h) for p, h in zip(model.parameters(), held))


@pytest.mark.parametrize('guard_cls', GUARDS, ids=lambda c: c.__name__)
@pytest.mark.parametrize('compare', ['next', 'same'])
def test_both_candidates_nonfinite_raises(guard_cls, compare):
    task = spiral_task()
    model = task.init(0)
    guard = guard_cls(NaNProposer(model.parameters()), torch.optim.SGD(model.parameters(), lr=float('inf')), compare=compare)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = next(task.batches(0))
    with pytest.raises(FloatingPointError, match='both candidates have non-finite entries'):
        guard.step(lambda: task.loss(model, (x, y)))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_learned_writing_into_grad_cannot_corrupt_fallback():
    "The fallback steps first, from the pristine gradient"
    w = torch.nn.Parameter(torch.tensor([2.0]))
    guard = LossGuard(GradScribbler([w], lr=0.1), torch.optim.SGD([w], lr=0.25), compare='same')
    guard.step(lambda: (w ** 2).sum())   # gradient 4: fallback 2 - 1 = 1; learned 2 - 0.4 = 1.6
    assert guard.last_choice == 'fallback' and w.item() == pytest.approx(1.0)


# --- construction and arguments ------------------------------------------------------------------------

def test_mismatched_params_named():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r'2 only in learned \(shapes \(2, 3\), \(2,\)\), 2 only in fallback'):
        LossGuard(torch.optim.SGD(a.parameters()), torch.optim.SGD(b.parameters()))
    with pytest.raises(ValueError, match=r'0 only in learned \(shapes -\), 1 only in fallback \(shapes \(2,\)\)'):
        GradientGuard(torch.optim.SGD([a.weight]), torch.optim.SGD(a.parameters()))
    with pytest.raises(TypeError, match='fallback must be a torch.optim.Optimizer'):
        LossGuard(torch.optim.SGD(a.parameters()), a)
    opt = torch.optim.SGD(a.parameters())
    with pytest.raises(ValueError, match='same optimizer object'):
        LossGuard(opt, opt)
    assert len(check_same_params(torch.optim.Adam(a.parameters()), torch.optim.SGD(reversed(list(a.parameters()))))) == 2


@pytest.mark.parametrize('kwargs, message', [
    (dict(delta=0), 'delta must be a number strictly between 0 and 1'), (dict(delta=1.0), 'delta must be'),
    (dict(delta='0.1'), 'delta must be'), (dict(theta=0), 'theta must be'), (dict(theta=1.5), 'theta must be'),
    (dict(theta=float('nan')), 'theta must be'), (dict(scheme='EMA'), 'scheme must be one of'),
    (dict(window=0), 'window must be a positive integer'), (dict(window=2.0), 'window must be'),
    (dict(compare='previous'), "compare must be one of \\['next', 'same'\\]")])
def test_gradient_guard_argument_validation(kwargs, message):
    m = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match=message):
        GradientGuard(torch.optim.SGD(m.parameters(), lr=1.0), torch.optim.SGD(m.parameters(), lr=0.1), **kwargs)


def test_closure_errors():
    w = torch.nn.Parameter(torch.ones(2))
    guard = LossGuard(torch.optim.SGD([w], lr=1.0), torch.optim.SGD([w], lr=0.1))
    with pytest.raises(TypeError, match='needs a closure'): guard.step()
    with pytest.raises(TypeError, match='scalar tensor, got a tensor of shape \\(2,\\)'): guard.step(lambda: w * 2)
    with pytest.raises(TypeError, match='scalar tensor, got float'): guard.step(lambda: 1.0)
    with pytest.raises(ValueError, match='has no graph'): guard.step(lambda: (w ** 2).sum().detach())


@pytest.mark.parametrize('scheme, expected', [('ema', 0.5 * 0.4 + 0.5 * 1.0), ('geometric', 0.5), ('recent_term', 0.4), ('recent_max', 1.0)])
def test_mu_schemes(scheme, expected):
    "mu after one accepted residual 0.4 from mu = 1 (recent_max remembers mu_0 within its window)"
    w = torch.nn.Parameter(torch.ones(1))
    guard = GradientGuard(torch.optim.SGD([w], lr=0.1), torch.optim.SGD([w], lr=0.1), scheme=scheme, theta=0.5, window=2)
    guard.mu = 1.0; guard._recent.append(1.0)
    guard._update_mu(0.4)
    assert guard.mu == pytest.approx(expected)
    if scheme == 'recent_max':
        guard._update_mu(0.3)
        assert guard.mu == pytest.approx(0.4)   # mu_0 left the window of 2


# --- the torch.optim contract -------------------------------------------------------------------------

@pytest.mark.parametrize('guard_cls', GUARDS, ids=lambda c: c.__name__)
@pytest.mark.parametrize('compare', ['next', 'same'])
@pytest.mark.parametrize('model_first', [True, False])
@pytest.mark.parametrize('shadow', [None, 0.0], ids=['paper-rule', 'shadow'])
def test_state_dict_round_trip_continues_identically(guard_cls, compare, model_first, shadow):
    task = spiral_task()
    batches = task.batches(3)
    data = [next(batches) for _ in range(14)]

    def make(seed):
        m = task.init(seed)
        g = guard_cls(torch.optim.Adam(m.parameters(), lr=0.05), torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9), compare=compare, shadow=shadow)
        return m, g

    m1, g1 = make(0)
    run_guard(g1, m1, task, data[:7])
    buf = io.BytesIO()
    torch.save({'model': m1.state_dict(), 'guard': g1.state_dict()}, buf)
    tail1 = run_guard(g1, m1, task, data[7:])
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    m2, g2 = make(1)
    if model_first: m2.load_state_dict(ck['model']); g2.load_state_dict(ck['guard'])
    else: g2.load_state_dict(ck['guard']); m2.load_state_dict(ck['model'])
    tail2 = run_guard(g2, m2, task, data[7:])
    assert tail1 == tail2
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert (g1.counts, g1.steps, g1.pending, g1.evaluations, g1.resets) == (g2.counts, g2.steps, g2.pending, g2.evaluations, g2.resets)
    if guard_cls is GradientGuard: assert g1.mu == g2.mu
    with pytest.raises(ValueError, match="lacks \\['guard'\\]"): g2.load_state_dict({'learned': {}, 'fallback': {}})


@pytest.mark.parametrize('guard_cls', GUARDS, ids=lambda c: c.__name__)
@pytest.mark.parametrize('shadow', [None, 0.0], ids=['paper-rule', 'shadow'])
def test_deepcopy_of_model_and_guard_continues_identically(guard_cls, shadow):
    task = spiral_task()
    data = [b for b, _ in zip(task.batches(1), range(10))]
    m = task.init(0)
    g = guard_cls(torch.optim.Adam(m.parameters(), lr=0.05), torch.optim.SGD(m.parameters(), lr=0.5), shadow=shadow)
    run_guard(g, m, task, data[:5])
    m2, g2 = copy.deepcopy((m, g))
    assert g2.learned.param_groups[0]['params'][0] is next(m2.parameters())
    assert run_guard(g, m, task, data[5:]) == run_guard(g2, m2, task, data[5:])


@pytest.mark.parametrize('guard_cls', GUARDS, ids=lambda c: c.__name__)
def test_scheduler_decays_the_fallback(guard_cls):
    m = torch.nn.Linear(2, 1)
    learned, fallback = torch.optim.Adam(m.parameters(), lr=0.01), torch.optim.SGD(m.parameters(), lr=1.0)
    guard = guard_cls(learned, fallback)
    assert isinstance(guard, torch.optim.Optimizer) and guard.param_groups is fallback.param_groups
    sched = torch.optim.lr_scheduler.StepLR(guard, step_size=1, gamma=0.5)
    x, y = torch.randn(8, 2), torch.randn(8, 1)
    for _ in range(3):
        guard.step(lambda: torch.nn.functional.mse_loss(m(x), y)); sched.step()
    assert fallback.param_groups[0]['lr'] == pytest.approx(0.125) and learned.param_groups[0]['lr'] == 0.01
    fallback.load_state_dict(copy.deepcopy(fallback.state_dict()))   # replaces the fallback's group list ...
    assert guard.param_groups is fallback.param_groups                # ... and the guard follows it
    guard.zero_grad()
    assert all(p.grad is None for p in m.parameters())


def test_add_param_group_reaches_both():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    guard = LossGuard(torch.optim.SGD([a], lr=1.0), torch.optim.SGD([a], lr=0.1), compare='same')
    guard.add_param_group({'params': [b], 'lr': 0.2})
    assert guard.fallback.param_groups[1]['lr'] == 0.2 and guard.learned.param_groups[1]['params'][0] is b
    guard.step(lambda: (a ** 2).sum() + (b ** 2).sum())
    assert guard.last_choice == 'fallback' and torch.allclose(b, torch.full((3,), 0.6))


# --- which data decides -----------------------------------------------------------------------------

def _two_batch_guard(guard_cls=LossGuard, **kw):
    w = torch.nn.Parameter(torch.zeros(1))
    guard = guard_cls(torch.optim.SGD([w], lr=0.5), torch.optim.SGD([w], lr=0.05), record=True, **kw)
    return w, guard, (lambda: ((w - 1) ** 2).sum()), (lambda: ((w + 1) ** 2).sum())


def test_compare_same_vs_next_vs_eval_closure():
    "The learned step fits the gradient's minibatch exactly: only a fresh minibatch exposes it"
    w, g, seen, fresh = _two_batch_guard(compare='same')
    assert g.step(seen).item() == 1.0 and g.last_choice == 'learned' and w.item() == 1.0 and not g.pending
    w, g, seen, fresh = _two_batch_guard()
    g.step(seen, eval_closure=fresh)
    assert g.last_choice == 'fallback' and w.item() == pytest.approx(0.1) and not g.pending
    w, g, seen, fresh = _two_batch_guard()
    g.step(seen)
    assert g.pending and g.last_choice is None and g.counts == {'learned': 0, 'fallback': 0}
    assert w.item() == pytest.approx(0.1)                      # provisional: the fallback's before any decision
    loss = g.step(fresh)                                        # decides step 0 on this minibatch, then steps
    assert g.history[-1]['decided'] == 0 and g.history[-1]['choice'] == 'fallback'
    assert loss.item() == pytest.approx(1.1 ** 2)               # the loss where step 1 starts: at w_F = 0.1
    assert g.history[-1]['loss_learned'] == pytest.approx(4.0)


@pytest.mark.parametrize('guard_cls', GUARDS, ids=lambda c: c.__name__)
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 1000), steps=st.integers(1, 30))
def test_deferred_equals_same_on_deterministic_loss(guard_cls, seed, steps):
    "With one deterministic loss, deciding on the 'next' minibatch is deciding on the same one"
    q = QuadraticTask(dim=4, condition=5.0, seed=seed)
    runs = []
    for compare in ('next', 'same'):
        m = q.init(seed)
        g = guard_cls(torch.optim.SGD(m.parameters(), lr=1.8 / q.L, momentum=0.5), torch.optim.SGD(m.parameters(), lr=0.5 / q.L), compare=compare)
        losses = [g.step(lambda: q.loss(m, (None, None))).item() for _ in range(steps)]
        g.resolve(lambda: q.loss(m, (None, None)))
        runs.append((losses, m.w.detach().clone(), dict(g.counts)))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1]) and runs[0][2] == runs[1][2]


def test_outside_change_drops_pending_decision():
    w = torch.nn.Parameter(torch.tensor([3.0]))
    g = LossGuard(torch.optim.SGD([w], lr=0.1), torch.optim.SGD([w], lr=0.5), record=True)
    loss = lambda: (w ** 2).sum()
    g.step(loss)
    with torch.no_grad(): w.fill_(1.0)                          # the user moves the parameters
    assert g.step(loss).item() == 1.0                           # the step starts from them
    assert g.history[-1]['dropped'] == 0 and 'decided' not in g.history[-1]
    assert g.counts == {'learned': 0, 'fallback': 0} and g.pending
    g.resolve(loss)
    assert g.last_choice == 'fallback' and w.item() == 0.0      # from 1: fallback 1 - 0.5*2 = 0 beats learned 0.8
    assert g.resolve(loss) is None                              # nothing pending any more


# --- what a step costs -------------------------------------------------------------------------------

def _evaluations(guard):
    task = spiral_task()
    m = task.init(0)
    g = guard(m)
    batches = task.batches(0)
    for _ in range(20):
        x, y = next(batches)
        g.step(lambda: task.loss(m, (x, y)))
    return g


def test_evaluation_counts():
    sgd = lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr)
    lg = _evaluations(lambda m: LossGuard(sgd(m, 2.0), sgd(m, 0.5), record=True, keep_both_graphs=True))
    per_call = [(h['forward'], h['backward']) for h in lg.history]
    assert per_call[0] == (1, 1) and all(f == 2 and b == 1 for f, b in per_call[1:])
    assert lg.evaluations['forward'] == sum(f for f, _ in per_call) and lg.evaluations['backward'] == 20
    assert lg.evaluations['forward'] == 1 + 2 * 19   # both graphs kept: one extra forward, whichever candidate wins
    one = _evaluations(lambda m: LossGuard(sgd(m, 2.0), sgd(m, 0.5), record=True))   # the default: one graph
    assert one.keep_both_graphs is False
    provisional = ['fallback'] + [h['choice'] for h in one.history[1:-1]]   # the last decision's winner is held next
    misses = sum(h['choice'] != held for h, held in zip(one.history[1:], provisional))
    assert misses > 0 and one.evaluations['forward'] == 1 + 2 * 19 + misses   # one graph: a third forward at each miss
    same = _evaluations(lambda m: LossGuard(sgd(m, 2.0), sgd(m, 0.5), compare='same'))
    assert same.evaluations == {'forward': 60, 'backward': 20}
    gl = _evaluations(lambda m: GradientGuard(sgd(m, 2.0), sgd(m, 0.5), compare='same'))
    assert gl.evaluations == {'forward': 40, 'backward': 40}
    gl_next = _evaluations(lambda m: GradientGuard(sgd(m, 2.0), sgd(m, 0.5), record=True))
    for h in gl_next.history[1:]:
        assert (h['forward'], h['backward']) == ((1, 1) if h['choice'] == 'learned' else (2, 2))


class _Net(torch.nn.Module):
    "A model with what a second graph must get right: BatchNorm statistics, dropout masks, optional checkpointing or autocast"
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.emb = torch.nn.Embedding(20, 6, sparse=kind == 'sparse-embedding', max_norm=1.0 if kind == 'max-norm' else None)
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Dropout(0.3))
        self.head = torch.nn.Linear(16, 1)
        if kind == 'frozen': self.body[0].requires_grad_(False)

    def forward(self, idx):
        h = self.emb(idx)
        if self.kind == 'checkpoint': h = torch.utils.checkpoint.checkpoint(self.body, h, use_reentrant=False)
        else: h = self.body(h)
        return self.head(h)


def _graph_run(kind, keep_both_graphs, steps=30, lr=0.1, momentum=0.5):
    torch.manual_seed(0)
    model, gen = _Net(kind), torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 20, (32,), generator=gen), torch.randn(32, 1, generator=gen)) for _ in range(steps)]
    learned = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)   # an aggressive proposer: it wins and loses
    guard = LossGuard(learned, torch.optim.SGD(model.parameters(), lr=0.05), record=True, keep_both_graphs=keep_both_graphs)
    def loss(idx, y):
        if kind == 'autocast':
            with torch.autocast('cpu', dtype=torch.bfloat16): return torch.nn.functional.mse_loss(model(idx).float(), y)
        out = torch.nn.functional.mse_loss(model(idx), y)
        if kind == 'gradient-penalty':   # differentiates inside the closure
            g, = torch.autograd.grad(out, model.head.weight, create_graph=True)
            out = out + 0.1 * g.pow(2).sum()
        return out
    for idx, y in batches: guard.step(lambda: loss(idx, y))
    grads = [None if p.grad is None else p.grad.to_dense() for p in model.parameters()]
    return guard, model, grads, torch.get_rng_state()


@pytest.mark.parametrize('kind', ['batchnorm-dropout', 'autocast', 'checkpoint', 'sparse-embedding', 'max-norm', 'frozen',
                                  'gradient-penalty'])
def test_both_graphs_equal_a_third_forward(kind):
    "Backpropagating the other candidate's kept graph is bit-identical to evaluating it again: parameters, gradients, BN statistics, RNG"
    both, m_both, g_both, rng_both = _graph_run(kind, True)
    one, m_one, g_one, rng_one = _graph_run(kind, False)
    switched = [h for h in one.history if h['forward'] == 3]
    assert len(switched) >= 3   # the path under test was taken
    assert [h.get('choice') for h in both.history] == [h.get('choice') for h in one.history]
    for a, b in zip(list(m_both.state_dict().values()), list(m_one.state_dict().values())): assert torch.equal(a, b)
    for a, b in zip(g_both, g_one): assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(rng_both, rng_one)
    third = 3 if kind == 'max-norm' else 2   # a forward that renormalises the parameters in place cannot lend its graph
    assert max(h['forward'] for h in both.history) == third


def test_kept_graph_still_detects_inplace_changes():
    "A closure that writes into a tensor its graph saved is refused as autograd refuses it, with the other candidate's graph too"
    task = spiral_task()
    m = task.init(0)
    g = LossGuard(torch.optim.Adam(m.parameters(), lr=0.05), torch.optim.SGD(m.parameters(), lr=0.5))
    x, y = next(task.batches(0))
    def bad():
        h = torch.sigmoid(m[0](x))
        out = m[2](h)
        h.mul_(2)   # sigmoid's backward needs its output
        return torch.nn.functional.cross_entropy(out, y)
    g.step(lambda: task.loss(m, (x, y)))
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(RuntimeError, match='modified by an inplace operation'): g.step(bad)
    assert all(torch.equal(a, p) for a, p in zip(before, m.parameters()))


def test_returned_loss_is_at_the_starting_parameters():
    "Deferred: the loss at the candidate just chosen, on the step's own minibatch; the first step: at the initial parameters"
    task = spiral_task()
    m = task.init(0)
    g = LossGuard(torch.optim.Adam(m.parameters(), lr=0.05), torch.optim.SGD(m.parameters(), lr=0.5), record=True)
    batches = task.batches(0)
    x, y = next(batches)
    with torch.no_grad(): first = task.loss(m, (x, y)).item()
    assert g.step(lambda: task.loss(m, (x, y))).item() == first
    for _ in range(10):
        x, y = next(batches)
        loss = g.step(lambda: task.loss(m, (x, y)))
        h = g.history[-1]
        assert not loss.requires_grad and loss.item() == h['loss'] == h['loss_' + h['choice']]
