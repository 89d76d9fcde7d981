"""Shared fixtures: where the repository is, papermill execution of the notebooks (each at most once a session), and
several worker processes (torchrun, gloo) that must all end cleanly."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# One intra-op thread for every notebook kernel and subprocess: the tasks are small, and two workers
# each spinning two OpenMP threads on two cores run 10-20x slower than one thread each.
os.environ.setdefault('OMP_NUM_THREADS', '1')

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
WORKER_ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}


def launch(script: Path, processes: int, *args) -> list[str]:
    "The command running `script` in 1 process, or under torchrun in several"
    if processes == 1: return [sys.executable, str(script), *map(str, args)]
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(processes), str(script), *map(str, args)]


def run_workers(script: Path, processes: int = 2, *args, timeout: float = 300, cwd=None) -> subprocess.CompletedProcess:
    """Run `script` with `args` in `processes` workers under torchrun (1: a plain process); fail unless every one ended cleanly.

    The pattern for a test with several processes, e.g. 2 gloo workers training a DistributedDataParallel model: each
    worker joins the group with `lgl2o.distributed.init_distributed()` (gloo on CPU; it registers
    `lgl2o.distributed.shutdown`, which destroys the group at exit) and keeps whatever holds the group, the DDP model
    above all, inside a function, so that nothing holds it any more when the process ends:

        WORKER = '''import sys, torch
        from torch.nn.parallel import DistributedDataParallel as DDP
        from lgl2o.distributed import init_distributed
        def main(out):
            rank, world = init_distributed()
            model = DDP(torch.nn.Linear(4, 1))   # a local, not a global: it holds the group
            ...                                 # train; rank 0 writes to `out`
        main(sys.argv[1])
        '''
        def test_ddp(tmp_path):
            (tmp_path / 'worker.py').write_text(WORKER)
            run_workers(tmp_path / 'worker.py', 2, tmp_path / 'out', cwd=tmp_path)

    Why: gloo frees a collective's tensors on its own worker thread, just after the waiting main thread has gone on; a
    group that survives `shutdown` keeps those threads into the interpreter's finalization, and one of them that needs
    the GIL then aborts its process ('terminate called without an active exception', SIGABRT: now and then, mostly
    under CPU load). `shutdown` warns whenever the group survives it, so this helper fails every time instead: on a
    non-zero exit, on that warning, and on the abort. One intra-op thread per worker; returns the completed process
    (stdout and stderr as text)."""
    p = subprocess.run(launch(script, processes, *args), capture_output=True, text=True, timeout=timeout, env=WORKER_ENV, cwd=cwd)
    assert p.returncode == 0, p.stderr[-3000:]
    for sign in ('after destroy_process_group', 'terminate called'):
        assert sign not in p.stderr, p.stderr[-3000:]
    return p


def notebooks() -> list[Path]:
    "Every notebook under nbs/, in the order nbdev numbers them"
    return sorted(p for p in NBS.rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts)


def notebook_id(nb: Path) -> str:
    return nb.relative_to(NBS).with_suffix('').as_posix()


@pytest.fixture(scope='session')
def executed_dir(tmp_path_factory) -> Path:
    "Where papermill writes executed notebooks and their results (never inside nbs/); LGL2O_EXECUTED keeps them"
    keep = os.environ.get('LGL2O_EXECUTED')
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        return Path(keep)
    return tmp_path_factory.mktemp('executed')


@pytest.fixture(scope='session')
def run_notebook(executed_dir):
    "Execute a notebook of nbs/ with its small default parameters; returns (executed path, results dict)"
    import papermill
    done = {}

    def run(nb: Path):
        if nb in done: return done[nb]
        out = executed_dir / nb.relative_to(NBS)
        out.parent.mkdir(parents=True, exist_ok=True)
        results = out.with_suffix('.json')
        results.unlink(missing_ok=True)
        papermill.execute_notebook(str(nb), str(out), parameters={'results_path': str(results)},
                                   cwd=str(nb.parent), kernel_name='python3', progress_bar=False,
                                   execution_timeout=600, log_output=False)
        done[nb] = (out, json.loads(results.read_text()) if results.exists() else {})
        return done[nb]
    return run
