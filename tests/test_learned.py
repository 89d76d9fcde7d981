"""Behaviour of lgl2o.learned: the optimizer contract (state_dict, param_groups, closure), functional equivalence, errors, finiteness."""
import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import NBS
from lgl2o.learned import NETS, LearnedNet, LearnedOptimizer, build_net
from lgl2o.tasks import MLPTask, mnist_mlp, spirals

KINDS = list(NETS)


def small_task():
    return MLPTask(data=spirals(n=64, n_test=16), hidden=(6, 5), batch_size=16)


def make_net(kind, seed=0):
    torch.manual_seed(seed)
    return build_net(kind, **({'lr': 0.3} if kind == 'stepsize' else {}))


def closure_for(opt, task, model, batch): return task.closure(model, batch, opt)


def run_steps(opt, task, model, batches, n):
    return [opt.step(closure_for(opt, task, model, next(batches))).item() for _ in range(n)]


def test_learned_notebook_results(run_notebook):
    "The timing cell measured every net and Adam, and the cheap nets are cheap"
    _, res = run_notebook(NBS / '01_learned.ipynb')
    sps = res['seconds_per_step']
    assert set(sps) == {'adam', *KINDS, 'celo 1 x 4', 'celo 1 x 4, tensor ops'}
    assert all(0 < s < 1 for s in sps.values())
    assert res['ratio_to_adam']['adam'] == 1.0
    # loose bounds (the CPU is shared): the step-size net costs about one Adam step, the MLP a few
    assert res['ratio_to_adam']['stepsize'] < 3
    assert res['ratio_to_adam']['mlp'] < 10
    assert res['ratio_to_adam']['celo'] < 10
    assert res['ratio_to_adam']['celo 1 x 4'] < 10 and res['ratio_to_adam']['celo 1 x 4, tensor ops'] < 10


@pytest.mark.parametrize('kind', KINDS)
def test_state_dict_round_trip_continues_bit_identically(kind):
    task = small_task()
    model = task.init(0)
    net = make_net(kind)
    opt = LearnedOptimizer(model.parameters(), net)
    batches = task.batches(0)
    run_steps(opt, task, model, batches, 3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)                    # through a file, with safe loading
    buf.seek(0)
    twin = copy.deepcopy(model)
    opt2 = LearnedOptimizer(twin.parameters(), net)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    rest = list(zip(range(4), batches))
    for m, o in ((model, opt), (twin, opt2)):
        for _, batch in rest: o.step(closure_for(o, task, m, batch))
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    sd = opt2.state_dict()
    assert all(float(s['step']) == 7 for s in sd['state'].values())
    assert 'net' not in sd and not any(k.startswith('lstm') for k in sd)  # the net is not in the optimizer's state


