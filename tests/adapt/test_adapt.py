"""Online drafter adaptation (specmux.adapt) on tiny random models: learning, losslessness,
the learners' update rules on toy problems, and state round-trips."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from specmux.adapt import (
    OGD,
    AdaptiveHFDrafter,
    EnsembleHead,
    ExpWeights,
    OptimisticOGD,
    ReplayBuffer,
    adaptive_drafter,
    atomic_torch_save,
    candidate_kl,
    distill_loss,
    make_head,
    torch_load,
)
from specmux.adapt.buffer import DistillBatch
from specmux.adapt.replay import RecordingDrafter, ReplayLM, ReplayTarget
from specmux.drafters.hf import HFDrafter
from specmux.engine import SpeculativeDecoder, autoregressive_generate

from conftest import tiny_lm
from stats import assert_distribution, target_first_two

PROMPTS = [[1, 2, 3], [5, 9, 14, 2], [7, 7, 30], [11, 3, 20, 41, 8], [4, 44]]
EVAL_PROMPTS = [[6, 1, 33], [19, 2, 12, 40]]



@pytest.fixture(scope="module")
def target() -> torch.nn.Module:
    return tiny_lm(0, hidden=48)


@pytest.fixture(scope="module")
def draft_model() -> torch.nn.Module:
    return tiny_lm(1, hidden=32, layers=1)


def _stream(target: torch.nn.Module, prompts: list[list[int]], n: int) -> list[list[int]]:
    return [p + autoregressive_generate(target, p, n) for p in prompts]


def _kl_on(drafter: AdaptiveHFDrafter, target: torch.nn.Module, seqs: list[list[int]],
           plens: list[int]) -> float:
    """Mean KL(p_target || q_drafter) over the generated positions (full distributions)."""
    kls = []
    for seq, plen in zip(seqs, plens, strict=True):
        n = len(seq) - plen
        with torch.no_grad():
            p = torch.log_softmax(target(input_ids=torch.tensor([seq[:-1]])).logits[0, -n:], -1)
        q = torch.log_softmax(drafter.lm.logits(seq[:-1], n), -1)
        kls.append((p.exp() * (p - q)).sum(-1))
    return float(torch.cat(kls).mean())


# --- the drafter ------------------------------------------------------------------------

def test_untrained_adapter_is_the_frozen_drafter(draft_model: torch.nn.Module) -> None:
    frozen = HFDrafter(draft_model, name="frozen")
    adaptive = adaptive_drafter(draft_model, "ogd", base_name="tiny")
    ens = adaptive_drafter(draft_model, "ens", base_name="tiny")
    assert (adaptive.name, ens.name) == ("tiny+ogd", "tiny+ens")
    assert adaptive.lm.model is frozen.lm.model is ens.lm.model  # weights shared, not copied
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    assert torch.equal(adaptive.lm.logits(ids, 4), frozen.lm.logits(ids, 4))  # bit for bit
    # The ensemble serves log of a mixture: the same distribution as the frozen drafter.
    assert torch.allclose(ens.lm.logits(ids, 4), torch.log_softmax(frozen.lm.logits(ids, 4), -1),
                          atol=1e-5)
    z0, h = adaptive.lm.forward(ids, 3)
    assert torch.allclose(adaptive.lm.base_logits(h), z0, atol=1e-5)
    assert adaptive.lm.hidden.shape == (len(ids), 32)


@pytest.mark.parametrize("kind", ["ogd", "opt", "ens"])
def test_adaptation_reduces_kl_to_the_target(target: torch.nn.Module,
                                             draft_model: torch.nn.Module, kind: str) -> None:
    train = _stream(target, PROMPTS, 24)
    held_out = _stream(target, EVAL_PROMPTS, 24)
    drafter = adaptive_drafter(draft_model, kind, base_name="tiny", stride=2, batch_size=32,
                               steps_per_update=2)
    before = _kl_on(drafter, target, held_out, [len(p) for p in EVAL_PROMPTS])
    before_train = _kl_on(drafter, target, train, [len(p) for p in PROMPTS])
    dec = SpeculativeDecoder(target, [drafter], "fixed", num_speculative_tokens=3)
    for _ in range(3):  # the same stream three times
        for p in PROMPTS:
            dec.generate(p, 24)
    after = _kl_on(drafter, target, held_out, [len(p) for p in EVAL_PROMPTS])
    after_train = _kl_on(drafter, target, train, [len(p) for p in PROMPTS])
    assert drafter.history and drafter.update_seconds > 0
    assert after_train < 0.6 * before_train, (before_train, after_train)
    assert after < before, (before, after)  # it generalizes a little to unseen prompts
    losses = [r.loss_before for r in drafter.history]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


@pytest.mark.parametrize("kind", ["ogd", "opt", "ens"])
def test_greedy_output_identical_while_the_drafter_changes(
    target: torch.nn.Module, draft_model: torch.nn.Module, kind: str
) -> None:
    frozen = HFDrafter(draft_model, name="frozen")
    adaptive = adaptive_drafter(draft_model, kind, base_name="tiny", stride=1, batch_size=16,
                                head_kwargs={"lr": 2.0, "lrs": (0.5, 2.0)})
    dec = SpeculativeDecoder(target, [frozen, adaptive], "hedge", num_speculative_tokens=[2, 4])
    for p in PROMPTS[:3]:
        n_updates = len(adaptive.history)
        out = dec.generate(p, 40).token_ids
        assert out == autoregressive_generate(target, p, 40)
        assert len(adaptive.history) > n_updates + 5  # it changed many times mid-generation
    head_params = [t for k, t in adaptive.head.state_dict().items() if k == "adapter"]
    assert all(float(t["B"].abs().sum()) > 0 for t in head_params)


def test_replay_reproduces_real_greedy_runs(target: torch.nn.Module,
                                            draft_model: torch.nn.Module) -> None:
    """A recorded real run, replayed with a frozen and with an adapting drafter, gives
    the same verdicts, and the adapting replay learns exactly what a real run learns."""
    rec = RecordingDrafter(draft_model, name="frozen", top_k=48)
    real = SpeculativeDecoder(target, [rec], "fixed", num_speculative_tokens=4)
    runs = []
    for p in PROMPTS[:3]:
        runs.append(real.generate(p, 30))
        rec.finish_query()
    replay_target = ReplayTarget(vocab_size=48)
    replay_lm = ReplayLM(draft_model.get_output_embeddings(), 48, None)
    twin = SpeculativeDecoder(replay_target, [HFDrafter(draft_model, name="frozen")], "fixed",
                              num_speculative_tokens=4)
    twin.drafters[0].lm = replay_lm
    kw = {"stride": 1, "batch_size": 16, "head_kwargs": {"lr": 2.0}}
    live = adaptive_drafter(draft_model, "opt", base_name="tiny", **kw)
    live_dec = SpeculativeDecoder(target, [live], "fixed", num_speculative_tokens=4)
    replayed = adaptive_drafter(draft_model, "opt", base_name="tiny",
                                lm=ReplayLM(draft_model.get_output_embeddings(), 48, None), **kw)
    replayed_dec = SpeculativeDecoder(replay_target, [replayed], "fixed",
                                      num_speculative_tokens=4)
    for recording, run, p in zip(rec.recordings, runs, PROMPTS, strict=False):
        replay_target.select(recording)
        replay_lm.select(recording)
        again = twin.generate(p, 30)
        assert again.token_ids == run.token_ids
        assert [s.num_accepted_tokens for s in again.steps] == [
            s.num_accepted_tokens for s in run.steps]
        replayed.lm.select(recording)
        a, b = live_dec.generate(p, 30), replayed_dec.generate(p, 30)
        assert a.token_ids == b.token_ids == run.token_ids
        assert [s.num_accepted_tokens for s in a.steps] == [
            s.num_accepted_tokens for s in b.steps]
    assert replay_target.seconds > 0 and replay_lm.seconds > 0
    assert len(live.history) == len(replayed.history) > 10
    for x, y in zip(live.history, replayed.history, strict=True):
        assert x.loss_before == pytest.approx(y.loss_before, rel=1e-4, abs=1e-6)


# --- learners on toy problems -----------------------------------------------------------

def test_optimistic_update_formula() -> None:
    """Unconstrained: x_{t+1} = x_t - 2 eta g_t + eta g_{t-1} (and x_2 = x_1 - 2 eta g_1)."""
    eta = 0.1
    x = torch.tensor([1.0, -2.0])
    opt = OptimisticOGD(eta)
    grads = [torch.tensor([0.5, 1.0]), torch.tensor([-1.0, 2.0]), torch.tensor([3.0, 0.0])]
    expect, prev = x.clone(), torch.zeros(2)
    for g in grads:
        opt.step([x], [g])
        expect = expect - 2 * eta * g + eta * prev
        prev = g
        assert torch.allclose(x, expect)
    ogd_x = torch.tensor([1.0, -2.0])
    OGD(eta).step([ogd_x], [grads[0]])
    assert torch.allclose(ogd_x, torch.tensor([1.0, -2.0]) - eta * grads[0])


def _regret(learner: OGD | OptimisticOGD, losses: list[torch.Tensor], radius: float,
            hints: list[torch.Tensor] | None = None) -> float:
    """Regret of linear losses <c_t, x> on the ball of ``radius``."""
    x = torch.zeros(losses[0].shape)
    total = 0.0
    for t, c in enumerate(losses):
        total += float(c @ x)
        if hints is not None and isinstance(learner, OptimisticOGD):
            learner.step([x], [c], hint=[hints[t + 1]] if t + 1 < len(hints) else None)
        else:
            learner.step([x], [c])
    best = -radius * float(torch.stack(losses).sum(0).norm())  # min over the ball
    return total - best


def test_optimistic_with_perfect_hints_beats_ogd() -> None:
    gen = torch.Generator().manual_seed(0)
    T, d, radius = 400, 5, 1.0
    # Slowly rotating loss vectors (a stable stream) plus a little noise.
    angle = torch.linspace(0, 3.0, T)
    base = torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    losses = list(torch.cat([base, torch.zeros(T, d - 2)], 1) + 0.05 * torch.randn(T, d,
                                                                                   generator=gen))
    for eta in (0.02, 0.1, 0.5):
        ogd = _regret(OGD(eta, max_norm=radius), losses, radius)
        perfect = _regret(OptimisticOGD(eta, max_norm=radius), losses, radius, hints=losses)
        last_grad = _regret(OptimisticOGD(eta, max_norm=radius), losses, radius)
        assert perfect < 0.5 * ogd, (eta, ogd, perfect)
        assert last_grad < ogd, (eta, ogd, last_grad)


def _toy_batches(seed: int, n: int = 1200, size: int = 20) -> list[DistillBatch]:
    """A toy distillation stream: a frozen linear head, a teacher = head + a fixed shift;
    every token is a candidate (so the candidate-set KL is the exact KL)."""
    gen = torch.Generator().manual_seed(seed)
    hdim, vocab = 16, 24
    hidden = torch.randn(n, hdim, generator=gen)
    w = torch.randn(vocab, hdim, generator=gen) * 0.3
    teacher = hidden @ (w + torch.randn(vocab, hdim, generator=gen) * 0.3).t()
    base = hidden @ w.t()
    idx = torch.arange(vocab).expand(n, vocab)
    prob = torch.softmax(teacher, -1)
    tail = torch.full((n,), float("-inf"))
    return [DistillBatch(hidden[i:i + size], idx[i:i + size], base[i:i + size],
                         tail[i:i + size], prob[i:i + size]) for i in range(0, n, size)]


def test_ensemble_weights_concentrate_on_the_best_learning_rate() -> None:
    batches = _toy_batches(0)
    lrs = (0.003, 0.3, 30.0)
    single_loss = {}
    for lr in lrs:
        head = make_head("ogd", 16, 24, rank=16, lr=lr)
        single_loss[lr] = sum(head.update(b) for b in batches)
    best = min(single_loss, key=single_loss.__getitem__)
    assert best == 0.3, single_loss
    ens = make_head("ens", 16, 24, rank=16, lrs=lrs)
    assert isinstance(ens, EnsembleHead)
    ens_loss = sum(ens.update(b) for b in batches)
    w = ens.weights
    assert int(np.argmax(w)) == lrs.index(best) and w.max() > 0.85 and w[2] < 1e-6, w
    assert ens_loss < 1.2 * single_loss[best]  # it pays little for not knowing the best rate
    # The mixture serves a proper distribution; "best" serves the best copy exactly.
    b = batches[0]
    q = torch.softmax(ens.logits(b.z0[:4], b.hidden[:4]), -1)
    assert torch.allclose(q.sum(-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(ens.batch_logprobs(b).exp()[:4], q, atol=1e-5)
    ens.mode = "best"
    assert torch.equal(ens.logits(b.z0[:4], b.hidden[:4]),
                       ens.members[1].logits(b.z0[:4], b.hidden[:4]))


def test_exp_weights_follow_recent_losses() -> None:
    w = ExpWeights(2, temperature=1.2, discount=0.5)
    for _ in range(20):
        w.update([0.0, 1.0])
    assert w.weights[0] > 0.8
    for _ in range(20):  # the workload changed: discounting lets the weights move back
        w.update([1.0, 0.0])
    assert w.weights[1] > 0.8


def test_distill_loss_is_kl() -> None:
    gen = torch.Generator().manual_seed(1)
    logits, target = torch.randn(3, 10, generator=gen), torch.randn(3, 10, generator=gen)
    p = torch.softmax(target, -1)
    idx = torch.arange(10).expand(3, 10)
    kl = (p * (p.log() - torch.log_softmax(logits, -1))).sum(-1).mean()
    assert torch.allclose(distill_loss(logits, idx, p), kl, atol=1e-6)
    assert float(distill_loss(target, idx, p)) == pytest.approx(0.0, abs=1e-6)


def test_candidate_kl_matches_the_full_kl_of_the_frozen_drafter() -> None:
    gen = torch.Generator().manual_seed(2)
    base, target = 3 * torch.randn(5, 300, generator=gen), 3 * torch.randn(5, 300, generator=gen)
    buf = ReplayBuffer(capacity=8, hidden_size=4, top_k=16, drafter_top_m=16)
    buf.add(torch.randn(5, 4, generator=gen), base, target)
    b = buf.batch(0, 5)
    t_val, t_idx = target.topk(16, -1)
    exact = distill_loss(base, t_idx, torch.softmax(t_val, -1))
    assert float(candidate_kl(b.z0, b.tail, b.prob)) == pytest.approx(float(exact), rel=1e-4)


def test_sampled_tail_tracks_the_exact_kl_of_an_adapted_head() -> None:
    """Once the adapter moves non-candidate logits, the candidate-set loss needs the sampled
    tail correction to stay close to the exact full-vocabulary KL."""
    gen = torch.Generator().manual_seed(3)
    n, hdim, vocab = 64, 8, 400
    hidden = torch.randn(n, hdim, generator=gen)
    base, target = 2 * torch.randn(n, vocab, generator=gen), 2 * torch.randn(n, vocab,
                                                                             generator=gen)
    head = make_head("ogd", hdim, vocab, rank=4)
    with torch.no_grad():
        head.adapter.b.copy_(2.0 * torch.randn(vocab, generator=gen))  # moves every token
    buf = ReplayBuffer(capacity=n, hidden_size=hdim, top_k=16, drafter_top_m=16,
                       tail_samples=256)
    buf.add(hidden, base, target)
    batch = buf.batch(0, n)
    t_val, t_idx = target.topk(16, -1)
    exact = head.dense_loss(base, hidden, t_idx, torch.softmax(t_val, -1))
    sampled = head.loss(batch)
    frozen_tail = head.loss(DistillBatch(batch.hidden, batch.idx, batch.z0, batch.tail,
                                         batch.prob))
    assert abs(sampled - exact) < 0.05 * exact, (sampled, exact)
    assert abs(sampled - exact) < abs(frozen_tail - exact), (sampled, frozen_tail, exact)


def test_replay_buffer_ring_and_batches() -> None:
    buf = ReplayBuffer(capacity=5, hidden_size=2, top_k=3, drafter_top_m=2)
    for i in range(7):
        buf.add(torch.full((1, 2), float(i)), torch.arange(6.0).flip(0).unsqueeze(0),
                torch.arange(6.0).unsqueeze(0))
    assert len(buf) == 5 and buf.num_added == 7
    assert buf.idx[0].tolist() == [5, 4, 3, 0, 1]  # target top-3, then drafter top-2
    b = buf.batch(new_since=5, size=4, generator=torch.Generator().manual_seed(0))
    assert b.hidden[:2, 0].tolist() == [5.0, 6.0]  # the new rows first
    assert set(b.hidden[2:, 0].tolist()) <= {2.0, 3.0, 4.0}  # then replayed ones (0, 1 evicted)
    assert torch.allclose(b.prob.sum(-1), torch.ones(4))


# --- state ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["opt", "ens"])
def test_state_round_trip(tmp_path: os.PathLike[str], target: torch.nn.Module,
                          draft_model: torch.nn.Module, kind: str) -> None:
    a = adaptive_drafter(draft_model, kind, base_name="tiny", stride=1, batch_size=16)
    SpeculativeDecoder(target, [a], "fixed").generate(PROMPTS[0], 20)
    path = f"{tmp_path}/adapter.pt"
    a.save(path, include_buffer=True)
    b = adaptive_drafter(draft_model, kind, base_name="tiny", stride=1, batch_size=16)
    b.load(path)
    ids = PROMPTS[1] + [3, 4, 5]
    assert torch.equal(a.lm.logits(ids, 3), b.lm.logits(ids, 3))
    # Both continue identically: same learner state (optimistic lazy iterate, ensemble
    # weights), same buffer, same sampling generator.
    for d in (a, b):
        SpeculativeDecoder(target, [d], "fixed").generate(PROMPTS[2], 12)
    assert torch.equal(a.lm.logits(ids, 3), b.lm.logits(ids, 3))
    assert [r.loss_before for r in a.history[-3:]] == [r.loss_before for r in b.history[-3:]]


def test_atomic_save_leaves_no_partial_file(tmp_path: os.PathLike[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = f"{tmp_path}/state.pt"
    atomic_torch_save({"x": torch.ones(3)}, path)

    def broken_save(obj: object, f: object) -> None:
        f.write(b"partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"x": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch_load(path)["x"], torch.ones(3))  # the old file, intact
    assert sorted(os.listdir(tmp_path)) == ["state.pt"]  # no temp file left behind


def test_learner_state_names_are_checked() -> None:
    state = OGD(0.1).state_dict()
    with pytest.raises(Exception, match="learner"):
        OptimisticOGD(0.1).load_state_dict(state)


def test_sampling_distills_the_raw_target_and_stays_consistent(
    target: torch.nn.Module, draft_model: torch.nn.Module
) -> None:
    """With temperature sampling the adapter still learns the raw (T = 1) target
    distribution, and every draft carries a proper distribution q for verification."""
    from specmux.types import SamplingParams

    drafter = adaptive_drafter(draft_model, "ogd", base_name="tiny", stride=1, batch_size=8,
                               head_kwargs={"lr": 2.0})
    seen: list[tuple[list[int], torch.Tensor]] = []
    propose = drafter.propose

    def checked(context, k, sampling, generator=None):  # type: ignore[no-untyped-def]
        draft = propose(context, k, sampling, generator)
        seen.append((list(context), draft.probs))
        return draft

    drafter.propose = checked  # type: ignore[method-assign]
    dec = SpeculativeDecoder(target, [drafter], "fixed", num_speculative_tokens=3)
    out = dec.generate(PROMPTS[0], 30, SamplingParams(temperature=0.7, seed=3))
    assert len(drafter.history) > 5 and len(out.token_ids) == 30
    # The buffer holds softmax of the raw target logits (not temperature-scaled).
    seq = PROMPTS[0] + out.token_ids
    with torch.no_grad():
        raw = target(input_ids=torch.tensor([seq[:-1]])).logits[0, len(PROMPTS[0]) - 1:]
    k = min(drafter.buffer.top_k, raw.shape[-1])
    vals = raw.topk(k, -1).values
    assert torch.allclose(drafter.buffer.prob[0, :k], torch.softmax(vals[0], -1), atol=1e-5)
    assert all(p is not None and torch.allclose(p.sum(-1), torch.ones(len(p))) for _, p in seen)


def test_sampling_with_a_changing_adapter_follows_the_target() -> None:
    """Over 10k seeded generations, while the adapter updates every round and keeps
    learning across generations, the first two tokens follow the target's joint law."""
    from specmux.types import SamplingParams

    target_model, drafter_model = tiny_lm(0, hidden=48), tiny_lm(1, hidden=32, layers=1)
    drafter = adaptive_drafter(drafter_model, "opt", base_name="tiny", stride=1, batch_size=8,
                               head_kwargs={"lr": 2.0})
    dec = SpeculativeDecoder(target_model, [drafter], "fixed", num_speculative_tokens=3)
    prompt = [3, 1, 4, 1, 5]
    vocab = int(target_model.config.vocab_size)
    counts = np.zeros((vocab, vocab))
    for seed in range(10_000):
        out = dec.generate(prompt, 2, SamplingParams(temperature=1.0, seed=seed))
        counts[out.token_ids[0], out.token_ids[1]] += 1
    assert len(drafter.history) > 1000  # the adapter really changed along the way
    assert dec.stats.num_accepted_tokens > 1000
    joint = target_first_two(target_model, prompt, SamplingParams(temperature=1.0))
    assert_distribution(counts.sum(1), joint.sum(1))  # first token
    assert_distribution(counts, joint)  # both together
