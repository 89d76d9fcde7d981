"""The paper reproductions' robust claims, asserted on the results their notebooks write under papermill."""
import math

from conftest import NBS


def test_stability_linear_optimizer_claims(run_notebook):
    "Seed 003: SGD on the noisy quadratic is stable exactly while every |1 - k h_i| < 1, at the closed-form stationary loss"
    _, r = run_notebook(NBS / 'papers' / 'stability.ipynb')
    for x, stable, sim, th in zip(r['lrs_times_hmax'], r['stable'], r['simulated'], r['theory']):
        assert stable == (x < 2), x
        if stable: assert math.isfinite(sim) and math.isfinite(th)
        else: assert sim == math.inf and th == math.inf
    assert r['max_relative_gap'] < 0.1
    assert all(math.isfinite(v) for v in r['final_loss'].values())
