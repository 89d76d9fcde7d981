"""The guard keeps the torch.optim contract in real training loops.

The reference is the plain loop `zero_grad(); loss.backward(); opt.step()`. A `LossGuard` whose two components are
the same optimizer twice proposes two equal candidates, keeps the fallback's (ties go to it) and must then follow
the plain loop exactly: parameters, optimizer states, module buffers, gradients, random state. Every habit of a
training loop is checked that way, and every failure inside a step must leave everything as the call found it.
"""
import copy
import functools

import pytest
import torch
from torch import nn

from lgl2o import GradientGuard, LearnedOptimizer, LossGuard, load_pretrained
from lgl2o.learned import build_net

GUARDS = [LossGuard, GradientGuard]


def regression_batches(n=12, batch=16, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, d, generator=g), torch.randn(batch, 1, generator=g)) for _ in range(n)]


def mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def plain_run(model, opt, batches, loss=mse, before_step=None):
    "The reference loop"
    for b in batches:
        opt.zero_grad()
        loss(model, b).backward()
        if before_step: before_step(model)
        opt.step()


def guarded_run(model, guard, batches, loss=mse):
    for b in batches: guard.step(lambda: loss(model, b))


def same_twice(make_opt, model, **guard_kw):
    "A LossGuard over two copies of one optimizer: it must behave as that optimizer alone"
    return LossGuard(make_opt(model.parameters()), make_opt(model.parameters()), **guard_kw)


def assert_same_tensors(a, b, exact=True):
    a, b = list(a), list(b)
    assert len(a) == len(b)
    for s, t in zip(a, b):
        if s is None or t is None: assert s is None and t is None; continue
        if s.is_sparse: s, t = s.to_dense(), t.to_dense()
        if exact: assert torch.equal(s, t), (s - t).abs().max()
        else: torch.testing.assert_close(s, t)


def fallback_state(guard): return guard.fallback.state_dict()['state']


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].keys() == b[k].keys()
        for kk in a[k]: assert torch.equal(torch.as_tensor(a[k][kk]), torch.as_tensor(b[k][kk])), (k, kk)


def everything(model, guard) -> dict:
    "What a failed call must leave as it was"
    return dict(params=[p.detach().clone() for p in model.parameters()],
                grads=[None if p.grad is None else p.grad.clone() for p in model.parameters()],
                buffers=[b.clone() for b in model.buffers()],
                learned=copy.deepcopy(guard.learned.state_dict()), fallback=copy.deepcopy(guard.fallback.state_dict()),
                guard=copy.deepcopy(guard.state_dict()['guard']), rng=torch.get_rng_state(),
                history=len(guard.history))


def assert_unchanged(before: dict, after: dict):
    assert_same_tensors(before['params'], after['params'])
    assert_same_tensors(before['grads'], after['grads'])
    assert_same_tensors(before['buffers'], after['buffers'])
    for k in ('learned', 'fallback'): assert_same_state(before[k]['state'], after[k]['state'])
    g0, g1 = before['guard'], after['guard']
    assert {k: v for k, v in g0.items() if k != 'candidates'} == {k: v for k, v in g1.items() if k != 'candidates'}
    if 'candidates' in g0:
        for c in g0['candidates']: assert_same_tensors(g0['candidates'][c], g1['candidates'][c])
    assert torch.equal(before['rng'], after['rng']) and before['history'] == after['history']


