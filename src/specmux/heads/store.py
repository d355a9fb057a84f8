"""Trained heads on disk: ``NAME.safetensors`` (weights + draft vocabulary) and ``NAME.json``
(metadata and the sha256 of the weights file), each written atomically (temp file + fsync +
``os.replace``; the JSON goes last, so a head is listed only once both files are whole).

Loading checks the sha256, the format version and the shapes; any mismatch is a
:class:`~specmux.errors.ModelLoadError` with one readable line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from specmux.errors import ModelLoadError
from specmux.heads.net import HeadNet

FORMAT_VERSION = 1


def heads_dir() -> pathlib.Path:
    """Where ``specmux heads train`` writes and the benchmark looks: ``<cache>/heads``."""
    from specmux.models import cache_dir

    return cache_dir() / "heads"


@dataclass
class HeadFile:
    """A loaded head: the network, its draft vocabulary [V_d] (most frequent first) and the
    metadata (target, domain, training figures...)."""

    net: HeadNet
    draft_vocab: torch.Tensor  # [V_d] int64 token ids
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.meta.get("name", "head"))


def sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: pathlib.Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def save_head(head: HeadFile, directory: pathlib.Path, name: str) -> pathlib.Path:
    """Write ``directory/name.safetensors`` and ``directory/name.json``; returns the JSON path."""
    weights = directory / f"{name}.safetensors"
    tensors = {f"net.{k}": v.detach().contiguous().cpu()
               for k, v in head.net.state_dict().items()}
    tensors["draft_vocab"] = head.draft_vocab.to(torch.int64).contiguous()
    _atomic_write(weights, lambda p: save_file(tensors, str(p)))
    meta = {**head.meta, "name": name, "format": FORMAT_VERSION, "net": head.net.config(),
            "draft_vocab_size": int(head.draft_vocab.numel()),
            "weights": weights.name, "sha256": sha256_file(weights)}
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    meta_path = directory / f"{name}.json"
    _atomic_write(meta_path, lambda p: p.write_text(text, encoding="utf-8"))
    return meta_path


def load_head(meta_path: str | os.PathLike[str]) -> HeadFile:
    """Load and verify a head written by :func:`save_head` (path of its ``.json``)."""
    meta_path = pathlib.Path(meta_path)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read head metadata {meta_path}: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise ModelLoadError(f"{meta_path}: not a specmux head (format {FORMAT_VERSION})")
    weights = meta_path.with_name(str(meta.get("weights", "")))
    if not weights.is_file():
        raise ModelLoadError(f"{meta_path}: weights file {weights.name} is missing")
    if sha256_file(weights) != meta.get("sha256"):
        raise ModelLoadError(f"{weights}: sha256 does not match its metadata (corrupt file?)")
    try:
        tensors = load_file(str(weights))
        net = HeadNet(**meta["net"])
        net.load_state_dict({k.removeprefix("net."): v for k, v in tensors.items()
                             if k.startswith("net.")})
        vocab = tensors["draft_vocab"].to(torch.int64)
    except (KeyError, TypeError, RuntimeError, ValueError) as err:
        raise ModelLoadError(f"{weights}: invalid head file: {err}") from err
    net.eval().requires_grad_(False)
    return HeadFile(net, vocab, meta)


def find_heads(directory: pathlib.Path | None = None) -> dict[str, pathlib.Path]:
    """``{name: json path}`` of the heads saved in ``directory`` (default :func:`heads_dir`)."""
    directory = heads_dir() if directory is None else directory
    if not directory.is_dir():
        return {}
    return {p.stem: p for p in sorted(directory.glob("*.json")) if not p.name.startswith(".")}
