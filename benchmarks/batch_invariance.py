"""Where does a row of the target's forward pass depend on the number of positions in the pass?

    python benchmarks/batch_invariance.py --model tiny            # random-init Qwen2 shape, fast
    flock /tmp/specmux-cpu.lock python benchmarks/batch_invariance.py \
        --model embedded:qwen2.5-coder-1.5b --json out/batch_invariance.json

Speculative greedy decoding equals target-only decoding bit for bit only if the logits of a
position are the same whether it is computed in a one-token decode step or as one row of a
``(k+1)``-token verification pass.  For default and exact mode (:mod:`specmux.exact`) this
script compares, bitwise:

1. **components**: during a (k+1)-token pass, the input of every linear layer (q/k/v/o, MLP,
   LM head), RMSNorm, rotary embedding, embedding and attention call is captured; each row is
   then recomputed alone (attention: the row's query over the keys up to its position, as a
   one-token step sees them) and compared with its row of the batched result;
2. **linear kernel per M**: every distinct linear shape, on the captured real activations,
   called with M = 1, 2, 3, k+1, 16, 64, 256 rows; its first rows against one-row calls and
   all rows against the largest call;
3. **end to end**: after the same prefill, k+1 one-token steps against one (k+1)-token pass:
   logit rows, the argmax and the KV cache each writes; and the whole prompt cut plus k+1
   tokens in ONE pass (as a first speculative round feeds prompt + draft) against the
   prompt's prefill then k+1 one-token steps (target-only decoding): logit rows;
4. **cost**: seconds of a prefill, a one-token step and a (k+1)-token pass after it (median
   of ``--repeats``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from transformers import DynamicCache, PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from specmux.bench.runner import fix_lm_head_strides
from specmux.exact import set_exact
from specmux.lm import cache_kwarg

TEXT = ("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n"
        "    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
        "Explain why the loop above runs in linear time and how memoization changes it. ") * 8


def tiny_qwen2(seed: int = 0) -> PreTrainedModel:
    """A random-init model with Qwen2.5's structure (GQA, q/k/v bias, RMSNorm, rotary)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=4096, hidden_size=512, intermediate_size=4096,
                      num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()


def _kind(name: str, module: torch.nn.Module) -> str | None:
    if isinstance(module, torch.nn.Linear):
        return "linear " + name.rsplit(".", 1)[-1]
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    cls = type(module).__name__
    if cls.endswith("RMSNorm"):
        return "rmsnorm"
    if cls.endswith("RotaryEmbedding"):
        return "rotary"
    return None


def _row(x: Any, j: int, m: int) -> Any:
    """Row j of a [1, m, ...] tensor (kept 3-D); other arguments unchanged."""
    if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1] == m:
        return x[:, j : j + 1]
    return x


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


@torch.inference_mode()
def components(model: PreTrainedModel, ids: list[int], k: int) -> dict[str, list[int]]:
    """{component: [rows differing, rows]} for one (k+1)-token pass after a prefill."""
    m = k + 1
    cache = DynamicCache()
    model(input_ids=torch.tensor([ids[:-m]]), **{cache_kwarg(model): cache}, use_cache=True)
    captured: list[tuple[str, torch.nn.Module, tuple[Any, ...], Any]] = []
    hooks = []
    for name, module in model.named_modules():
        kind = _kind(name, module)
        if kind is not None:
            hooks.append(module.register_forward_hook(
                lambda mod, args, out, kind=kind: captured.append((kind, mod, args, out))))
    impl = model.config._attn_implementation
    inner: Callable[..., Any] = ALL_ATTENTION_FUNCTIONS[impl]
    attn: list[tuple[Any, ...]] = []

    def capture(module: Any, q: Any, key: Any, value: Any, mask: Any, **kw: Any) -> Any:
        out = inner(module, q, key, value, mask, **kw)
        attn.append((module, q, key, value, kw, out[0]))
        return out

    ALL_ATTENTION_FUNCTIONS[impl] = capture
    try:
        model(input_ids=torch.tensor([ids[-m:]]), **{cache_kwarg(model): cache}, use_cache=True)
    finally:
        del ALL_ATTENTION_FUNCTIONS[impl]
        for h in hooks:
            h.remove()
    stats: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for kind, mod, args, out in captured:
        rows = out[0].shape[1] if kind == "rotary" else out.shape[1]
        for j in range(rows):
            alone = mod(*[_row(a, j, rows) for a in args])
            if kind == "rotary":
                same = all(_same(x[:, j : j + 1], y) for x, y in zip(out, alone, strict=True))
            else:
                same = _same(out[:, j : j + 1], alone)
            stats[kind][0] += not same
            stats[kind][1] += 1
    for module, q, key, value, kw, out in attn:  # out [1, q, H, d]
        n, kv = q.shape[2], key.shape[2]
        for j in range(n):
            length = kv - n + j + 1
            alone = inner(module, q[:, :, j : j + 1], key[:, :, :length], value[:, :, :length],
                          None, **kw)[0]
            stats["attention"][0] += not _same(out[:, j : j + 1], alone)
            stats["attention"][1] += 1
    return dict(stats)


