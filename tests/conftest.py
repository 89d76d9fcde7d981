"""Shared fixtures: where the repository is, and papermill execution of the notebooks (each at most once a session)."""
import json
import os
from pathlib import Path

import pytest

# One intra-op thread for every notebook kernel and subprocess: the tasks are small, and two workers
# each spinning two OpenMP threads on two cores run 10-20x slower than one thread each.
os.environ.setdefault('OMP_NUM_THREADS', '1')

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'


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
