"""Behaviour fingerprint of the engine and the simulator on tiny random-init models.

Runs a fixed stream (several prompts; drafters: two LMs, an adaptive LM, prompt lookup, a
suffix drafter; every policy; greedy and sampled with fixed seeds; persistent and
reset-per-query learners; one generation closed early, so the delayed feedback of an
unfinished query is delivered) and dumps, per round, the committed tokens, the arm and
drafter played and the draft/accept counts, plus the policies' learned state after each
query and the regret counters.  The simulator runs every policy on a small stream too.

Refactors of the learning loop must leave the JSON unchanged::

    PYTHONPATH=src python benchmarks/trace_check.py before.json   # on the old commit
    PYTHONPATH=src python benchmarks/trace_check.py after.json
    cmp before.json after.json

Only the public construction API (``SpeculativeDecoder``, ``simulate``, the drafters) is
used, so the same script runs on both sides of a refactor.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specmux.adapt.drafter import adaptive_drafter
from specmux.drafters.hf import HFDrafter
from specmux.drafters.ngram import NgramDrafter
from specmux.drafters.suffix import SuffixDrafter
from specmux.engine import SpeculativeDecoder
from specmux.policies import POLICIES, make_policy
from specmux.sim.env import SimEnv, iid_pool, make_stream
from specmux.sim.runner import default_arms, simulate
from specmux.types import SamplingParams

VOCAB = 48
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 1, 2, 3], [9, 9, 8, 7, 9, 9, 8], [30, 31, 32, 33, 34, 35],
           [1, 2, 3, 4, 5, 6, 7, 8, 1, 2]]


def tiny_lm(seed: int, hidden: int = 32, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=512, initializer_range=0.3, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def models() -> tuple[LlamaForCausalLM, LlamaForCausalLM, LlamaForCausalLM]:
    target = tiny_lm(0, hidden=48)
    small = tiny_lm(1, hidden=32, layers=1)
    good = tiny_lm(0, hidden=48)
    with torch.no_grad():
        for p in good.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return target, small, good


def pool(small: Any, good: Any, adaptive: bool) -> list:
    drafters = [
        HFDrafter(small, name="small"),
        HFDrafter(good, name="good"),
        NgramDrafter(prompt_lookup_max=3),
        SuffixDrafter([[1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 8, 7, 6]], max_n=3, name="corpus"),
    ]
    if adaptive:
        drafters.append(adaptive_drafter(small, "ogd", base_name="small", stride=1,
                                         batch_size=8, head_kwargs={"lr": 1.0}))
    return drafters


def _state(decoder: SpeculativeDecoder) -> Any:
    policy = decoder.selector.policy if hasattr(decoder, "selector") else decoder.policy
    state = policy.state_dict()
    state.pop("rng", None)  # numpy's bit-generator state: compared through the choices
    return json.loads(json.dumps(state, default=float))


def _stats(decoder: SpeculativeDecoder) -> dict[str, Any]:
    stats = decoder.selector.stats if hasattr(decoder, "selector") else decoder.stats
    return {"num_drafts": stats.num_drafts, "num_output_tokens": stats.num_output_tokens,
            "regret": round(stats.regret, 12), "oracle_arm": stats.oracle_arm,
            "scored": stats.num_scored_rounds,
            "arm_loss_sum": None if stats.arm_loss_sum is None
            else [round(float(x), 12) for x in stats.arm_loss_sum]}


def engine_traces() -> dict[str, Any]:
    torch.set_num_threads(1)
    target, small, good = models()
    out: dict[str, Any] = {}
    configs = []
    for policy in sorted(POLICIES):
        for temperature in (0.0, 0.8):
            for reset in (False, True):
                configs.append((policy, temperature, reset, [1, 3] if policy != "fixed" else 3))
    for policy, temperature, reset, ks in configs:
        adaptive = policy == "hedge" and not reset
        decoder = SpeculativeDecoder(target, pool(small, good, adaptive), policy,
                                     num_speculative_tokens=ks, reset_per_query=reset,
                                     score_all=True if policy == "fixed" else None, seed=3)
        queries = []
        for q, prompt in enumerate(PROMPTS):
            sampling = SamplingParams(temperature=temperature, seed=100 + q if temperature else
                                      None)
            rounds = []
            steps = decoder.generate_steps(prompt, 24, sampling)
            for i, step in enumerate(steps):
                rounds.append([list(step.tokens), step.arm, step.drafter, step.k,
                               step.num_draft_tokens, step.num_accepted_tokens,
                               step.finish_reason])
                if q == 1 and i == 2:  # a client that goes away mid-generation
                    steps.close()
                    break
            queries.append({"rounds": rounds, "state": _state(decoder)})
        key = f"{policy}/T={temperature}/reset={reset}/ks={ks}"
        out[key] = {"queries": queries, "stats": _stats(decoder)}
        print(key, sum(len(q["rounds"]) for q in queries), "rounds", file=sys.stderr)
    return out


def sim_traces() -> dict[str, Any]:
    out: dict[str, Any] = {}
    pool_ = iid_pool(np.array([[0.85, 0.5, 0.7], [0.6, 0.9, 0.7]]))
    arms = default_arms(3, (2, 5))
    for name in sorted(POLICIES):
        for mode in ("greedy", "sampling"):
            for loss, delayed in (("length", True), ("length", False), ("acceptance", True)):
                if loss != "length" and not POLICIES[name].full_information:
                    continue
                rng = np.random.default_rng(7)
                stream = make_stream("blocks", 2, 30, rng, query_tokens=64, block=5)
                env = SimEnv(pool_, np.random.default_rng(11), mode=mode)
                policy = make_policy(name, len(arms), seed=5)
                trace = simulate(policy, env, stream, arms, rounds=1500, loss=loss,
                                 delayed=delayed, reset_per_query=name == "ucb")
                out[f"{name}/{mode}/{loss}/{delayed}"] = {
                    "arm": trace.arm.tolist(), "tokens": trace.tokens.tolist(),
                    "domain": trace.domain.tolist()}
    return out


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "trace.json"
    result = {"engine": engine_traces(), "sim": sim_traces()}
    with open(path, "w") as f:
        json.dump(result, f, sort_keys=True)
    print("wrote", path, file=sys.stderr)


if __name__ == "__main__":
    main()
