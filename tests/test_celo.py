"""The shipped general-purpose learned optimizer (CeloNet meta-trained on MLPFamily) and the speed-up metric it is judged by."""
import copy
import math

import torch

from lgl2o.bench import speedup_over_adam, train_loss_curve
from lgl2o.learned import NS_COEFFICIENTS, CeloNet, LearnedOptimizer, build_net, newton_schulz, restore_net
from lgl2o.meta import MetaConfig, make_task
from lgl2o.pretrained import load_pretrained, pretrained_config, pretrained_info, pretrained_names
from lgl2o.tasks import MLPFamily, QuadraticTask, mnist_mlp

NAME = 'celo-mlpfamily'


def test_shipped_and_recorded():
    assert NAME in pretrained_names()
    info, config = pretrained_info(NAME), pretrained_config(NAME)
    assert info['kind'] == 'celo' and config['task'] == 'mlp_family' and config['estimator'] == 'pes'
    assert MetaConfig.from_dict(config).to_dict() == MetaConfig.from_json(MetaConfig.from_dict(config).to_json()).to_dict()
    assert info['trained_with'].startswith('lgl2o-train --config lgl2o/pretrained/celo-mlpfamily.json')


def test_config_round_trips_to_the_same_net():
    net = load_pretrained(NAME)
    twin = restore_net(net.kind, net.config, net.state_dict())
    assert twin.config == net.config and all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), twin.state_dict().values()))
    assert build_net('celo', **net.config).config == net.config
    size = lambda n: sum(p.numel() for p in n.parameters())
    # the shipped rule is a 1 x 4 MLP, smaller than Celo2's 2 x 8 (CeloNet's defaults), to keep a step within 2x Adam's
    assert (net.config['hidden'], net.config['layers']) == (4, 1)
    assert size(net) == size(CeloNet(hidden=4, layers=1)) < size(CeloNet()) < 200


def test_update_is_finite_and_trains_a_model_of_the_family():
    net = load_pretrained(NAME)
    params = [torch.randn(7, 30), torch.randn(7), torch.randn(3, 3, 2), torch.randn(())]
    grads = [torch.randn_like(p) * s for p, s in zip(params, (1e-20, 1.0, 1e12, 0.0))]
    states = net.init_state(params)
    with torch.no_grad():
        for step in range(3):
            params, states = net.update(params, grads, states, step)
            assert all(torch.isfinite(p).all() for p in params)
    task = MLPFamily(widths=(16,), depths=(2,), activations=('tanh',)).sample(0)
    curve = train_loss_curve(task, lambda ps: LearnedOptimizer(ps, net), 60, seed=3, eval_every=20)
    assert curve[-1][0] == 60 and curve[-1][1] < 0.5 * curve[0][1]


def test_newton_schulz_orthogonalises():
    for shape in [(20, 784), (30, 30), (50, 4)]:
        sv = torch.linalg.svdvals(newton_schulz(torch.randn(shape, generator=torch.Generator().manual_seed(0))))
        assert 0.6 < sv.min() and sv.max() < 1.25


def test_family_samples_batch_sizes_and_keeps_old_draws():
    old, new = MLPFamily(widths=(16, 32), activations=('relu', 'tanh')), MLPFamily(widths=(16, 32), activations=('relu', 'tanh'), batch_sizes=(32, 64))
    for seed in range(10):
        a, b = old.sample(seed), new.sample(seed)
        assert (a.hidden, a.activation, a.batch_size) == (b.hidden, b.activation, 128) and b.batch_size in (32, 64)
        assert b.batch_size == new.sample(seed).batch_size
    assert {new.sample(s).batch_size for s in range(20)} == {32, 64}
    assert make_task('mlp_family', batch_sizes=[64]).sample(1).batch_size == 64


def test_speedup_of_adam_over_itself_is_one():
    task = QuadraticTask(dim=10, condition=10.0, seed=0)
    r = speedup_over_adam(task, lambda ps: torch.optim.Adam(ps, lr=0.1), 30, seeds=[0, 1], grid=[0.1], eval_every=1)
    assert r['speedup'] == 1.0 and all(x['adam_steps'] == 30 and x['adam_lr'] == 0.1 for x in r['runs'])


