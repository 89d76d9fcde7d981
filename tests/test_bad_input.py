"""Issue #9: each public entry point answers bad input with one clear line and leaves models, optimizer states and files
as they were. (lgl2o-train's option and config-file checks are in test_cli.py, checkpoint formats in test_meta.py.)"""
import contextlib
import io
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from lgl2o import GradientGuard, LearnedOptimizer, LossGuard, build_net, load_checkpoint, load_mnist, load_pretrained, mnist_mlp
from lgl2o.cli import bench_main
from lgl2o.learned import NETS, check_placement, restore_net
from lgl2o.pretrained import load_net, net_record, save_net
from lgl2o.tasks import QuadraticTask

KINDS = list(NETS)


def one_line(e) -> str:
    msg = str(e.value)
    assert msg and '\n' not in msg and 'Traceback' not in msg, msg
    return msg


def model_and_batch(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)).to(dtype)
    return model, (torch.randn(8, 4, generator=g).to(dtype), torch.randn(8, 1, generator=g).to(dtype))


def snapshot(model): return [p.detach().clone() for p in model.parameters()]


def unchanged(model, before): return all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def loss_of(model, batch): return ((model(batch[0]) - batch[1]) ** 2).mean()


def stepped(kind='lstm', steps=2):
    "A model and a LearnedOptimizer that has taken `steps` steps (so it has state to lose)"
    model, batch = model_and_batch()
    opt = LearnedOptimizer(model.parameters(), build_net(kind))
    for _ in range(steps):
        opt.zero_grad(); loss_of(model, batch).backward(); opt.step()
    return model, batch, opt


def guard_over(model, cls=LossGuard, **kw):
    return cls(LearnedOptimizer(model.parameters(), build_net('lstm')), torch.optim.SGD(model.parameters(), lr=0.1), **kw)


# --- hyperparameters out of range --------------------------------------------------------------------------------

@pytest.mark.parametrize('lr', [-1.0, math.nan, math.inf, '0.1', None, True])
def test_learned_optimizer_lr(lr):
    model, _ = model_and_batch()
    with pytest.raises(ValueError) as e: LearnedOptimizer(model.parameters(), build_net('mlp'), lr=lr)
    assert 'lr must be a finite number >= 0' in one_line(e)


def test_param_group_lr_is_checked_too():
    model, _ = model_and_batch()
    opt = LearnedOptimizer(list(model.parameters())[:2], build_net('mlp'))
    with pytest.raises(ValueError) as e: opt.add_param_group({'params': list(model.parameters())[2:], 'lr': -3})
    assert 'lr must be' in one_line(e) and len(opt.param_groups) == 1


@pytest.mark.parametrize('option, value, needle', [
    ('delta', 0.0, 'delta must be a number strictly between 0 and 1'), ('delta', 1.5, 'delta must be'),
    ('delta', math.nan, 'delta must be'), ('theta', 0, 'theta must be'), ('theta', 1, 'theta must be'),
    ('window', 0, 'window must be a positive integer'), ('scheme', 'ema2', "scheme must be one of ['ema'"),
    ('compare', 'future', "compare must be one of ['next', 'same']")])
def test_gradient_guard_options(option, value, needle):
    model, _ = model_and_batch()
    with pytest.raises(ValueError) as e: guard_over(model, GradientGuard, **{option: value})
    assert needle in one_line(e)


def test_loss_guard_compare_rule():
    model, _ = model_and_batch()
    with pytest.raises(ValueError) as e: guard_over(model, compare='expected')
    assert "compare must be one of ['next', 'same'], got 'expected'" in one_line(e)


def test_fallback_hyperparameters_are_torch_s_own_check():
    model, _ = model_and_batch()
    with pytest.raises(ValueError, match='Invalid learning rate'):
        LossGuard(LearnedOptimizer(model.parameters(), build_net('lstm')), torch.optim.SGD(model.parameters(), lr=-1))


