"""Write a tiny random-init HF Llama as a GGUF file that llama.cpp loads (offline, fast).

The mapping follows llama.cpp's ``convert_hf_to_gguf.py`` for the ``llama`` architecture:
tensor names, and q/k rows permuted from HF's rotate-half layout to llama.cpp's interleaved
RoPE.  The vocabulary is the tests' character tokenizer as a SentencePiece-style
(``llama``) vocab: ``' '`` becomes ``'▁'`` and ``'\\n'`` the byte token ``<0x0A>``.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import LlamaForCausalLM

from helpers import CHARS, SPECIALS


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k weight [n_head * d, H] -> llama.cpp's row order (as convert_hf_to_gguf)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _tokens(vocab: int) -> tuple[list[str], list[int]]:
    pieces = [*SPECIALS, *CHARS][:vocab]
    pieces += [f"<extra{i}>" for i in range(vocab - len(pieces))]
    types = []
    out = []
    for i, p in enumerate(pieces):
        if i < len(SPECIALS):
            types.append(gguf.TokenType.UNKNOWN if p == "<unk>" else gguf.TokenType.CONTROL)
            out.append(p)
        elif p == "\n":
            types.append(gguf.TokenType.BYTE)
            out.append("<0x0A>")
        else:
            types.append(gguf.TokenType.NORMAL)
            out.append(p.replace(" ", "\u2581"))
    return out, types


def write_gguf(model: LlamaForCausalLM, path: Path, *, vocab_pieces: list[str] | None = None,
               f16: bool = False, q8: bool = False) -> Path:
    """Write ``model`` (a tiny ``LlamaForCausalLM``) to ``path`` as a GGUF; returns ``path``.

    ``vocab_pieces`` overrides the token strings (a different tokenizer of the same size);
    ``f16`` stores the matrices in float16, ``q8`` quantizes them to Q8_0 (rows must be a
    multiple of 32 long: ``hidden`` 64, say); norms stay float32, as llama.cpp expects.
    """
    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // n_head
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None)
                               or cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if q8 else
                    gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    tokens, types = _tokens(cfg.vocab_size)
    if vocab_pieces is not None:
        tokens = list(vocab_pieces)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(False)

    def put(name: str, t: torch.Tensor, matrix: bool = True) -> None:
        a = t.detach().float().numpy()
        if q8 and matrix:
            q8_0 = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, gguf.quants.quantize(a, q8_0), raw_dtype=q8_0)
        else:
            w.add_tensor(name, a.astype(np.float16) if f16 and matrix else a)

    sd = model.state_dict()
    put("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q = _permute(sd[p + "self_attn.q_proj.weight"].numpy(), n_head)
        k = _permute(sd[p + "self_attn.k_proj.weight"].numpy(), n_kv)
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"], matrix=False)
        put(f"blk.{i}.attn_q.weight", torch.from_numpy(q))
        put(f"blk.{i}.attn_k.weight", torch.from_numpy(k))
        put(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], matrix=False)
        put(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    put("output_norm.weight", sd["model.norm.weight"], matrix=False)
    put("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
