"""Behaviour of lgl2o.tasks beyond the notebook's examples: results of its papermill run, properties, processes."""
import json
import math
import subprocess
import sys

import torch
from hypothesis import given, settings, strategies as st

from conftest import NBS
from lgl2o.tasks import LeastSquaresTask, MLPTask, QuadraticTask, mnist_mlp, spirals


def test_tasks_notebook_results(run_notebook):
    "The notebook's SGD demo lowers the evaluation loss of every task family"
    _, results = run_notebook(NBS / '00_tasks.ipynb')
    losses = results['losses']
    assert set(losses) == {'quadratic', 'noisy quadratic', 'least squares', 'mnist mlp', 'spirals mlp'}
    for name, (before, after) in losses.items():
        assert after < before, name


@settings(max_examples=25, deadline=None)
@given(dim=st.integers(1, 30), condition=st.floats(1.0, 1e4), scale=st.floats(1e-2, 1e2), seed=st.integers(0, 10**6))
def test_quadratic_has_requested_spectrum(dim, condition, scale, seed):
    task = QuadraticTask(dim=dim, condition=condition, scale=scale, seed=seed)
    assert math.isclose(task.L, scale, rel_tol=1e-3)
    if dim > 1: assert math.isclose(task.L / task.mu, condition, rel_tol=1e-2)
    grad = task.hessian @ task.minimizer - task.b          # the gradient vanishes at the minimiser
    assert grad.norm() <= 1e-3 * (1 + task.b.norm())


@settings(max_examples=10, deadline=None)
@given(hidden=st.lists(st.integers(1, 8), min_size=1, max_size=3), activation=st.sampled_from(['sigmoid', 'relu', 'tanh']),
       seed=st.integers(0, 1000))
def test_functional_and_module_losses_agree(hidden, activation, seed):
    task = MLPTask(data=spirals(n=64, n_test=16), hidden=tuple(hidden), activation=activation, batch_size=16)
    batch = next(task.batches(seed))
    model, params = task.init(seed), task.params(seed)
    torch.testing.assert_close(task.loss(model, batch), task.loss(params, batch))


def test_same_seed_same_run_in_a_fresh_process():
    "Seeds fix initial weights and data order across processes, not just within one"
    code = ("from lgl2o.tasks import mnist_mlp; t = mnist_mlp(); b = next(t.batches(seed=5)); "
            "print(t.params(5)['0.weight'].sum().item(), b[1][:8].tolist())")
    runs = [subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout for _ in range(2)]
    assert runs[0] == runs[1]
    task = mnist_mlp()
    assert str(task.params(5)['0.weight'].sum().item()) in runs[0]


def test_batches_cover_an_epoch_without_repeats():
    task = LeastSquaresTask(dim=3, n_train=10)
    x, _ = next(task.batches())
    assert x.shape == (10, 3)
    mlp_task = mnist_mlp(batch_size=1000)
    it = mlp_task.batches(seed=0)
    seen = torch.cat([next(it)[1] for _ in range(4)])   # 4 x 1000 = the 4000 training labels once each
    assert torch.equal(seen.sort().values, mlp_task.data.y_train.sort().values)
