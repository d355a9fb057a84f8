"""Exact mode: every target pass computes each position bitwise the same way.

Greedy speculative decoding is bit-identical to target-only decoding only if the target's
logits for a position do not depend on how many positions share the forward pass: a
verification pass feeds ``k + 1`` tokens, a decode step one.  On a CPU in bfloat16 they do
depend on it (``benchmarks/batch_invariance.py`` shows where), and a near-tie argmax (top
two logits within 1-2 ulp) can flip.  Exact mode makes a pass *batch-invariant*, the cure
serving engines adopted (vLLM's batch-invariant mode; Thinking Machines, "Defeating
Nondeterminism in LLM Inference", 2025), with the two changes this CPU needs:

* **linear layers** never run with one row: oneDNN's bf16 ``brg_matmul`` picks another
  work split for ``M = 1`` (the reduction over K is cut differently across threads), while
  every ``M >= 2`` rounds each row the same way.  A one-row input is duplicated to two rows
  and the first result row kept.  This covers q/k/v/o, the MLP and the LM head, and so the
  KV cache entries a pass writes.  Where larger calls round differently again (on an Intel
  Xeon with AMX, every linear shape of Qwen2.5-1.5B rounds rows apart from two-row calls
  for ``M >= 33``: a prefill, or a first verification pass that carries the prompt), calls
  are cut into pieces of at most :func:`row_chunk` rows, the largest piece size found, once
  per linear shape and thread count, to compute every row exactly as a two-row call does.
* **attention** is computed one query row at a time, each row exactly as a one-token decode
  step computes it: SDPA over the keys up to its own position, with the query heads packed
  per key/value head (transformers' decode layout).  A batched pass otherwise runs a
  different kernel on a different shape (causal mask over ``k + 1`` queries).

Embedding lookup, RMSNorm (a per-row fp32 reduction), rotary embeddings and the MLP's
elementwise ops are row-wise already; the script checks them too.

Exact mode covers **bfloat16** models.  In float32, torch runs linear layers on MKL's sgemm,
whose rows round differently for M = 1, for some M up to 15 (9 does, 8 does not) and
for M >= 16 (measured with ``benchmarks/batch_invariance.py --model shapes --dtype float32``);
making them invariant would need every pass padded to one large fixed M, several times the
cost of a float32 decode step.  A float32 model is left as it is (with a warning): there, a
greedy output can leave target-only only at a near-tie within float32 rounding.

Both changes are installed on the model object itself, so every user of the model gets
them: :class:`~specmux.lm.CachedLM`, and Hugging Face ``generate`` (the assisted-generation
baseline).  :func:`set_exact` toggles them; with exact mode off the model is untouched.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

log = logging.getLogger(__name__)

EXACT_ATTENTION = "specmux_exact"
_FLAG = "_specmux_exact"
_PREVIOUS_ATTENTION = "_specmux_previous_attention"


ROW_CHUNKS = (32, 16, 8, 4, 2)  # piece sizes tried, largest first, where big calls differ
_PROBE_ROWS = 130  # rows of the largest calibration call
_WHOLE_SIZES = (3, 5, 9, 17, 33, 65, 129, _PROBE_ROWS)  # calls tried uncut: each side of
# the kernel switches seen (M = 1 / 2, 33 on an AMX Xeon, 16 and 64 for float32's sgemm)
_CHUNKS: dict[tuple[Any, ...], int | None] = {}  # linear shape + threads -> row_chunk


def _linear_rows(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor,
                 chunk: int | None) -> torch.Tensor:
    """``F.linear`` of ``x`` [M, K] in pieces of at most ``chunk`` rows (``None``: one
    call), a one-row piece computed as the first row of a two-row call: [M, N]."""
    pieces = [x] if chunk is None else list(x.split(chunk))
    out = []
    for piece in pieces:
        if piece.shape[0] == 1:
            out.append(F.linear(torch.cat([piece, piece]), weight, bias)[:1])  # [1, N]
        else:
            out.append(F.linear(piece, weight, bias))  # [m, N]
    return out[0] if len(out) == 1 else torch.cat(out)


def _calibrate(weight: torch.Tensor, bias: torch.Tensor | None) -> int | None:
    """The largest piece size (``None``: any ``M``; ``1``: one row a call) at which calls
    compute every row as a two-row call does, on :data:`_PROBE_ROWS` random rows (kernels
    are chosen by ``M``, not by the values): uncut calls of :data:`_WHOLE_SIZES` rows, else,
    for a piece size ``c`` of :data:`ROW_CHUNKS`, every call of 3 to ``c`` rows and the whole
    probe cut into pieces of ``c``."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(_PROBE_ROWS, weight.shape[1], generator=gen).to(weight.dtype)  # [M, K]
    pairs = _linear_rows(weight, bias, x, 2)  # [M, N]: each row in a two-row call
    if all(torch.equal(_linear_rows(weight, bias, x[:m], None), pairs[:m])
           for m in _WHOLE_SIZES):
        return None
    for chunk in ROW_CHUNKS:
        if all(torch.equal(_linear_rows(weight, bias, x[:m], chunk), pairs[:m])
               for m in [*range(3, chunk + 1), _PROBE_ROWS]):
            return chunk
    return 1  # pieces of one row (each a two-row call): every row as a decode step


