"""Behaviour of distributed meta-training (lgl2o.distributed with lgl2o.meta): 2 processes under torchrun reach the
meta-parameters of 1 process, a run resumes on another number of processes, and lgl2o-train killed with SIGKILL
and restarted with --resume ends exactly like an uninterrupted run."""
import json
import os
import random
import signal
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import lgl2o.meta
from conftest import NBS, launch, run_workers
from lgl2o.distributed import all_gather_objects, all_reduce_sum, init_distributed, resolve_device, shutdown, world_size
from lgl2o.meta import MetaConfig, MetaTrainer, instance_seeds, load_checkpoint, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}

# a tiny run: a 4-unit LSTM on sampled quadratics, 4 task instances per meta-step, trajectories of 2 truncations
CONFIG = dict(net='lstm', net_config={'hidden': 4}, task='quadratic_family', task_config={'dims': [5, 5]},
              meta_steps=6, unroll=3, trajectory=6, tasks_per_step=4, lr=0.01, seed=5)

TRAIN = """import json, sys, torch
torch.set_num_threads(1)
from lgl2o.meta import MetaConfig, MetaTrainer
config, out, until, resume = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4] == 'resume'
tr = MetaTrainer.resume(out + '/checkpoint.pt', progress=False) if resume else MetaTrainer(MetaConfig(**config), out, progress=False)
tr.train(until=until)
"""

CLI = "import sys\nfrom lgl2o.cli import train_main\nsys.exit(train_main())\n"


def train(tmp_path, processes, out, until, resume=False, config=CONFIG):
    script = tmp_path / 'train.py'
    script.write_text(TRAIN)
    run_workers(script, processes, json.dumps(config), out, until, 'resume' if resume else 'new', cwd=tmp_path)
    return read_checkpoint(Path(out) / 'checkpoint.pt')


def assert_close_states(a: dict, b: dict, tol=1e-5):
    assert a.keys() == b.keys()
    for k in a: torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=k)


def metric_lines(path: Path) -> list[dict]:
    "metrics.jsonl without the wall-clock seconds"
    return [{k: v for k, v in json.loads(l).items() if k != 'seconds'} for l in path.read_text().splitlines()]


def test_two_processes_equal_one_and_resume_on_another_world_size(tmp_path):
    one = train(tmp_path, 1, tmp_path / 'one', 6)
    two = train(tmp_path, 2, tmp_path / 'two', 6)
    assert one['step'] == two['step'] == 6
    assert_close_states(one['net_state'], two['net_state'])
    for a, b in zip(one['history'], two['history']):
        assert a['step'] == b['step'] and a['task_step'] == b['task_step']
        assert a['meta_loss'] == pytest.approx(b['meta_loss'], rel=1e-5)
    # the checkpoint of the 2-process run holds all 4 instances, in global order, like the 1-process one
    assert one['trajectories'] is None and two['trajectories'] is None   # 6 steps = 2 whole trajectories
    logs = [metric_lines(tmp_path / d / 'metrics.jsonl') for d in ('one', 'two')]   # rank 0 alone wrote the log
    assert [r['step'] for r in logs[0]] == [r['step'] for r in logs[1]] == list(range(1, 7))
    assert [r['meta_loss'] for r in logs[0]] == pytest.approx([r['meta_loss'] for r in logs[1]], rel=1e-5)
    # stop 2 processes mid-trajectory, resume in 1: the same end
    mid = train(tmp_path, 2, tmp_path / 'mid', 3)
    assert len(mid['trajectories']) == 4 and [t['step'] for t in mid['trajectories']] == [3] * 4
    assert [t['seeds'] for t in mid['trajectories']] == [list(instance_seeds(5, 2, i)) for i in range(4)]
    end = train(tmp_path, 1, tmp_path / 'mid', 6, resume=True)
    assert_close_states(one['net_state'], end['net_state'])
    assert len(metric_lines(tmp_path / 'mid' / 'metrics.jsonl')) == 6


