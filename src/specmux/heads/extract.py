"""Target hidden states of a corpus, extracted once and cached on disk (resumable).

One shard per text, named by the text's sha256: ``HASH.safetensors`` with ``ids`` [T] (the
tokens), ``hidden`` [T, H] (bf16: the final-layer state the LM head reads after
``ids[:t+1]``) and ``argmax`` [T] (the target's greedy next token there).  Shards are
written atomically, so an interrupted run (or one over more texts) resumes at the first
missing one.  The cache directory is keyed by the model, dtype and token limit, the file
names by the texts themselves, so a changed corpus never reuses stale states.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from specmux.heads.store import _atomic_write

CHARS_PER_TOKEN = 3  # about what a Qwen2.5 token spans in source code (a corpus piece's size)
ARGMAX_CHUNK = 64  # rows per full-vocabulary LM-head matmul (bounds the [rows, V] buffer)


def extraction_key(model_label: str, dtype: str, max_tokens: int) -> str:
    return hashlib.sha256(json.dumps([model_label, dtype, max_tokens]).encode()).hexdigest()[:16]


def shard_name(text: str | Sequence[int]) -> str:
    """A text's shard file name (token sequences are named by their ids)."""
    key = text if isinstance(text, str) else "ids:" + json.dumps([int(t) for t in text])
    return f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"


@dataclass
class Shard:
    ids: torch.Tensor  # [T] int64
    hidden: torch.Tensor  # [T, H] bf16
    argmax: torch.Tensor  # [T] int64


@torch.inference_mode()
def extract_one(model: PreTrainedModel, ids: list[int]) -> Shard:
    """One forward pass of the base model; the LM head only for the greedy tokens."""
    x = torch.tensor([ids], dtype=torch.long)
    hidden = model.base_model(input_ids=x).last_hidden_state[0]  # [T, H], after the final norm
    head = model.get_output_embeddings()
    argmax = torch.cat([head(hidden[i:i + ARGMAX_CHUNK]).argmax(-1)
                        for i in range(0, hidden.shape[0], ARGMAX_CHUNK)])
    return Shard(x[0], hidden.to(torch.bfloat16), argmax)


def extract(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str | Sequence[int]],
    directory: pathlib.Path,
    *,
    max_tokens: int = 512,
    on_text: Callable[[int, int], None] | None = None,
) -> list[pathlib.Path]:
    """Extract every text into ``directory``; existing shards are kept.  A text is a string
    (tokenized, its first ``max_tokens`` tokens kept) or token ids (a prompt and the target's
    answer, :mod:`specmux.heads.distill`: the last ``max_tokens`` kept, so the answer stays).
    ``on_text(tokens, done)`` reports progress.  Returns the shard paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, text in enumerate(texts):
        path = directory / shard_name(text)
        if isinstance(text, str):
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])[:max_tokens]
        else:
            ids = [int(t) for t in text][-max_tokens:]
        if len(ids) >= 3:
            if not path.is_file():
                s = extract_one(model, ids)
                tensors = {"ids": s.ids, "hidden": s.hidden.contiguous(), "argmax": s.argmax}
                _atomic_write(path, lambda p, t=tensors: save_file(t, str(p)))
            paths.append(path)
        if on_text is not None:
            on_text(len(ids), i + 1)
    return paths


def chunk_text(text: str, max_chars: int) -> list[str]:
    """``text`` cut into pieces of about ``max_chars`` characters at line boundaries,
    preferably at a blank line once a piece is half full (a long source file becomes many
    training texts instead of its first ``max_tokens`` tokens); blank pieces are dropped.

    >>> chunk_text("a\\nb\\n\\ncc\\ndd\\n", 4)
    ['a\\nb\\n\\n', 'cc\\n', 'dd\\n']
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        if current and (size + len(line) > max_chars
                        or (not line.strip() and size >= max_chars // 2)):
            if not line.strip():
                current.append(line)
                line = ""
            pieces.append("".join(current))
            current, size = [], 0
        if line:
            current.append(line)
            size += len(line)
    if current:
        pieces.append("".join(current))
    return [p for p in pieces if p.strip()]


def corpus_chunks(paths: Sequence[str | pathlib.Path], max_tokens: int,
                  seed: int = 0) -> list[str]:
    """Every text of the corpora at ``paths`` (files, ``.jsonl`` or directories, read as
    :func:`specmux.drafters.suffix.read_corpus` does) cut by :func:`chunk_text` into pieces
    of about ``CHARS_PER_TOKEN * max_tokens`` characters (what :func:`extract` keeps of a
    text), in a seeded shuffle: a cap on the number of texts then samples every file."""
    import random

    from specmux.drafters.suffix import read_corpus

    chunks = [c for path in paths for text in read_corpus(path)
              for c in chunk_text(text, CHARS_PER_TOKEN * max_tokens)]
    random.Random(seed).shuffle(chunks)
    return chunks


def load_shards(paths: Sequence[pathlib.Path]) -> list[Shard]:
    out = []
    for p in paths:
        t = load_file(str(p))
        out.append(Shard(t["ids"].long(), t["hidden"], t["argmax"].long()))
    return out
