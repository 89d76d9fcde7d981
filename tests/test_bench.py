"""The benchmark: what its notebook's small run shows, determinism, and the `lgl2o-bench` command's input checks."""
import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import NBS
from lgl2o import GradientGuard, LossGuard
from lgl2o.tasks import QuadraticTask, mnist_cnn
from lgl2o.bench import (DEFAULT_NETS, PeakMemory, LR_GRID, Contender, Scenario, guard_verdicts, markdown_table, ratio_lines, run_benchmark,
                         scenarios, speedup_table, summarize, tune_lr, write_report)


def _bench_results(run_notebook) -> dict:
    return run_notebook(NBS / '05_bench.ipynb')[1]


def test_lgl2o_never_diverges_and_costs_one_backward(run_notebook):
    summary = pd.DataFrame(_bench_results(run_notebook)['summary'])
    lg, gl = summary[(summary['kind'] == 'lgl2o') & (summary['rule'] == 'paper')], summary[summary['kind'] == 'gl2o']
    shadow = summary[summary['rule'] == 'shadow']
    assert len(lg) and len(gl) and len(shadow)
    assert lg['diverged'].sum() == 0 and shadow['diverged'].sum() == 0
    assert (lg['backward_per_step'] == 1).all()                       # one gradient per step, whatever is chosen
    assert shadow['backward_per_step'].between(1.9, 2.0).all()       # and one more for the shadow run (none at its first step)
    assert (gl['backward_per_step'] > 1.5).all()                      # GL2O evaluates a gradient at the learned candidate too
    same = lg[lg['optimizer'].str.contains('same batch')]
    assert (same['forward_per_step'] == 3).all()                      # same-batch rule: one forward for the gradient, two to compare
    assert (lg.loc[~lg.index.isin(same.index), 'forward_per_step'] < 3).all()   # the deferred rule reuses the chosen forward


def test_lgl2o_over_sgd_keeps_the_better_component(run_notebook):
    verdicts = pd.DataFrame(_bench_results(run_notebook)['verdicts'])
    sgd_guard = verdicts[verdicts['guard'].str.startswith('LGL2O(') & verdicts['guard'].str.endswith(', SGD)')]
    assert len(sgd_guard) >= 4
    assert (sgd_guard['ratio'] <= 1.10).all(), sgd_guard


def test_the_shadow_rule_is_never_worse_than_its_fallback_where_the_paper_rule_is(run_notebook):
    r = _bench_results(run_notebook)
    v = pd.DataFrame(r['fallback_verdicts'])
    shadow, paper = v[v['rule'] == 'shadow'], v[(v['rule'] == 'paper') & v['guard'].str.startswith('LGL2O(')]
    assert shadow['never_worse'].all(), shadow
    assert not paper['never_worse'].all()                             # the small run has a case where the paper's rule is worse
    card = {(c['kind'], c['rule']): c for c in r['scorecard']}
    assert card['LGL2O', 'shadow']['never_worse'] == card['LGL2O', 'shadow']['cases']


def test_every_contender_has_a_speedup_over_tuned_adam(run_notebook):
    "The small run's summary: a speed-up for each contender, celo's among them; Adam's own is at most 1 (its reference run is its run, continued)"
    summary = pd.DataFrame(_bench_results(run_notebook)['summary'])
    assert summary['speedup'].notna().all() and (summary['speedup'] >= 0).all()
    assert {'celo-mlpfamily', 'LGL2O(celo-mlpfamily, Adam)', 'GL2O(celo-mlpfamily, SGD)'} <= set(summary['optimizer'])
    adam = summary[summary['optimizer'] == 'Adam']
    assert ((adam['speedup'] > 0.5) & (adam['speedup'] <= 1)).all() and not adam['speedup_lower_bound'].any()