@torch.inference_mode()
def linear_per_m(model: PreTrainedModel, ids: list[int], ms: list[int]) -> list[dict[str, Any]]:
    """Per distinct linear shape: do the rows of an M-row call equal one-row calls (first 4
    rows) and the rows of the largest call?"""
    inputs: dict[tuple[int, int, bool], tuple[torch.nn.Linear, torch.Tensor]] = {}
    hooks = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            def grab(mod: Any, args: Any, _out: Any) -> None:
                key = (mod.out_features, mod.in_features, mod.bias is not None)
                inputs.setdefault(key, (mod, args[0].reshape(-1, args[0].shape[-1])))
            hooks.append(module.register_forward_hook(grab))
    big = max(ms)
    model(input_ids=torch.tensor([ids[:big]]), logits_to_keep=0)
    for h in hooks:
        h.remove()
    rows = []
    for (n, kdim, bias), (mod, x) in sorted(inputs.items()):
        x = x[:big].contiguous()
        full = F.linear(x, mod.weight, mod.bias)  # [big, N]
        single = torch.cat([F.linear(x[i : i + 1], mod.weight, mod.bias) for i in range(4)])
        res = {"shape": f"{n}x{kdim}{'+b' if bias else ''}", "rows_vs_M1": {}, "rows_vs_Mmax": {}}
        for mm in ms:
            out = F.linear(x[:mm].contiguous(), mod.weight, mod.bias)
            res["rows_vs_M1"][mm] = bool(torch.equal(out[:4], single[:mm]))
            res["rows_vs_Mmax"][mm] = bool(torch.equal(out, full[:mm]))
        rows.append(res)
    return rows


@torch.inference_mode()
def end_to_end(model: PreTrainedModel, ids: list[int], k: int) -> dict[str, Any]:
    """k+1 one-token steps against one (k+1)-token pass after the same prefill; and the
    same steps against the last k+1 rows of ONE pass over all of ``ids`` (the prompt's KV
    cache then written by a pass of another size: ``one_pass_rows_identical``)."""
    m = k + 1
    prefix = torch.tensor([ids[:-m]])
    c1, c2, c3 = DynamicCache(), DynamicCache(), DynamicCache()
    kw = cache_kwarg(model)
    model(input_ids=prefix, **{kw: c1}, use_cache=True)
    model(input_ids=prefix, **{kw: c2}, use_cache=True)
    steps = [model(input_ids=torch.tensor([[t]]), **{kw: c1}, use_cache=True).logits[0, -1]
             for t in ids[-m:]]
    batch = model(input_ids=torch.tensor([ids[-m:]]), **{kw: c2}, use_cache=True).logits[0]
    joint = model(input_ids=torch.tensor([ids]), **{kw: c3}, use_cache=True).logits[0, -m:]
    rows = [bool(torch.equal(s, b)) for s, b in zip(steps, batch, strict=True)]
    argmax = [int(s.argmax()) == int(b.argmax()) for s, b in zip(steps, batch, strict=True)]
    diff = [float((s.float() - b.float()).abs().max()) for s, b in zip(steps, batch, strict=True)]
    kv = [bool(torch.equal(a.keys[:, :, -m:], b.keys[:, :, -m:])
               and torch.equal(a.values[:, :, -m:], b.values[:, :, -m:]))
          for a, b in zip(c1.layers, c2.layers, strict=True)]
    return {"rows_identical": rows, "argmax_identical": argmax, "max_abs_logit_diff": diff,
            "kv_layers_identical": f"{sum(kv)}/{len(kv)}",
            "one_pass_rows_identical": [bool(torch.equal(s, j))
                                        for s, j in zip(steps, joint, strict=True)]}


