"""specmux inside vLLM vs vLLM plain and vLLM's own n-gram proposer, on the same prompts.

Run in the vLLM venv (docs/VLLM.md), under the CPU lock on shared machines::

    flock /tmp/specmux-cpu.lock python benchmarks/vllm_bench.py --out vllm_bench.json

1. The target (default the embedded Qwen2.5-Coder-1.5B GGUF) is dequantized with transformers
   and saved once as bf16 safetensors (vLLM reads no GGUF without a plugin) under
   ``~/.cache/specmux/vllm/``.
2. Prompts: ``--per-category`` eval examples of each category -- ``edit`` (rewrite a
   HumanEval solution, copy-heavy), ``code`` (HumanEval stubs, raw completion), ``chat``
   (ShareGPT) -- tokenized with the target's chat template; the *mixed* stream interleaves
   them.  Concurrency 1 and concurrency 8 get disjoint prompts (``--per-category`` of each
   category each): the specmux proposer learns from every output it sees, so the same
   prompts again would be drafted from their own earlier outputs.
3. Each method runs in its own process with one engine: ``plain`` (no speculation),
   ``ngram`` (vLLM's prompt lookup), ``specmux`` (this repo's proposer).  Concurrency 1: its
   prompts one at a time, timed per prompt; concurrency 8: its stream submitted at once
   with ``max_num_seqs=8``.  Greedy, ``--max-tokens`` each, ``ignore_eos``; one short warm-up
   request first, on a prompt of neither set.
4. Throughput = generated tokens / wall seconds; ratios are over the other methods' runs in
   the same invocation.  The specmux proposer's own time per (request, step) comes from its
   ``stats_file``.
5. Output identity: every output of a speculative method that leaves plain's (same prompt,
   same concurrency) is diagnosed after the timed runs by one more plain engine returning
   raw logits (``logprobs_mode="raw_logits"``, untimed): at the first differing position,
   the logits of plain's token and of the other method's token in a one-token decode step
   (plain's own pass) and in a multi-token pass (a prefill of the prompt and the common
   prefix, as a verification pass scores several positions at once), and their gap in
   bf16 ulps (``--no-diagnose`` skips it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

CATEGORIES = ("edit", "code", "chat")
METHODS = ("plain", "ngram", "specmux")
EDIT_INSTRUCTION = ("Rename the function `{name}` to `{name}_v2` and output the complete "
                    "updated code, unchanged otherwise, in one Python code block.\n\n```python\n"
                    "{code}```")


def prepare_model(spec: str, cache: Path) -> Path:
    """bf16 safetensors of ``spec`` (an embedded name or a .gguf path), built once."""
    from specmux.models import embedded_path, load_tokenizer

    gguf = Path(spec) if spec.endswith(".gguf") else embedded_path(spec)
    out = cache / (gguf.stem + "-bf16")
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.bfloat16)
    model.hf_quantizer = None  # dequantized: save as plain weights
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=cache))
    model.save_pretrained(tmp, safe_serialization=True)
    load_tokenizer(str(gguf)).save_pretrained(tmp)
    tmp.rename(out)
    return out


def build_prompts(model_dir: Path, per_category: int) -> list[dict]:
    """Token ids per prompt, categories interleaved (the mixed stream's order)."""
    from transformers import AutoTokenizer

    from specmux.bench.datasets import load_domain

    tok = AutoTokenizer.from_pretrained(model_dir)
    per_category *= 2  # the first half at concurrency 1, the second at concurrency 8
    code = load_domain("code", num_eval=2 * per_category, seed=0).eval
    chat = load_domain("chat", num_eval=per_category, seed=0).eval
    by_cat: dict[str, list[list[int]]] = {"edit": [], "code": [], "chat": []}
    for ex in code[per_category:]:
        name = ex.prompt.split("def ", 1)[1].split("(", 1)[0]
        text = EDIT_INSTRUCTION.format(name=name, code=ex.prompt + (ex.reference or ""))
        by_cat["edit"].append(chat_ids(tok, text))
    for ex in code[:per_category]:
        by_cat["code"].append(tok(ex.prompt, add_special_tokens=False)["input_ids"])
    for ex in chat:
        by_cat["chat"].append(chat_ids(tok, ex.prompt))
    half = per_category // 2
    out = [{"category": c, "ids": by_cat[c][i], "set": "c1" if i < half else "c8"}
           for i in range(per_category) for c in CATEGORIES]
    return [*out, {"category": "warmup", "ids": chat_ids(tok, WARMUP_TEXT), "set": "warmup"}]


WARMUP_TEXT = "Say hello in one word."


def prompt_set(prompts: list[dict], name: str) -> list[dict]:
    """The prompts of one set of :func:`build_prompts` (``"c1"``, ``"c8"``, ``"warmup"``)."""
    return [x for x in prompts if x["set"] == name]


def chat_ids(tok, text: str) -> list[int]:
    return list(tok.apply_chat_template([{"role": "user", "content": text}],
                                        add_generation_prompt=True, tokenize=True,
                                        return_dict=False))


def speculative_config(method: str, args: argparse.Namespace, stats: str) -> dict | None:
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": args.ngram_k,
                "prompt_lookup_max": args.ngram_max, "prompt_lookup_min": args.ngram_min}
    if method == "specmux":
        return {"method": "custom_class", "model": "specmux.integrations.vllm.Proposer",
                "num_speculative_tokens": args.specmux_k, "stats_file": stats,
                **json.loads(args.specmux_options)}
    return None