def test_cost_figures_are_printed(run_notebook):
    "Both tasks, each net's floor, and the memory that keeping both graphs costs where activations are large"
    r = _bench_results(run_notebook)
    for task in ('mnist-mlp', 'mnist-cnn'):
        assert {f'LGL2O/unguarded (lstm-mnist, {task})', f'floor/unguarded (lstm-mnist, {task})', f'LGL2O extra/floor extra (lstm-mnist, {task})',
                f'LGL2O shadow/paper rule (lstm-mnist, {task})', f'lstm-mnist/Adam ({task})'} <= set(r['ratios'])
    # times over times are positive; a difference over a difference (the extra over the floor's) may be noise-signed in a short run
    assert all(v > 0 for k, v in r['ratios'].items() if 'extra' not in k) and all(math.isfinite(v) for v in r['ratios'].values())
    table = pd.DataFrame(r['times']).set_index(['task', 'optimizer'])
    nets = [n for n in DEFAULT_NETS if ('mnist-cnn', n) in table.index]
    assert nets
    for n in nets:
        floor = table.loc[('mnist-cnn', f'floor({n})'), 'cpu_ms_per_step']
        assert floor > table.loc[('mnist-cnn', n), 'cpu_ms_per_step']
        both, one = (table.loc[('mnist-cnn', f'LGL2O({n}, Adam{graphs})'), 'peak_mb'] for graphs in (', both graphs', ''))
        assert both >= one - 0.1   # a second graph never lowers the peak (where the LSTM's own update makes it, it does not show)


def test_keeping_both_graphs_holds_a_second_forwards_activations():
    "Measured by PeakMemory on the CNN with optimizers whose own temporaries are small: the price of never needing a third forward"
    task, peaks = mnist_cnn(), {}
    batch = next(task.batches(0))
    for both in (True, False):
        model = task.init(0)
        guard = LossGuard(torch.optim.SGD(model.parameters(), lr=0.01), torch.optim.SGD(model.parameters(), lr=0.02), keep_both_graphs=both)
        guard.step(lambda: task.loss(model, batch))   # the first step has nothing to resolve
        with PeakMemory() as pm: guard.step(lambda: task.loss(model, batch))
        peaks[both] = pm.peak
    model = task.init(0)
    with PeakMemory() as forward, torch.no_grad(): task.loss(model, batch)
    assert peaks[True] > peaks[False] + 0.5 * forward.peak


GRAPH_CASES = {   # guards over SGD steps whose own temporaries are small; each case's second step evaluates a candidate twice
    # the larger step wins on this batch while the fallback's candidate is held (before any decision): a third forward
    'LossGuard, the held candidate loses': (lambda ps: LossGuard(torch.optim.SGD(ps, lr=0.05), torch.optim.SGD(ps, lr=0.001), record=True),
                                            'learned', 3),
    # a huge learned step fails the gradient test: the fallback is evaluated after the learned candidate's gradient
    'GradientGuard rejects': (lambda ps: GradientGuard(torch.optim.SGD(ps, lr=50.0), torch.optim.SGD(ps, lr=0.001), record=True), 'fallback', 2),
    # the shadow run's forward and backward after the guarded step's
    'LossGuard with the shadow run': (lambda ps: LossGuard(torch.optim.SGD(ps, lr=0.001), torch.optim.SGD(ps, lr=0.05), record=True,
                                                           shadow=0.02), 'fallback', 3),
}


@pytest.mark.parametrize('case', list(GRAPH_CASES))
def test_a_guarded_step_holds_one_graph_at_a_time(case):
    "A graph that is done with goes before the next forward: a step's peak is the plain loop's, not two graphs' (the default LossGuard)"
    make, choice, forwards = GRAPH_CASES[case]
    task = mnist_cnn()
    batch = next(task.batches(0))
    model = task.init(0)
    guard = make(list(model.parameters()))
    guard.step(lambda: task.loss(model, batch))
    with PeakMemory() as pm: guard.step(lambda: task.loss(model, batch))
    assert (guard.history[-1]['choice'], guard.history[-1]['forward']) == (choice, forwards)
    model = task.init(0)
    with PeakMemory() as plain: task.loss(model, batch).backward()
    with PeakMemory() as forward, torch.no_grad(): task.loss(model, batch)
    assert pm.peak < plain.peak + 0.5 * forward.peak, (pm.peak, plain.peak, forward.peak)