@pytest.mark.parametrize('kind', KINDS)
def test_functional_update_equals_optimizer_step(kind):
    task = small_task()
    net = make_net(kind)
    model = task.init(1)
    opt = LearnedOptimizer(model.parameters(), net)
    params = [p.detach().clone() for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    states = net.init_state(params)
    batches_a, batches_b = task.batches(1), task.batches(1)
    for step in range(4):
        run_steps(opt, task, model, batches_a, 1)
        leaves = [p.requires_grad_() for p in params]
        loss = task.loss(dict(zip(names, leaves)), next(batches_b))
        grads = torch.autograd.grad(loss, leaves)
        with torch.no_grad(): params, states = net.update(leaves, list(grads), states, step)
        params = [p.detach() for p in params]
    for a, b in zip(model.parameters(), params):
        torch.testing.assert_close(a.detach(), b, rtol=1e-6, atol=1e-7)


def test_closure_convention():
    task = small_task()
    model = task.init(0)
    opt = LearnedOptimizer(model.parameters(), build_net('stepsize', lr=0.5))
    batch = next(task.batches(0))
    calls = []
    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = task.loss(model, batch); loss.backward()
        return loss
    before = task.loss(model, batch).item()
    loss = opt.step(closure)
    assert len(calls) == 1 and math.isclose(loss.item(), before, rel_tol=1e-6)
    assert task.loss(model, batch).item() < before
    assert opt.step() is None                  # without a closure: uses the existing .grad, returns None


def test_param_groups_lr_scales_and_skip_missing_grads():
    task = small_task()
    model = task.init(0)
    first, rest = list(model.parameters())[:2], list(model.parameters())[2:]
    opt = LearnedOptimizer([{'params': first, 'lr': 0.5}, {'params': rest, 'lr': 0.0}], build_net('stepsize', lr=0.2))
    assert [g['lr'] for g in opt.param_groups] == [0.5, 0.0]
    before = [p.detach().clone() for p in model.parameters()]
    run_steps(opt, task, model, task.batches(0), 1)
    grads = [p.grad.clone() for p in model.parameters()]
    torch.testing.assert_close(first[0].detach(), before[0] - 0.5 * 0.2 * grads[0])   # half the GD step
    for p, b in zip(rest, before[2:]): assert torch.equal(p.detach(), b)               # lr 0 freezes a group
    # a parameter without a gradient is skipped and its step count waits
    frozen = first[1]
    for p in model.parameters(): p.grad = None
    for p in model.parameters(): p.grad = torch.ones_like(p) if p is not frozen else None
    snapshot = frozen.detach().clone()
    opt.step()
    assert torch.equal(frozen.detach(), snapshot)
    assert float(opt.state[frozen]['step']) == 1 and float(opt.state[first[0]]['step']) == 2
    # schedulers drive the group lr
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(); sched.step()
    assert opt.param_groups[0]['lr'] == 0.25


def test_per_tensor_stepsize_skips_by_index():
    "Per-tensor step sizes follow the tensor, not its position among those with a gradient"
    w1, w2 = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    net = build_net('stepsize', lr=0.1, per_tensor=True, n_tensors=2)
    with torch.no_grad(): net.log_lr[1] = math.log(0.5)
    opt = LearnedOptimizer([w1, w2], net)
    w2.grad = torch.ones(3)
    opt.step()
    assert torch.equal(w1.detach(), torch.ones(2))
    torch.testing.assert_close(w2.detach(), torch.full((3,), 0.5))


def test_errors():
    with pytest.raises(ValueError, match=r"unknown learned optimizer 'sgd'; use one of \['lstm', 'mlp', 'nominal', 'stepsize', 'celo'\]"):
        build_net('sgd')
    with pytest.raises(ValueError, match=r"'mlp' net has no option \['width'\]"):
        build_net('mlp', width=3)
    with pytest.raises(ValueError, match='per_tensor=True needs n_tensors'):
        build_net('stepsize', per_tensor=True)
    with pytest.raises(ValueError, match='lr must be a positive'):
        build_net('stepsize', lr=0.0)
    with pytest.raises(ValueError, match='hidden and layers must be >= 1'):
        build_net('lstm', hidden=0)
    with pytest.raises(TypeError, match='net must be a LearnedNet'):
        LearnedOptimizer([torch.nn.Parameter(torch.ones(1))], 'lstm')
    net = build_net('mlp')
    p = [torch.ones(2)]
    with pytest.raises(ValueError, match='one gradient and one state per parameter'):
        net.update(p, [], net.init_state(p), 0)
    with pytest.raises(ValueError, match=r'gradient 0 has shape \(3,\)'):
        net.update(p, [torch.ones(3)], net.init_state(p), 0)


@pytest.mark.parametrize('kind', KINDS)
def test_update_is_differentiable_in_the_meta_parameters(kind):
    net = make_net(kind)
    params = [torch.randn(4, 3), torch.randn(3)]
    grads = [torch.randn(4, 3), torch.randn(3)]
    new, _ = net.update(params, grads, net.init_state(params), 0)
    meta = torch.autograd.grad(sum((n ** 2).sum() for n in new), [p for p in net.parameters()], allow_unused=True)
    flat = torch.cat([g.reshape(-1) for g in meta if g is not None])
    assert torch.isfinite(flat).all() and flat.abs().sum() > 0


@st.composite
def huge_and_tiny_grads(draw):
    "Parameter shapes and gradients whose magnitudes span 1e-30 .. 1e30, with signs and exact zeros"
    shapes = draw(st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=2), min_size=1, max_size=3))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    def grad(shape):
        exponent = torch.empty(shape).uniform_(-30, 30, generator=gen)
        sign = torch.randint(-1, 2, shape, generator=gen).float()   # -1, 0 or 1
        return sign * torch.pow(10.0, exponent)
    steps = [[grad(s) for s in shapes] for _ in range(3)]
    return [tuple(s) for s in shapes], steps