def small_net(seed=0, bn=False, dropout=0.0):
    torch.manual_seed(seed)
    layers = [nn.Linear(4, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.ReLU()]
    layers += [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(*layers, nn.Linear(8, 1))


SGD = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-2)
ADAM = functools.partial(torch.optim.Adam, lr=0.01)


# 1. an exception inside a step changes nothing ---------------------------------------------------------------------

class Boom(Exception): pass


@pytest.mark.parametrize('guard_cls,fail_at', [(LossGuard, 1), (LossGuard, 2), (LossGuard, 3), (GradientGuard, 1), (GradientGuard, 2)])
def test_closure_failing_at_any_call_changes_nothing_and_the_loop_goes_on(guard_cls, fail_at):
    "A loop that catches the error and skips the batch continues exactly as a loop that never saw that batch"
    batches = regression_batches(10)
    bad = (torch.randn(16, 4), torch.randn(16, 1))

    def calls_made(model, guard, batch) -> int:
        "How many closure calls a step on `batch` makes, tried on copies"
        m, g = copy.deepcopy((model, guard))
        n = [0]
        def counting():
            n[0] += 1
            return mse(m, batch)
        state = torch.get_rng_state()
        g.step(counting)
        torch.set_rng_state(state)
        return n[0]

    def run(inject: bool):
        model = small_net(bn=True, dropout=0.2)
        guard = guard_cls(ADAM(model.parameters()), SGD(model.parameters()), record=True)
        torch.manual_seed(1)
        failed = False
        for i, b in enumerate(batches):
            bad = batches[i - 1]
            if inject and i >= 5 and not failed and calls_made(model, guard, bad) >= fail_at:
                calls = [0]
                def failing():
                    calls[0] += 1
                    if calls[0] == fail_at: raise Boom()
                    return mse(model, bad)
                before = everything(model, guard)
                assert guard.pending
                with pytest.raises(Boom): guard.step(failing)
                assert calls[0] == fail_at
                assert_unchanged(before, everything(model, guard))
                failed = True
            guard.step(lambda: mse(model, b))
        assert failed or not inject, f'no step made {fail_at} closure calls'
        guard.resolve(lambda: mse(model, batches[0]))
        return model, guard

    (m1, g1), (m2, g2) = run(inject=True), run(inject=False)
    assert_same_tensors(m1.parameters(), m2.parameters())
    assert_same_tensors(m1.buffers(), m2.buffers())
    assert g1.counts == g2.counts and g1.history == g2.history


@pytest.mark.parametrize('guard_cls', GUARDS)
def test_torch_optim_closure_convention_is_refused_in_one_line_before_anything_changes(guard_cls):
    "zero_grad(); loss.backward(); return loss -- LBFGS's and Lightning's automatic-optimization closure"
    model = small_net()
    guard = guard_cls(ADAM(model.parameters()), SGD(model.parameters()))
    batches = regression_batches(3)
    guard.step(lambda: mse(model, batches[0]))
    assert guard.pending

    def torch_closure():
        guard.zero_grad()
        loss = mse(model, batches[1])
        loss.backward()
        return loss

    before = everything(model, guard)
    with pytest.raises(ValueError, match='called backward') as e: guard.step(torch_closure)
    assert '\n' not in str(e.value) and 'manual optimization' in str(e.value)
    assert_unchanged(before, everything(model, guard))
    # on a guard with no pending decision (the first step) too
    fresh = guard_cls(ADAM(model.parameters()), SGD(model.parameters()))
    with pytest.raises(ValueError, match='called backward'): fresh.step(torch_closure)


class FailingAfter(torch.optim.SGD):
    "An optimizer whose step raises halfway, after writing into its state and the parameters"
    def __init__(self, params, fail=False, **kw):
        super().__init__(params, **kw)
        self.fail = fail

    def step(self, closure=None):
        super().step(closure)
        if self.fail: raise Boom()


@pytest.mark.parametrize('which', ['learned', 'fallback'])
def test_an_optimizer_failing_inside_its_step_changes_nothing(which):
    model = small_net()
    learned = FailingAfter(model.parameters(), lr=0.1, momentum=0.9)
    fallback = FailingAfter(model.parameters(), lr=0.05, momentum=0.5)
    guard = LossGuard(learned, fallback)
    batches = regression_batches(4)
    for b in batches[:2]: guard.step(lambda: mse(model, b))
    getattr(guard, which).fail = True
    before = everything(model, guard)
    with pytest.raises(Boom): guard.step(lambda: mse(model, batches[2]))
    assert_unchanged(before, everything(model, guard))


def test_a_failed_check_after_the_proposals_restores_both_optimizers_states():
    "Both candidates non-finite: before, the optimizers' states had advanced; now the step is undone entirely"
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    guard = LossGuard(torch.optim.SGD([w], lr=3e38, momentum=0.9), torch.optim.SGD([w], lr=3e38, momentum=0.5))
    before_f = copy.deepcopy(guard.fallback.state_dict())
    with pytest.raises(FloatingPointError, match='both candidates'): guard.step(lambda: (w ** 2).sum() * 100)
    assert torch.equal(w.detach(), torch.tensor([1.0, 2.0]))
    assert guard.fallback.state_dict() == before_f and not guard.learned.state


# 2. parameters that take no part in a step are left alone ------------------------------------------------------------

class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 1), nn.Linear(6, 1)

    def forward(self, x, head):
        return getattr(self, head)(torch.tanh(self.body(x)))