def test_same_seeds_same_table():
    def run():
        res = run_benchmark(['spirals', 'quadratic'], seeds=[3], nets=['lstm-mnist'], max_steps=8, tune_steps=8, progress=False)
        return res.steps.drop(columns=['seconds'])
    a, b = run(), run()
    pd.testing.assert_frame_equal(a, b)
    assert set(a['optimizer']) == {'SGD', 'Adam', 'lstm-mnist', 'LGL2O(lstm-mnist, SGD)', 'LGL2O(lstm-mnist, Adam)', 'GL2O(lstm-mnist, SGD)',
                                   'LGL2O(lstm-mnist, SGD, shadow)', 'LGL2O(lstm-mnist, Adam, shadow)'}


def test_verdicts_compare_with_the_components():
    summary = pd.DataFrame({'scenario': ['s'] * 3, 'optimizer': ['x', 'SGD', 'LGL2O(x, SGD)'], 'kind': ['learned', 'sgd', 'lgl2o'],
                            'net': ['x', None, 'x'], 'fallback': [None, None, 'sgd'], 'train_loss': [2.0, 1.0, 1.04], 'diverged': [0, 0, 0]})
    v = guard_verdicts(summary).iloc[0]
    assert v['best_component'] == 1.0 and v['within_tolerance']
    assert not guard_verdicts(summary.assign(train_loss=[2.0, 1.0, 1.2])).iloc[0]['within_tolerance']
    assert Contender('lgl2o', 'x', 'sgd').components()[1].name == 'SGD'


def _bench(*args):
    return subprocess.run([sys.executable, '-c', 'import sys; from lgl2o.cli import bench_main; sys.exit(bench_main(sys.argv[1:]))', *args],
                          capture_output=True, text=True)


def test_bench_help_lists_every_option():
    res = _bench('--help')
    assert res.returncode == 0
    for opt in ('--out', '--full', '--seeds', '--scenarios', '--nets', '--max-steps', '--timing-steps', '--threads', '--no-figures', '--quiet', '--overwrite'):
        assert opt in res.stdout, opt


def _bench_here(*args) -> tuple[int, str]:
    "lgl2o-bench's entry point in this process (no interpreter start-up): its exit status and stderr"
    import contextlib, io
    from lgl2o.cli import bench_main
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try: code = bench_main(list(args))
        except SystemExit as e: code = e.code
    return code, err.getvalue()


def test_bench_bad_input_is_one_line_exit_2(tmp_path):
    "One case as a real process (exit status, no traceback); the others through the same entry point in this process"
    res = _bench('--nets', 'nope')
    assert res.returncode == 2 and 'lstm-mnist' in res.stderr and res.stderr.count('\n') == 1 and 'Traceback' not in res.stderr, res.stderr
    blocker = tmp_path / 'file'; blocker.write_text('x')
    for args, expected in ((['--scenarios', 'horizon-100x'], 'add --full'), (['--out', str(blocker / 'sub')], 'cannot write to --out'),
                           (['--seeds', '-1'], 'seeds')):
        code, err = _bench_here(*args)
        assert code == 2, (args, err)
        assert expected in err and err.count('\n') == 1 and err.startswith('lgl2o-bench: error:'), err


def test_horizon_anatomy_runs_every_variant(run_notebook):
    "The 10x-horizon anatomy table: SGD, the LSTM, and LGL2O deciding on one or four batches, at two SGD learning rates"
    rows = _bench_results(run_notebook)['anatomy']
    assert [r['optimizer'] for r in rows] == ['SGD', 'lstm-mnist', 'LGL2O', 'LGL2O', 'SGD', 'LGL2O']
    assert [r['deciding batches'] for r in rows if r['optimizer'] == 'LGL2O'] == [1, 4, 1]
    assert all(0 <= r['learned kept'] <= 1 for r in rows if r['optimizer'] == 'LGL2O')
    assert all(r['final train loss'] > 0 for r in rows)


def test_default_suite_runs_the_lstm_the_mlp_and_celo():
    assert DEFAULT_NETS == ('lstm-mnist', 'mlp-mnist', 'celo-mlpfamily')
    from lgl2o.cli import bench_parser, bench_settings
    assert bench_settings(bench_parser().parse_args([]))['nets'] == ['lstm-mnist', 'mlp-mnist', 'celo-mlpfamily']