def test_speedup_of_a_faster_optimizer_and_of_a_diverged_one():
    task = QuadraticTask(dim=10, condition=10.0, seed=0)
    fast = speedup_over_adam(task, lambda ps: torch.optim.SGD(ps, lr=1 / task.L), 30, eval_every=1)
    assert fast['speedup'] > 1 and fast['runs'][0]['adam_steps'] > 30
    capped = speedup_over_adam(task, lambda ps: torch.optim.SGD(ps, lr=1 / task.L), 30, grid=[1e-4], horizon=1.5, eval_every=1)
    assert capped['speedup'] == 1.5 and capped['runs'][0]['capped']   # Adam at 1e-4 never gets there: the cap
    bad = speedup_over_adam(task, lambda ps: torch.optim.SGD(ps, lr=100.0), 30, grid=[0.1])
    assert bad['speedup'] == 0.0 and bad['runs'][0]['final_loss'] == math.inf


def reference_update(net: CeloNet, params, grads, states, step):
    "CeloNet's update written out as its docs state it, tensor by tensor, with no fusion: what the optimized update must equal"
    cfg, t, (a, b, c) = net.config, step + 1, NS_COEFFICIENTS
    decays = torch.tensor(cfg['decays'])[:, None]
    embed = torch.tensor([1.0] + [math.tanh(step / tau) for tau in cfg['timescales']])
    schedule = torch.exp((cfg['schedule_mult'] * (net.log_lr @ embed)).clamp(-20.0, 20.0))
    new, new_states = [], []
    for p, g, s in zip(params, grads, states):
        g = g.reshape(-1)
        m = decays * s['m'] + (1 - decays) * g
        v = cfg['beta2'] * s['v'] + (1 - cfg['beta2']) * g * g
        features = torch.cat([g[None], m / (1 - decays ** t)]) / torch.sqrt(v / (1 - cfg['beta2'] ** t) + cfg['eps'] ** 2)
        if p.ndim >= 2:
            h = features.T
            for layer in net.hidden_layers: h = torch.relu(layer(h))
            y = (features[1] + net.output(h)[:, 0]).view(p.shape[0], -1)
            y = y / torch.sqrt((y * y).sum() + 1e-14)
            for _ in range(cfg['ns_steps']):
                gram = y @ y.T
                y = a * y + (b * gram + c * gram @ gram) @ y
            new.append(p - schedule[0] * cfg['lr'] * math.sqrt(max(y.shape)) * y.view(p.shape))
        else: new.append(p - schedule[1] * cfg['lr_1d'] * features[1].view(p.shape))
        new_states.append({'m': m, 'v': v})
    return new, new_states


def assert_same_update(net, params, grads, states, ref_states, step):
    "The optimized update, with and without autograd recording, equals the reference to float32 rounding; the new states of both"
    with torch.no_grad(): expected, ref_states = reference_update(net, params, grads, ref_states, step)
    for grad_mode in (False, True):
        with torch.set_grad_enabled(grad_mode): got, new_states = net.update(params, grads, states, step)
        for p, x, y in zip(params, got, expected):
            # Newton-Schulz multiplies the rounding of a small singular value by up to a^5 ~ 500: a matrix's step agrees to 1e-3 of
            # its largest entry (2e-4 measured, before and after the update was optimized), every other tensor's to 1e-5
            step_size, tolerance = (y - p).abs().max(), 1e-3 if p.ndim >= 2 else 1e-5
            assert (x.detach() - y).abs().max() <= tolerance * step_size + 1e-12, (tuple(p.shape), step, (x.detach() - y).abs().max(), step_size)
        for s, r in zip(new_states, ref_states):   # the moments: torch.lerp(g^2, v, 0.999) rounds 1 - 0.999 to float32, 3 digits lost
            for k in ('m', 'v'): assert (s[k].detach() - r[k]).abs().max() <= 1e-3 * r[k].abs().max(), (k, step)
    return [p.detach() for p in got], [{k: v.detach() for k, v in s.items()} for s in new_states], ref_states