def worker(args: argparse.Namespace) -> None:
    """One method, one engine: concurrency 1 per prompt, then the stream at concurrency 8."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = json.loads(Path(args.prompts).read_text())
    (warm,), c8 = prompt_set(prompts, "warmup"), prompt_set(prompts, "c8")
    prompts = prompt_set(prompts, "c1")
    stats = str(Path(args.result).with_suffix(".stats.json"))
    llm = LLM(args.model_dir, dtype="bfloat16", max_model_len=args.max_model_len,
              max_num_seqs=8, seed=0, speculative_config=speculative_config(args.worker, args,
                                                                            stats))
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)

    def generate(batch: list[dict], p: SamplingParams = params) -> tuple[float, list]:
        t0 = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=x["ids"]) for x in batch], p,
                            use_tqdm=False)
        return time.perf_counter() - t0, [list(o.outputs[0].token_ids) for o in outs]

    generate([warm], SamplingParams(temperature=0.0, max_tokens=8))  # warm-up
    single = []
    for x in prompts:
        seconds, (out,) = generate([x])
        single.append({"category": x["category"], "seconds": seconds, "tokens": out})
    seconds, outs = generate(c8)
    result = {"method": args.worker, "c1": single,
              "c8": {"seconds": seconds, "tokens": outs}, "proposer": None}
    if args.worker == "specmux":
        time.sleep(1.5)  # the proposer rewrites its stats file every second
        generate([warm], SamplingParams(temperature=0.0, max_tokens=4))
        if Path(stats).exists():
            result["proposer"] = json.loads(Path(stats).read_text())
    Path(args.result).write_text(json.dumps(result))


def bf16_ulp(x: float) -> float:
    """The spacing of bfloat16 numbers (8 significant bits) at ``x``.

    >>> bf16_ulp(17.3), bf16_ulp(-3.0), bf16_ulp(0.0)
    (0.125, 0.015625, 0.0)
    """
    if x == 0.0:
        return 0.0
    return 2.0 ** (math.floor(math.log2(abs(x))) - 7)


def mismatches(results: dict[str, dict], prompts: list[dict]) -> list[dict]:
    """Every speculative output that leaves plain's at the same concurrency: the method, the
    prompt (its index in its concurrency's set), the first differing position and the two
    tokens there."""
    sets = {"c=1": prompt_set(prompts, "c1"), "c=8": prompt_set(prompts, "c8")}
    base = results.get("plain")
    if base is None:
        return []
    cases = []
    for method, res in results.items():
        if method == "plain":
            continue
        pairs = [("c=1", i, a["tokens"], b["tokens"])
                 for i, (a, b) in enumerate(zip(base["c1"], res["c1"], strict=True))]
        pairs += [("c=8", i, a, b)
                  for i, (a, b) in enumerate(zip(base["c8"]["tokens"], res["c8"]["tokens"],
                                                 strict=True))]
        for conc, i, ref, out in pairs:
            d = next((j for j, (x, y) in enumerate(zip(ref, out, strict=False)) if x != y), None)
            if d is not None:
                cases.append({"method": method, "concurrency": conc, "prompt": i,
                              "category": sets[conc][i]["category"], "position": d,
                              "ids": sets[conc][i]["ids"],
                              "prefix": ref[:d], "plain_token": ref[d], "other_token": out[d]})
    return cases


def diagnose(args: argparse.Namespace) -> None:
    """Raw logits at each mismatch (module docstring, item 5), in one plain engine."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    cases = json.loads(Path(args.cases).read_text())
    llm = LLM(args.model_dir, dtype="bfloat16", max_model_len=args.max_model_len,
              max_num_seqs=1, seed=0, logprobs_mode="raw_logits",
              enable_prefix_caching=False)  # the multi-token pass recomputes every position

    def logits(ids: list[int], steps: int) -> tuple[list[int], dict[int, float]]:
        p = SamplingParams(temperature=0.0, max_tokens=steps, logprobs=20, ignore_eos=True)
        (out,) = llm.generate([TokensPrompt(prompt_token_ids=ids)], p, use_tqdm=False)
        last = out.outputs[0].logprobs[-1]
        return list(out.outputs[0].token_ids), {t: v.logprob for t, v in last.items()}

    for case in cases:
        ids = case.pop("ids")
        decoded, step = logits(ids, case["position"] + 1)  # one-token steps, plain's way
        _, batch = logits(ids + case["prefix"], 1)  # the prefix scored in one pass
        for name, top in (("decode_step", step), ("multi_token_pass", batch)):
            a, b = top.get(case["plain_token"]), top.get(case["other_token"])
            ranked = sorted(top.items(), key=lambda kv: -kv[1])
            case[name] = {
                "plain_logit": a, "other_logit": b,
                "top2": ranked[:2],  # (token, logit)
                "gap_ulp": (None if a is None or b is None
                            else (a - b) / bf16_ulp(max(abs(a), abs(b)))),
            }
        case["decode_step"]["reproduces_plain"] = decoded[: case["position"]] == case[
            "prefix"] and decoded[-1] == case["plain_token"]
        del case["prefix"]
    Path(args.result).write_text(json.dumps(cases))


def throughput(runs: list[dict]) -> float:
    return sum(len(r["tokens"]) for r in runs) / sum(r["seconds"] for r in runs)


def summarize(results: dict[str, dict], args: argparse.Namespace) -> dict:
    table: dict[str, dict[str, float]] = {}
    for method, res in results.items():
        row = {c: throughput([r for r in res["c1"] if r["category"] == c]) for c in CATEGORIES}
        row["mixed c=1"] = throughput(res["c1"])
        row["mixed c=8"] = sum(len(t) for t in res["c8"]["tokens"]) / res["c8"]["seconds"]
        table[method] = row
    base = results.get("plain")  # None when --methods leaves plain out
    same = None if base is None else {
        m: sum(a["tokens"] == b["tokens"] for a, b in zip(res["c1"], base["c1"], strict=True))
        for m, res in results.items()}
    same8 = None if base is None else {
        m: sum(a == b for a, b in zip(res["c8"]["tokens"], base["c8"]["tokens"], strict=True))
        for m, res in results.items()}
    summary = {"tokens_per_second": table, "identical_to_plain_c1": same,
               "identical_to_plain_c8": same8,
               "num_prompts": len(next(iter(results.values()))["c1"])}
    if "specmux" in table:
        sm = table["specmux"]
        others = [m for m in table if m != "specmux"]
        builtin = [m for m in others if m != "plain"]
        summary["specmux_over_best_builtin"] = {
            k: sm[k] / max(table[m][k] for m in builtin) for k in sm} if builtin else None
        summary["specmux_over_best_other"] = {
            k: sm[k] / max(table[m][k] for m in others) for k in sm} if others else None
        summary["specmux_over_plain_c8"] = (sm["mixed c=8"] / table["plain"]["mixed c=8"]
                                            if "plain" in table else None)
        summary["proposer"] = results["specmux"]["proposer"]
    return summary


def markdown(report: dict) -> str:
    """The summary as Markdown tables (tokens/s and ratios)."""
    summary = report["summary"]
    table = summary["tokens_per_second"]
    cols = [*CATEGORIES, "mixed c=1", "mixed c=8"]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for method, row in table.items():
        lines.append(f"| {method} | " + " | ".join(f"{row[c]:.2f}" for c in cols) + " |")
    for key in ("specmux_over_best_builtin",):
        if summary.get(key):
            lines.append("| specmux / ngram | "
                         + " | ".join(f"{summary[key][c]:.2f}x" for c in cols) + " |")
    if "specmux" in table and "plain" in table:
        plain = table["plain"]
        lines.append("| specmux / plain | "
                     + " | ".join(f"{table['specmux'][c] / plain[c]:.2f}x" for c in cols) + " |")
    cases = report.get("mismatches") or []
    if cases:
        lines += ["", "| method | conc. | prompt | position | plain / other token | "
                  "decode step: logits, gap | multi-token pass: logits, gap |",
                  "|---|---|---|---|---|---|---|"]
        for c in cases:
            cells = []
            for name in ("decode_step", "multi_token_pass"):
                x = c.get(name)
                if x is None or x["plain_logit"] is None or x["other_logit"] is None:
                    cells.append("not in top 20" if x else "not diagnosed")
                else:
                    cells.append(f"{x['plain_logit']:.4f} / {x['other_logit']:.4f}, "
                                 f"{x['gap_ulp']:+.1f} ulp")
            lines.append(f"| {c['method']} | {c['concurrency']} | {c['prompt']} "
                         f"({c['category']}) | {c['position']} | {c['plain_token']} / "
                         f"{c['other_token']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b",
                    help="embedded model name or .gguf path")
    ap.add_argument("--hf-dir", help="an HF model directory to use as is (skips --model)")
    ap.add_argument("--cache", default=str(Path.home() / ".cache/specmux/vllm"))
    ap.add_argument("--per-category", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--ngram-k", type=int, default=4)
    ap.add_argument("--ngram-max", type=int, default=4)
    ap.add_argument("--ngram-min", type=int, default=2)
    ap.add_argument("--specmux-k", type=int, default=8)
    ap.add_argument("--specmux-options", default="{}", help="JSON: extra specmux options")
    ap.add_argument("--out", default="vllm_bench.json")
    ap.add_argument("--no-diagnose", action="store_true",
                    help="skip the raw-logit diagnosis of outputs that leave plain's")
    ap.add_argument("--worker", choices=(*METHODS, "diagnose"), help=argparse.SUPPRESS)
    ap.add_argument("--cases", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--prompts", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "diagnose":
        return diagnose(args)
    if args.worker:
        return worker(args)

    # An explicit KV cache size: vLLM's CPU backend otherwise reserves 92% of the RAM.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import vllm

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_dir = Path(args.hf_dir) if args.hf_dir else prepare_model(args.model, cache)
    prompts = build_prompts(model_dir, args.per_category)
    work = Path(tempfile.mkdtemp(prefix="vllm_bench_"))
    (work / "prompts.json").write_text(json.dumps(prompts))
    results = {}
    for method in args.methods.split(","):
        out = work / f"{method}.json"
        cmd = [sys.executable, __file__, "--worker", method, "--model-dir", str(model_dir),
               "--prompts", str(work / "prompts.json"), "--result", str(out),
               "--max-tokens", str(args.max_tokens), "--max-model-len", str(args.max_model_len),
               "--ngram-k", str(args.ngram_k), "--ngram-max", str(args.ngram_max),
               "--ngram-min", str(args.ngram_min), "--specmux-k", str(args.specmux_k),
               "--specmux-options", args.specmux_options]
        with open(work / f"{method}.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
        results[method] = json.loads(out.read_text())
        print(f"{method}: done ({time.perf_counter() - t0:.0f}s)", flush=True)
    cases = mismatches(results, prompts)
    if cases and not args.no_diagnose:
        (work / "cases.json").write_text(json.dumps(cases))
        out = work / "diagnose.json"
        cmd = [sys.executable, __file__, "--worker", "diagnose", "--model-dir", str(model_dir),
               "--prompts", str(work / "prompts.json"), "--cases", str(work / "cases.json"),
               "--result", str(out), "--max-model-len", str(args.max_model_len)]
        with open(work / "diagnose.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
        cases = json.loads(out.read_text())
        print(f"diagnose: {len(cases)} mismatches ({time.perf_counter() - t0:.0f}s)",
              flush=True)
    for case in cases:
        case.pop("prefix", None)
        case.pop("ids", None)
    import torch
    import transformers

    report = {
        "command": " ".join(sys.argv),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "settings": {k: v for k, v in vars(args).items()
                     if k not in ("worker", "model_dir", "prompts", "result")},
        "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_")},
        "prompt_lengths": {k: [len(p["ids"]) for p in prompt_set(prompts, k)]
                           for k in ("c1", "c8")},
        "summary": summarize(results, args),
        "mismatches": cases,
        "wall_seconds": time.perf_counter() - t0,
        "logs": str(work),
    }
    Path(args.out).write_text(json.dumps({**report, "results": results}, indent=1))
    print(json.dumps(report, indent=1))
    print(markdown(report))


if __name__ == "__main__":
    main()
