"""The meta-gradient estimators of lgl2o.meta: ES and PES against the exact (autograd) meta-gradient of a whole
trajectory, the truncation bias of truncated backpropagation and ES, and the estimators' settings in the trainer and
on the command line."""
import json
import math

import pytest
import torch

import lgl2o.meta
from lgl2o.cli import train_main
from lgl2o.learned import build_net
from lgl2o.meta import (MetaConfig, MetaTrainer, antithetic_estimate, forward_unroll, meta_vector, perturbation, perturbed,
                        read_checkpoint, unroll)
from lgl2o.tasks import QuadraticTask

TASK = QuadraticTask(dim=5, condition=10.0, seed=0)
LR = 0.1   # the learned step size eta at which the meta-gradients are compared (d / d log eta)


def exact_gradient(init_seed: int, steps: int) -> float:
    "d/d log eta of the sum of the losses of a whole `steps`-step trajectory from TASK.params(init_seed), by autograd (second order)"
    net = build_net('stepsize', lr=LR)
    res = unroll(net, TASK, TASK.params(init_seed), [{}], TASK.batches(), steps, objective='sum', second_order=True)
    return torch.autograd.grad(res.meta_loss, net.log_lr)[0].item()


def trajectory_gradients(estimator: str, trajectories: int, unroll_steps: int, trajectory: int, **settings):
    "Per trajectory: the sum of the trainer's meta-gradient estimates over its truncations, and the exact gradient (the net never changes)"
    config = MetaConfig(net='stepsize', net_config={'lr': LR}, task='quadratic', unroll=unroll_steps, trajectory=trajectory,
                        objective='sum', estimator=estimator, seed=0, **settings)
    tr = MetaTrainer(config, task=TASK, progress=False)
    before = meta_vector(tr.net)
    started, start = [], tr._start_trajectory   # note the seeds of every trajectory the trainer starts
    tr._start_trajectory = lambda seeds, *args: started.append(seeds) or start(seeds, *args)
    estimates, exact = [], []
    for _ in range(trajectories):
        total = 0.0
        for _ in range(trajectory // unroll_steps):
            grads, loss, ok = tr.meta_gradient()
            assert ok and math.isfinite(loss)
            total += grads[0].item()
        assert tr.traj is None   # the trajectory ended
        estimates.append(total)
        exact.append(exact_gradient(started[-1][1], trajectory))
    assert len(started) == trajectories
    assert torch.equal(meta_vector(tr.net), before)   # estimating leaves the net as it was
    return torch.tensor(estimates, dtype=torch.float64), torch.tensor(exact, dtype=torch.float64)


def mean_and_se(x: torch.Tensor) -> tuple[float, float]:
    return x.mean().item(), x.std().item() / math.sqrt(len(x))


def test_es_on_a_whole_trajectory_matches_the_autograd_meta_gradient():
    "One truncation per trajectory: ES's mean over 300 antithetic pairs is within 4 standard errors of the exact gradient"
    est, exact = trajectory_gradients('es', 30, 10, 10, perturbations=10, sigma=0.01)
    bias, se = mean_and_se(est - exact)
    assert abs(bias) < 4 * se, (bias, se)
    assert se < 0.1 * abs(exact.mean().item())   # precise enough for the agreement to mean something


def test_pes_is_unbiased_over_truncations_and_tbptt_and_es_are_not():
    """24-step trajectories in 6 truncations of 4 steps: PES's summed estimates average to the whole trajectory's meta-gradient;
    truncated backpropagation (exact within each truncation) misses most of it, and ES per truncation estimates the same
    truncated gradient as backpropagation does"""
    settings = dict(unroll_steps=4, trajectory=24)
    pes, exact = trajectory_gradients('pes', 20, perturbations=10, sigma=0.01, **settings)
    es, exact_es = trajectory_gradients('es', 20, perturbations=10, sigma=0.01, **settings)
    tbptt, exact_tb = trajectory_gradients('tbptt', 20, second_order=True, **settings)
    assert torch.equal(exact, exact_es) and torch.equal(exact, exact_tb)   # the same seed: the same 20 trajectories
    pes_bias, pes_se = mean_and_se(pes - exact)
    assert abs(pes_bias) < 4 * pes_se, (pes_bias, pes_se)
    assert pes_se < 0.1 * abs(exact.mean().item())
    tbptt_bias = (tbptt - exact).mean().item()
    assert abs(tbptt_bias) > 8 * pes_se and abs(tbptt_bias) > 0.5 * abs(exact.mean().item()), (tbptt_bias, pes_se)
    es_vs_tbptt, es_se = mean_and_se(es - tbptt)
    assert abs(es_vs_tbptt) < 4 * es_se, (es_vs_tbptt, es_se)
    assert abs((es - exact).mean().item()) > 8 * es_se


def test_antithetic_estimate_and_perturbations():
    net = build_net('lstm', hidden=4)
    theta = meta_vector(net)
    eps = perturbation(1, 2, 3, theta.numel(), 0.1)
    assert torch.equal(eps, perturbation(1, 2, 3, theta.numel(), 0.1)) and eps.dtype == torch.float32
    with perturbed(net, -eps): assert torch.allclose(meta_vector(net), theta - eps)
    assert torch.equal(meta_vector(net), theta)
    # a linear meta-loss L(theta) = c . theta: every antithetic pair gives (c . eps) eps / sigma^2, whose mean is c
    c = torch.linspace(-1, 1, 3, dtype=torch.float64)
    eps = torch.stack([perturbation(0, 0, j, 3, 0.1) for j in range(4000)]).double()
    g = antithetic_estimate(eps @ c, -(eps @ c), eps, 0.1)
    torch.testing.assert_close(g, c, atol=0.08, rtol=0)
    with pytest.raises(ValueError, match=r'directions \(P, D\)'):
        antithetic_estimate(torch.zeros(3), torch.zeros(3), torch.zeros(2, 5), 0.1)


def test_forward_unroll_equals_unroll():
    net = build_net('mlp')
    p0 = TASK.params(0)
    s0 = net.init_state(list(p0.values()))
    fwd = forward_unroll(net, [TASK], [p0], [s0], [TASK.batches()], 5, objective='log_mean', offsets=[TASK.optimum])[0]
    ref = unroll(net, TASK, p0, s0, TASK.batches(), 5, objective='log_mean', offset=TASK.optimum)
    torch.testing.assert_close(fwd.meta_loss, ref.meta_loss.detach())
    torch.testing.assert_close(fwd.params['w'], ref.params['w'].detach())
    assert not fwd.meta_loss.requires_grad


def test_pes_particles_follow_their_own_trajectories_and_reset_with_it():
    config = MetaConfig(net='stepsize', task='quadratic', task_config={'dim': 4}, unroll=2, trajectory=4, meta_steps=3,
                        estimator='pes', perturbations=3, sigma=0.1, lr=0.05)
    tr = MetaTrainer(config, progress=False)
    tr.meta_step()
    eps = [perturbation(config.seed, 0, j, 1, 0.1) for j in range(3)]
    assert [p['pair'] for p in tr.particles] == [0, 1, 2]
    for p, e in zip(tr.particles, eps):
        torch.testing.assert_close(p['xi'], e)                                    # xi holds the perturbation used so far
        assert not torch.equal(p['params'][0]['w'], p['params'][1]['w'])           # + and - particles went apart
        assert not torch.equal(p['params'][0]['w'], tr.traj.params['w'])          # and away from the unperturbed run
    tr.meta_step()                                                                # the trajectory ends: particles reset
    assert tr.traj is None and tr.particles is None and tr.draws == 2
    tr.meta_step()
    torch.testing.assert_close(tr.particles[0]['xi'], perturbation(config.seed, 2, 0, 1, 0.1))


def test_divergence_skips_the_update_and_resets_particles():
    config = MetaConfig(net='stepsize', net_config={'lr': 1e5}, task='quadratic', task_config={'dim': 5, 'condition': 2.0},
                        meta_steps=1, unroll=20, trajectory=100, estimator='pes', perturbations=2)
    tr = MetaTrainer(config, progress=False)
    before = meta_vector(tr.net)
    rec = tr.meta_step()
    assert rec['meta_loss'] is None and rec['meta_grad_norm'] is None
    assert torch.equal(meta_vector(tr.net), before) and tr.traj is None and tr.particles is None


def test_pairs_must_divide_among_processes(monkeypatch):
    monkeypatch.setattr(lgl2o.meta, 'world_size', lambda: 2)
    with pytest.raises(ValueError, match='3 antithetic pairs must be a multiple of the 2 processes'):
        MetaTrainer(MetaConfig(net='stepsize', task='quadratic', estimator='es', perturbations=3), progress=False)
    MetaTrainer(MetaConfig(net='stepsize', task='quadratic', estimator='es', perturbations=2, tasks_per_step=1), progress=False)


def test_command_line_estimator_options(tmp_path, capsys):
    out = tmp_path / 'run'
    assert train_main(['--out', str(out), '--net', 'stepsize', '--task', 'quadratic', '--task-config', '{"dim": 4}', '--meta-steps', '3',
                       '--unroll', '2', '--trajectory', '4', '--estimator', 'pes', '--perturbations', '2', '--sigma', '0.05', '--quiet']) == 0
    config = json.loads((out / 'config.json').read_text())
    assert (config['estimator'], config['perturbations'], config['sigma']) == ('pes', 2, 0.05)
    ck = read_checkpoint(out / 'checkpoint.pt')
    assert ck['estimator']['draws'] == 3 and len(ck['estimator']['particles']) == 2   # mid-trajectory: the particles are kept
    with pytest.raises(SystemExit) as e:
        train_main(['--out', str(tmp_path / 'bad'), '--estimator', 'reinforce', '--quiet'])
    assert e.value.code == 2 and "unknown estimator 'reinforce'" in capsys.readouterr().err
    assert train_main(['--out', str(out), '--resume', '--meta-steps', '4', '--quiet']) == 0
    assert read_checkpoint(out / 'checkpoint.pt')['estimator']['particles'] is None   # the trajectory ended