@pytest.mark.parametrize('kind', KINDS)
@settings(max_examples=30, deadline=None)
@given(case=huge_and_tiny_grads(), scale=st.sampled_from([1e-30, 1.0, 1e30]))
def test_finite_gradients_give_finite_updates(kind, case, scale):
    shapes, steps = case
    net = make_net(kind) if kind != 'stepsize' else build_net('stepsize', lr=1.0)
    params = [torch.randn(s) for s in shapes]
    states = net.init_state(params)
    with torch.no_grad():
        for step, grads in enumerate(steps):
            grads = [(g * scale).clamp(-3e38, 3e38) for g in grads]       # stay finite in float32
            params, states = net.update(params, grads, states, step)
            assert all(torch.isfinite(p).all() for p in params), kind
            assert all(torch.isfinite(v).all() for s in states for v in s.values() if v.is_floating_point()), kind


def test_all_coordinates_in_one_call_equals_per_tensor_calls():
    "The LSTM and MLP nets are coordinatewise (up to the per-tensor normalisation): batching tensors changes nothing"
    for kind in ('lstm', 'mlp'):
        net = make_net(kind)
        params = [torch.randn(5, 4), torch.randn(7)]
        grads = [torch.randn(5, 4), torch.randn(7)]
        together, _ = net.update(params, grads, net.init_state(params), 2)
        for i in range(2):
            alone, _ = net.update(params[i:i + 1], grads[i:i + 1], net.init_state(params[i:i + 1]), 2)
            torch.testing.assert_close(alone[0], together[i])


# --- compile=True: one compiled update per net kind, shared by the tests below (compiling takes seconds) ---

from torch._dynamo.utils import counters
from lgl2o.learned import check_compile, compile_update
from lgl2o.pretrained import load_pretrained

COMPILED_NETS = ['lstm-mnist', 'mlp-mnist', 'celo-mlpfamily']
# compiled against eager, relative to the largest update: fused loops round differently, and CeloNet's Newton-Schulz
# polynomial amplifies rounding (on these small matrices its eager float32 update is itself up to 1e-3 from float64's)
UPDATE_TOL = {'lstm-mnist': 1e-4, 'mlp-mnist': 1e-4, 'celo-mlpfamily': 3e-3}


@pytest.fixture(scope='module')
def compiled():
    "name -> (net, compiled update, small MLP task): compiled once for the module"
    task = MLPTask(data=spirals(n=64, n_test=16), hidden=(6, 5), batch_size=16)
    out = {}
    for name in COMPILED_NETS:
        net = load_pretrained(name)
        out[name] = (net, compile_update(net), task)
    return out


def close(a, b, rel=1e-5):
    "a and b agree to `rel` of a's largest magnitude (float rounding of fused loops)"
    return all((x - y).abs().max() <= rel * x.abs().max().clamp(min=1e-12) for x, y in zip(a, b))


@pytest.mark.parametrize('name', COMPILED_NETS)
def test_compiled_update_equals_eager_without_recompiling(compiled, name):
    net, fast, task = compiled[name]
    model, batches = task.init(0), task.batches(0)
    states = {k: net.init_state(list(model.parameters())) for k in ('eager', 'compiled')}
    with torch.no_grad():
        for step in range(6):
            model.zero_grad()
            with torch.enable_grad(): task.loss(model, next(batches)).backward()
            params, grads = [p.detach().clone() for p in model.parameters()], [p.grad.clone() for p in model.parameters()]
            new, states['eager'] = net.update(params, grads, states['eager'], step)
            new_c, states['compiled'] = fast(params, grads, states['compiled'], step)
            if step == 0: graphs = counters['stats']['unique_graphs']   # the first call compiles
            assert close([n - p for n, p in zip(new, params)], [n - p for n, p in zip(new_c, params)], UPDATE_TOL[name])   # the update
            for se, sc in zip(states['eager'], states['compiled']):
                assert close(list(se.values()), [sc[k] for k in se], 1e-3)
            for p, n in zip(model.parameters(), new): p.copy_(n)
    assert counters['stats']['unique_graphs'] == graphs, "the step count (new every step) recompiled the update"


