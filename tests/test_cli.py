"""Behaviour of lgl2o-train (lgl2o.cli.train_main): every option documented, real runs, resume, and one-line exit-2 errors."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lgl2o.cli import option_name, train_main, train_parser
from lgl2o.meta import MetaConfig, load_checkpoint
from lgl2o.pretrained import load_net

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--net', 'lstm', '--net-config', '{"hidden": 4}', '--task', 'quadratic', '--task-config', '{"dim": 6}',
        '--meta-steps', '4', '--unroll', '3', '--trajectory', '6', '--seed', '3', '--quiet']


def cli(*args, cwd=None):
    "Run lgl2o-train in a fresh process; (exit status, stdout, stderr)"
    code = 'import sys; from lgl2o.cli import train_main; sys.exit(train_main(sys.argv[1:]))'
    p = subprocess.run([sys.executable, '-c', code, *map(str, args)], capture_output=True, text=True, timeout=300,
                       cwd=cwd or ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    return p.returncode, p.stdout, p.stderr


def inproc(*args):
    "Run train_main in this process; (exit status, stdout, stderr), like `cli` but without the start-up cost"
    import contextlib, io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: code = train_main([str(a) for a in args])
        except SystemExit as e: code = e.code
    return code, out.getvalue(), err.getvalue()


def test_help_lists_every_option():
    text = train_parser().format_help()
    options = [o for a in train_parser()._actions for o in a.option_strings]
    for name in ['--out', '--config', '--resume', '--threads', '--quiet', '--meta-steps', '--net', '--task', '--unroll',
                 '--trajectory', '--lr', '--objective', '--seed']:
        assert name in options, name
    for f in dataclasses.fields(MetaConfig):   # derived from MetaConfig: no field is left out
        assert option_name(f.name) in text, f.name
    for action in train_parser()._actions:     # and every option has a real explanation
        assert action.help and len(action.help) > 15, action.option_strings


def test_help_exits_zero_in_a_process():
    code, out, err = cli('--help')
    assert code == 0 and '--resume' in out and '--meta-steps' in out and err == ''


def test_real_run_then_resume(tmp_path):
    out = tmp_path / 'run'
    assert train_main(['--out', str(out), '--eval-every', '2', '--checkpoint-every', '2', *TINY]) == 0
    net, info = load_checkpoint(out / 'checkpoint.pt')
    assert info['kind'] == 'lstm' and info['step'] == 4 and net.config['hidden'] == 4
    assert MetaConfig.from_dict(json.loads((out / 'config.json').read_text())).seed == 3
    records = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in records if 'meta_loss' in r] == [1, 2, 3, 4]
    final, finfo = load_net(out / 'net.pt')
    assert finfo['command'].startswith('lgl2o-train --out') and finfo['versions']['torch'] == torch.__version__
    assert finfo['summary']['meta_steps'] == 4
    # resume a finished run: nothing to do, says how to extend it, exit 0
    code, stdout, err = cli('--out', out, '--resume')
    assert code == 0 and 'finished' in stdout and 'Traceback' not in err
    # extend it: continues from meta-step 4 to 7, same log
    assert train_main(['--out', str(out), '--resume', '--meta-steps', '7', '--quiet']) == 0
    assert load_checkpoint(out / 'checkpoint.pt')[1]['step'] == 7
    records = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in records if 'meta_loss' in r] == list(range(1, 8))


def test_help_and_final_message_point_to_the_one_call(tmp_path):
    "--help and the last line of a run name lgl2o.load_pretrained, and the call printed at the end loads the run's net"
    text = ' '.join(train_parser().format_help().split())
    assert 'lgl2o.load_pretrained(OUT)' in text and 'load_net' not in text
    out = tmp_path / 'my run'
    code, stdout, err = inproc('--out', out, *[a for a in TINY if a != '--quiet'])
    assert code == 0, err
    last = stdout.strip().splitlines()[-1]
    assert 'load_net' not in stdout and 'lgl2o.load_pretrained(' in last
    call = last[last.index('lgl2o.load_pretrained('):]
    import lgl2o
    net = eval(call, {'lgl2o': lgl2o})
    assert isinstance(net, lgl2o.LearnedNet) and net.config['hidden'] == 4
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), load_net(out / 'net.pt')[0].state_dict().values()))


def test_resume_equals_uninterrupted(tmp_path):
    "A run stopped at 2 meta-steps and resumed to 4 ends with the same net as a straight 4-step run"
    assert train_main(['--out', str(tmp_path / 'a'), *TINY]) == 0
    assert train_main(['--out', str(tmp_path / 'b'), *TINY, '--meta-steps', '2']) == 0
    assert train_main(['--out', str(tmp_path / 'b'), '--resume', '--meta-steps', '4', '--quiet']) == 0
    a, b = load_net(tmp_path / 'a' / 'net.pt')[0].state_dict(), load_net(tmp_path / 'b' / 'net.pt')[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_config_file_and_overrides(tmp_path):
    cf = tmp_path / 'c.json'
    cf.write_text(json.dumps({'net': 'stepsize', 'task': 'quadratic', 'task_config': {'dim': 3}, 'meta_steps': 9, 'unroll': 2, 'trajectory': 4}))
    assert train_main(['--out', str(tmp_path / 'r'), '--config', str(cf), '--meta-steps', '3', '--quiet']) == 0
    saved = json.loads((tmp_path / 'r' / 'config.json').read_text())
    assert saved['net'] == 'stepsize' and saved['meta_steps'] == 3 and saved['unroll'] == 2


def assert_usage_error(result, *needles):
    code, out, err = result
    assert code == 2, (code, out, err)
    assert 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith('lgl2o-train: error:'), err
    for n in needles: assert n in err, (n, err)


def test_typo_in_config_key(tmp_path):
    cf = tmp_path / 'c.json'
    cf.write_text(json.dumps({'net': 'lstm', 'meta_step': 10}))
    assert_usage_error(cli('--out', tmp_path / 'r', '--config', cf), "'meta_step'", "did you mean 'meta_steps'")
    assert not (tmp_path / 'r' / 'checkpoint.pt').exists()


@pytest.mark.parametrize('content,needle', [('{"net": "lstm",', 'not valid JSON'), ('[1, 2]', 'JSON object'),
                                           ('{"unroll": 0}', 'unroll must be an integer >= 1'),
                                           ('{"net": "lsmt"}', "unknown net 'lsmt'")])
def test_bad_config_file(tmp_path, content, needle):
    cf = tmp_path / 'c.json'
    cf.write_text(content)
    assert_usage_error(inproc('--out', tmp_path / 'r', '--config', cf), needle)


def test_unknown_option_and_missing_things(tmp_path):
    assert_usage_error(cli('--out', tmp_path, '--meta-step', '3'), "'--meta-step'", 'did you mean --meta-steps')   # in a real process too
    assert_usage_error(inproc('--net', 'lstm'), '--out')                               # --out is required
    assert_usage_error(inproc('--out', tmp_path, '--config', tmp_path / 'none.json'), 'cannot read --config')
    assert_usage_error(inproc('--out', tmp_path, '--meta-steps', 'ten'), "invalid int value: 'ten'")
    assert_usage_error(inproc('--out', tmp_path / 'empty', '--resume'), 'nothing to resume')
    assert_usage_error(inproc('--out', tmp_path, '--task-config', '[1]'), 'JSON object')


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a GPU')
def test_device_without_gpu(tmp_path):
    assert_usage_error(inproc('--out', tmp_path / 'r', '--device', 'cuda', *TINY), 'sees no CUDA GPU')
    assert_usage_error(inproc('--out', tmp_path / 'r', '--device', 'tpu', *TINY), "device must be 'cpu', 'cuda' or 'cuda:N'")


def test_conflicting_options(tmp_path):
    out = tmp_path / 'r'
    assert train_main(['--out', str(out), *TINY]) == 0
    assert_usage_error(inproc('--out', out, '--resume', '--net', 'mlp'), 'drop --net')
    assert_usage_error(inproc('--out', out, *TINY), 'already holds a run', '--resume')   # would overwrite the run
    assert_usage_error(inproc('--out', out, '--resume', '--meta-steps', '2'), 'below the 4 meta-steps')


def test_unwritable_out_dir(tmp_path):
    blocker = tmp_path / 'file'             # a folder cannot be made under a file, whoever runs the test
    blocker.write_text('x')
    assert_usage_error(cli('--out', blocker / 'run', *TINY), 'cannot write to --out')


@pytest.mark.skipif(hasattr(os, 'geteuid') and os.geteuid() == 0, reason='root can write into a read-only folder')
def test_read_only_out_dir(tmp_path):
    locked = tmp_path / 'locked'
    locked.mkdir(); locked.chmod(0o500)
    try: assert_usage_error(inproc('--out', locked / 'run', *TINY), 'cannot write to --out')
    finally: locked.chmod(0o700)