def head_loss(model, batch, head): return nn.functional.mse_loss(model(batch[0], head), batch[1])


@pytest.mark.parametrize('learned', ['adam', 'lstm-mnist'])
def test_an_unused_head_does_not_move(learned):
    "Head b used for 4 steps, then only head a: plain SGD(momentum, weight decay) leaves b alone, and so must the guard"
    model = TwoHeads()
    learned_opt = ADAM(model.parameters()) if learned == 'adam' else LearnedOptimizer(model.parameters(), load_pretrained(learned))
    guard = LossGuard(learned_opt, SGD(model.parameters()))
    batches = regression_batches(8)
    for b in batches[:4]: guard.step(lambda: head_loss(model, b, 'b'))
    guard.step(lambda: head_loss(model, batches[4], 'a'))   # decides the last head-b step
    held_b = [p.detach().clone() for p in model.b.parameters()]
    for b in batches[5:]: guard.step(lambda: head_loss(model, b, 'a'))
    assert_same_tensors(model.b.parameters(), held_b)
    assert all(p.grad is None for p in model.b.parameters())


def test_unused_parameters_follow_the_plain_loop_exactly():
    batches = regression_batches(8)
    heads = ['b'] * 4 + ['a'] * 4
    plain, guarded = TwoHeads(), TwoHeads()
    opt = SGD(plain.parameters())
    for b, h in zip(batches, heads):
        opt.zero_grad(); head_loss(plain, b, h).backward(); opt.step()
    guard = same_twice(SGD, guarded)
    for b, h in zip(batches, heads): guard.step(lambda: head_loss(guarded, b, h))
    assert_same_tensors(plain.parameters(), guarded.parameters())
    assert_same_state(opt.state_dict()['state'], fallback_state(guard))
    assert_same_tensors([p.grad for p in plain.parameters()], [p.grad for p in guarded.parameters()])


def test_freezing_and_unfreezing_after_the_guard_is_built_follows_the_plain_loop():
    "Gradual unfreezing in fine-tuning: requires_grad is read at every step"
    batches = regression_batches(12)
    def schedule(model, i):
        model[0].weight.requires_grad_(i >= 8)   # frozen from the start until step 8
        model[2].bias.requires_grad_(i < 4)      # trained for 4 steps, then frozen

    plain, guarded = small_net(), small_net()
    opt = ADAM(plain.parameters())
    for i, b in enumerate(batches):
        schedule(plain, i)
        opt.zero_grad(); mse(plain, b).backward(); opt.step()
    guard = same_twice(ADAM, guarded)
    for i, b in enumerate(batches):
        schedule(guarded, i)
        guard.step(lambda: mse(guarded, b))
    assert_same_tensors(plain.parameters(), guarded.parameters())
    assert_same_state(opt.state_dict()['state'], fallback_state(guard))


def test_a_learned_optimizer_with_frozen_layers_moves_only_the_trainable_ones():
    model = small_net()
    model[0].requires_grad_(False)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    guard = LossGuard(LearnedOptimizer(model.parameters(), load_pretrained('lstm-mnist')), SGD(model.parameters()))
    guarded_run(model, guard, regression_batches(6))
    assert_same_tensors(model[0].parameters(), frozen)
    assert sum(guard.counts.values()) == 5


# 3. buffers and random state --------------------------------------------------------------------------------------------

