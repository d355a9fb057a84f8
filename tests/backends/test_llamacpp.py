"""The llama.cpp backend on tiny random GGUFs written by the test (offline, fast):
the GGUF is the HF model, the KV cache rolls back, every drafter x policy is lossless against
llama.cpp target-only greedy, sampling follows the target's law, bad files fail in one line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from specmux.drafters.ngram import NgramDrafter
from specmux.drafters.suffix import SuffixDrafter
from specmux.engine import SpeculativeDecoder, autoregressive_generate
from specmux.errors import ModelLoadError, PromptError, TokenizerMismatchError
from specmux.lm import CachedLM
from specmux.policies import POLICIES
from specmux.types import SamplingParams

from conftest import VOCAB, tiny_lm
from gguf_helpers import write_gguf
from helpers import tiny_tokenizer
from stats import assert_distribution, target_first_two

llama_cpp = pytest.importorskip("llama_cpp")

from specmux.backends.llamacpp import (  # noqa: E402
    LlamaCppDrafter,
    LlamaCppLM,
    check_same_vocab,
)

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 1, 2, 3], [9, 9, 8, 7, 9, 9, 8], [30, 31, 32, 33, 34, 35, 36, 37]]
cli = CliRunner()


@pytest.fixture(scope="module")
def ggufs(target_model, drafter_models, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gguf")
    small, good = drafter_models
    return {"target": write_gguf(target_model, d / "target.gguf"),
            "small": write_gguf(small, d / "small.gguf"),
            "good": write_gguf(good, d / "good.gguf")}


@pytest.fixture(scope="module")
def lms(ggufs) -> dict[str, LlamaCppLM]:
    return {name: LlamaCppLM.load(path, name=name, threads=1, context=512)
            for name, path in ggufs.items()}


def pool(lms) -> list:
    return [
        LlamaCppDrafter(lms["small"], name="small"),
        LlamaCppDrafter(lms["good"], name="good"),
        NgramDrafter(prompt_lookup_max=3),
        SuffixDrafter([[1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 8, 7, 6]], max_n=3, name="corpus"),
    ]


@pytest.fixture(scope="module")
def references(lms) -> dict:
    return {tuple(p): autoregressive_generate(lms["target"], p, 40) for p in PROMPTS}


def test_gguf_runs_the_same_model_as_transformers(lms, target_model) -> None:
    """The llama.cpp logits of the written GGUF are the HF model's, up to rounding (llama.cpp
    keeps its KV cache in float16)."""
    ids = PROMPTS[0]
    ours = lms["target"].logits(ids, 4)
    ref = CachedLM(target_model).logits(ids, 4)
    assert ours.shape == (4, VOCAB) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=1e-2, rtol=1e-2)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    assert lms["target"].vocab_size == VOCAB and lms["target"].max_context == 512


def test_kv_cache_rolls_back_to_the_common_prefix(lms) -> None:
    lm = lms["target"]
    lm.reset()
    base = [5, 6, 7, 8, 9, 10, 11, 12]
    lm.logits(base, 1)
    fed0, calls0 = lm.num_tokens_fed, lm.num_forward_calls
    rows = lm.logits([*base[:6], 20, 21, 22], 3)  # drops 2 cached tokens, feeds 3
    assert lm.num_tokens_fed - fed0 == 3 and lm.num_forward_calls - calls0 == 1
    lm.reset()
    fresh = lm.logits([*base[:6], 20, 21, 22], 3)
    torch.testing.assert_close(rows, fresh, atol=1e-5, rtol=1e-5)
    again = lm.logits([*base[:6], 20, 21, 22], 2)  # remembered rows: no forward pass
    assert lm.num_forward_calls - calls0 == 2
    torch.testing.assert_close(again, fresh[1:])


def test_long_prompt_is_fed_in_batches(ggufs) -> None:
    lm = LlamaCppLM.load(ggufs["target"], threads=1, context=512, n_batch=16)
    ids = [i % 40 + 2 for i in range(70)]
    rows = lm.logits(ids, 3)
    assert lm.num_forward_calls == 5 and lm.num_tokens_fed == 70
    one_batch = LlamaCppLM.load(ggufs["target"], threads=1, context=512).logits(ids, 3)
    torch.testing.assert_close(rows, one_batch, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="context"):
        lm.logits([1] * 513)
    with pytest.raises(PromptError, match="vocabulary"):
        lm.logits([1, 2, VOCAB])  # llama_decode would fail on it; the cache stays usable
    torch.testing.assert_close(lm.logits(ids, 3), rows, atol=1e-4, rtol=1e-4)
    many = lm.logits([*ids, 3], 30)  # more rows than it remembers (max_saved_rows)
    assert many.shape == (30, VOCAB) and len(lm.rows) <= lm.max_saved_rows
    torch.testing.assert_close(many[-2], rows[-1], atol=1e-4, rtol=1e-4)
    lm.close()


def test_quantized_gguf_scores_a_batch_on_any_cpu(tmp_path) -> None:
    """A Q8_0 GGUF (a layout llama.cpp's AMX kernels take) scores a 32-token batch: on a
    CPU with AMX, llama.cpp's AMX matmul segfaults on any batch of more than one token
    (llama.cpp #20824) unless ``new_llama`` leaves its extra buffer types out.  The batch
    runs in a child process, so a segfault fails this test instead of ending the run."""
    model = tiny_lm(0, hidden=64)
    path = write_gguf(model, tmp_path / "q8.gguf", q8=True)
    code = ("from specmux.backends.llamacpp import LlamaCppLM\n"
            f"lm = LlamaCppLM.load({str(path)!r}, threads=2, context=256)\n"
            "rows = lm.logits(list(range(5, 37)), 9)\n"
            "print(*rows.argmax(-1).tolist())\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-1500:]}"
    with torch.no_grad():  # [9] the float model's greedy tokens at the same positions
        expected = model(torch.tensor([list(range(5, 37))])).logits[0, -9:].argmax(-1)
    got = [int(t) for t in run.stdout.split()]
    assert len(got) == 9
    assert sum(a == b for a, b in zip(got, expected.tolist(), strict=True)) >= 7


def test_new_llama_leaves_extra_buffers_out_where_amx_runs(monkeypatch, ggufs) -> None:
    import specmux.backends.llamacpp as backend

    class Info:  # what llama_print_system_info() says on an AMX Xeon / elsewhere
        def __init__(self, text: bytes) -> None:
            self.llama_print_system_info = lambda: text

    assert backend.amx_kernels(Info(b"CPU : AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 |"))
    assert not backend.amx_kernels(Info(b"CPU : AVX2 = 1 | AVX512 = 1 | REPACK = 1 |"))
    for amx in (True, False):
        monkeypatch.setattr(backend, "amx_kernels", lambda lc, amx=amx: amx)
        llama = backend.new_llama(model_path=str(ggufs["target"]), n_ctx=64, verbose=False)
        assert llama.model_params.use_extra_bufts is not amx
        llama.close()
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts  # put back


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_is_identical_to_llamacpp_target_only_for_every_policy(
    policy, k, lms, references
) -> None:
    decoder = SpeculativeDecoder(lms["target"], pool(lms), policy, num_speculative_tokens=k,
                                 score_all=True, seed=k)
    for prompt in PROMPTS:
        out = decoder.generate(prompt, max_new_tokens=40)
        assert out.token_ids == references[tuple(prompt)]
    assert decoder.stats.num_drafts < 3 * 40


@pytest.mark.parametrize("index", range(4))
def test_greedy_is_identical_for_every_single_drafter(index, lms, references) -> None:
    decoder = SpeculativeDecoder(lms["target"], [pool(lms)[index]], "fixed",
                                 num_speculative_tokens=4)
    for prompt in PROMPTS:
        assert decoder.generate(prompt, 40).token_ids == references[tuple(prompt)]


def test_learner_choosing_k_is_lossless_and_learns_the_good_drafter(lms, references) -> None:
    decoder = SpeculativeDecoder(lms["target"], pool(lms)[:3], "hedge",
                                 num_speculative_tokens=[1, 2, 4],
                                 policy_kwargs={"selection": "argmax"})
    for prompt in PROMPTS * 2:
        assert decoder.generate(prompt, 40).token_ids == references[tuple(prompt)]
    share = decoder.stats.selection_share()
    assert max(share, key=share.get) == "good"
    assert decoder.stats.mean_acceptance_length > 1.5


def test_llamacpp_generate_agrees_with_our_target_only(lms, references) -> None:
    """llama-cpp-python's own greedy loop on the same Llama object gives the same tokens."""
    from specmux.bench.anchors import run_anchor

    target = lms["target"]
    for prompt in PROMPTS:
        run = run_anchor(target.llama, prompt, 40, SamplingParams(), frozenset(), 512,
                         clear=target.reset)
        assert run.tokens == references[tuple(prompt)]
    assert target.cached_ids == []  # the anchor leaves the cache empty for us


@pytest.mark.parametrize(
    "sampling",
    [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=6, top_p=0.9)],
    ids=["t1", "t0.7-topk-topp"],
)
def test_sampling_matches_target_distribution(sampling, lms) -> None:
    """Over 6k seeded generations, the first two tokens follow the llama.cpp target's law."""
    prompt = [3, 1, 4, 1, 5]
    drafters = [LlamaCppDrafter(lms["small"], "small"), LlamaCppDrafter(lms["good"], "good"),
                NgramDrafter(2)]
    decoder = SpeculativeDecoder(lms["target"], drafters, "hedge", num_speculative_tokens=3)
    counts = np.zeros((VOCAB, VOCAB))
    for seed in range(6_000):
        s = SamplingParams(sampling.temperature, sampling.top_k, sampling.top_p, seed=seed)
        out = decoder.generate(prompt, max_new_tokens=2, sampling=s)
        counts[out.token_ids[0], out.token_ids[1]] += 1
    assert decoder.stats.num_accepted_tokens > 500  # drafts were really accepted
    lms["target"].reset()
    joint = target_first_two(lms["target"], prompt, sampling)
    assert_distribution(counts.sum(1), joint.sum(1))
    assert_distribution(counts.sum(0), joint.sum(0))
    assert_distribution(counts, joint)


# ----------------------------------------------------------------------------- bad input


def _first_line(err: Exception) -> str:
    text = str(err)
    assert "\n" not in text
    return text


def test_bad_files_give_one_line_errors(ggufs, tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        LlamaCppLM.load(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all" * 10)
    with pytest.raises(ModelLoadError, match="not a GGUF") as e:
        LlamaCppLM.load(junk)
    _first_line(e.value)
    data = ggufs["target"].read_bytes()
    for frac in (0.5, 0.999):
        cut = tmp_path / f"cut{frac}.gguf"
        cut.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(ModelLoadError, match="cannot load") as e:
            LlamaCppLM.load(cut, threads=1, context=64)
        _first_line(e.value)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(data[:24])
    with pytest.raises(ModelLoadError, match="cannot load"):
        LlamaCppLM.load(header_only, threads=1, context=64)


def test_vocabulary_mismatch(lms, target_model, tmp_path) -> None:
    pieces = [f"w{i}" for i in range(VOCAB)]
    other = LlamaCppLM.load(write_gguf(target_model, tmp_path / "other.gguf",
                                       vocab_pieces=pieces), threads=1, context=64)
    with pytest.raises(TokenizerMismatchError, match="vocabulary"):
        check_same_vocab(lms["target"], other)
    check_same_vocab(lms["target"], lms["good"])  # same tokenizer, different weights


def test_pipeline_and_config_select_the_backend(ggufs) -> None:
    from specmux.api import Pipeline
    from specmux.config import parse_speculative_config

    pipe = Pipeline(str(ggufs["target"]), [str(ggufs["good"]), "ngram"], "hedge",
                    backend="llama.cpp", threads=1, tokenizer=tiny_tokenizer())
    assert type(pipe.decoder.target).__name__ == "LlamaCppLM"
    ref = autoregressive_generate(pipe.decoder.target, pipe.encode("def f(x):"), 24)
    out = pipe.generate("def f(x):", max_new_tokens=24)
    assert out.token_ids == ref and isinstance(out.text, str)
    assert 1 in pipe.decoder.eos_token_ids  # the GGUF's eos
    assert parse_speculative_config('{"backend": "llama.cpp"}').backend == "llama.cpp"


# ------------------------------------------- a transformers target, LM drafters on llama.cpp


@pytest.mark.parametrize("policy", ["hedge", "ucb"])
def test_transformers_target_with_llamacpp_drafters_is_lossless(policy, lms, target_model) -> None:
    """Greedy output of a transformers target drafted by GGUFs on llama.cpp equals that
    target's own greedy output: the drafter's backend only changes the proposals."""
    target = CachedLM(target_model)
    decoder = SpeculativeDecoder(target, pool(lms), policy, num_speculative_tokens=[0, 2, 4],
                                 loss="time", contextual=True)
    for prompt in PROMPTS:
        ref = autoregressive_generate(CachedLM(target_model), prompt, 40)
        assert decoder.generate(prompt, max_new_tokens=40).token_ids == ref
    assert decoder.stats.num_accepted_tokens > 0


def test_transformers_target_with_llamacpp_drafter_samples_the_target_law(lms,
                                                                          target_model) -> None:
    """Over 4k seeded generations the first two tokens follow the transformers target's law
    when the (only) drafter is a GGUF on llama.cpp (its float32 q in the rejection test)."""
    prompt = [3, 1, 4, 1, 5]
    sampling = SamplingParams(temperature=1.0)
    decoder = SpeculativeDecoder(CachedLM(target_model), [LlamaCppDrafter(lms["good"], "good")],
                                 "fixed", num_speculative_tokens=3)
    counts = np.zeros((VOCAB, VOCAB))
    for seed in range(4_000):
        out = decoder.generate(prompt, max_new_tokens=2, sampling=SamplingParams(1.0, seed=seed))
        counts[out.token_ids[0], out.token_ids[1]] += 1
    assert decoder.stats.num_accepted_tokens > 500
    joint = target_first_two(CachedLM(target_model), prompt, sampling)
    assert_distribution(counts, joint)


def test_pipeline_drafter_backend(ggufs, target_model, tmp_path) -> None:
    """``drafter_backend="llama.cpp"``: a transformers target with a GGUF drafter, its
    vocabulary checked against the target's tokenizer (a mismatch is one line)."""
    from specmux.api import Pipeline
    from specmux.config import parse_speculative_config

    pipe = Pipeline(target_model, [str(ggufs["good"]), "ngram"], "hedge",
                    drafter_backend="llama.cpp", threads=1, tokenizer=tiny_tokenizer())
    assert type(pipe.decoder.drafters[0]).__name__ == "LlamaCppDrafter"
    ref = autoregressive_generate(CachedLM(target_model), pipe.encode("def f(x):"), 24)
    assert pipe.generate("def f(x):", max_new_tokens=24).token_ids == ref
    config = parse_speculative_config('{"drafter_backend": "llama.cpp"}')
    assert config.drafter_backend == "llama.cpp"
    other = write_gguf(target_model, tmp_path / "other.gguf",
                       vocab_pieces=[f"w{i}" for i in range(VOCAB)])
    with pytest.raises(TokenizerMismatchError, match="vocabulary") as e:
        Pipeline(target_model, [str(other)], "hedge", drafter_backend="llama.cpp", threads=1,
                 tokenizer=tiny_tokenizer())
    _first_line(e.value)


def _cli_error(args: list[str]) -> str:
    from specmux.cli import app

    res = cli.invoke(app, args)
    assert res.exit_code == 2, res.output
    text = re.sub(r"\x1b\[[0-9;]*m", "", res.output).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert lines[0].startswith("error:") and "Traceback" not in text
    return " ".join(lines)


def test_cli_bad_models_exit_2(ggufs, tmp_path) -> None:
    base = ["generate", "-p", "ab", "--backend", "llama.cpp", "--no-install", "--threads", "1"]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(ggufs["target"].read_bytes()[:5000])
    assert "not found" in _cli_error([*base, "--target", str(tmp_path / "no.gguf")])
    assert "cannot load" in _cli_error([*base, "--target", str(cut)])
    assert "GGUF files" in _cli_error([*base, "--target", str(tmp_path)])
    assert "backend" in _cli_error([*base[:3], "--backend", "onnx"])
    assert "backend" in _cli_error([*base[:3], "--drafter-backend", "onnx"])
    assert "drafter_backend" in _cli_error(
        [*base[:3], "--speculative-config", '{"drafter_backend": "onnx"}'])