@pytest.mark.parametrize('name', ['spirals', 'quadratic'])
def test_tuned_learning_rates_lie_inside_the_grid(name):
    "Adam's optimum was at the top of a narrower grid on these two; at the benchmark's tuning horizon it lies strictly inside"
    sc = scenarios()[name]
    task = sc.make_task()
    for kind, grid in LR_GRID.items():
        lr, _ = tune_lr(task, kind, min(sc.steps, 200))
        assert grid[0] < lr < grid[-1], (name, kind, lr)


def test_report_says_what_it_compares_and_records_tasks_by_name(tmp_path):
    "config.json names tasks by class and arguments (no function addresses); the report explains verdicts, targets and bands; no 'nan' cells"
    res = run_benchmark(['spirals', 'quadratic'], seeds=[0, 1], nets=['lstm-mnist'], max_steps=4, tune_steps=4, progress=False)
    text = write_report(res, tmp_path, {}, timing_steps=2, figures=True)
    config = (tmp_path / 'config.json').read_text()
    assert ' at 0x' not in config and '<function' not in config
    tasks = {k: v['task'] for k, v in json.loads(config)['scenarios'].items()}
    assert tasks['quadratic'] == {'task': 'QuadraticTask', 'dim': 50, 'condition': 1000.0, 'scale': 1.0, 'init_std': 1.0, 'seed': 0}
    assert tasks['spirals']['task'] == 'MLPTask' and tasks['spirals']['data']['name'] == 'spirals'
    assert 'mean over 2 seeds' in text and 'better of its two components' in text and 'at most 5% above' in text
    assert 'band: ±1 sd across seeds' in text and (tmp_path / 'losses.png').exists() and (tmp_path / 'guard_choices.png').exists()
    assert '## Speed-up over tuned Adam' in text and 'geometric mean over seeds' in text and (tmp_path / 'adam_reference.csv').exists()
    assert '| nan |' not in text and ' nan ' not in text
    sgd = summarize(res.steps).query("optimizer == 'SGD'").iloc[0]
    assert math.isnan(sgd['learned_fraction'])            # a column that does not apply to SGD ...
    assert '|  |' in markdown_table(pd.DataFrame([sgd]))   # ... is an empty cell


def test_cost_targets_say_where_they_come_from():
    lines = ratio_lines({'LGL2O/unguarded (lstm-mnist, mnist-mlp)': 1.0, 'mlp-mnist/Adam (mnist-mlp)': 2.0, 'lstm-mnist/Adam (mnist-mlp)': 8.0}).splitlines()
    assert 'target <= 1.10: met; the loss guard adds one forward pass' in lines[0]
    assert 'target <= 3.00: met; the per-parameter MLP' in lines[1]
    assert lines[2].endswith('(no target)')


def test_gl2o_anatomy_shows_the_saturation_mechanism(run_notebook):
    "The notebook's GL2O anatomy: kept learned steps have a smaller gradient, a loss near chance and saturated hidden units"
    r = _bench_results(run_notebook)
    table, kept = pd.DataFrame(r['gl2o_anatomy']), pd.DataFrame(r['gl2o_kept']).set_index('candidate')
    assert len(table) >= 2
    assert kept.loc['learned (kept)', 'gradient norm (median)'] < kept.loc['SGD (not taken)', 'gradient norm (median)']
    assert kept.loc['learned (kept)', 'hidden slope (mean)'] < kept.loc['SGD (not taken)', 'hidden slope (mean)']
    assert kept.loc['learned (kept)', 'training loss (median)'] > 0.85 * math.log(10)
    assert table['GL2O final loss'].mean() > table['SGD alone final loss'].mean()
    assert not any(row['at_edge'] for row in r['tuned_lrs'])


def test_divergence_is_judged_above_the_minimum():
    "The quadratic's raw loss starts near zero on seed 0: a rise that is small next to the gap to the minimum is no divergence"
    from lgl2o.bench import train
    task = scenarios()['quadratic'].make_task()
    rows = train(task, Contender('adam'), 5, 0, {'adam': 30.0}, {}, eval_every=5)
    assert abs(rows[1]['batch_loss']) < 1 and max(r['batch_loss'] for r in rows[1:]) > 1000   # from about 0 to above 1000 ...
    assert len(rows) == 6 and not rows[-1]['diverged']                                        # ... and on to the end
    rows = train(task, Contender('adam'), 5, 0, {'adam': 1e5}, {}, eval_every=5)
    assert rows[-1]['diverged']                                                               # a real divergence still stops the run


