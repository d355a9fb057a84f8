"""specmux's transformers backend on a GPU: lossless there, and what the cost model sees.

Weights cannot travel to a lent GPU machine (no network there), so the costs are timed on
random-init models of the embedded architectures (Qwen2.5-Coder-1.5B target, 0.5B drafter,
shapes from their GGUF metadata): a forward pass costs the same whatever the weights.  Three
parts, one JSON file:

1. **lossless** (tiny random models as in ``tests/conftest.py``, float32, on the device):
   greedy output of every policy (k = 3) and of the contextual time-loss learners over
   k in {0, 2, 4} equals target-only greedy on the same device, token for token; and a
   sampled Hedge run's first two tokens pass the chi-square test against the target's exact
   joint law (``--draws`` seeded generations, alpha = 0.001).
2. **costs** (random-init embedded architectures, bfloat16): milliseconds of one
   :class:`~specmux.lm.CachedLM` pass scoring ``n`` positions after a cached context (what
   a verification pass costs specmux, the logits' copy to the CPU included), for the target
   and the drafter; ``c`` = drafter step / target step.
3. **engine** (the same random-init pair, bfloat16): target-only, fixed arms and the
   time-loss learners on a few prompts; per method the tokens/s ratio, the learner's
   policy and scoring milliseconds per round against a target step, and greedy equality
   with target-only (a mismatch is diagnosed: the top-two logit gap at the divergence, in
   bfloat16 ulp).  Random weights accept little from an LM drafter, so only the costs and
   overheads of this part carry over to trained models, not its speedups.

    python benchmarks/gpu_check.py --out DIR [--device cuda] [--smoke]

``--smoke`` runs every part with small shapes (on a CPU too): the check of this script.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM

from specmux.drafters.hf import HFDrafter
from specmux.drafters.ngram import NgramDrafter
from specmux.drafters.suffix_tree import SuffixTreeDrafter
from specmux.engine import SpeculativeDecoder, autoregressive_generate
from specmux.lm import CachedLM
from specmux.policies import POLICIES
from specmux.types import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import VOCAB, tiny_drafters, tiny_lm  # noqa: E402
from stats import chi2_critical, chi2_statistic, target_first_two  # noqa: E402

# Shapes of the embedded GGUFs (qwen2.* metadata keys); vocabulary 151,936.
ARCHS = {
    "qwen2.5-coder-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                               num_attention_heads=12, num_key_value_heads=2),
    "qwen2.5-coder-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                               num_attention_heads=14, num_key_value_heads=2),
}
TINY = [[1, 2, 3, 4, 5, 6, 7, 1, 2, 3], [9, 9, 8, 7, 9, 9, 8], [30, 31, 32, 33, 34, 35, 36, 37]]


def lossless(device: str, draws: int) -> dict:
    """Part 1: greedy equality for every policy, and the sampled chi-square test."""
    target = tiny_lm(0, hidden=48).to(device)
    small, good = (m.to(device) for m in tiny_drafters())

    def pool() -> list:
        return [HFDrafter(small, name="small"), HFDrafter(good, name="good"),
                NgramDrafter(prompt_lookup_max=3), SuffixTreeDrafter(name="suffix")]

    refs = [autoregressive_generate(target, p, 40) for p in TINY]
    cpu_refs = [autoregressive_generate(tiny_lm(0, hidden=48), p, 40) for p in TINY]
    runs = [(name, dict(num_speculative_tokens=3)) for name in sorted(POLICIES)] + [
        (f"{name}:time:ctx", dict(num_speculative_tokens=[0, 2, 4], loss="time",
                                  contextual=True, score_rate=0.3))
        for name in ("hedge", "normalhedge")]
    greedy = {}
    for name, kwargs in runs:
        decoder = SpeculativeDecoder(target, pool(), name.split(":")[0], seed=1, **kwargs)
        outs = [decoder.generate(p, 40).token_ids for p in TINY]
        greedy[name] = {"identical": outs == refs, "mat": decoder.stats.mean_acceptance_length}
    prompt, sampling = [3, 1, 4, 1, 5], SamplingParams(temperature=1.0)
    decoder = SpeculativeDecoder(target, pool()[:3], "hedge", num_speculative_tokens=3)
    counts = np.zeros((VOCAB, VOCAB))
    for seed in range(draws):
        s = SamplingParams(sampling.temperature, seed=seed)
        out = decoder.generate(prompt, max_new_tokens=2, sampling=s).token_ids
        counts[out[0], out[1]] += 1
    joint = target_first_two(target, prompt, sampling)
    tests = {}
    for label, c, p in (("first", counts.sum(1), joint.sum(1)),
                        ("second", counts.sum(0), joint.sum(0)), ("joint", counts, joint)):
        stat, df = chi2_statistic(c, p)
        tests[label] = {"chi2": stat, "df": df, "critical": chi2_critical(df),
                        "passed": stat < chi2_critical(df)}
    return {"greedy": greedy, "same_as_cpu": refs == cpu_refs, "sampled_draws": draws,
            "sampled_accepted_tokens": decoder.stats.num_accepted_tokens, "chi2": tests}


def arch_model(name: str, device: str, smoke: bool) -> Qwen2ForCausalLM:
    """A random-init bfloat16 model of an embedded architecture (``smoke``: 2 layers)."""
    shape = dict(ARCHS[name])
    if smoke:
        shape.update(num_hidden_layers=2, hidden_size=64 if "0.5b" in name else 96,
                     intermediate_size=128)
    config = Qwen2Config(vocab_size=151_936, max_position_embeddings=32_768,
                         rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    return model.to(torch.bfloat16).eval().requires_grad_(False)


def pass_ms(lm: CachedLM, context: list[int], n: int, reps: int) -> float:
    """Median ms of a pass scoring ``n`` new positions after the cached ``context``."""
    lm.logits(context, 1)
    times = []
    for r in range(reps + 2):
        tail = [(7 * r + 3 * j + 11) % 50_000 for j in range(n)]  # differs each time
        t0 = time.perf_counter()
        lm.logits([*context, *tail], n)  # crops back to context, feeds n tokens
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[2:])


def costs(models: dict, contexts: list[int], positions: list[int], reps: int) -> dict:
    """Part 2: pass milliseconds per model, context length and positions scored."""
    out: dict = {}
    for name, model in models.items():
        lm = CachedLM(model, name)
        pass_ms(lm, [5] * contexts[0], 4, reps)  # warm-up: kernels, allocator
        for L in contexts:
            context = [(13 * i + 5) % 50_000 for i in range(L)]
            out.setdefault(name, {})[str(L)] = {
                str(n): pass_ms(lm, context, n, reps) for n in positions}
    t, d = out[next(iter(models))], out[list(models)[1]]
    out["c"] = {L: d[L]["1"] / t[L]["1"] for L in t}
    return out


def diagnose(target: Qwen2ForCausalLM, prompt: list[int], ref: list[int], got: list[int]) -> dict:
    """The first divergence: the reference's top-two logit gap there, in bfloat16 ulp."""
    t = next(i for i, (a, b) in enumerate(zip(ref, got, strict=False)) if a != b)
    row = CachedLM(target).logits([*prompt, *ref[:t]], 1)[0]
    top = float(row[ref[t]])
    gap = top - float(row[got[t]])
    ulp = 2.0 ** (math.floor(math.log2(abs(top))) - 7) if top else 2.0 ** -133
    return {"position": t, "logit_gap": gap, "ulp": ulp, "gap_ulp": gap / ulp}