def row_chunk(module: torch.nn.Linear) -> int | None:
    """The piece size exact mode cuts ``module``'s calls into (``None``: none needed), found
    once per weight shape, dtype, bias and thread count (:func:`_calibrate`; module
    docstring).  Only CPU kernels are calibrated (``None`` elsewhere)."""
    weight = module.weight
    if weight.device.type != "cpu":
        return None
    key = (tuple(weight.shape), weight.dtype, module.bias is not None, torch.get_num_threads())
    if key not in _CHUNKS:
        with torch.no_grad():
            _CHUNKS[key] = chunk = _calibrate(weight, module.bias)
        if chunk is not None:
            log.log(logging.WARNING if chunk == 1 else logging.INFO,
                    "exact mode: linear %s computes rows apart in calls of more than %d "
                    "rows here (%d threads); calls are cut into pieces of %d",
                    tuple(weight.shape), chunk, key[-1], chunk)
    return _CHUNKS[key]


def exact_linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``F.linear`` whose rows never depend on how many rows the call has.

    ``x`` [..., K] -> [..., N].  A single row is computed as the first row of a two-row call
    (a fresh contiguous [2, K] tensor), the same kernel path as every larger call; a call of
    more rows than :func:`row_chunk` (for the thread count of this call) in pieces of it.
    """
    rows = x.numel() // max(x.shape[-1], 1)
    chunk = row_chunk(self) if rows > 1 else None
    if rows != 1 and (chunk is None or rows <= chunk):
        return F.linear(x, self.weight, self.bias)
    out = _linear_rows(self.weight, self.bias, x.reshape(rows, x.shape[-1]), chunk)  # [M, N]
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _masks_only_the_future(mask: torch.Tensor | None, q: int, kv: int) -> bool:
    """Whether ``mask`` [b, 1|H, q, kv] (bool, or additive float) lets each row ``j`` see all
    of its first ``kv - q + j + 1`` keys: then every row runs unmasked over exactly those
    keys, as a one-token step does (the plain causal mask of a cached pass, or no mask)."""
    if mask is None:
        return True
    allowed = mask if mask.dtype == torch.bool else mask == 0
    past = torch.arange(kv)[None, :] <= torch.arange(kv - q, kv)[:, None]  # [q, kv]
    return bool((allowed[..., -q:, :] | ~past).all())


def _row_mask(mask: torch.Tensor, j: int, length: int) -> torch.Tensor:
    """Row ``j`` of an attention mask cut to ``length`` keys, [b, 1|H, 1, length]."""
    return mask[:, :, j : j + 1, :length]


def exact_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention, one query row at a time, each as a one-token decode step does it.

    ``query`` [b, H, q, d] holds the last ``q`` positions of ``key``/``value``
    [b, Hkv, kv, d] (cache + new).  Row ``j`` attends the first ``kv - q + j + 1`` keys.
    Returns [b, q, H, d], the layout transformers' attention functions return.
    """
    if kwargs.get("sliding_window"):
        raise NotImplementedError("exact mode does not support sliding-window attention")
    b, heads, q, d = query.shape
    kv_heads, kv = key.shape[1], key.shape[2]
    rep = heads // kv_heads
    out = query.new_empty(b, q, heads, d)
    if _masks_only_the_future(attention_mask, q, kv):
        attention_mask = None  # padding-free batch: each row sees exactly its own past
    for j in range(q):
        length = kv - q + j + 1
        # [b, Hkv, rep, d]: the query heads of each key/value head, as transformers packs a
        # single decode query (pack_gqa) so SDPA needs no repeat_kv.
        qj = query[:, :, j, :].reshape(b, kv_heads, rep, d)
        mask = None if attention_mask is None else _row_mask(attention_mask, j, length)
        if mask is not None and mask.shape[1] == heads:
            mask = mask.reshape(b, kv_heads, rep, length)
        oj = F.scaled_dot_product_attention(
            qj, key[:, :, :length], value[:, :, :length], attn_mask=mask,
            scale=scaling, is_causal=False,
        )  # [b, Hkv, rep, d]
        out[:, j] = oj.reshape(b, heads, d)
    return out, None


AttentionInterface.register(EXACT_ATTENTION, exact_attention_forward)
AttentionMaskInterface.register(EXACT_ATTENTION, sdpa_mask)


def is_exact(model: PreTrainedModel) -> bool:
    """Whether exact mode is on for ``model``."""
    return bool(getattr(model, _FLAG, False))


def set_exact(model: PreTrainedModel, on: bool = True) -> PreTrainedModel:
    """Turn exact mode on or off for ``model`` (in place; returns it).

    On: every ``nn.Linear`` gets :func:`exact_linear_forward` and attention runs through
    :func:`exact_attention_forward`.  Off: both are removed again, so the model computes
    exactly as loaded.  Idempotent.  Models other than bfloat16 torch models (float32, or
    another backend such as llama.cpp) are left unchanged (see the module docstring);
    :func:`is_exact` tells whether it took effect.
    """
    if on == is_exact(model) or not isinstance(model, torch.nn.Module):
        return model
    if on and model.dtype != torch.bfloat16:
        log.info("exact mode covers bfloat16 models; %s stays as it is (%s): greedy "
                 "output may leave target-only at float rounding near-ties",
                 type(model).__name__, str(model.dtype).removeprefix("torch."))
        return model
    if on:
        setattr(model, _PREVIOUS_ATTENTION, model.config._attn_implementation)
        model.set_attn_implementation(EXACT_ATTENTION)
    else:
        model.set_attn_implementation(getattr(model, _PREVIOUS_ATTENTION, None) or "sdpa")
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            if on:
                row_chunk(module)  # calibrated now, at load, for the current thread count
                module.forward = types.MethodType(exact_linear_forward, module)
            elif "forward" in module.__dict__:
                del module.forward
    setattr(model, _FLAG, on)
    log.info("exact (batch-invariant) mode %s for %s", "on" if on else "off",
             type(model).__name__)
    return model
