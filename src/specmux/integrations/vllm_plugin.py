"""vLLM general plugin: specmux's options ride in the speculative config.

vLLM's ``SpeculativeConfig`` rejects keys it does not know, and its ``custom_class`` proposer
receives only the ``VllmConfig``.  Registered as the ``vllm.general_plugins`` entry point
``specmux`` (``pyproject.toml``), :func:`register` wraps ``EngineArgs.create_speculative_config``:
when the config names specmux's proposer, every key vLLM does not know is validated as a
specmux option (:func:`specmux.integrations.vllm.parse_options`, one-line
:class:`~specmux.errors.ConfigError` before the engine starts) and moved to
``additional_config["specmux"]``, vLLM's free-form config, which reaches the proposer in
every process.  Without the plugin, pass the options as ``additional_config={"specmux":
{...}}``.  vLLM may load plugins several times; :func:`register` is idempotent.

**A fix for vLLM 0.32.0 on CPU.**  Its CPU stand-in for the Triton ``expand_kernel``
(``vllm.utils.cpu_triton_utils._expand_kernel_impl``) hands the C++ op int64 *copies* of its
tensors, so a float (or int32) output is never written: the rejection sampler's per-token
temperatures (and top-k/top-p) are uninitialized memory, and sampled speculative decoding
(vLLM's own n-gram proposer too) stops following the target's law -- on a 16-token model,
drafts were accepted ~95% of the time where the target gives them ~10%.  :func:`register`
swaps in :func:`expand`, which writes the output in place; the platform registers its
kernel overrides after the plugins load, so it picks the fixed function up.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

MARK = "_specmux_options"
FIXED_VLLM = "0.32.0"  # the vLLM version whose CPU expand kernel is replaced


def expand(output: Any, input_val: Any, cu_num_tokens: Any, replace_from: Any,
           replace_to: Any, MAX_NUM_TOKENS: Any = None) -> None:  # noqa: N803 (kernel's name)
    """``output[cu[i-1]:cu[i]] = input_val[i]`` (``replace_from`` read as ``replace_to``).

    >>> import torch
    >>> out = torch.empty(5)
    >>> expand(out, torch.tensor([0.5, -1.0]), torch.tensor([2, 5]), -1, 1)
    >>> out.tolist()
    [0.5, 0.5, 1.0, 1.0, 1.0]
    """
    import torch

    cu = cu_num_tokens.to(torch.int64)
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    values = torch.where(input_val == replace_from,
                         torch.tensor(replace_to, dtype=input_val.dtype), input_val)
    n = int(cu[-1]) if cu.numel() else 0
    output[:n].copy_(torch.repeat_interleave(values, counts, output_size=n))


def _fix_cpu_expand() -> None:
    import vllm

    if vllm.__version__ != FIXED_VLLM:
        return
    try:
        from vllm.utils import cpu_triton_utils
    except ImportError:  # not a CPU build
        return
    if hasattr(cpu_triton_utils, "_expand_kernel_impl"):
        cpu_triton_utils._expand_kernel_impl = expand


def split_options(spec: dict[str, Any], vllm_keys: set[str]) -> dict[str, Any]:
    """Pop the keys of ``spec`` that vLLM does not know (``-`` read as ``_``).

    >>> spec = {"model": "m", "policy": "hedge", "num-speculative-tokens": 4}
    >>> split_options(spec, {"model", "num_speculative_tokens"}), spec
    ({'policy': 'hedge'}, {'model': 'm', 'num-speculative-tokens': 4})
    """
    ours = [key for key in spec if key.replace("-", "_") not in vllm_keys]
    return {key.replace("-", "_"): spec.pop(key) for key in ours}


def _names_specmux(spec: dict[str, Any]) -> bool:
    from specmux.integrations.vllm import PROPOSER_PATH

    return spec.get("model") == PROPOSER_PATH and spec.get("method") in (None, "custom_class")


def register() -> None:
    """Install the wrapper (the ``vllm.general_plugins`` entry point)."""
    from vllm.config import SpeculativeConfig
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_speculative_config
    if getattr(original, MARK, False):
        return
    _fix_cpu_expand()
    vllm_keys = {f.name for f in dataclasses.fields(SpeculativeConfig)}

    @functools.wraps(original)
    def create_speculative_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        spec = self.speculative_config
        if isinstance(spec, dict) and _names_specmux(spec):
            from specmux.errors import ConfigError
            from specmux.integrations.vllm import parse_options

            ours = split_options(spec, vllm_keys)
            nested = ours.pop("specmux", None) or {}  # {"specmux": {...}} works too
            if not isinstance(nested, dict):
                raise ConfigError("speculative_config['specmux'] must be a JSON object")
            extra = self.additional_config
            if not isinstance(extra, dict):
                extra = self.additional_config = {}
            merged = {**(extra.get("specmux") or {}), **nested, **ours}
            k = spec.get("num_speculative_tokens") or getattr(self, "spec_tokens", None)
            if k is not None:  # else vLLM reports the missing K itself
                parse_options(merged, int(k))
            extra["specmux"] = merged
        return original(self, *args, **kwargs)

    setattr(create_speculative_config, MARK, True)
    EngineArgs.create_speculative_config = create_speculative_config  # type: ignore[method-assign]