@pytest.mark.parametrize('name', COMPILED_NETS)
def test_optimizer_compile_option_state_dict_copy_and_pickle(compiled, name):
    import pickle
    net, _, task = compiled[name]   # the same net class: the compiled code above is reused, nothing compiles again
    eager_model, fast_model = task.init(0), task.init(0)
    eager = LearnedOptimizer(eager_model.parameters(), net)
    fast = LearnedOptimizer(fast_model.parameters(), net, compile=True)
    batches = task.batches(0)
    def step_both(pairs, batch):
        for m, o in pairs: o.zero_grad(); task.loss(m, batch).backward(); o.step()
    for _ in range(3): step_both([(eager_model, eager), (fast_model, fast)], next(batches))
    assert close(list(eager_model.parameters()), list(fast_model.parameters()), UPDATE_TOL[name])
    # state_dict round trip into a new compiled optimizer, a deepcopy and a pickle: all continue as the original
    twin_model = copy.deepcopy(fast_model)
    twin = LearnedOptimizer(twin_model.parameters(), net, compile=True)
    twin.load_state_dict(fast.state_dict())
    copied_model, copied = copy.deepcopy((fast_model, fast))
    pickled_model, pickled = pickle.loads(pickle.dumps((fast_model, fast)))
    assert copied.compile_options == {} and copied._compiled.fn is None and pickled.net.kind == net.kind
    batch = next(batches)
    step_both([(fast_model, fast), (twin_model, twin), (copied_model, copied), (pickled_model, pickled)], batch)
    for other in (twin_model, copied_model, pickled_model):
        assert close(list(fast_model.parameters()), list(other.parameters()), 1e-6)
    assert float(pickled.state[next(pickled_model.parameters())]['step']) == 4


@pytest.mark.parametrize('name', COMPILED_NETS)
def test_a_compiled_optimizer_resumed_from_an_eager_checkpoint_compiles_once(compiled, name):
    "Eager states are views of one flat result; loaded into a compiled optimizer they are laid out as its own, so no second compile"
    net, _, task = compiled[name]
    eager_model, batches = task.init(0), task.batches(0)
    eager = LearnedOptimizer(eager_model.parameters(), net)
    for _ in range(3):
        eager.zero_grad(); task.loss(eager_model, next(batches)).backward(); eager.step()
    fast_model = copy.deepcopy(eager_model)
    fast = LearnedOptimizer(fast_model.parameters(), net, compile=True)
    fast.load_state_dict(eager.state_dict())
    for step in range(3):
        batch = next(batches)
        for m, o in ((eager_model, eager), (fast_model, fast)): o.zero_grad(); task.loss(m, batch).backward(); o.step()
        if step == 0: graphs = counters['stats']['unique_graphs']
    assert counters['stats']['unique_graphs'] == graphs, "the resumed states' layout compiled the update a second time"
    assert close(list(eager_model.parameters()), list(fast_model.parameters()), UPDATE_TOL[name])


def test_compile_option_errors(monkeypatch):
    net = build_net('lstm')
    assert check_compile(False, net) is None and check_compile(True, net) == {}
    assert check_compile({'mode': 'max-autotune-no-cudagraphs'}, net) == {'mode': 'max-autotune-no-cudagraphs'}
    with pytest.raises(TypeError, match='compile must be True, False or a dict'): check_compile('yes', net)
    with pytest.raises(ValueError, match=r"torch.compile has no argument \['fulgraph'\]"): check_compile({'fulgraph': True}, net)
    import torch._inductor.cpp_builder as cpp_builder
    def missing(): raise RuntimeError('no compiler')
    monkeypatch.setattr(cpp_builder, 'get_cpp_compiler', missing)
    with pytest.raises(RuntimeError, match='needs a C\\+\\+ compiler .* or pass compile=False') as e:
        LearnedOptimizer(torch.nn.Linear(2, 1).parameters(), net, compile=True)
    assert '\n' not in str(e.value)
    LearnedOptimizer(torch.nn.Linear(2, 1).parameters(), net)   # compile=False needs no compiler