def test_update_equals_the_plain_reference_on_a_real_model():
    "Five steps of the shipped net on the MNIST MLP (a wide first layer, a nearly square second), then tall, square and 0-d tensors"
    net, task = load_pretrained(NAME), mnist_mlp()
    model = task.init(0)
    params, batches = list(model.parameters()), task.batches(0)
    states = ref_states = net.init_state(params)
    for step in range(5):
        model.zero_grad(); task.loss(model, next(batches)).backward()
        new, states, ref_states = assert_same_update(net, params, [p.grad for p in params], states, ref_states, step)
        with torch.no_grad():
            for p, n in zip(params, new): p.copy_(n)
    gen = torch.Generator().manual_seed(0)
    odd = [torch.randn(300, 7, generator=gen), torch.randn(9, 9, generator=gen), torch.randn(2, 3, 4, generator=gen), torch.randn((), generator=gen)]
    states = ref_states = net.init_state(odd)
    for step in range(3):
        _, states, ref_states = assert_same_update(net, odd, [torch.randn(p.shape, generator=gen) for p in odd], states, ref_states, step)


def test_channels_last_convolutions_train_as_contiguous_ones():
    "A CNN in channels_last memory format, stepped by the shipped net as in a plain loop, matches the same CNN in the default format"
    def cnn(): return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
    torch.manual_seed(0)
    plain, x, y = cnn(), torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 0, 1, 1])
    last = cnn().to(memory_format=torch.channels_last)
    last.load_state_dict(plain.state_dict())
    assert last[0].weight.is_contiguous(memory_format=torch.channels_last) and not last[0].weight.is_contiguous()
    runs = []
    for model, inputs in ((plain, x), (last, x.to(memory_format=torch.channels_last))):
        opt = LearnedOptimizer(model.parameters(), load_pretrained(NAME))
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(inputs), y).backward()
            opt.step()
        runs.append(model)
    assert last[0].weight.is_contiguous(memory_format=torch.channels_last)   # the step kept the model's layout
    for a, b in zip(*(r.parameters() for r in runs)): torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_loops_follow_the_tensor_ops_along_a_run():
    "Along 40 MNIST steps, each update of the compiled CPU loops is the tensor ops' update from the same state, to float32 rounding"
    net = load_pretrained(NAME)
    with torch.no_grad():   # a non-zero MLP output too, so that the MLP is compared and not only the Adam direction
        net.output.weight.normal_(0, 0.3); net.hidden_layers[0].weight.normal_(0, 0.5)
    tensor_ops = copy.deepcopy(net); tensor_ops.use_fused_kernel = False
    task = mnist_mlp()
    model, batches = task.init(0), task.batches(0)
    params = list(model.parameters())
    states, worst = net.init_state(params), 0.0
    for step in range(40):
        grads = torch.autograd.grad(task.loss(model, next(batches)), params)
        with torch.no_grad():
            (new, new_states), (want, want_states) = (n.update(params, grads, states, step) for n in (net, tensor_ops))
            for p, a, b in zip(params, new, want): worst = max(worst, ((a - b).abs().max() / (b - p).abs().max()).item())
            for a, b in zip(new_states, want_states):
                for k in ('m', 'v'): assert (a[k] - b[k]).abs().max() <= 1e-5 * b[k].abs().max()
            for p, a in zip(params, new): p.copy_(a)
        states = new_states
    # the directions agree to 3e-7; Newton-Schulz magnifies that along a direction's small singular values (the output
    # layer's at step 2 is 1e-2 of its largest), to 3e-4 of the step there and about 1e-6 elsewhere
    assert worst < 1e-3, worst


def test_compiled_loops_run_where_they_can_and_only_there():
    "The compiled loops take CPU float32 and float64 with one hidden layer; a deeper MLP, another dtype or the switch off take tensor ops"
    net = load_pretrained(NAME)
    g, m, v = torch.randn(10), torch.zeros(3, 10), torch.zeros(10)
    assert net._fused_kernel(g, m, v) is not None
    assert net.double()._fused_kernel(g.double(), m.double(), v.double()) is not None
    assert net._fused_kernel(g, m, v) is None   # the net is float64 now, the tensors float32
    assert CeloNet(layers=2)._fused_kernel(g, m, v) is None
    off = CeloNet(hidden=4, layers=1); off.use_fused_kernel = False
    assert off._fused_kernel(g, m, v) is None
    assert CeloNet(hidden=4, layers=1)._fused_kernel(g, m[:, ::2].repeat(1, 2), v) is not None
    assert CeloNet(hidden=4, layers=1)._fused_kernel(g, torch.zeros(10, 3).T, v) is None   # not contiguous
