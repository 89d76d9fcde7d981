"""The tutorials do what they promise, checked on the results their notebooks write under papermill."""
from conftest import NBS


def test_guard_your_loop_trains_a_foreign_model(run_notebook):
    "A plain nn.Sequential on scikit-learn digits, guarded LSTM + SGD: it learns, and every step was decided"
    _, r = run_notebook(NBS / 'tutorials' / 'guard_your_loop.ipynb')
    assert r['loss'] < 0.5 and r['accuracy'] > 0.85
    assert sum(r['counts'].values()) == 150 and r['counts']['learned'] > 0


def test_mistakes_page_runs_every_case(run_notebook):
    "The docs table of bad inputs comes from running each one: all raised, in one line, in each area of issue #9"
    _, rows = run_notebook(NBS / 'tutorials' / 'mistakes.ipynb')
    assert {r['where'] for r in rows} == {'optimizers', 'steps', 'files', 'command line'}
    assert len(rows) >= 35
    for r in rows:
        assert '\n' not in r['what you get'] and 'Traceback' not in r['what you get'], r
        assert r['what you get'].startswith('`'), r   # an exception type, or the command that exited with status 2
    cli = [r for r in rows if r['where'] == 'command line']
    assert all(': error: ' in r['what you get'] for r in cli)