@pytest.mark.parametrize('guard_kw', [dict(compare='next'), dict(compare='same'), dict(compare='next', cls=GradientGuard)])
def test_batchnorm_tracks_one_batch_per_step(guard_kw):
    kw = dict(guard_kw)
    cls = kw.pop('cls', LossGuard)
    model = small_net(bn=True)
    guard = cls(ADAM(model.parameters()), SGD(model.parameters()), **kw)
    guarded_run(model, guard, regression_batches(10))
    assert model[1].num_batches_tracked.item() == 10


@pytest.mark.parametrize('compare', ['next', 'same'])
def test_batchnorm_and_dropout_follow_the_plain_loop(compare):
    "Running statistics, dropout masks and the random stream afterwards are the plain loop's"
    batches = regression_batches(10)
    plain, guarded = small_net(bn=True, dropout=0.3), small_net(bn=True, dropout=0.3)
    torch.manual_seed(7)
    plain_run(plain, SGD(plain.parameters()), batches)
    after_plain = torch.rand(3)
    torch.manual_seed(7)
    guard = same_twice(SGD, guarded, compare=compare)
    guarded_run(guarded, guard, batches)
    assert_same_tensors(plain.parameters(), guarded.parameters())
    assert_same_tensors(plain.buffers(), guarded.buffers())
    assert torch.equal(after_plain, torch.rand(3))


def test_both_candidates_of_a_decision_see_the_same_dropout_masks():
    "Two equal candidates evaluated under the same masks have bit-equal losses; unpaired masks would differ"
    model = small_net(dropout=0.5)
    guard = same_twice(ADAM, model, record=True)
    guarded_run(model, guard, regression_batches(8))
    decided = [h for h in guard.history if 'choice' in h]
    assert len(decided) == 7
    assert all(h['loss_learned'] == h['loss_fallback'] and h['choice'] == 'fallback' for h in decided)


def test_the_chosen_candidates_graph_forward_reproduces_its_evaluation():
    "When the provisional candidate lost, the forward with a graph at the winner sees the evaluation's masks"
    model = small_net(dropout=0.5)
    guard = LossGuard(torch.optim.SGD(model.parameters(), lr=0.3), torch.optim.SGD(model.parameters(), lr=0.01), record=True)
    guarded_run(model, guard, regression_batches(12))
    switched = [h for h in guard.history if 'choice' in h and h['forward'] == 3]
    assert switched, 'no step where the provisional candidate lost'
    for h in switched: assert h['loss'] == pytest.approx(h['loss_' + h['choice']], rel=1e-6)


# 4. the habits of a training loop --------------------------------------------------------------------------------------

def test_gradient_clipping_through_grad_hook_follows_the_plain_loop():
    batches = regression_batches(8)
    plain, guarded = small_net(), small_net()
    clip = lambda m: nn.utils.clip_grad_norm_(m.parameters(), 0.05)
    plain_run(plain, SGD(plain.parameters()), batches, before_step=clip)
    guard = same_twice(SGD, guarded, grad_hook=lambda ps: nn.utils.clip_grad_norm_(ps, 0.05))
    guarded_run(guarded, guard, batches)
    assert_same_tensors(plain.parameters(), guarded.parameters(), exact=False)
    unclipped = small_net()
    guarded_run(unclipped, same_twice(SGD, unclipped), batches)
    assert not torch.allclose(unclipped[0].weight, guarded[0].weight)


def test_autocast_around_the_step_evaluates_each_candidate_at_its_own_weights():
    "autocast caches low-precision copies of the weights; the guard must not compare two candidates through one copy"
    model = small_net()
    guard = LossGuard(torch.optim.SGD(model.parameters(), lr=0.2), torch.optim.SGD(model.parameters(), lr=0.001), record=True)
    for b in regression_batches(10):
        with torch.autocast('cpu', dtype=torch.bfloat16): guard.step(lambda: mse(model, b))
    decided = [h for h in guard.history if 'choice' in h]
    assert sum(h['loss_learned'] != h['loss_fallback'] for h in decided) >= len(decided) - 1
    assert guard.counts['learned'] > 0