@torch.inference_mode()
def cost(model: PreTrainedModel, ids: list[int], k: int, repeats: int) -> dict[str, float]:
    """Median seconds of a one-token step and of a (k+1)-token pass after a cached prefix."""
    m = k + 1
    cache = DynamicCache()
    model(input_ids=torch.tensor([ids[:-m]]), **{cache_kwarg(model): cache}, use_cache=True)
    out = {}
    times = []
    for _ in range(max(repeats // 2, 1) + 1):
        t0 = time.perf_counter()
        model(input_ids=torch.tensor([ids[:-m]]), logits_to_keep=1)
        times.append(time.perf_counter() - t0)
    out[f"prefill_{len(ids) - m}"] = statistics.median(times[1:])
    for label, new in (("step_1", ids[-m:-m + 1]), (f"pass_{m}", ids[-m:])):
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            model(input_ids=torch.tensor([new]), **{cache_kwarg(model): cache}, use_cache=True,
                  logits_to_keep=len(new))
            times.append(time.perf_counter() - t0)
            cache.crop(-len(new))
        out[label] = statistics.median(times[1:])
    return out


# Qwen2.5-1.5B's linear shapes (out, in, bias): q, k/v, o, gate/up, down, lm_head.
QWEN_1_5B_SHAPES = [(1536, 1536, True), (256, 1536, True), (1536, 1536, False),
                    (8960, 1536, False), (1536, 8960, False), (151936, 1536, False)]


@torch.inference_mode()
def linear_shapes(dtype: torch.dtype, ms: list[int]) -> list[dict[str, Any]]:
    """:func:`linear_per_m` on random weights of the real target's shapes (no model load)."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n, kdim, bias in QWEN_1_5B_SHAPES:
        lin = torch.nn.Linear(kdim, n, bias=bias).to(dtype)
        torch.nn.init.normal_(lin.weight, std=0.02, generator=gen)
        x = torch.randn(max(ms), kdim, generator=gen).to(dtype)
        full = lin(x)
        single = torch.cat([lin(x[i : i + 1]) for i in range(4)])
        res = {"shape": f"{n}x{kdim}{'+b' if bias else ''}", "rows_vs_M1": {}, "rows_vs_Mmax": {}}
        for mm in ms:
            out = lin(x[:mm].contiguous())
            res["rows_vs_M1"][mm] = bool(torch.equal(out[:4], single[:mm]))
            res["rows_vs_Mmax"][mm] = bool(torch.equal(out, full[:mm]))
        rows.append(res)
        del lin
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="'tiny', 'shapes' (only the linear check, "
                    "on random weights of Qwen2.5-1.5B's shapes) or any specmux model spec")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("-k", type=int, default=4, help="drafted tokens: passes of k+1 tokens")
    ap.add_argument("--prompt-tokens", type=int, default=120)
    ap.add_argument("--positions", type=int, default=3, help="prompt cuts to test")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    ms = sorted({1, 2, 3, args.k + 1, 16, 64, 256})
    report: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]), "model": args.model, "dtype": args.dtype,
        "k": args.k, "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "threads": torch.get_num_threads(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "modes": {},
    }
    if args.model == "shapes":
        report["linear_per_m"] = linear_shapes(dtype, ms)
        return _finish(report, args.json)
    if args.model == "tiny":
        model = tiny_qwen2().to(dtype)
        ids = torch.randint(0, model.config.vocab_size, (400,),
                            generator=torch.Generator().manual_seed(0)).tolist()
    else:
        from specmux.models import load_model

        model, tok = load_model(args.model, dtype=dtype)
        ids = tok(TEXT)["input_ids"]
    fix_lm_head_strides(model)  # as the bench does: no slow bf16 lm_head layout in the timings
    cuts = [args.prompt_tokens + 17 * i for i in range(args.positions)]
    for mode in ("default", "exact"):
        set_exact(model, mode == "exact")
        comp: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        e2e = []
        for n in cuts:
            for kind, (bad, tot) in components(model, ids[:n], args.k).items():
                comp[kind][0] += bad
                comp[kind][1] += tot
            e2e.append(end_to_end(model, ids[:n], args.k))
        report["modes"][mode] = {
            "components": {k: f"{b}/{t} rows differ" for k, (b, t) in sorted(comp.items())},
            "end_to_end": e2e,
            "cost_s": cost(model, ids[:args.prompt_tokens], args.k, args.repeats),
        }
    set_exact(model, False)
    report["linear_per_m"] = linear_per_m(model, ids, ms)
    return _finish(report, args.json)


def _finish(report: dict[str, Any], path: Path | None) -> int:
    _print(report)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))
    return 0


def _print(r: dict[str, Any]) -> None:
    print(f"# batch invariance: {r['model']} {r['dtype']} k={r['k']} "
          f"({r['machine']['threads']} threads, torch {r['machine']['torch']}, {r['date']})")
    for mode, res in r["modes"].items():
        print(f"\n## {mode} mode")
        for kind, s in res["components"].items():
            print(f"  {kind:<18} {s}")
        for e in res["end_to_end"]:
            rows = sum(e["rows_identical"])
            print(f"  end to end: logit rows identical {rows}/{len(e['rows_identical'])}, "
                  f"argmax identical {sum(e['argmax_identical'])}/{len(e['argmax_identical'])}, "
                  f"max |diff| {max(e['max_abs_logit_diff']):.3g}, "
                  f"KV layers identical {e['kv_layers_identical']}")
        for e in res["end_to_end"]:
            rows = e["one_pass_rows_identical"]
            print(f"  prompt + {len(rows)} tokens in one pass vs prefill then steps: logit "
                  f"rows identical {sum(rows)}/{len(rows)}")
        c = res["cost_s"]
        print("  cost: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in c.items()))
    print("\n## linear kernel per M (default F.linear): rows == one-row calls? == largest call?")
    for row in r["linear_per_m"]:
        a = " ".join(f"{m}:{'=' if v else 'X'}" for m, v in row["rows_vs_M1"].items())
        b = " ".join(f"{m}:{'=' if v else 'X'}" for m, v in row["rows_vs_Mmax"].items())
        print(f"  {row['shape']:<14} vs M=1 [{a}]   vs M=max [{b}]")


if __name__ == "__main__":
    raise SystemExit(main())