# PES on the same quadratics: 3 instances x 2 antithetic pairs = 6 pairs, 3 per process, so instance 1's pairs are split
# between the processes; trajectories of 3 truncations
PES_CONFIG = {**CONFIG, 'tasks_per_step': 3, 'estimator': 'pes', 'perturbations': 2, 'sigma': 0.05, 'trajectory': 9}


def test_pes_two_processes_equal_one_and_resume_on_another_world_size(tmp_path):
    "PES shares the antithetic pairs among the processes: 2 processes take the steps of 1, and a run goes on 2 -> 1 -> 2 processes"
    whole = train(tmp_path, 1, tmp_path / 'whole', 8, config=PES_CONFIG)
    two = train(tmp_path, 2, tmp_path / 'chain', 5, config=PES_CONFIG)   # mid-trajectory (truncation 2 of 3)
    for a, b in zip(whole['history'], two['history']):   # the same meta-gradients (norms) and meta-losses step by step
        assert a['meta_loss'] == pytest.approx(b['meta_loss'], rel=1e-5) and a['meta_grad_norm'] == pytest.approx(b['meta_grad_norm'], rel=1e-4)
    assert len(two['trajectories']) == 3 and two['estimator']['draws'] == 5   # rank 0 carries and saves all instances
    particles = two['estimator']['particles']   # gathered from both processes, in pair order, each its own state
    assert [p['pair'] for p in particles] == list(range(6)) and len({float(p['xi'].abs().sum()) for p in particles}) == 6
    train(tmp_path, 1, tmp_path / 'chain', 7, resume=True)   # 2 -> 1 process, mid-trajectory again
    end = train(tmp_path, 2, tmp_path / 'chain', 8, resume=True)   # 1 -> 2 processes
    assert_close_states(whole['net_state'], end['net_state'])
    assert whole['estimator']['draws'] == end['estimator']['draws'] == 8
    for a, b in zip(whole['estimator']['particles'], end['estimator']['particles']):
        torch.testing.assert_close(a['xi'], b['xi'], rtol=1e-5, atol=1e-6)
        for s in (0, 1): assert_close_states(a['params'][s], b['params'][s])
    assert [r['meta_loss'] for r in metric_lines(tmp_path / 'chain' / 'metrics.jsonl')] == pytest.approx([r['meta_loss'] for r in whole['history']], rel=1e-5)


def test_tasks_per_step_must_divide_among_processes(monkeypatch):
    monkeypatch.setattr(lgl2o.meta, 'world_size', lambda: 2)
    with pytest.raises(ValueError, match='tasks_per_step 3 must be a multiple of the 2 processes'):
        MetaTrainer(MetaConfig(**{**CONFIG, 'tasks_per_step': 3}), progress=False)


def test_lone_process_helpers_and_device_errors():
    assert init_distributed() == (0, 1) and world_size() == 1
    t = torch.arange(3.0)
    assert all_reduce_sum(t) is t and torch.equal(t, torch.arange(3.0)) and all_gather_objects('x') == ['x']
    assert resolve_device('cpu') == torch.device('cpu')
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
        MetaConfig(device='tpu')
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='sees no CUDA GPU'):
            MetaTrainer(MetaConfig(**{**CONFIG, 'device': 'cuda'}), progress=False)


def test_shutdown_warns_when_the_group_outlives_it():
    "A group still held after destroy_process_group keeps its gloo threads past the interpreter (the abort at exit): shutdown says so"
    dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)
    held = dist.group.WORLD
    with pytest.warns(RuntimeWarning, match='still referenced'): shutdown()
    assert not dist.is_initialized()
    del held
    dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        shutdown()
    assert not dist.is_initialized()


