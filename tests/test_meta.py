"""Behaviour of lgl2o.meta: exact resume, checkpoint safety and errors, meta-gradients, and that meta-training learns."""
import json
import math
import os
from pathlib import Path

import pytest
import torch

from conftest import NBS
from lgl2o.learned import build_net
from lgl2o.meta import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, MetaConfig, MetaTrainer, atomic_save, evaluate_net, load_checkpoint,
                        make_task, meta_loss, meta_train, read_checkpoint, trajectory_length, unroll)
from lgl2o.tasks import LeastSquaresTask, MLPFamily, QuadraticFamily, QuadraticTask, spirals


def strip(history):
    "Metrics without the wall-clock times, which legitimately differ between runs"
    return [{k: v for k, v in r.items() if k != 'seconds'} for r in history]


def assert_same_net(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa: assert torch.equal(sa[k], sb[k]), k


RESUME_CASES = {
    # MLP net on an MLP family, train-by-validation (a second batch stream), checkpoint mid-trajectory
    'mlp-family-validation': (MetaConfig(net='mlp', meta_steps=7, unroll=3, trajectory=7, meta_split='test', seed=3),
                              lambda: MLPFamily(data=spirals(n=96, n_test=32), widths=(4, 6), depths=(1, 2), batch_size=16)),
    # LSTM on a quadratic family, with evaluation and keep-best, weight decay through AdamW
    'lstm-quadratic-eval': (MetaConfig(net='lstm', net_config={'hidden': 6}, task='quadratic_family', task_config={'dims': [4, 6]},
                                       meta_steps=7, unroll=2, trajectory=5, eval_every=2, weight_decay=0.01, seed=5), None),
    # learned step size, log_mean objective, cosine meta-lr, evaluation on 2 instances' training loss
    'stepsize-cosine-log-mean': (MetaConfig(net='stepsize', task='quadratic', task_config={'dim': 5}, meta_steps=7, unroll=2, trajectory=5,
                                            objective='log_mean', lr=0.05, lr_schedule='cosine', eval_every=2, eval_instances=2,
                                            eval_split='train', seed=4), None),
    # PES on an MLP family, train-by-validation (the particles replay both batch streams), 2 instances x 2 pairs, mid-trajectory
    'pes-mlp-family-validation': (MetaConfig(net='mlp', meta_steps=7, unroll=3, trajectory=7, meta_split='test', seed=3, estimator='pes',
                                             tasks_per_step=2, perturbations=2, sigma=0.05),
                                  lambda: MLPFamily(data=spirals(n=96, n_test=32), widths=(4, 6), depths=(1, 2), batch_size=16)),
    # ES with an LSTM on a quadratic family, evaluation and keep-best
    'es-lstm-quadratic-eval': (MetaConfig(net='lstm', net_config={'hidden': 6}, task='quadratic_family', task_config={'dims': [4, 6]},
                                          meta_steps=7, unroll=2, trajectory=5, eval_every=2, seed=5, estimator='es', perturbations=3,
                                          sigma=0.01), None),
    # PES under a truncation schedule: each trajectory's own length, carried by the checkpoint
    'pes-varied-lengths': (MetaConfig(net='mlp', meta_steps=9, unroll=2, trajectory=7, min_trajectory=2, seed=11, estimator='pes',
                                      perturbations=2, sigma=0.05, eval_every=3),
                           lambda: MLPFamily(data=spirals(n=96, n_test=32), widths=(4, 6), depths=(1, 2), batch_size=16)),
}


@pytest.mark.parametrize('case', list(RESUME_CASES))
def test_resume_equals_uninterrupted(case, tmp_path):
    "Crash after a checkpoint (metrics already logged past it), resume: same final meta-parameters, metrics and log"
    config, make = RESUME_CASES[case]
    task = make() if make else None
    whole = MetaTrainer(config, tmp_path / 'whole', task=task, progress=False)
    whole.train()

    part = MetaTrainer(config, tmp_path / 'part', task=task, progress=False)
    part.train(until=4)            # saves checkpoint.pt at meta-step 4 (mid-trajectory in both cases)
    part.meta_step()               # one more step logged, then the process "dies" before the next save
    del part
    resumed = MetaTrainer.resume(tmp_path / 'part' / 'checkpoint.pt', task=task, progress=False)
    assert resumed.step == 4
    resumed.train()

    assert_same_net(whole.net, resumed.net)
    assert strip(whole.history) == strip(resumed.history)
    logged = [json.loads(l) for l in (tmp_path / 'part' / 'metrics.jsonl').read_text().splitlines()]
    assert strip(logged) == strip(whole.history)
    for a, b in zip(whole.meta_opt.state_dict()['state'].values(), resumed.meta_opt.state_dict()['state'].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    if config.eval_every:
        assert (tmp_path / 'whole' / 'best.pt').exists() and whole.best == resumed.best
    if config.estimator == 'pes':   # the checkpoint at meta-step 4 was mid-trajectory: it held every pair's particles
        particles = read_checkpoint(tmp_path / 'part' / 'checkpoint.pt')['estimator']['particles']
        assert [p['pair'] for p in particles] == list(range(config.tasks_per_step * config.perturbations)) and all(p['xi'].abs().sum() > 0 for p in particles)


def test_meta_train_resume_flag(tmp_path):
    config = MetaConfig(net='stepsize', task='quadratic', task_config={'dim': 4}, meta_steps=6, unroll=2, trajectory=4, lr=0.05)
    whole = meta_train(config, tmp_path / 'a', progress=False)
    part = MetaTrainer(config, tmp_path / 'b', progress=False); part.train(until=3)
    resumed = meta_train(config, tmp_path / 'b', resume=True, progress=False)
    assert resumed.step == 6 and torch.equal(whole.net.log_lr, resumed.net.log_lr)
    assert json.loads((tmp_path / 'b' / 'config.json').read_text()) == config.to_dict()


def test_load_checkpoint_round_trip_and_errors(tmp_path):
    config = MetaConfig(net='nominal', net_config={'hidden': 8}, task='quadratic', task_config={'dim': 3}, meta_steps=2, unroll=2, trajectory=4)
    tr = meta_train(config, tmp_path, progress=False)
    net, info = load_checkpoint(tmp_path / 'checkpoint.pt')
    assert_same_net(net, tr.net)
    assert info['kind'] == 'nominal' and info['net_config']['hidden'] == 8 and info['step'] == 2
    assert MetaConfig.from_dict(info['meta_config']) == config
    assert info['metrics']['step'] == 2

    good = (tmp_path / 'checkpoint.pt').read_bytes()
    (tmp_path / 'text.pt').write_text('hello')
    (tmp_path / 'cut.pt').write_bytes(good[: len(good) // 2])
    torch.save({'state_dict': {'w': torch.ones(1)}}, tmp_path / 'model.pt')
    ck = torch.load(tmp_path / 'checkpoint.pt', weights_only=True)
    torch.save({**ck, 'version': CHECKPOINT_VERSION + 1}, tmp_path / 'future.pt')
    torch.save({**ck, 'kind': 'lstm'}, tmp_path / 'mismatch.pt')
    for name, message in [('text.pt', 'not a readable lgl2o checkpoint'), ('cut.pt', 'not a readable lgl2o checkpoint'),
                          ('model.pt', 'not an lgl2o meta-training checkpoint'),
                          ('future.pt', f'format version {CHECKPOINT_VERSION + 1}'), ('mismatch.pt', "does not hold a loadable 'lstm' net")]:
        with pytest.raises(ValueError, match=message):
            load_checkpoint(tmp_path / name)
    with pytest.raises(FileNotFoundError, match='no checkpoint file'):
        load_checkpoint(tmp_path / 'absent.pt')


def test_atomic_write_keeps_old_checkpoint_when_writing_fails(tmp_path, monkeypatch):
    config = MetaConfig(net='stepsize', task='quadratic', task_config={'dim': 3}, meta_steps=2, unroll=2, trajectory=4)
    tr = meta_train(config, tmp_path, progress=False)
    before = (tmp_path / 'checkpoint.pt').read_bytes()

    real_save = torch.save
    def failing_save(obj, f, *args, **kwargs):
        real_save({'partial': torch.zeros(1000)}, f)        # bytes reach the temporary file...
        raise OSError(28, 'No space left on device')        # ...then the disk fills up
    monkeypatch.setattr(torch, 'save', failing_save)
    tr.meta_step()
    with pytest.raises(OSError, match='No space left'):
        tr.save()
    monkeypatch.setattr(torch, 'save', real_save)
    assert (tmp_path / 'checkpoint.pt').read_bytes() == before
    assert read_checkpoint(tmp_path / 'checkpoint.pt')['step'] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint.pt', 'config.json', 'metrics.jsonl']
    with pytest.raises(OSError):   # a folder that cannot be written to fails loudly, nothing half-written
        atomic_save({'x': 1}, tmp_path / 'checkpoint.pt' / 'inside.pt')


def fixed_meta_loss(net, task, steps=20):
    "The meta-loss of one unroll from a fixed start (no training)"
    params = task.params(123)
    return unroll(net, task, params, net.init_state(list(params.values())), task.batches(), steps, objective='mean').meta_loss.item()


def test_meta_training_lowers_meta_loss_on_easy_quadratic():
    task = QuadraticTask(dim=10, condition=10.0, seed=2)
    config = MetaConfig(net='stepsize', net_config={'lr': 0.01}, task='quadratic', meta_steps=40, unroll=20, trajectory=20,
                        objective='mean', lr=0.1, seed=0)
    tr = MetaTrainer(config, task=task, progress=False)
    before = fixed_meta_loss(tr.net, task)
    tr.train()
    after = fixed_meta_loss(tr.net, task)
    assert after < before - 0.5 * (before - task.optimum)   # at least half of the gap above the optimum closed
    assert 0.01 < tr.net.lr.item() < 2 / task.L              # a larger, still stable step size
    losses = [r['meta_loss'] for r in tr.history]
    assert sum(losses[-5:]) < sum(losses[:5])


def test_second_order_meta_gradient_matches_finite_differences():
    task = QuadraticTask(dim=6, condition=5.0, seed=0)
    def loss_and_grad(lr, second_order):
        net = build_net('stepsize', lr=lr)
        res = unroll(net, task, task.params(0), [{}], task.batches(), 8, objective='sum', second_order=second_order)
        return res.meta_loss.item(), torch.autograd.grad(res.meta_loss, net.log_lr)[0].item()
    h = 1e-3
    fd = (loss_and_grad(0.2 * math.exp(h), True)[0] - loss_and_grad(0.2 * math.exp(-h), True)[0]) / (2 * h)
    exact, first = loss_and_grad(0.2, True)[1], loss_and_grad(0.2, False)[1]
    assert math.isclose(exact, fd, rel_tol=1e-2)
    assert not math.isclose(first, exact, rel_tol=1e-2)


def test_divergence_skips_the_update_and_resets_the_trajectory():
    config = MetaConfig(net='stepsize', net_config={'lr': 1e5}, task='quadratic', task_config={'dim': 5, 'condition': 2.0},
                        meta_steps=1, unroll=20, trajectory=100)
    tr = MetaTrainer(config, progress=False)
    before = tr.net.log_lr.detach().clone()
    rec = tr.meta_step()
    assert rec['meta_loss'] is None and rec['meta_grad_norm'] is None
    assert torch.equal(tr.net.log_lr.detach(), before) and tr.traj is None


def test_train_by_validation_uses_the_held_out_split():
    task = LeastSquaresTask(dim=30, n_train=20, n_valid=20, n_test=20, seed=0)
    net = build_net('stepsize', lr=0.05)
    p = task.params(0)
    train = unroll(net, task, p, [{}], task.batches(), 5)
    valid = unroll(net, task, p, [{}], task.batches(), 5, meta_batches=task.batches(split='valid'))
    torch.testing.assert_close(train.params['w'], valid.params['w'])     # same optimizee trajectory
    assert valid.meta_loss.item() != train.meta_loss.item()               # different meta-objective
    with pytest.raises(ValueError, match="no split 'valid'"):
        MetaTrainer(MetaConfig(net='stepsize', task='quadratic', meta_split='valid'), progress=False)


def test_log_mean_weighs_relative_improvement_equally_along_the_unroll():
    losses = [torch.tensor(2.4), torch.tensor(1.2), torch.tensor(0.3)]
    assert math.isclose(meta_loss(losses, 'log_mean').item(), sum(math.log(l.item()) for l in losses) / 3, rel_tol=1e-6)
    assert math.isclose(meta_loss(losses, 'log_mean', offset=0.1).item(), sum(math.log(l.item() - 0.1) for l in losses) / 3, rel_tol=1e-6)
    # d log_mean / d loss_t = 1 / (T loss_t): the late, small loss gets 8 times the weight of the early one (sum: equal weights)
    ls = [l.clone().requires_grad_() for l in losses]
    g = torch.autograd.grad(meta_loss(ls, 'log_mean'), ls)
    assert math.isclose(g[2].item() / g[0].item(), 8.0, rel_tol=1e-5)
    # through the trainer on a quadratic with a linear term: the offset is the optimum, so the logs stay finite and training lowers it
    task = QuadraticTask(dim=10, condition=10.0, seed=2)
    config = MetaConfig(net='stepsize', net_config={'lr': 0.01}, task='quadratic', meta_steps=30, unroll=20, trajectory=20,
                        objective='log_mean', lr=0.1, seed=0)
    tr = MetaTrainer(config, task=task, progress=False)
    assert tr._new_trajectories()[0].offset == task.optimum
    tr.train()
    losses = [r['meta_loss'] for r in tr.history]
    assert all(math.isfinite(l) for l in losses) and sum(losses[-5:]) < sum(losses[:5])


def test_evaluation_on_several_instances_and_a_chosen_split():
    task = LeastSquaresTask(dim=8, n_train=40, n_valid=20, n_test=20, seed=0)
    base = dict(net='stepsize', net_config={'lr': 0.05}, task='least_squares', meta_steps=4, unroll=2, trajectory=4, eval_every=2, seed=7)
    default = MetaTrainer(MetaConfig(**base), task=task, progress=False)
    assert default.evaluate() == evaluate_net(default.net, task, 4, 8)           # unchanged: instance seed+1, the task's default split
    several = MetaTrainer(MetaConfig(**base, eval_instances=3, eval_split='train'), task=task, progress=False)
    runs = [evaluate_net(several.net, task, 4, s, 'train') for s in (8, 9, 10)]
    got = several.evaluate()
    assert math.isclose(got['eval_loss'], sum(r['eval_loss'] for r in runs) / 3, rel_tol=1e-12)
    assert got['eval_loss'] != default.evaluate()['eval_loss']                  # another split, other instances
    several.train()                                                             # keep-best by the new score
    evals = [r for r in several.history if 'eval_loss' in r]
    assert [r['step'] for r in evals] == [0, 2, 4] and several.best == min(r['eval_loss'] for r in evals)


def test_keep_best_keeps_the_starting_net_when_meta_training_never_beats_it(tmp_path, monkeypatch):
    config = MetaConfig(net='stepsize', net_config={'lr': 0.05}, task='quadratic', task_config={'dim': 4}, meta_steps=4, unroll=2,
                        trajectory=4, lr=0.5, eval_every=2, seed=2)
    tr = MetaTrainer(config, tmp_path, progress=False)
    start = tr.net.log_lr.detach().clone()
    scores = iter([1.0, 2.0, 3.0, 4.0])                   # the start scores best, every later net worse
    monkeypatch.setattr(tr, 'evaluate', lambda: {'eval_loss': next(scores)})
    tr.train()
    assert [(r['step'], r['eval_loss']) for r in tr.history if 'eval_loss' in r] == [(0, 1.0), (2, 2.0), (4, 3.0)]
    assert not torch.equal(tr.net.log_lr, start)       # meta-training moved the net ...
    kept, info = load_checkpoint(tmp_path / 'best.pt')
    assert info['step'] == 0 and torch.equal(kept.log_lr, start)   # ... and best.pt is the net it started from
    tr.train(until=6)                                  # continuing a run does not evaluate the start again
    assert [r['step'] for r in tr.history if 'eval_loss' in r] == [0, 2, 4, 6]


def test_truncation_schedule_draws_each_trajectorys_length():
    assert trajectory_length(0, 5, None, 1000) == 1000 and trajectory_length(0, 5, 1000, 1000) == 1000
    draws = [trajectory_length(3, s, 10, 1000) for s in range(4000)]
    assert draws == [trajectory_length(3, s, 10, 1000) for s in range(4000)]          # a function of (seed, meta-step)
    assert 10 == min(draws) and 950 < max(draws) <= 1000
    logs = torch.tensor(draws, dtype=torch.float64).log10()
    assert abs(logs.mean().item() - 2.0) < 0.05 and abs((logs < 1.5).double().mean().item() - 0.25) < 0.03   # log-uniform on [1, 3]
    config = MetaConfig(net='stepsize', task='quadratic', task_config={'dim': 4}, meta_steps=30, unroll=3, trajectory=12,
                        min_trajectory=2, seed=1)
    tr = MetaTrainer(config, progress=False)
    started, new = [], tr._new_trajectories
    tr._new_trajectories = lambda: started.append((tr.step, new())) or started[-1][1]
    tr.train()
    done = started[:-1]                                # the last may be cut short by the end of the run
    lengths = [trajs[0].length for _, trajs in done]
    assert lengths == [trajectory_length(1, step, 2, 12) for step, _ in done] and len(set(lengths)) > 2
    assert [trajs[0].step for _, trajs in done] == lengths   # each ran exactly its own length, then a new one started
    with pytest.raises(ValueError, match='min_trajectory must be'): MetaConfig(trajectory=10, min_trajectory=11)
    with pytest.raises(ValueError, match='min_trajectory must be'): MetaConfig(trajectory=10, min_trajectory=True)   # JSON's true
    with pytest.raises(ValueError, match='meta_steps must be'): MetaConfig(meta_steps=True)
    with pytest.raises(ValueError, match='eval_every must be'): MetaConfig(eval_every=False)


def test_cosine_meta_lr_schedule():
    config = MetaConfig(net='stepsize', task='quadratic', task_config={'dim': 4}, meta_steps=4, unroll=2, trajectory=4, lr=0.1, lr_schedule='cosine')
    tr = MetaTrainer(config, progress=False)
    used = []
    for _ in range(4):
        used.append(tr.meta_lr()); tr.meta_step()
        assert tr.meta_opt.param_groups[0]['lr'] == used[-1]
    assert [round(v, 6) for v in used] == [round(0.1 * (1 + math.cos(math.pi * k / 4)) / 2, 6) for k in range(4)]
    assert tr.meta_lr() == 0.0
    constant = MetaTrainer(MetaConfig(**{**config.to_dict(), 'lr_schedule': 'constant'}), progress=False)
    constant.meta_step(); constant.meta_step()
    assert constant.meta_lr() == 0.1 and constant.meta_opt.param_groups[0]['lr'] == 0.1


def test_config_round_trip_and_errors():
    config = MetaConfig(net='mlp', net_config={'hidden': 16}, task='mlp_family', task_config={'widths': [10, 20]}, clip_grad=None)
    assert MetaConfig.from_json(config.to_json()) == config
    assert MetaConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad, message in [({'net': 'rnn'}, "unknown net 'rnn'"), ({'task': 'cifar'}, "unknown task 'cifar'"),
                         ({'objective': 'max'}, "unknown objective 'max'"), ({'trajectory': 0}, 'trajectory must be an integer >= 1'),
                         ({'meta_split': 'dev'}, "meta_split must be"), ({'lr': -1.0}, 'lr must be > 0'),
                         ({'eval_instances': 0}, 'eval_instances must be an integer >= 1'), ({'eval_split': 'dev'}, 'eval_split must be'),
                         ({'lr_schedule': 'step'}, 'lr_schedule must be')]:
        with pytest.raises(ValueError, match=message):
            MetaConfig(**bad)
    with pytest.raises(ValueError, match=r"unknown MetaConfig keys \['epochs'\]"):
        MetaConfig.from_dict({'epochs': 3})
    with pytest.raises(ValueError, match="unknown task 'cifar'"):
        make_task('cifar')


def test_meta_notebook_results(run_notebook):
    _, res = run_notebook(NBS / '03_meta.ipynb')
    ss = res['stepsize']
    assert ss['meta_loss_last'] < ss['meta_loss_first']
    assert ss['eta_start'] < ss['eta_end'] < ss['two_over_L']
    lstm = res['lstm']
    assert all(math.isfinite(lstm[k]) for k in ('mean_loss_first', 'mean_loss_last'))
    t1 = res['seconds_per_meta_iteration']['threads_1']
    assert 0 < t1['wall_min'] <= t1['wall_median'] < 60 and 0 < t1['cpu_median'] < 60
    by_tasks = res['seconds_per_meta_step_by_tasks']   # 1 and N task instances per meta-step (issue #8)
    assert len(by_tasks) == 2 and '1' in by_tasks and all(0 < t < 60 for t in by_tasks.values())
