"""The package on a CUDA device behaves as the plain torch.optim loop does there, and as it does on the CPU.

The device under test is `LGL2O_TEST_DEVICE` ('cuda' unless set); the whole module is skipped when that is a CUDA
device and this PyTorch sees none (CI). `LGL2O_TEST_DEVICE=cpu` runs the same tests on the CPU, which checks their
logic on a machine without a GPU (there the device-vs-CPU comparisons compare the CPU with itself, and the random
state checked is the CPU's alone).

Two kinds of comparison:
- on one device, a guard over one optimizer twice against the plain loop: the same ops on the same device in the same
  order, so the results must be bit-identical (`torch.equal`), random state included. The one exception is a sparse
  gradient added into a dense parameter, which CUDA may accumulate with atomics (see `test_sparse_embedding_...`);
- the device against the CPU: different kernels round differently, so float32 tolerances, each sized from a
  measurement on the CPU of how much float32 rounding moves that result (against a float64 run of the same
  computation, or from one rounding of the inputs; the numbers are beside each tolerance). Decisions (which
  candidate a guard keeps) must be the same where the two candidates' losses are further apart than any such rounding
  difference, and each test checks on its CPU run that they are.
"""
import copy
import functools
import io
import math
import os

import pytest
import torch
from torch import nn

from lgl2o import GradientGuard, LearnedOptimizer, LossGuard, load_pretrained, pretrained_names
from lgl2o.learned import build_net
from lgl2o.meta import MetaConfig, MetaTrainer, load_checkpoint
from lgl2o.tasks import MLPTask, seeded, spirals

from test_training_loop import (assert_same_state, assert_same_tensors, guarded_run, mse, plain_run,   # the reference loop
                                sparse_embedding_beside)

DEVICE = os.environ.get('LGL2O_TEST_DEVICE', 'cuda')
DEVICE_TYPE = torch.device(DEVICE).type
ON_CUDA = DEVICE_TYPE == 'cuda'

pytestmark = pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(),
                                reason=f'LGL2O_TEST_DEVICE={DEVICE!r} and this PyTorch ({torch.__version__}) sees no CUDA device')

GUARDS = [LossGuard, GradientGuard]
RULES = dict(argnames='shadow', argvalues=[None, 0.02], ids=['paper-rule', 'shadow'])


@pytest.fixture(autouse=True)
def ieee_float32_matmul():
    "float32 products in full precision (no TF32) while a test runs, so that the device-vs-CPU tolerances hold"
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision('highest')
    yield
    torch.set_float32_matmul_precision(before)


@functools.cache
def dev() -> torch.device:
    "The device under test with its index ('cuda' -> cuda:0), as parameters report it"
    return torch.empty(0, device=DEVICE).device


def device_rng() -> torch.Tensor:
    "The state of the generator that dropout on the device draws from"
    return torch.cuda.get_rng_state(dev()) if ON_CUDA else torch.get_rng_state()


def rng_states() -> tuple:
    "The CPU generator's state and, on CUDA, the device's"
    return torch.get_rng_state(), device_rng() if ON_CUDA else None


def assert_same_rng(a: tuple, b: tuple):
    assert torch.equal(a[0], b[0]), 'CPU random state'
    if a[1] is not None: assert torch.equal(a[1], b[1]), f'{DEVICE} random state'


def to(batches, device):
    return [tuple(t.to(device) for t in b) for b in batches]


def regression_batches(n=10, batch=16, d=4, seed=0, device=DEVICE):
    "Made on the CPU from a seed, then moved: the same numbers on every device"
    g = torch.Generator().manual_seed(seed)
    return to([(torch.randn(batch, d, generator=g), torch.randn(batch, 1, generator=g)) for _ in range(n)], device)


