"""Write a random MaTVLM checkpoint in the authors' layout (hustvl/MaTVLM, like `hustvl/MaTVLM_0_25_Mamba2`).

    from matvlm_hf.fabricate_authors import write_authors_checkpoint
    path = write_authors_checkpoint(tmp_path / "authors", ssm_layers=[0, 4], lm={"num_hidden_layers": 8})

The folder is a TinyLLaVA-Phi checkpoint (fabricate.py's config, tokenizer and weight writer) whose Mamba layers
hold the authors' `PhiMambaDecoderLayer` tensors (`language_model.model.layers.N.mamba.{in_proj, conv1d, dt_bias,
A_log, D, norm, out_proj}` beside `mlp.*` and `input_layernorm.*`, no `self_attn.*`), config.json names their
`HybridTinyLlavaForConditionalGeneration`, and `mamba_config.json` is their `PhiMambaConfig` as their training script
fills it. size="full" is TinyLLaVA-Phi-2-SigLIP-3.1B's dimensions, written shard by shard (a few GB of RAM).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .authors_checkpoint import AUTHORS_ARCHITECTURE, MAMBA_CONFIG_NAME
from .fabricate import (
    FULL_SHARD_SIZE,
    LM_PREFIX,
    _param_specs,
    _write_metadata,
    _write_weights,
    build_tokenizer,
    parse_size,
    tinyllava_configs,
)

#: the authors' training script's model_max_length (12.5 and 25 %; 1228 for 50 %), saved as tokenizer_model_max_length
AUTHORS_MAX_LENGTH = 1428


def train_script_mamba_config(text_config, ssm_layers: list[int], is_bias: bool = False) -> dict[str, Any]:
    """mamba_config.json as the authors' train_hybrid.py builds PhiMambaConfig from the teacher's text config."""
    head_dim = text_config.hidden_size // text_config.num_attention_heads
    n = text_config.num_hidden_layers
    return {
        "d_model": text_config.hidden_size,
        "ssm_cfg": {"expand": 1, "ngroups": text_config.num_attention_heads, "d_state": head_dim},
        "layer_norm_eps": text_config.layer_norm_eps,
        "vocab_size": None,
        "d_inner": text_config.hidden_size,
        "d_xb": text_config.num_key_value_heads * head_dim,
        "intermediate_size": text_config.intermediate_size,
        "hidden_act": text_config.hidden_act,
        "n_layer": n,
        "attn_layers": [i for i in range(n) if i not in ssm_layers],
        "resid_pdrop": text_config.resid_pdrop,
        "bidirectional": False,
        "is_bias": is_bias,
    }


def _mixer_specs(mamba: dict[str, Any], layer: int) -> list[tuple[str, tuple[int, ...], str]]:
    d_model, d_inner, d_xb = mamba["d_model"], mamba["d_inner"], mamba["d_xb"]
    nheads = mamba["ssm_cfg"]["ngroups"]
    conv_dim = d_inner + 2 * d_xb
    p = f"{LM_PREFIX}model.layers.{layer}.mamba."
    specs = [
        (p + "in_proj.weight", (2 * d_inner + 2 * d_xb + nheads, d_model), "weight"),
        (p + "conv1d.weight", (conv_dim, 1, 4), "weight"),
        (p + "conv1d.bias", (conv_dim,), "bias"),
        (p + "dt_bias", (nheads,), "bias"),
        (p + "A_log", (nheads,), "weight"),
        (p + "D", (nheads,), "weight"),
        (p + "norm.weight", (d_inner,), "norm"),
        (p + "out_proj.weight", (d_model, d_inner), "weight"),
    ]
    if mamba["is_bias"]:
        specs += [
            (p + "in_proj.bias", (2 * d_inner + 2 * d_xb + nheads,), "bias"),
            (p + "out_proj.bias", (d_model,), "bias"),
        ]
    return specs


def authors_param_specs(text_config, vision_config, mamba: dict[str, Any]) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, kind) of every tensor of the authors' checkpoint, in TinyLLaVA's order, the mixer where the
    attention was (fabricate.py's specs with the Mamba layers' self_attn.* replaced by mamba.*)."""
    n = mamba["n_layer"]
    mamba_prefixes = tuple(f"{LM_PREFIX}model.layers.{i}." for i in range(n) if i not in mamba["attn_layers"])
    specs = []
    for spec in _param_specs(text_config, vision_config):
        key = spec[0]
        if key.startswith(mamba_prefixes) and ".self_attn." in key:
            if key.endswith("self_attn.q_proj.weight"):
                specs += _mixer_specs(mamba, int(key[len(LM_PREFIX + "model.layers.") :].split(".", 1)[0]))
            continue
        specs.append(spec)
    return specs


def write_authors_checkpoint(
    out_dir: str | os.PathLike,
    *,
    ssm_layers: list[int],
    size: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str | None = None,
    is_bias: bool = False,
    lm: dict[str, Any] | None = None,
) -> Path:
    """Write a random authors'-layout MaTVLM checkpoint (Phi LM) to `out_dir`; returns it.

    ssm_layers: the Mamba layers (their `ssm_layers`; mamba_config.json stores the complement as attn_layers).
    size: "tiny" (CPU tests) or "full" (3.1B). dtype: float32 for tiny, bfloat16 for full when None.
    max_shard_size: bytes or "2GB"; None = one file for tiny, 2 GiB shards for full. is_bias: their is_bias.
    lm: overrides of the language model's dimensions (e.g. {"num_hidden_layers": 8}).
    """
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    dtype = dtype or (torch.bfloat16 if size == "full" else torch.float32)
    max_shard_size = parse_size(max_shard_size) or (FULL_SHARD_SIZE if size == "full" else None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer("phi", phi2_ids=(size == "full"), model_max_length=AUTHORS_MAX_LENGTH)
    text_config, vision_config = tinyllava_configs(tokenizer, "phi", size, dtype=dtype, lm=lm)
    n = text_config.num_hidden_layers
    if not ssm_layers or any(not 0 <= i < n for i in ssm_layers):
        raise ValueError(f"ssm_layers must be a non-empty list of layers in 0..{n - 1}, got {ssm_layers}")
    _write_metadata(out, "phi", tokenizer, text_config, vision_config, "square", dtype)
    config = json.loads((out / "config.json").read_text())
    config.update(architectures=[AUTHORS_ARCHITECTURE], tokenizer_model_max_length=AUTHORS_MAX_LENGTH)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    mamba = train_script_mamba_config(text_config, sorted(ssm_layers), is_bias)
    (out / MAMBA_CONFIG_NAME).write_text(json.dumps(mamba, indent=4) + "\n")

    specs = authors_param_specs(text_config, vision_config, mamba)
    _write_weights(out, specs, seed=seed, size=size, dtype=dtype, max_shard_size=max_shard_size)
    return out