# --- closures ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('make, error, needle', [
    (lambda m, b: 1.0, TypeError, 'scalar tensor, got float'),
    (lambda m, b: None, TypeError, 'scalar tensor, got NoneType'),
    (lambda m, b: (m(b[0]) - b[1]) ** 2, TypeError, 'got a tensor of shape (8, 1)'),
    (lambda m, b: loss_of(m, b).detach(), ValueError, "the closure's loss has no graph"),
    (lambda m, b: loss_of(m, b) * math.nan, FloatingPointError, 'the loss at the current parameters is nan')])
@pytest.mark.parametrize('cls', [LossGuard, GradientGuard])
def test_bad_closure_leaves_the_model(cls, make, error, needle):
    model, batch = model_and_batch()
    guard, before = guard_over(model, cls), snapshot(model)
    with pytest.raises(error) as e: guard.step(lambda: make(model, batch))
    assert needle in one_line(e) and unchanged(model, before)
    guard.step(lambda: loss_of(model, batch))   # and the guard still works afterwards
    assert guard.steps == 1


def test_closure_with_backward_inside_is_refused_in_no_grad():
    model, batch = model_and_batch()
    guard = guard_over(model)
    def closure():
        with torch.no_grad(): return loss_of(model, batch)
    with pytest.raises(ValueError, match='no graph'): guard.step(closure)


def test_step_without_closure():
    model, _ = model_and_batch()
    with pytest.raises(TypeError) as e: guard_over(model).step()
    assert 'needs a closure that returns the minibatch loss' in one_line(e)


# --- parameters -------------------------------------------------------------------------------------------------------

def test_learned_and_fallback_over_different_parameters():
    model, _ = model_and_batch()
    other, _ = model_and_batch(1)
    with pytest.raises(ValueError) as e:
        LossGuard(LearnedOptimizer(model.parameters(), build_net('lstm')), torch.optim.SGD(other.parameters(), lr=0.1))
    assert "build both from one model's parameters" in one_line(e)
    opt = LearnedOptimizer(model.parameters(), build_net('lstm'))
    with pytest.raises(ValueError, match='the same optimizer object'): LossGuard(opt, opt)
    with pytest.raises(TypeError, match='must be a torch.optim.Optimizer'): LossGuard(opt, build_net('lstm'))


def test_empty_and_used_up_parameter_lists():
    model, _ = model_and_batch()
    with pytest.raises(ValueError) as e: LearnedOptimizer([], build_net('lstm'))
    assert 'got no parameters' in one_line(e)
    params = model.parameters()
    LearnedOptimizer(params, build_net('lstm'))
    with pytest.raises(ValueError) as e: LearnedOptimizer(params, build_net('lstm'))
    assert 'a generator is used up' in one_line(e)


def test_float64_model_with_float32_net():
    model, batch = model_and_batch(dtype=torch.float64)
    with pytest.raises(TypeError) as e: LearnedOptimizer(model.parameters(), load_pretrained('lstm-mnist'))
    assert 'is torch.float64 but the learned optimizer\'s net is torch.float32' in one_line(e)
    assert 'net.to(torch.float64)' in str(e.value)
    opt = LearnedOptimizer(model.parameters(), load_pretrained('lstm-mnist').to(torch.float64))   # the fix works
    opt.zero_grad(); loss_of(model, batch).backward(); opt.step()
    assert all(p.dtype == torch.float64 and torch.isfinite(p).all() for p in model.parameters())


def test_model_converted_after_the_optimizer_was_built():
    model, batch = model_and_batch()
    opt = LearnedOptimizer(model.parameters(), build_net('mlp'))
    model.double(); before = snapshot(model)
    opt.zero_grad(); loss_of(model, tuple(t.double() for t in batch)).backward()
    with pytest.raises(TypeError, match='net.to'): opt.step()
    assert unchanged(model, before) and len(opt.state) == 0


def test_parameters_on_another_device():
    w = torch.nn.Parameter(torch.zeros(3, device='meta'))   # any device other than the net's
    with pytest.raises(ValueError) as e: check_placement([w], build_net('lstm'))
    assert "is on meta but the learned optimizer's net is on cpu" in one_line(e)
    with pytest.raises(ValueError): LearnedOptimizer([w], build_net('lstm'))