def small_net(seed=0, bn=True, dropout=0.3, device=DEVICE):
    "Initialised on the CPU from a seed, then moved: the same weights on every device"
    torch.manual_seed(seed)
    layers = [nn.Linear(4, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.ReLU()]
    layers += [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(*layers, nn.Linear(8, 1)).to(device)


SGD = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-2)
ADAM = functools.partial(torch.optim.Adam, lr=0.01)


def same_twice(make_opt, model, guard_cls=LossGuard, **guard_kw):
    "A guard over two copies of one optimizer: it must behave as that optimizer alone"
    return guard_cls(make_opt(model.parameters()), make_opt(model.parameters()), **guard_kw)


def grads(model): return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def follows_the_plain_loop(make_model, make_opt, guard_cls, batches, loss=mse, seed=7, **guard_kw):
    """The plain loop and a guard over `make_opt` twice, each on its own model and from the same random state: both
    random states, parameters, buffers, gradients and the optimizer's state are bit-identical afterwards"""
    plain, guarded = make_model(), make_model()
    torch.manual_seed(seed)   # seeds the CPU and every CUDA device
    opt = make_opt(plain.parameters())
    plain_run(plain, opt, batches, loss=loss)
    after_plain = rng_states()
    torch.manual_seed(seed)
    guard = same_twice(make_opt, guarded, guard_cls, **guard_kw)
    guarded_run(guarded, guard, batches, loss=loss)
    assert_same_rng(after_plain, rng_states())
    assert_same_tensors(plain.parameters(), guarded.parameters())
    assert_same_tensors(plain.buffers(), guarded.buffers())
    assert_same_tensors(grads(plain), grads(guarded))
    assert_same_state(opt.state_dict()['state'], guard.fallback.state_dict()['state'])
    return guarded, guard


def everything(model, guard) -> dict:
    "What a refused call must leave as it was"
    return dict(params=[p.detach().clone() for p in model.parameters()], grads=grads(model),
                buffers=[b.clone() for b in model.buffers()],
                learned=copy.deepcopy(guard.learned.state_dict()), fallback=copy.deepcopy(guard.fallback.state_dict()),
                scalars=(dict(guard.counts), guard.steps, guard.pending, dict(guard.evaluations)), rng=rng_states())


def assert_unchanged(before: dict, after: dict):
    for k in ('params', 'grads', 'buffers'): assert_same_tensors(before[k], after[k])
    for k in ('learned', 'fallback'): assert_same_state(before[k]['state'], after[k]['state'])
    assert before['scalars'] == after['scalars']
    assert_same_rng(before['rng'], after['rng'])


def tensors_in(obj):
    "Every tensor in a nested structure of dicts, lists and tuples"
    if isinstance(obj, torch.Tensor): yield obj
    elif isinstance(obj, dict):
        for v in obj.values(): yield from tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj: yield from tensors_in(v)


def decision_margins(guard) -> list[float]:
    "How far each decision of a recorded guard was from going the other way, relative to the quantities compared"
    out = []
    for h in guard.history:
        if 'choice' not in h: continue
        if 'residual' in h:   # GradientGuard: residual against (1 - delta) mu
            bar = (1 - guard.delta) * h['mu']
            out.append(abs(h['residual'] - bar) / bar if math.isfinite(h['residual']) else math.inf)
        else:
            l, f = h['loss_learned'], h['loss_fallback']
            out.append(abs(l - f) / abs(f) if math.isfinite(l) and math.isfinite(f) else math.inf)
    return out


def choices(guard) -> list:
    return [(h.get('decided'), h.get('choice'), h.get('reset', False)) for h in guard.history]


# 1. a guard over one optimizer twice follows the plain loop on the device ---------------------------------------------

@pytest.mark.parametrize(**RULES)
@pytest.mark.parametrize('make_opt', [SGD, ADAM], ids=['sgd', 'adam'])
@pytest.mark.parametrize('guard_cls,compare', [(LossGuard, 'next'), (LossGuard, 'same'), (GradientGuard, 'next')],
                         ids=['LossGuard-next', 'LossGuard-same', 'GradientGuard-next'])
def test_guard_follows_the_plain_loop_on_the_device(guard_cls, compare, make_opt, shadow):
    """BatchNorm and dropout on the device: parameters, running statistics, optimizer state, gradients and both random
    states are bit-identical to the plain loop's. The dropout masks come from the device's generator, so this checks
    that the guard saves and restores it around its extra forwards."""
    batches = regression_batches(10)
    guarded, guard = follows_the_plain_loop(small_net, make_opt, guard_cls, batches, compare=compare, shadow=shadow, record=True)
    assert next(guarded.parameters()).device == dev()
    assert guarded[1].num_batches_tracked.item() == len(batches)
    assert all(t.device == dev() for s in guard.fallback.state.values() for k, t in s.items() if k != 'step')
    assert sum(guard.counts.values()) == len(batches) - (compare == 'next')
    if guard_cls is LossGuard:   # equal candidates under the same dropout masks: bit-equal losses, the tie goes to the fallback
        decided = [h for h in guard.history if 'choice' in h]
        assert all(h['loss_learned'] == h['loss_fallback'] and h['choice'] == 'fallback' for h in decided)


# 2. autocast on the device ---------------------------------------------------------------------------------------------

AMP = [pytest.param(torch.bfloat16, id='bfloat16'), pytest.param(torch.float16, id='float16')]   # float16: the CUDA habit (CPU autocast takes it too)


@pytest.mark.parametrize(**RULES)
@pytest.mark.parametrize('dtype', AMP)
@pytest.mark.parametrize('guard_cls', GUARDS)
def test_autocast_inside_the_closure_follows_the_plain_loop(guard_cls, dtype, shadow):
    "torch.autocast(DEVICE) inside the closure (no scaler): bit-identical to the plain loop with the same closure"
    def amp_loss(model, b):
        with torch.autocast(DEVICE_TYPE, dtype=dtype):
            out = model(b[0])
            assert out.dtype == dtype   # autocast is on for this device
            return nn.functional.mse_loss(out.float(), b[1])
    follows_the_plain_loop(small_net, ADAM, guard_cls, regression_batches(8), loss=amp_loss, seed=3, shadow=shadow)


@pytest.mark.parametrize('dtype', AMP)
def test_autocast_around_the_step_evaluates_each_candidate_at_its_own_weights(dtype):
    "autocast caches low-precision copies of the weights on the device; the guard must not compare two candidates through one copy"
    model = small_net(bn=False, dropout=0.0)
    guard = LossGuard(torch.optim.SGD(model.parameters(), lr=0.2), torch.optim.SGD(model.parameters(), lr=0.001), record=True)
    for b in regression_batches(10):
        with torch.autocast(DEVICE_TYPE, dtype=dtype): guard.step(lambda: mse(model, b))
    decided = [h for h in guard.history if 'choice' in h]
    assert sum(h['loss_learned'] != h['loss_fallback'] for h in decided) >= len(decided) - 1
    assert guard.counts['learned'] > 0


# 3. GradScaler is refused ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('guard_cls', GUARDS)
def test_grad_scaler_is_refused_in_one_line_and_changes_nothing(guard_cls):
    "torch.amp.GradScaler(DEVICE) stepping a guard: one line naming GradScaler and bfloat16; parameters, state, random state untouched"
    model = small_net()
    guard = guard_cls(ADAM(model.parameters()), SGD(model.parameters()))
    batches = regression_batches(3)
    guard.step(lambda: mse(model, batches[0]))
    scaler = torch.amp.GradScaler(DEVICE_TYPE)
    def scaled_loss():
        with torch.autocast(DEVICE_TYPE, dtype=torch.float16 if ON_CUDA else torch.bfloat16): return mse(model, batches[1])
    scaler.scale(scaled_loss())   # a loop written for a scaler scales its loss
    before = everything(model, guard)
    with pytest.raises(RuntimeError, match='GradScaler') as e: scaler.step(guard, scaled_loss)
    assert '\n' not in str(e.value) and 'bfloat16' in str(e.value)
    assert_unchanged(before, everything(model, guard))
    assert not hasattr(guard, 'found_inf') and not hasattr(guard, 'grad_scale')
    guard.step(lambda: mse(model, batches[1]))   # the guard still works without the scaler
    assert guard.steps == 2


# 4. learned optimizers on the device -----------------------------------------------------------------------------------

def optimizee(device=DEVICE):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).to(device)