def _curve_rows(optimizer: str, kind: str, losses: dict, seed: int = 0) -> list[dict]:
    "Step-table rows of one run whose full-split training loss at each evaluated step is `losses[step]`"
    return [{'scenario': 's', 'optimizer': optimizer, 'kind': kind, 'net': None if kind == 'adam' else 'x', 'fallback': None, 'rule': None,
             'seed': seed, 'step': t, 'train_loss': loss, 'test_loss': loss, 'diverged': False if t else None, 'seconds': 0.001}
            for t, loss in losses.items()]


def test_speedup_over_tuned_adam_in_the_summary():
    "Adam against itself is 1; a curve that is Adam's k steps ahead scores (T + k) / T; past Adam's longer run it is a flagged lower bound"
    adam = lambda t: math.exp(-t / 50)   # a loss that only falls
    horizon, shift = 100, 30
    steps = pd.DataFrame(_curve_rows('Adam', 'adam', {t: adam(t) for t in range(0, horizon + 1, 10)})
                         + _curve_rows('ahead', 'learned', {t: adam(t + shift) for t in range(0, horizon + 1, 10)})
                         + _curve_rows('far ahead', 'learned', {t: adam(t + 500) for t in range(0, horizon + 1, 10)})
                         + _curve_rows('behind', 'learned', {t: adam(t / 2) for t in range(0, horizon + 1, 10)}))
    reference = pd.DataFrame([{'scenario': 's', 'seed': 0, 'step': t, 'train_loss': adam(t), 'horizon': 2 * horizon} for t in range(0, 2 * horizon + 1, 10)])
    s = summarize(steps, reference).set_index('optimizer')
    assert s.loc['Adam', 'speedup'] == 1.0 and not s.loc['Adam', 'speedup_lower_bound']
    assert s.loc['ahead', 'speedup'] == pytest.approx((horizon + shift) / horizon) and not s.loc['ahead', 'speedup_lower_bound']
    assert s.loc['behind', 'speedup'] == pytest.approx(0.5)
    assert s.loc['far ahead', 'speedup'] == 2.0 and s.loc['far ahead', 'speedup_lower_bound']   # Adam never gets there in 2x the steps
    alone = summarize(steps).set_index('optimizer')             # without the longer run: the step table's Adam, to the horizon only
    assert alone.loc['ahead', 'speedup'] == 1.0 and alone.loc['ahead', 'speedup_lower_bound']
    table = speedup_table(s.reset_index()).set_index('optimizer')
    assert table.loc['far ahead', 's'] == '>= 2.00' and table.loc['ahead', 's'] == '1.30'
    diverged = steps.copy()
    diverged.loc[(diverged['optimizer'] == 'behind') & (diverged['step'] == horizon), 'diverged'] = True
    assert summarize(diverged, reference).set_index('optimizer').loc['behind', 'speedup'] == 0.0


def test_adams_reference_run_continues_the_step_tables():
    "Same seed, same rate: the longer run of tuned Adam is the step table's Adam up to the horizon, and then goes on"
    tiny = Scenario('tiny', 'q', lambda: QuadraticTask(dim=3, condition=2.0), steps=6, eval_every=3)
    res = run_benchmark([tiny], seeds=[0], nets=[], progress=False, adam_horizon=2.0)
    adam = res.steps[res.steps['optimizer'] == 'Adam'].dropna(subset=['train_loss'])
    ref = res.reference[res.reference['step'] <= 6]
    assert ref['step'].tolist() == adam['step'].tolist() and np.allclose(ref['train_loss'], adam['train_loss'], rtol=1e-6)
    assert res.reference['horizon'].iloc[0] == 12 and res.reference['lr'].iloc[0] == res.config['learning_rates']['tiny']['adam']
    assert 'speedup' in summarize(res.steps, res.reference)
