"""The tutorials do what they promise, checked on the results their notebooks write under papermill."""
import json
import tempfile

from conftest import NBS, ROOT


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


def test_lightning_module_trains_and_resumes_bit_for_bit(run_notebook):
    "The guard as a LightningModule's optimizer: it learns, every step is decided, a resumed run ends bit-identical, the page is quiet"
    executed, r = run_notebook(NBS / 'tutorials' / 'lightning.ipynb')
    assert r['loss_end'] < 0.5 * r['loss_start'] and r['test_accuracy'] > 0.8
    assert r['steps'] == r['global_step'] == 124            # LightningOptimizer.step advanced Lightning's step count
    assert sum(r['counts'].values()) == r['steps'] and r['counts']['learned'] > 0
    assert r['pending_at_checkpoint'] and 0 < r['checkpoint_step'] < r['steps']
    assert r['resumed_identical'] == {'parameters': True, 'guard': True, 'scheduler': True, 'global_step': True}
    outputs = [o for c in json.loads(executed.read_text())['cells'] if c['cell_type'] == 'code'
               and 'injected-parameters' not in c['metadata'].get('tags', []) for o in c.get('outputs', [])]
    assert not [o for o in outputs if o['output_type'] == 'error' or o.get('name') == 'stderr'], "the page shows warnings or errors"
    shown = json.dumps(outputs)
    for path in (str(ROOT), tempfile.gettempdir(), 'site-packages'):
        assert path not in shown, f"the page shows a local path ({path})"