# The relative error of a float32 update against float64 on the CPU, from the same parameters, gradients and states over
# these 4 steps, measured: celo-mlpfamily 5.5e-5 (Newton-Schulz amplifies the rounding of small singular values),
# nominal-mnist 1.0e-5, lstm-mnist 2.0e-6, mlp-mnist 4.1e-7. A device differs from the CPU by about as much; 1e-3 leaves
# a margin of 18x over the worst, and a wrong update (a misplaced tensor, a dropped state) is off by O(1).
STEP_RTOL = 1e-3


@pytest.mark.parametrize('name', pretrained_names())
def test_a_learned_step_on_the_device_equals_the_step_on_the_cpu(name):
    "Each shipped net: 4 steps from the same gradients on the device and on the CPU agree; the state lives on the device"
    g = torch.Generator().manual_seed(1)
    shapes = [p.shape for p in optimizee('cpu').parameters()]   # gradients over four decades of magnitude
    steps = [[torch.randn(s, generator=g) * 10 ** torch.empty(s).uniform_(-4, 0, generator=g) for s in shapes] for _ in range(4)]
    def run(device):
        model, net = optimizee(device), load_pretrained(name).to(device)
        opt = LearnedOptimizer(model.parameters(), net)
        updates = []
        for gs in steps:
            for p, gr in zip(model.parameters(), gs): p.grad = gr.to(device)
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            updates.append([p.detach() - b for p, b in zip(model.parameters(), before)])
        return model, opt, updates
    cpu_model, cpu_opt, cpu_updates = run('cpu')
    model, opt, updates = run(DEVICE)
    assert all(p.device == dev() for p in [*model.parameters(), *opt.net.parameters()])
    for p in model.parameters():
        state = opt.state[p]
        assert int(state['step'].item()) == len(steps)
        assert all(t.device == dev() for k, t in state.items() if k != 'step'), {k: t.device for k, t in state.items()}
    scales = []
    for step, (on_dev, on_cpu) in enumerate(zip(updates, cpu_updates)):
        scales.append(max(u.abs().max().item() for u in on_cpu))
        assert scales[-1] > 0
        err = max((a.cpu() - b).abs().max().item() for a, b in zip(on_dev, on_cpu))
        assert err <= STEP_RTOL * scales[-1], f'step {step}: update differs by {err:.3g} (largest update {scales[-1]:.3g})'
    for a, b in zip(model.parameters(), cpu_model.parameters()):   # the parameters sum the updates' differences
        torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=0, atol=STEP_RTOL * sum(scales))
    for p, q in zip(model.parameters(), cpu_model.parameters()):
        for k, t in cpu_opt.state[q].items():
            if k == 'step': continue
            d = opt.state[p][k]
            assert d.shape == t.shape and d.dtype == t.dtype
            assert (d.cpu() - t).abs().max().item() <= STEP_RTOL * max(t.abs().max().item(), 1e-30), (k, (d.cpu() - t).abs().max())


