"""The notebooks are the source: they export the package unchanged, are clean, and run under papermill."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import NBS, ROOT, notebook_id, notebooks

BIN = Path(sys.executable).parent


def _copy_tree(dst: Path) -> Path:
    "A copy of the tracked and untracked (not ignored) files, as a clean clone would have them"
    files = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard', '-z'], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split('\0')
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file() or src.is_symlink():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f, follow_symlinks=False)
    return dst


def _tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob('*.py'))}


def test_export_changes_nothing(tmp_path):
    "A fresh nbdev_export reproduces lgl2o/ exactly: nobody edited the package by hand"
    copy = _copy_tree(tmp_path / 'repo')
    before = _tree(copy / 'lgl2o')
    subprocess.run([BIN / 'nbdev_export'], cwd=copy, check=True, capture_output=True)
    after = _tree(copy / 'lgl2o')
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"nbdev_export changes {changed}: edit the notebooks, export, and commit both"


def test_notebooks_are_clean(tmp_path):
    "nbdev_clean changes nothing (and keeps the papermill `parameters` tags)"
    copy = _copy_tree(tmp_path / 'repo')
    before = {p: p.read_bytes() for p in (copy / 'nbs').rglob('*.ipynb')}
    subprocess.run([BIN / 'nbdev_clean'], cwd=copy, check=True, capture_output=True)
    dirty = sorted(str(p.relative_to(copy)) for p, b in before.items() if p.read_bytes() != b)
    assert not dirty, f"run nbdev_clean and commit: {dirty}"


def test_nbdev_test():
    "nbdev's own notebook tests: every cell not flagged `notest` runs without error"
    res = subprocess.run([BIN / 'nbdev_test', '--n_workers', '2', '--do_print'], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.timeout(900)
@pytest.mark.parametrize('nb', notebooks(), ids=notebook_id)
def test_notebook_runs_under_papermill(nb, run_notebook):
    "Every notebook executes top to bottom with its small default parameters"
    executed, _ = run_notebook(nb)
    assert executed.exists()
    assert not str(executed).startswith(str(NBS)), 'papermill output must not be written into nbs/'