def test_state_dict_of_another_net_or_model_is_refused_and_nothing_lost():
    model, batch, opt = stepped('lstm')
    _, _, mlp_opt = stepped('mlp')
    mine = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
    with pytest.raises(ValueError) as e: opt.load_state_dict(mlp_opt.state_dict())
    assert 'saved over another net or model' in one_line(e)
    assert all(torch.equal(v, mine[k]) for k, v in opt.state[next(model.parameters())].items())
    wide = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    with pytest.raises(ValueError, match='another net or model'):
        LearnedOptimizer(wide.parameters(), build_net('lstm')).load_state_dict(opt.state_dict())


# --- gradients --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('bad', [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize('kind', KINDS)
def test_non_finite_gradient_changes_nothing(kind, bad):
    model, batch, opt = stepped(kind)
    before = snapshot(model)
    states = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    opt.zero_grad(); loss_of(model, batch).backward()
    list(model.parameters())[2].grad[0, 1] = bad
    with pytest.raises(FloatingPointError) as e: opt.step()
    assert 'parameter 2 (shape (1, 3)) has NaN or inf entries' in one_line(e)
    assert unchanged(model, before)
    assert all(torch.equal(v, states[id(p)][k]) for p in model.parameters() for k, v in opt.state[p].items())


@pytest.mark.parametrize('cls', [LossGuard, GradientGuard])
def test_guard_refuses_non_finite_gradient(cls):
    model, batch = model_and_batch()
    guard, before = guard_over(model, cls), snapshot(model)
    nan_grad = lambda: loss_of(model, batch) + (0 * list(model.parameters())[0]).abs().sqrt().sum()   # value finite, gradient NaN
    with pytest.raises(FloatingPointError) as e: guard.step(nan_grad)
    assert 'the gradient at the current parameters has NaN or inf entries' in one_line(e) and unchanged(model, before)


SIZES = st.integers(1, 6)
MAGNITUDE = st.sampled_from([0.0, 1e-38, 1e-30, 1e-8, 1e-3, 1.0, 1e3, 1e8, 1e20, 1e30])


@st.composite
def gradient_sequences(draw):
    "A few steps of gradients for two small tensors: magnitudes from 0 to 1e30, mixed signs, shared or per-entry scale"
    shapes = [(draw(SIZES),), (draw(SIZES), draw(SIZES))]
    steps = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    seq = []
    for _ in range(steps):
        grads = []
        for s in shapes:
            scale = torch.tensor([draw(MAGNITUDE) for _ in range(math.prod(s))]).view(s) if draw(st.booleans()) \
                else torch.full(s, draw(MAGNITUDE))
            grads.append(torch.randn(s, generator=g).sign() * scale)
        seq.append(grads)
    theta = [torch.randn(s, generator=g) * draw(st.sampled_from([0.0, 1e-3, 1.0, 1e3])) for s in shapes]
    return theta, seq


@pytest.mark.parametrize('net', [*KINDS, 'lstm-mnist', 'mlp-mnist', 'nominal-mnist', 'celo-mlpfamily'])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=gradient_sequences())
def test_finite_gradients_give_finite_updates(net, case):
    """Finite gradients from 0 to 1e30 (and parameters up to 1e3) never produce a non-finite update. The step-size net is
    GD (theta - eta g), finite for these magnitudes like SGD; the others squash the gradient in their preprocessing."""
    theta, seq = case
    opt_net = load_pretrained(net) if '-' in net else build_net(net)
    params = [torch.nn.Parameter(t.clone()) for t in theta]
    opt = LearnedOptimizer(params, opt_net)
    for grads in seq:
        for p, g in zip(params, grads): p.grad = g.clone()
        opt.step()
        assert all(torch.isfinite(p).all() for p in params), (net, [g.abs().max().item() for g in grads])
        assert all(torch.isfinite(v).all() for p in params for v in opt.state[p].values())


# --- files -------------------------------------------------------------------------------------------------------------