def test_bf16_autocast_inside_the_closure_follows_the_plain_loop():
    batches = regression_batches(6)
    plain, guarded = small_net(), small_net()
    def amp_loss(model, b):
        with torch.autocast('cpu', dtype=torch.bfloat16): return mse(model, b)
    plain_run(plain, ADAM(plain.parameters()), batches, loss=amp_loss)
    guarded_run(guarded, same_twice(ADAM, guarded), batches, loss=amp_loss)
    assert_same_tensors(plain.parameters(), guarded.parameters())


def test_grad_scaler_is_refused_in_one_line_and_changes_nothing():
    model = small_net()
    guard = LossGuard(ADAM(model.parameters()), SGD(model.parameters()))
    batches = regression_batches(3)
    guard.step(lambda: mse(model, batches[0]))
    scaler = torch.amp.GradScaler('cpu')
    scaler.scale(mse(model, batches[1]))   # a loop written for a scaler scales its loss
    before = everything(model, guard)
    with pytest.raises(RuntimeError, match='GradScaler') as e: scaler.step(guard, lambda: mse(model, batches[1]))
    assert '\n' not in str(e.value) and 'bfloat16' in str(e.value)
    assert_unchanged(before, everything(model, guard))
    assert not hasattr(guard, 'found_inf')
    guard.step(lambda: mse(model, batches[1]))   # the guard still works without the scaler


def test_gradient_accumulation_over_micro_batches_follows_the_plain_loop():
    "The closure returns the mean of the micro-batch losses; the plain loop calls backward on each loss / k"
    micro, k = regression_batches(12, batch=8), 3
    steps = [micro[i:i + k] for i in range(0, len(micro), k)]
    plain, guarded = small_net(bn=True), small_net(bn=True)
    opt = SGD(plain.parameters())
    for group in steps:
        opt.zero_grad()
        for b in group: (mse(plain, b) / k).backward()
        opt.step()
    guard = same_twice(SGD, guarded)
    for group in steps: guard.step(lambda: sum(mse(guarded, b) for b in group) / k)
    assert_same_tensors(plain.parameters(), guarded.parameters(), exact=False)
    assert_same_tensors(plain.buffers(), guarded.buffers(), exact=False)


@pytest.mark.parametrize('which', ['learned', 'fallback'])
def test_an_optimizer_that_needs_a_closure_is_refused_in_one_line(which):
    model = small_net()
    opts = dict(learned=ADAM(model.parameters()), fallback=SGD(model.parameters()))
    opts[which] = torch.optim.LBFGS(model.parameters())
    with pytest.raises(TypeError, match='first-order optimizer') as e: LossGuard(**opts)
    assert '\n' not in str(e.value) and 'LBFGS' in str(e.value)


# 6. the rest of the Optimizer protocol --------------------------------------------------------------------------------

@pytest.mark.parametrize('guard_cls', GUARDS)
def test_state_dict_hooks_run_as_in_torch_optim(guard_cls):
    model = small_net()
    guard = guard_cls(ADAM(model.parameters()), SGD(model.parameters()))
    guarded_run(model, guard, regression_batches(3))
    calls = []
    guard.register_state_dict_pre_hook(lambda opt: calls.append(('pre', opt is guard)))
    guard.register_state_dict_post_hook(lambda opt, sd: {**sd, 'note': 'added'})
    guard.register_load_state_dict_pre_hook(lambda opt, sd: calls.append(('load_pre', sd.get('note'))))
    guard.register_load_state_dict_post_hook(lambda opt: calls.append(('load_post', opt is guard)))
    sd = guard.state_dict()
    assert sd['note'] == 'added'
    guard.load_state_dict(sd)
    assert calls == [('pre', True), ('load_pre', 'added'), ('load_post', True)]


def embedding_model(sparse):
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(20, 4, sparse=sparse), nn.Flatten(), nn.Linear(12, 1))


def token_batches(n=8):
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 20, (16, 3), generator=g), torch.randn(16, 1, generator=g)) for _ in range(n)]


