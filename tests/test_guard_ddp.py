"""A guard under DistributedDataParallel keeps the replicas bit-identical: 2 gloo processes under torchrun, each with
its own shard of every minibatch. Gradients are averaged by DDP (the guard runs backward(), which DDP hooks), and
each choice is made on the loss averaged over the processes, so every process keeps the same candidate."""
import json

import pytest

from conftest import run_workers

WORKER = r'''
import json, sys, torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from lgl2o import LossGuard, GradientGuard, LearnedOptimizer, load_pretrained
from lgl2o.distributed import init_distributed

def model():
    torch.manual_seed(0)   # identical initial weights on every process
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 1))

def main(folder):
    torch.set_num_threads(1)
    rank, world = init_distributed()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)) for _ in range(7)]
    shards = [(x[rank::world], y[rank::world]) for x, y in data]   # each process its own half of every minibatch
    loss_of = lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)
    adam = lambda ps: torch.optim.Adam(ps, lr=0.05)
    lstm = lambda ps: LearnedOptimizer(ps, load_pretrained('lstm-mnist'))
    runs = {'plain SGD': None, 'LossGuard(SGD, SGD)': (LossGuard, sgd, sgd), 'LossGuard(Adam, SGD)': (LossGuard, adam, sgd),
            'LossGuard(lstm-mnist, Adam)': (LossGuard, lstm, adam), 'GradientGuard(Adam, SGD)': (GradientGuard, adam, sgd),
            'LossGuard(SGD, SGD, shadow)': (LossGuard, sgd, sgd, dict(shadow=0.02)),
            'LossGuard(lstm-mnist, Adam, shadow)': (LossGuard, lstm, adam, dict(shadow=0.0)),
            'LossGuard(Adam, SGD, both graphs)': (LossGuard, adam, sgd, dict(keep_both_graphs=True)),
            'LossGuard(Adam, SGD, unused search)': (LossGuard, adam, sgd, dict(find_unused_parameters=True)),
            'LossGuard(Adam, SGD, unused search, both graphs)': (LossGuard, adam, sgd, dict(find_unused_parameters=True, keep_both_graphs=True))}
    out = {}
    for name, spec in runs.items():
        torch.manual_seed(2 + rank)   # different dropout masks on each process, as in real data-parallel training
        net = model()
        kw = dict(spec[3]) if spec is not None and len(spec) > 3 else {}
        ddp = DDP(net, find_unused_parameters=kw.pop('find_unused_parameters', False))   # a local: nothing holds the process group when the process ends
        if spec is None:
            opt = sgd(ddp.parameters())
            for b in shards[:6]:
                opt.zero_grad(); loss_of(ddp, b).backward(); opt.step()
            counts = None
        else:
            cls, learned, fallback = spec[:3]
            guard = cls(learned(ddp.parameters()), fallback(ddp.parameters()), record=True, **kw)
            for b in shards[:6]: guard.step(lambda: loss_of(ddp, b))
            guard.resolve(lambda: loss_of(ddp, shards[6]))
            counts = {**guard.counts, 'resets': guard.resets, 'third forwards': sum(h['forward'] == 3 for h in guard.history)}
        out[name] = {'params': [p.detach().flatten().tolist() for p in net.parameters()],
                     'buffers': [b.detach().flatten().tolist() for b in net.buffers()], 'counts': counts}
    json.dump(out, open(folder + f'/rank{rank}.json', 'w'))

main(sys.argv[1])
'''


@pytest.fixture(scope='module')
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp('ddp')
    (folder / 'worker.py').write_text(WORKER)
    run_workers(folder / 'worker.py', 2, folder, cwd=folder)
    return [json.loads((folder / f'rank{r}.json').read_text()) for r in range(2)]


def max_difference(a: list, b: list) -> float:
    return max((abs(x - y) for s, t in zip(a, b) for x, y in zip(s, t)), default=0.0)


@pytest.mark.timeout(400)
@pytest.mark.parametrize('run', ['plain SGD', 'LossGuard(SGD, SGD)', 'LossGuard(Adam, SGD)', 'LossGuard(lstm-mnist, Adam)',
                                 'GradientGuard(Adam, SGD)', 'LossGuard(SGD, SGD, shadow)', 'LossGuard(lstm-mnist, Adam, shadow)',
                                 'LossGuard(Adam, SGD, both graphs)', 'LossGuard(Adam, SGD, unused search)',
                                 'LossGuard(Adam, SGD, unused search, both graphs)'])
def test_replicas_stay_bit_identical(ranks, run):
    r0, r1 = ranks[0][run], ranks[1][run]
    assert r0['params'] == r1['params'], max_difference(r0['params'], r1['params'])
    assert r0['counts'] == r1['counts']
    if r0['counts'] is not None: assert r0['counts']['learned'] + r0['counts']['fallback'] == 6


@pytest.mark.timeout(400)
def test_a_guard_over_one_optimizer_twice_is_plain_ddp(ranks):
    "Averaged gradients, BatchNorm statistics and dropout masks as in the plain DDP loop"
    for r in ranks:
        plain = r['plain SGD']
        for guarded in (r['LossGuard(SGD, SGD)'], r['LossGuard(SGD, SGD, shadow)']):
            assert plain['params'] == guarded['params'] and plain['buffers'] == guarded['buffers']
    assert ranks[0]['LossGuard(Adam, SGD)']['params'] != ranks[0]['plain SGD']['params']   # the comparison is not vacuous


@pytest.mark.timeout(400)
def test_the_other_candidates_kept_graph_is_a_third_forward_under_ddp(ranks):
    "Backpropagating the kept graph of the candidate evaluated first gives the replicas what a third forward gives them"
    for r in ranks:
        for one, both in [('LossGuard(Adam, SGD)', 'LossGuard(Adam, SGD, both graphs)'),
                          ('LossGuard(Adam, SGD, unused search)', 'LossGuard(Adam, SGD, unused search, both graphs)')]:
            assert r[both]['params'] == r[one]['params'] and r[both]['buffers'] == r[one]['buffers']
            assert r[one]['counts']['third forwards'] > 0   # the path was taken
        assert r['LossGuard(Adam, SGD, both graphs)']['counts']['third forwards'] == 0
        # DDP's search for unused parameters notes the last forward's graph: the guard evaluates the winner again
        assert r['LossGuard(Adam, SGD, unused search, both graphs)']['counts']['third forwards'] > 0
