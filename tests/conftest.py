"""Tiny configurations shared by the tests (built in-process; no checkpoint, no network)."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import LlamaConfig, PhiConfig, Qwen2Config, SiglipVisionConfig

from matvlm_hf import MaTVLMConfig, MaTVLMForConditionalGeneration

# two CPU processes (gloo) of a script, as the multi-process tests launch them
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def tiny_text_config(lm_type: str = "phi", num_layers: int = 6):
    common = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=512,
    )
    if lm_type == "phi":
        return PhiConfig(**common)
    if lm_type == "llama":
        return LlamaConfig(**common, num_key_value_heads=2)
    if lm_type == "qwen2":
        return Qwen2Config(**common, num_key_value_heads=2)
    raise ValueError(lm_type)


def tiny_vision_config():
    return SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )


def tiny_config(lm_type: str = "phi", mamba_layers=(0, 2, 5), num_layers: int = 6, **kwargs) -> MaTVLMConfig:
    return MaTVLMConfig(
        text_config=tiny_text_config(lm_type, num_layers),
        vision_config=tiny_vision_config(),
        mamba_layers=list(mamba_layers),
        mamba_chunk_size=8,
        **kwargs,
    )


def tiny_model(lm_type: str = "phi", mamba_layers=(0, 2, 5), seed: int = 0, dtype=torch.float32, **kwargs):
    torch.manual_seed(seed)
    model = MaTVLMForConditionalGeneration(tiny_config(lm_type, mamba_layers, **kwargs)).eval().to(dtype)
    # fresh Mamba-2 init gives near-identical tiny logits; spread A and dt so the tests exercise real decay
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_bias")):
                p.uniform_(-1.0, 1.0)
    return model


def image_prompt(config: MaTVLMConfig, text_len: int = 12, n_images: int = 1, seed: int = 0) -> torch.LongTensor:
    """Random text ids (below the image id) with `n_images` blocks of image tokens spliced in after position 2."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, config.image_token_id - 1, (text_len,), generator=g)
    block = torch.full((config.num_image_tokens,), config.image_token_id)
    parts = [text[:2]] + [block] * n_images + [text[2:]]
    return torch.cat(parts)[None]


@pytest.fixture
def pixel_values():
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA; they are skipped (not silently passed) elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
