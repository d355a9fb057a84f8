"""Exact mode: a verification row is bitwise the one-token row, so bf16 greedy is lossless."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from specmux.drafters.hf import HFDrafter
from specmux.drafters.ngram import NgramDrafter
from specmux.engine import SpeculativeDecoder, autoregressive_generate
from specmux.exact import is_exact, set_exact
from specmux.lm import CachedLM, cache_kwarg
from specmux.policies import POLICIES

VOCAB = 512


def tiny_qwen2(seed: int, hidden: int = 128, inter: int = 1024, layers: int = 2,
               init_range: float = 0.02) -> Qwen2ForCausalLM:
    """A bf16 random-init model of Qwen2.5's structure (GQA, q/k/v bias, RMSNorm, rotary).

    The default init range keeps its logits close together: near-ties are frequent, so any
    row that rounds differently in a bigger pass soon flips a greedy token."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=init_range, tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config).to(torch.bfloat16).eval()


@pytest.fixture(scope="module")
def exact_target() -> Qwen2ForCausalLM:
    return set_exact(tiny_qwen2(0))


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def _one_token_and_batched(model, ids: list[int], m: int):
    """Logit rows and KV caches of m one-token steps and of one m-token pass after the same
    prefill of ids[:-m]."""
    prefix = torch.tensor([ids[:-m]])
    c1, c2 = DynamicCache(), DynamicCache()
    kw = cache_kwarg(model)  # the KV cache argument's name in this transformers version
    model(input_ids=prefix, **{kw: c1}, use_cache=True)
    model(input_ids=prefix, **{kw: c2}, use_cache=True)
    steps = torch.stack([
        model(input_ids=torch.tensor([[t]]), **{kw: c1}, use_cache=True).logits[0, -1]
        for t in ids[-m:]
    ])
    batch = model(input_ids=torch.tensor([ids[-m:]]), **{kw: c2}, use_cache=True)
    return steps, batch.logits[0], c1, c2


@pytest.mark.parametrize("m", [2, 5, 8])
@pytest.mark.parametrize("prefix", [1, 17, 60])
def test_verification_rows_are_bitwise_one_token_rows(exact_target, m, prefix) -> None:
    steps, batch, c1, c2 = _one_token_and_batched(exact_target, _prompt(prefix + m, prefix), m)
    for j in range(m):
        assert torch.equal(steps[j], batch[j]), f"row {j} of a {m}-token pass differs"
    for a, b in zip(c1.layers, c2.layers, strict=True):  # the KV cache each pass wrote
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("n", [30, 100])
def test_prefill_rows_match_too(exact_target, n) -> None:
    """The first speculative round feeds prompt + draft at once; every row of it must be the
    row target-only decoding computes (prompt alone, then one token at a time).  100 rows:
    past the sizes where oneDNN switches kernels on an AMX CPU (``M >= 33``)."""
    ids = _prompt(n, 3)
    lm_a, lm_b = CachedLM(exact_target), CachedLM(exact_target)
    joint = lm_a.logits(ids, 5)  # one pass over n tokens
    lm_b.logits(ids[:-4], 1)  # prefill n - 4, then one token at a time
    alone = torch.stack([lm_b.logits(ids[: n - 4 + j], 1)[0] for j in range(5)])
    assert torch.equal(joint, alone)


