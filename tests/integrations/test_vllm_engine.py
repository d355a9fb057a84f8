"""specmux's proposer inside a real vLLM (CPU build) on tiny random models built here.

Skipped unless vLLM is importable (``.ci/run`` runs it in its own venv with the ``vllm``
extra).  The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the
tests can read the proposer's state.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
vllm = pytest.importorskip("vllm")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from vllm.distributed.parallel_state import cleanup_dist_env_and_memory  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from specmux.errors import ConfigError  # noqa: E402
from specmux.integrations.vllm import PROPOSER_PATH, Proposer  # noqa: E402

from stats import assert_distribution  # noqa: E402

K = 4


def tiny_model(path: Path, vocab: int, logit_scale: float, seed: int) -> str:
    """A 2-layer random Llama saved as safetensors (head_dim 64, which vLLM's CPU kernels take)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=1)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)  # how peaked the next-token laws are
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def peaked(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_model(tmp_path_factory.mktemp("peaked"), vocab=64, logit_scale=30.0, seed=0)


@pytest.fixture(scope="module")
def spread(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_model(tmp_path_factory.mktemp("spread"), vocab=16, logit_scale=4.0, seed=1)


def make_llm(model: str, options: dict | None = None, **kwargs) -> vllm.LLM:
    spec = None
    if options is not None:
        spec = {"method": "custom_class", "model": PROPOSER_PATH, "num_speculative_tokens": K,
                **options}
    return vllm.LLM(model, skip_tokenizer_init=True, dtype="float32", max_model_len=256,
                    seed=0, speculative_config=spec, **kwargs)


def proposer() -> Proposer:
    (found,) = list(Proposer.instances)
    return found


def shut_down() -> None:
    """After ``del llm``: free the engine now, not while the next one runs."""
    gc.collect()
    cleanup_dist_env_and_memory()


def run(llm: vllm.LLM, prompts: list[list[int]], params: list) -> list[list[int]]:
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


# Repetitive prompts (prompt lookup hits) and free ones; lengths differ so that requests
# finish, and with max_num_seqs=3 start, at different steps (continuous batching).
PROMPTS = [
    [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6],
    [10, 11, 12, 13, 14, 15, 16, 17],
    [20, 21, 20, 21, 20, 21, 20],
    [3, 30, 31, 32, 33, 3, 30, 31],
    [40, 41, 42],
    [50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 50, 51, 52],
]
MAX_TOKENS = [40, 25, 60, 10, 50, 33]


def test_greedy_token_identical_and_state_per_request(peaked: str) -> None:
    greedy = [vllm.SamplingParams(temperature=0.0, max_tokens=m, detokenize=False,
                                  ignore_eos=True) for m in MAX_TOKENS]
    llm = make_llm(peaked, max_num_seqs=3)
    expected = run(llm, PROMPTS, greedy)
    del llm
    shut_down()

    llm = make_llm(peaked, {"record_history": True, "token_cost": 0.02}, max_num_seqs=3)
    got = run(llm, PROMPTS, greedy)
    core = proposer().core
    stats = core.stats_dict()
    assert got == expected
    assert stats["drafted"] > 0 and stats["accepted"] > 0, stats
    # Each request's learner saw exactly its own tokens: prompt + output (+ tokens the last
    # step committed past max_tokens), whatever row it sat in.
    assert len(core.finished_history) + len(core.requests) == len(PROMPTS)
    histories = {**core.finished_history, **{r: s.history for r, s in core.requests.items()}}
    for i, (prompt, out) in enumerate(zip(PROMPTS, expected, strict=True)):
        (history,) = [h for rid, h in histories.items() if rid.split("-")[0] == str(i)]
        assert history[: len(prompt)] == prompt
        assert history[len(prompt): len(prompt) + len(out)] == out
        assert len(out) <= len(history) - len(prompt) <= len(out) + K
    # Finished requests are freed once the runner drops them (at the next step).
    again = run(llm, [PROMPTS[0]], greedy[:1])
    assert again == expected[:1]
    assert stats["max_live"] <= 3
    assert core.stats.requests_freed >= len(PROMPTS) and len(core.requests) <= 1
    del llm
    shut_down()


def exact_first_two(model_dir: str, prompt: list[int]) -> np.ndarray:
    """The target's exact joint law [V, V] of its first two sampled tokens (temperature 1)."""
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double(), -1)
        vocab = p1.shape[0]
        batch = torch.tensor([[*prompt, x] for x in range(vocab)])
        p2 = torch.softmax(model(batch).logits[:, -1].double(), -1)  # [V, V]
    return (p1[:, None] * p2).numpy()


def test_sampled_run_follows_the_target_law(spread: str) -> None:
    """Needs specmux's fix of vLLM 0.32.0's CPU expand kernel (vllm_plugin): without it,
    vLLM's own n-gram proposer fails this check as well (chi2 ~ 13,000 at df 125)."""
    prompt = [*range(2, 16), *range(2, 16)]  # every token recurs: the ngram drafter hits
    draws = 3000
    llm = make_llm(spread, {"drafters": ["ngram"], "k": [2], "no_spec": False,
                            "policy": "fixed"}, max_num_seqs=256)
    # The engine's seed, not per-request seeds: vLLM 0.32's CPU runner fails rewinding a
    # per-request generator ("CPU Generator does not use offset") for chunked prefills.
    params = vllm.SamplingParams(temperature=1.0, max_tokens=3, detokenize=False,
                                 ignore_eos=True)
    outs = run(llm, [prompt] * draws, [params] * draws)
    stats = proposer().core.stats_dict()
    del llm
    shut_down()
    assert all(len(o) == 3 for o in outs)
    assert 0 < stats["accepted"] < stats["drafted"], stats  # drafts both kept and rejected
    joint = exact_first_two(spread, prompt)
    counts = np.zeros_like(joint)
    for o in outs:
        counts[o[0], o[1]] += 1
    assert_distribution(counts, joint)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"polcy": "hedge"}, "'polcy' is unknown"),
        ({"policy": "nope"}, "unknown policy 'nope'"),
        ({"k": [8]}, "exceeds num_speculative_tokens"),
        ({"drafters": ["lm"]}, "drafter 'lm' is unknown"),
        ({"token_cost": -1}, "token_cost"),
        ({"policy": "hedge", "policy_kwargs": {"eta": 0}}, "eta"),
        ({"drafters": ["corpus:/no/such/file"]}, "corpus not found"),
    ],
)
def test_bad_options_fail_before_the_engine_starts(peaked: str, options: dict,
                                                    match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_llm(peaked, options)


def test_vllm_serve_cli_passes_the_options(peaked: str) -> None:
    """`vllm serve MODEL --speculative-config '{...}'`: the options reach the proposer's
    config (parsed as the server does, without starting it)."""
    import json

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    def config(options: dict):
        spec = {"method": "custom_class", "model": PROPOSER_PATH, "num_speculative_tokens": K,
                **options}
        parser = make_arg_parser(FlexibleArgumentParser())
        args = parser.parse_args(["--model", peaked, "--skip-tokenizer-init",
                                  "--speculative-config", json.dumps(spec)])
        return AsyncEngineArgs.from_cli_args(args).create_engine_config()

    cfg = config({"policy": "hedge", "k": [1, 4]})
    assert cfg.additional_config["specmux"] == {"policy": "hedge", "k": [1, 4]}
    assert cfg.speculative_config.method == "custom_class"
    with pytest.raises(ConfigError, match="'polcy' is unknown"):
        config({"polcy": "hedge"})