def engine(models: dict, prompt_len: int, new_tokens: int, num_prompts: int) -> dict:
    """Part 3: methods on the random-init pair; ratios, overheads, equality."""
    target, drafter = models.values()
    rng = np.random.default_rng(0)
    prompts = []
    for _ in range(num_prompts):  # text with repeats, so that lookup drafters find matches
        base = rng.integers(100, 50_000, size=prompt_len // 4).tolist()
        tail = rng.integers(100, 50_000, size=prompt_len // 4).tolist()
        prompts.append(base + base[::-1] + base + tail)
    autoregressive_generate(target, prompts[0], 4)  # warm-up: kernels, allocator
    t0 = time.perf_counter()
    refs = [autoregressive_generate(target, p, new_tokens) for p in prompts]
    base_s = time.perf_counter() - t0
    methods = {"only suffix@8": ("fixed", [8], "suffix"), "only lm@4": ("fixed", [4], "lm"),
               "hedge:time:ctx": ("hedge", [0, 2, 4, 8], None),
               "normalhedge:time:ctx": ("normalhedge", [0, 2, 4, 8], None)}
    out = {"target-only": {"seconds": base_s, "tokens": sum(map(len, refs))}}
    for label, (policy, ks, only) in methods.items():
        pool = [SuffixTreeDrafter(name="suffix"), NgramDrafter(name="ngram"),
                HFDrafter(drafter, name="lm")]
        kwargs = {}
        if only is not None:
            pool = [d for d in pool if d.name == only]
        else:
            kwargs = dict(loss="time", contextual=True, score_rate=0.05)
        decoder = SpeculativeDecoder(target, pool, policy, num_speculative_tokens=ks, **kwargs)
        t0 = time.perf_counter()
        outs = [decoder.generate(p, new_tokens) for p in prompts]
        secs = time.perf_counter() - t0
        rounds = sum(len(o.steps) for o in outs)
        sel = decoder.selector
        mismatches = [diagnose(target, p, r, o.token_ids)
                      for p, r, o in zip(prompts, refs, outs, strict=True) if o.token_ids != r]
        out[label] = {
            "seconds": secs, "speedup": base_s / secs, "rounds": rounds,
            "mat": decoder.stats.mean_acceptance_length,
            "policy_ms_per_round": 1e3 * sel.policy_seconds / rounds,
            "learner_ms_per_round": 1e3 * sum(s.learner_seconds for o in outs for s in o.steps)
            / rounds,
            "identical": not mismatches, "mismatches": mismatches,
            "cost_model": sel.cost_model.snapshot(),
        }
    t0 = time.perf_counter()  # target-only again: drift over the part
    again = [autoregressive_generate(target, p, new_tokens) for p in prompts]
    out["target-only again"] = {"seconds": time.perf_counter() - t0, "identical": again == refs}
    out["target_step_ms"] = 1e3 * base_s / out["target-only"]["tokens"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="small shapes, few draws")
    ap.add_argument("--draws", type=int, default=4000)
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: this torch sees no CUDA device")
    args.out.mkdir(parents=True, exist_ok=True)
    smoke = args.smoke
    info = {"device": args.device, "device_name": torch.cuda.get_device_name()
            if args.device == "cuda" else platform.processor(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "smoke": smoke}
    t0 = time.perf_counter()
    result = {"machine": info, "lossless": lossless(args.device, 300 if smoke else args.draws)}
    print("lossless", json.dumps(result["lossless"]), f"{time.perf_counter() - t0:.0f}s",
          flush=True)
    models = {name: arch_model(name, args.device, smoke) for name in ARCHS}
    result["costs"] = costs(models, [64] if smoke else [256, 2048],
                            [1, 2, 4, 8, 9] if smoke else [1, 2, 3, 4, 5, 6, 8, 9, 12, 16, 17, 32],
                            2 if smoke else 15)
    print("costs", json.dumps(result["costs"]), f"{time.perf_counter() - t0:.0f}s", flush=True)
    result["engine"] = engine(models, 32 if smoke else 256, 8 if smoke else 64,
                              1 if smoke else 3)
    print("engine", json.dumps(result["engine"], default=str),
          f"{time.perf_counter() - t0:.0f}s", flush=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
