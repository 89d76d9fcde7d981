"""The shipped general-purpose learned optimizer (CeloNet meta-trained on MLPFamily) and the speed-up metric it is judged by."""
import math

import torch

from lgl2o.bench import speedup_over_adam, train_loss_curve
from lgl2o.learned import CeloNet, LearnedOptimizer, build_net, newton_schulz, restore_net
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
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in CeloNet().parameters()) < 200


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