def test_linear_calls_are_cut_where_big_calls_round_apart(monkeypatch) -> None:
    """A kernel that rounds every row differently once a call has more than 4 rows (as
    oneDNN's bf16 kernels do beyond 32 on an AMX Xeon): exact mode finds the piece size 4
    and computes each row of a 50-row call exactly as a two-row call does."""
    import types

    import torch.nn.functional as F

    import specmux.exact as exact

    def skewed(x, weight, bias=None):
        out = F.linear(x, weight, bias)
        return out + 0.125 if x.numel() // x.shape[-1] > 4 else out

    monkeypatch.setattr(exact, "F", types.SimpleNamespace(linear=skewed))
    monkeypatch.setattr(exact, "_CHUNKS", {})
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48).to(torch.bfloat16)
    assert exact.row_chunk(lin) == 4
    lin.forward = types.MethodType(exact.exact_linear_forward, lin)
    x = torch.randn(50, 64).to(torch.bfloat16)
    with torch.no_grad():
        rows = torch.cat([lin(x[i:i + 1]) for i in range(50)])  # [50, 48]: one row a call
        assert torch.equal(lin(x), rows) and torch.equal(lin(x[None])[0], rows)
        assert not torch.equal(skewed(x, lin.weight, lin.bias), rows)  # uncut, it differs
        monkeypatch.setattr(exact, "F", F)  # this machine's own kernels, calibrated afresh
        monkeypatch.setattr(exact, "_CHUNKS", {})
        rows = torch.cat([lin(x[i:i + 1]) for i in range(50)])
        assert torch.equal(lin(x), rows)
        assert len(exact._CHUNKS) == 1


def test_set_exact_toggles_and_restores() -> None:
    model, plain = tiny_qwen2(1), tiny_qwen2(1)
    ids = torch.tensor([_prompt(12, 1)])
    with torch.inference_mode():
        ref = plain(input_ids=ids).logits
        set_exact(model)
        assert is_exact(model) and model.config._attn_implementation == "specmux_exact"
        set_exact(model)  # idempotent
        on = model(input_ids=ids).logits
        set_exact(model, False)
        assert not is_exact(model)
        assert not any("forward" in m.__dict__ for m in model.modules())
        assert torch.equal(model(input_ids=ids).logits, ref)
    assert on.shape == ref.shape


def test_float32_models_are_left_alone() -> None:
    model = tiny_qwen2(2).float()
    assert set_exact(model) is model and not is_exact(model)
    assert model.config._attn_implementation != "specmux_exact"
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.fixture(scope="module")
def exact_pool() -> list:
    small = set_exact(tiny_qwen2(1, hidden=64, inter=256, layers=1))
    good = tiny_qwen2(0)
    with torch.no_grad():
        for p in good.parameters():
            p.add_(0.002 * torch.randn_like(p))
    return [HFDrafter(small, name="small"), HFDrafter(good, name="good"),
            NgramDrafter(prompt_lookup_max=3)]


PROMPTS = [_prompt(9, 11), [5, 6, 7, 8, 5, 6, 7, 8, 5, 6], _prompt(40, 12)]


@pytest.fixture(scope="module")
def exact_references(exact_target) -> dict:
    return {tuple(p): autoregressive_generate(exact_target, p, 48) for p in PROMPTS}


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_bf16_greedy_is_identical_in_exact_mode(exact_target, exact_pool, exact_references,
                                                policy) -> None:
    decoder = SpeculativeDecoder(exact_target, exact_pool, policy,
                                 num_speculative_tokens=[2, 5], seed=0)
    for p in PROMPTS:
        assert decoder.generate(p, 48).token_ids == exact_references[tuple(p)], p


@pytest.mark.parametrize("index", [0, 1, 2])
def test_bf16_greedy_single_drafters_in_exact_mode(exact_target, exact_pool, exact_references,
                                                   index) -> None:
    decoder = SpeculativeDecoder(exact_target, [exact_pool[index]], "fixed",
                                 num_speculative_tokens=6)
    for p in PROMPTS:
        assert decoder.generate(p, 48).token_ids == exact_references[tuple(p)], p


def test_hf_assisted_generation_is_identical_in_exact_mode(exact_target, exact_pool,
                                                           exact_references) -> None:
    """Exact mode lives on the model, so Hugging Face's own assisted generation (the bench's
    external baseline) is bit-exact too."""
    assistant = exact_pool[1].lm.model
    for p in PROMPTS:
        ids = torch.tensor([p])
        with torch.inference_mode():
            out = exact_target.generate(ids, attention_mask=torch.ones_like(ids),
                                        assistant_model=assistant, max_new_tokens=48,
                                        do_sample=False, temperature=None, top_p=None,
                                        top_k=None, pad_token_id=0, eos_token_id=None)
        assert out[0, len(p):].tolist() == exact_references[tuple(p)], p