def spiral_task():
    return MLPTask(data=spirals(n=256, n_test=64), hidden=(8, 8), batch_size=32, init_std=None, activation='tanh')


def celo_guarded_run(device, steps=20):
    task = spiral_task()
    model = task.init(0).to(device)
    guard = LossGuard(LearnedOptimizer(model.parameters(), load_pretrained('celo-mlpfamily').to(device)),
                      torch.optim.Adam(model.parameters(), lr=0.01), record=True)
    batches = task.batches(0)
    losses = []
    for _ in range(steps):
        x, y = next(batches)
        x, y = x.to(device), y.to(device)
        losses.append(guard.step(lambda: task.loss(model, (x, y))).item())
    return model, guard, losses


def test_a_guarded_learned_optimizer_on_the_device_decides_as_on_the_cpu():
    """LossGuard(LearnedOptimizer(celo), Adam) for 20 steps on spirals: the same decisions as on the CPU, whose candidates'
    losses are never within 1e-4 of each other (float32 against float64 on the CPU: 2.6e-7 relative), the same losses
    and parameters to float32 tolerances (float32 against float64 on the CPU: losses 2.6e-7 relative, parameters
    1.7e-5 absolute, the largest 0.7; one Adam step moves a parameter by about its lr, 1e-2)"""
    m_cpu, g_cpu, l_cpu = celo_guarded_run('cpu')
    m_dev, g_dev, l_dev = celo_guarded_run(DEVICE)
    assert min(decision_margins(g_cpu)) > 1e-4   # no near-tie that rounding could flip
    assert 0 < g_cpu.counts['learned'] < sum(g_cpu.counts.values())   # both kinds of decision are taken
    assert choices(g_dev) == choices(g_cpu) and g_dev.counts == g_cpu.counts
    assert all(torch.isfinite(p).all() and p.device == dev() for p in m_dev.parameters())
    torch.testing.assert_close(torch.tensor(l_dev), torch.tensor(l_cpu), rtol=1e-4, atol=1e-6)
    for a, b in zip(m_dev.parameters(), m_cpu.parameters()): torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-4, atol=3e-4)