def test_sparse_gradients_follow_the_plain_loop():
    "nn.Embedding(sparse=True) under a guard over two sparse-capable optimizers"
    batches = token_batches()
    plain, guarded = embedding_model(True), embedding_model(True)
    plain_run(plain, torch.optim.SGD(plain.parameters(), lr=0.1), batches)
    guard = same_twice(functools.partial(torch.optim.SGD, lr=0.1), guarded)
    guarded_run(guarded, guard, batches)
    assert_same_tensors(plain.parameters(), guarded.parameters())
    assert guarded[0].weight.grad.is_sparse
    other = embedding_model(True)
    both = LossGuard(torch.optim.Adagrad(other.parameters(), lr=0.1), torch.optim.SGD(other.parameters(), lr=0.1))
    guarded_run(other, both, batches)
    assert sum(both.counts.values()) == len(batches) - 1
    gg = GradientGuard(torch.optim.Adagrad(other.parameters(), lr=0.1), torch.optim.SGD(other.parameters(), lr=0.1))
    guarded_run(other, gg, batches)
    assert sum(gg.counts.values()) == len(batches) - 1


def test_a_learned_optimizer_refuses_sparse_gradients_with_its_own_message_and_nothing_changes():
    model = embedding_model(True)
    guard = LossGuard(LearnedOptimizer(model.parameters(), load_pretrained('lstm-mnist')), torch.optim.SGD(model.parameters(), lr=0.1))
    before = everything(model, guard)
    with pytest.raises(RuntimeError, match='LearnedOptimizer does not support sparse gradients') as e:
        guard.step(lambda: mse(model, token_batches(1)[0]))
    assert '\n' not in str(e.value) and 'sparse=False' in str(e.value)
    assert_unchanged(before, everything(model, guard))
    dense = embedding_model(False)   # the fix the message names works
    guarded_run(dense, LossGuard(LearnedOptimizer(dense.parameters(), load_pretrained('lstm-mnist')),
                                 torch.optim.SGD(dense.parameters(), lr=0.1)), token_batches(3))


def test_complex_parameters_follow_the_plain_loop():
    target = torch.randn(5, dtype=torch.complex64, generator=torch.Generator().manual_seed(1))
    w_plain = nn.Parameter(torch.randn(5, dtype=torch.complex64, generator=torch.Generator().manual_seed(0)))
    w_guard = nn.Parameter(w_plain.detach().clone())
    loss = lambda w: (w - target).abs().pow(2).sum()
    opt = ADAM([w_plain])
    for _ in range(6):
        opt.zero_grad(); loss(w_plain).backward(); opt.step()
    guard = LossGuard(ADAM([w_guard]), ADAM([w_guard]))
    for _ in range(6): guard.step(lambda: loss(w_guard))
    assert torch.equal(w_plain.detach(), w_guard.detach())


@pytest.mark.parametrize('dtype', [torch.complex64, torch.float16, torch.bfloat16, torch.float64])
def test_a_learned_optimizer_refuses_parameters_it_cannot_update_with_a_fix_that_works(dtype):
    "Every refusal names a fix that works: float64 by converting the net; complex and half precision otherwise"
    w = nn.Parameter(torch.ones(3, dtype=dtype))
    with pytest.raises(TypeError) as e: LearnedOptimizer([w], build_net('lstm'))
    msg = str(e.value)
    assert '\n' not in msg
    if dtype == torch.float64:
        assert 'net.to(torch.float64)' in msg
        opt = LearnedOptimizer([w], build_net('lstm').to(dtype))
        w.grad = torch.ones_like(w)
        opt.step()
        assert torch.isfinite(w).all()
    else: assert ('view_as_complex' if dtype.is_complex else 'torch.autocast') in msg and 'net.to' not in msg


def test_sharded_parameters_are_refused_in_one_line():
    w = nn.Parameter(torch.ones(3))
    w._fsdp_flattened = True   # what FSDP marks its flattened parameters with
    with pytest.raises(TypeError, match='DistributedDataParallel'): LossGuard(ADAM([w]), SGD([w]))