def test_net_file_of_another_architecture_version_or_truncated(tmp_path):
    net = build_net('lstm', hidden=4)
    good = save_net(net, tmp_path / 'net.pt')
    torch.save({**net_record(net), 'net_config': {**net.config, 'hidden': 8}}, tmp_path / 'arch.pt')
    torch.save({**net_record(net), 'version': 99}, tmp_path / 'version.pt')
    (tmp_path / 'cut.pt').write_bytes(good.read_bytes()[:200])
    (tmp_path / 'text.pt').write_text('not a net')
    for name, needle in [('arch.pt', "does not hold a loadable 'lstm' net"), ('version.pt', 'net-file version 99'),
                         ('cut.pt', 'not a readable torch file'), ('text.pt', 'not a readable torch file')]:
        before = (tmp_path / name).read_bytes()
        with pytest.raises(ValueError) as e: load_net(tmp_path / name)
        assert needle in one_line(e) and name in str(e.value)
        assert (tmp_path / name).read_bytes() == before   # reading never repairs or rewrites a file
    with pytest.raises(ValueError, match='not an lgl2o meta-training checkpoint'): load_checkpoint(good)
    with pytest.raises(FileNotFoundError, match='no net file'): load_net(tmp_path / 'absent.pt')


def test_restore_net_names_the_source_and_the_kind():
    with pytest.raises(ValueError) as e: restore_net('lstm', {'hidden': 3}, build_net('lstm').state_dict(), 'x.pt')
    assert one_line(e).startswith("x.pt does not hold a loadable 'lstm' net")
    with pytest.raises(ValueError) as e: restore_net('lstm', {'hiden': 3}, {}, 'x.pt')
    assert "no option ['hiden']" in one_line(e)


def test_unknown_pretrained_name_lists_what_exists():
    with pytest.raises(ValueError) as e: load_pretrained('adam-mnist')
    assert "'adam-mnist'" in one_line(e) and all(n in str(e.value) for n in ('lstm-mnist', 'mlp-mnist', 'nominal-mnist'))


def test_dataset_path_missing_or_malformed(tmp_path):
    with pytest.raises(FileNotFoundError) as e: load_mnist(tmp_path / 'nowhere')
    assert 'does not exist' in one_line(e)
    (tmp_path / 'bad.npz').write_bytes(b'PK not really')
    with pytest.raises(ValueError) as e: load_mnist(tmp_path / 'bad.npz')
    assert 'not a readable .npz' in one_line(e)


@pytest.mark.parametrize('kwargs, needle', [({'hidden': (20, 0)}, 'hidden must be a width or a sequence of widths'),
                                            ({'hidden': 'wide'}, 'hidden must be'), ({'batch_size': 0}, 'batch_size must be'),
                                            ({'activation': 'swish'}, "unknown activation 'swish'")])
def test_task_settings(kwargs, needle):
    with pytest.raises(ValueError) as e: mnist_mlp(**kwargs)
    assert needle in one_line(e)


# --- lgl2o-bench (lgl2o-train's are in test_cli.py) ------------------------------------------------------------------

def bench(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: code = bench_main([str(a) for a in args])
        except SystemExit as e: code = e.code
    return code, err.getvalue()


@pytest.mark.parametrize('args, needle', [(['--full', '--max-steps', '5'], '--full asks for the long horizons'),
                                          (['--seeds', '0,x'], 'must be a count'), (['--threads', '0'], '--threads must be >= 1'),
                                          (['--fast'], "unrecognized argument '--fast'"),
                                          (['--timing-steps', '-1'], '--timing-steps must be >= 1')])
def test_bench_usage_errors(tmp_path, args, needle):
    code, err = bench('--out', tmp_path / 'out', *args)
    assert code == 2 and needle in err and err.count('\n') == 1 and err.startswith('lgl2o-bench: error: '), err
    assert not (tmp_path / 'out' / 'steps.csv').exists()


def test_bench_keeps_an_earlier_run(tmp_path):
    (tmp_path / 'steps.csv').write_text('earlier results')
    code, err = bench('--out', tmp_path, '--quiet')
    assert code == 2 and 'already holds an earlier run (steps.csv); pass --overwrite' in err and err.count('\n') == 1
    assert (tmp_path / 'steps.csv').read_text() == 'earlier results'


def test_a_boolean_is_not_a_count():
    "JSON's true and Python's True pass isinstance(x, int): every count refuses them"
    with pytest.raises(ValueError, match='dim must be'): QuadraticTask(dim=True)
    with pytest.raises(ValueError, match='n_tensors'): build_net('stepsize', per_tensor=True, n_tensors=True)