# 5. sparse gradients and parameters on several devices -----------------------------------------------------------------

def embedding_model(sparse=True, device=DEVICE):
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(20, 4, sparse=sparse), nn.Flatten(), nn.Linear(12, 1)).to(device)


def token_batches(n=8, device=DEVICE):
    g = torch.Generator().manual_seed(0)
    return to([(torch.randint(0, 20, (16, 3), generator=g), torch.randn(16, 1, generator=g)) for _ in range(n)], device)


@pytest.mark.parametrize(**RULES)
def test_sparse_embedding_on_the_device_follows_the_plain_loop(shadow):
    """nn.Embedding(sparse=True) on the device under a guard over two sparse-capable optimizers, as on the CPU.
    Compared with assert_close's float32 tolerance rather than bit for bit: adding an uncoalesced sparse gradient
    (a token repeated in a batch) into the dense weight may accumulate with atomics on CUDA, in no fixed order."""
    batches = token_batches()
    plain, guarded = embedding_model(), embedding_model()
    plain_run(plain, torch.optim.SGD(plain.parameters(), lr=0.1), batches)
    guard = same_twice(functools.partial(torch.optim.SGD, lr=0.1), guarded, shadow=shadow)
    guarded_run(guarded, guard, batches)
    assert guarded[0].weight.grad.is_sparse and guarded[0].weight.grad.device == dev()
    assert_same_tensors(plain.parameters(), guarded.parameters(), exact=False)
    for guard_cls in GUARDS:
        other = embedding_model()
        both = guard_cls(torch.optim.Adagrad(other.parameters(), lr=0.1), torch.optim.SGD(other.parameters(), lr=0.1), shadow=shadow)
        guarded_run(other, both, batches)
        assert sum(both.counts.values()) == len(batches) - 1
        assert all(torch.isfinite(p).all() for p in other.parameters())


@pytest.mark.parametrize('guard_cls', GUARDS)
def test_a_sparse_embedding_beside_the_guard_gets_its_gradient_as_in_the_plain_loop(guard_cls):
    "SparseAdam on a device embedding outside the guard, a guarded dense head: the embedding follows the plain loop exactly"
    plain, guarded = sparse_embedding_beside(guard_cls, DEVICE)
    assert torch.equal(plain[0], guarded[0])   # distinct indices: no accumulation order to differ
    if guard_cls is LossGuard: assert torch.equal(plain[1], guarded[1])


def test_a_learned_optimizer_on_the_device_refuses_sparse_gradients_as_on_the_cpu():
    model = embedding_model()
    net = load_pretrained('lstm-mnist').to(DEVICE)
    guard = LossGuard(LearnedOptimizer(model.parameters(), net), torch.optim.SGD(model.parameters(), lr=0.1))
    before = everything(model, guard)
    with pytest.raises(RuntimeError, match='LearnedOptimizer does not support sparse gradients') as e:
        guard.step(lambda: mse(model, token_batches(1)[0]))
    assert '\n' not in str(e.value) and 'sparse=False' in str(e.value)
    assert_unchanged(before, everything(model, guard))
    dense = embedding_model(sparse=False)   # the fix the message names works on the device
    guard = LossGuard(LearnedOptimizer(dense.parameters(), load_pretrained('lstm-mnist').to(DEVICE)), torch.optim.SGD(dense.parameters(), lr=0.1))
    guarded_run(dense, guard, token_batches(3))
    assert sum(guard.counts.values()) == 2 and all(torch.isfinite(p).all() for p in dense.parameters())


class SplitNet(nn.Module):
    "A body on the CPU and a head on the device, each with dropout (one drawing from the CPU generator, one from the device's)"
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.3))
        self.head = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 1)).to(DEVICE)

    def forward(self, x): return self.head(self.body(x).to(DEVICE))


def split_run(guard_cls, shadow):
    loss = lambda m, b: nn.functional.mse_loss(m(b[0]), b[1].to(DEVICE))
    follows_the_plain_loop(SplitNet, SGD, guard_cls, regression_batches(8, device='cpu'), loss=loss, seed=5, shadow=shadow)


@pytest.mark.parametrize(**RULES)
def test_parameters_on_the_cpu_and_the_device_in_one_loss_guard_follow_the_plain_loop(shadow):
    "One guard over parameters on two devices (torch.optim takes them): both random states saved and restored, bit-identical to the plain loop"
    split_run(LossGuard, shadow)


