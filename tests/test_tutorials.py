"""The tutorials do what they promise, checked on the results their notebooks write under papermill."""
from conftest import NBS


def test_guard_your_loop_trains_a_foreign_model(run_notebook):
    "A plain nn.Sequential on scikit-learn digits, guarded LSTM + SGD: it learns, and every step was decided"
    _, r = run_notebook(NBS / 'tutorials' / 'guard_your_loop.ipynb')
    assert r['loss'] < 0.5 and r['accuracy'] > 0.85
    assert sum(r['counts'].values()) == 150 and r['counts']['learned'] > 0