def test_several_tasks_per_step_average_the_meta_gradient():
    "tasks_per_step=2 in one process = the mean of the two instances' meta-gradients, each from its own seeds"
    config = MetaConfig(**{**CONFIG, 'tasks_per_step': 2, 'meta_steps': 1, 'meta_optimizer': 'sgd', 'lr': 1.0, 'clip_grad': None})
    tr = MetaTrainer(config, progress=False)
    before = [p.detach().clone() for p in tr.net.parameters()]
    rec = tr.meta_step()
    grads = []
    for i in range(2):
        single = MetaTrainer(MetaConfig(**{**CONFIG, 'tasks_per_step': 1}), progress=False)
        seeds = instance_seeds(config.seed, 0, i)
        t = single._start_trajectory(seeds, config.trajectory)
        res = lgl2o.meta.unroll(single.net, t.task, t.params, t.states, t.batches, config.unroll)
        grads.append((torch.autograd.grad(res.meta_loss, list(single.net.parameters())), res.meta_loss.item()))
    for p, b, g0, g1 in zip(tr.net.parameters(), before, grads[0][0], grads[1][0]):
        torch.testing.assert_close(b - p.detach(), (g0 + g1) / 2, rtol=1e-4, atol=1e-6)   # SGD at lr 1: the step is the gradient
    assert rec['meta_loss'] == pytest.approx((grads[0][1] + grads[1][1]) / 2, rel=1e-5)


def cli_args(out):
    return ['--out', str(out), '--net', 'lstm', '--net-config', '{"hidden": 8}', '--task', 'spirals_mlp',
            '--task-config', '{"batch_size": 64}', '--meta-steps', '12', '--unroll', '4', '--trajectory', '8',
            '--tasks-per-step', '2', '--checkpoint-every', '1', '--eval-every', '5', '--seed', '1', '--quiet', '--threads', '1']


@pytest.mark.parametrize('trial', range(int(os.environ.get('LGL2O_KILL_TRIALS', '1'))))
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, trial):
    script = tmp_path / 'cli.py'
    script.write_text(CLI)
    whole = subprocess.run(launch(script, 1, *cli_args(tmp_path / 'whole')), capture_output=True, text=True, timeout=300, env=ENV)
    assert whole.returncode == 0, whole.stderr[-3000:]

    rng = random.Random()
    out = tmp_path / 'killed'
    kill_after = rng.randint(1, 10)    # meta-step lines in the log before the kill...
    delay = rng.uniform(0.0, 0.05)     # ...plus a random moment after that: maybe during a checkpoint write
    proc = subprocess.Popen(launch(script, 1, *cli_args(out)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    log, t0 = out / 'metrics.jsonl', time.time()
    while time.time() - t0 < 120 and proc.poll() is None:
        if log.exists() and sum('meta_loss' in l for l in log.read_text().splitlines()) >= kill_after: break
        time.sleep(0.005)
    time.sleep(delay)
    assert proc.poll() is None, f"the run ended before the kill: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL); proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    ck = read_checkpoint(out / 'checkpoint.pt')   # the last good checkpoint is always readable
    assert 1 <= ck['step'] <= 12
    load_checkpoint(out / 'checkpoint.pt')

    resumed = subprocess.run(launch(script, 1, '--out', out, '--resume', '--quiet'), capture_output=True, text=True, timeout=300, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (read_checkpoint(d / 'checkpoint.pt') for d in (tmp_path / 'whole', out))
    assert a['step'] == b['step'] == 12
    for k in a['net_state']: assert torch.equal(a['net_state'][k], b['net_state'][k]), k
    assert metric_lines(tmp_path / 'whole' / 'metrics.jsonl') == metric_lines(out / 'metrics.jsonl')
    assert not [p.name for p in out.iterdir() if p.name.endswith('.tmp')]   # no temporary file survives the resumed run


def test_distributed_notebook_results(run_notebook):
    _, res = run_notebook(NBS / '09_distributed.ipynb')
    assert res['single'] > 0
    assert {(r['processes'], r['tasks']) for r in res['rows']} >= {(1, 2), (2, 2)}
    assert all(0 < r['seconds'] < 60 for r in res['rows'])