@pytest.mark.parametrize(**RULES)
def test_parameters_on_the_cpu_and_the_device_in_one_gradient_guard_follow_the_plain_loop(shadow):
    "GradientGuard's test norm over gradients on two devices (their per-tensor norms meet on one device)"
    split_run(GradientGuard, shadow)


# 6. checkpoints move between devices -----------------------------------------------------------------------------------

def checkpoint_guard(guard_cls, model, shadow):
    return guard_cls(torch.optim.Adam(model.parameters(), lr=0.05), torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9),
                     shadow=shadow, record=True)


@pytest.mark.parametrize('shadow', [None, 0.0], ids=['paper-rule', 'shadow'])
@pytest.mark.parametrize('guard_cls', GUARDS)
def test_a_checkpoint_from_the_device_resumes_on_the_cpu(guard_cls, shadow):
    """A guard on the device, saved mid-run with a decision pending, loaded into a fresh guard on the CPU
    (map_location='cpu'): every tensor is on the CPU, the pending candidates are the saved ones bit for bit, and the
    CPU run goes on as the device run does (the same decisions; losses and parameters to float32 tolerance)"""
    task = MLPTask(data=spirals(n=256, n_test=64), hidden=(8,), batch_size=32, init_std=None)
    batches = task.batches(3)
    data = [next(batches) for _ in range(14)]
    run = lambda guard, model, part, device: [guard.step(lambda: task.loss(model, (x.to(device), y.to(device)))).item() for x, y in part]

    m1 = task.init(0).to(DEVICE)
    g1 = checkpoint_guard(guard_cls, m1, shadow)
    run(g1, m1, data[:7], DEVICE)
    assert g1.pending
    buf = io.BytesIO()
    torch.save({'model': m1.state_dict(), 'guard': g1.state_dict()}, buf)
    saved = copy.deepcopy(g1.state_dict())
    tail1 = run(g1, m1, data[7:], DEVICE)

    buf.seek(0)
    ck = torch.load(buf, map_location='cpu', weights_only=False)
    assert all(t.device.type == 'cpu' for t in tensors_in(ck))
    m2 = task.init(1)
    g2 = checkpoint_guard(guard_cls, m2, shadow)
    g2.load_state_dict(ck['guard']); m2.load_state_dict(ck['model'])
    state = g2.state_dict()
    assert all(t.device.type == 'cpu' for t in tensors_in(state))
    assert all(t.device.type == 'cpu' for s in [*g2.learned.state.values(), *g2.fallback.state.values()] for t in tensors_in(s))
    assert g2.pending and (g2.steps, g2.counts) == (saved['guard']['steps'], saved['guard']['counts'])
    for c in ('learned', 'fallback'): assert_same_tensors([t.cpu() for t in saved['guard']['candidates'][c]], state['guard']['candidates'][c])
    tail2 = run(g2, m2, data[7:], 'cpu')

    assert min(decision_margins(g2)[-7:]) > 1e-4   # no near-tie on the CPU that rounding could flip on the device
    assert choices(g1)[-7:] == choices(g2)[-7:]
    assert (g1.counts, g1.steps, g1.pending, g1.evaluations, g1.resets) == (g2.counts, g2.steps, g2.pending, g2.evaluations, g2.resets)
    torch.testing.assert_close(torch.tensor(tail1), torch.tensor(tail2), rtol=1e-4, atol=1e-6)
    for a, b in zip(m1.parameters(), m2.parameters()): torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-4, atol=1e-5)


# 7. meta-training on the device ----------------------------------------------------------------------------------------

def small_spirals_mlp():
    return MLPTask(data=spirals(n=96, n_test=32), hidden=(6,), batch_size=16, init_std=None, activation='tanh')


QUADRATICS = dict(net='lstm', net_config={'hidden': 6}, task='quadratic_family', task_config={'dims': [4, 6]}, unroll=2, trajectory=4, seed=5)
META = {
    # truncated backpropagation through an LSTM's unrolls on random quadratics
    'tbptt-lstm-quadratics': (QUADRATICS, None),
    # the MLP net on an MLP classifier (a functional forward of parameters on the device), train-by-validation, two instances
    'tbptt-mlp-spirals': (dict(net='mlp', unroll=2, trajectory=4, meta_split='test', seed=3, tasks_per_step=2), small_spirals_mlp),
    # PES: two antithetic pairs of particles carried across the truncations
    'pes-lstm-quadratics': (dict(QUADRATICS, estimator='pes', perturbations=2, sigma=0.05), None),
    # ES, and the evaluation of held-out instances (on the CPU, from a copy of the net)
    'es-lstm-quadratics': (dict(QUADRATICS, estimator='es', perturbations=2, sigma=0.05, eval_every=2), None),
}


@pytest.mark.parametrize('case', list(META))
def test_meta_training_on_the_device_follows_the_cpu_run(case, tmp_path):
    """4 meta-steps (two whole trajectories of two truncations) on the device and on the CPU: the same meta-losses,
    meta-gradient norms, evaluations and change of the net, to tolerances 45x (gradient norms) to 90x (the net's
    change) the change that one float32 rounding of the optimizees' starting parameters makes on the CPU (worst
    measured: meta-losses 7.4e-7 relative, gradient norms 1.1e-4 and the net's change 1.1e-4, both ES's, whose estimate
    is a difference of nearly equal losses). Plain SGD as the meta-optimizer, so that a rounding difference in the
    meta-gradient stays one in the net (Adam's first step is the sign of each component). The net and the trajectories
    live on the device while it trains; a checkpoint holds the net on the CPU."""
    settings, make_task = META[case]
    def trained(device):
        config = MetaConfig(**settings, meta_steps=4, meta_optimizer='sgd', lr=0.01, device=device)
        tr = MetaTrainer(config, task=make_task() if make_task else None, progress=False)
        tr.train(until=1)   # mid-trajectory: where its tensors live
        where = dev() if device == DEVICE else torch.device('cpu')
        assert all(p.device == where for p in tr.net.parameters())
        assert all(t.device == where for traj in tr.trajs for t in tensors_in([traj.params, traj.states]))
        if tr.config.estimator == 'pes':
            assert all(t.device == where for part in tr.particles for t in tensors_in([part['params'], part['states'], part['xi']]))
        tr.train()
        return tr
    cpu, on_dev = trained('cpu'), trained(DEVICE)
    if case.startswith('pes'): assert on_dev.draws == cpu.draws == 4
    assert all(p.device == dev() for p in on_dev.net.parameters())
    steps = lambda tr: [r for r in tr.history if 'meta_loss' in r]
    assert len(steps(on_dev)) == len(steps(cpu)) == 4
    for a, b in zip(steps(on_dev), steps(cpu)):
        assert a['meta_loss'] is not None and b['meta_loss'] is not None and a['task_step'] == b['task_step']
        assert math.isclose(a['meta_loss'], b['meta_loss'], rel_tol=1e-4), (a, b)
        assert math.isclose(a['meta_grad_norm'], b['meta_grad_norm'], rel_tol=5e-3), (a, b)
    evals = lambda tr: [r['eval_loss'] for r in tr.history if 'eval_loss' in r]
    assert len(evals(on_dev)) == len(evals(cpu)) == (3 if settings.get('eval_every') else 0)
    for a, b in zip(evals(on_dev), evals(cpu)): assert math.isclose(a, b, rel_tol=1e-4)
    start = list(initial_net(cpu).parameters())
    change_cpu = [p.detach() - s for p, s in zip(cpu.net.parameters(), start)]
    change_dev = [p.detach().cpu() - s for p, s in zip(on_dev.net.parameters(), start)]
    scale = max(c.abs().max().item() for c in change_cpu)
    assert scale > 0   # it trained
    assert max((a - b).abs().max().item() for a, b in zip(change_dev, change_cpu)) <= 1e-2 * scale
    # a checkpoint holds the net on the CPU and loads there, equal to the device's
    assert all(t.device.type == 'cpu' for t in tensors_in(on_dev.state()['net_state']))
    net, info = load_checkpoint(on_dev.save(tmp_path / 'checkpoint.pt'))
    assert info['meta_config']['device'] == DEVICE and info['step'] == 4
    for a, b in zip(net.parameters(), on_dev.net.parameters()):
        assert a.device.type == 'cpu' and torch.equal(a, b.detach().cpu())


def initial_net(tr):
    "The net a trainer starts from (its config's seed), on the CPU"
    with seeded(tr.config.seed): return build_net(tr.config.net, **tr.config.net_config)
