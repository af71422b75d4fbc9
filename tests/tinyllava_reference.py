"""An independent reference of TinyLLaVA's forward (TinyLLaVA Factory), for the conversion tests.

It uses nothing from matvlm_hf: plain transformers modules built from the checkpoint's config.json, weights
loaded by prefix with strict=True, and TinyLLaVA's `prepare_inputs_labels_for_multimodal` splice:

    features = SigLIP(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]   # drops token 0
    features = connector(features)                                                       # Linear, GELU, Linear
    embeds   = text embeddings with each -200 in input_ids replaced by one image's features
    logits   = LM(inputs_embeds=embeds[:tokenizer_model_max_length])

transformers 5's SiglipVisionModel state dict has no `vision_model.` level, while TinyLLaVA's checkpoints
(written by transformers 4) do: the prefix stripped here is `vision_tower._vision_tower.vision_model.`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

IMAGE_TOKEN_INDEX = -200
LM_PREFIX = "language_model."
VISION_PREFIX = "vision_tower._vision_tower.vision_model."
CONNECTOR_PREFIX = "connector._connector."


@dataclass
class TinyLlavaReference:
    config: dict
    vision_tower: nn.Module  # transformers SiglipVisionModel
    connector: nn.Sequential  # Linear(vision_hidden, hidden), GELU, Linear(hidden, hidden)
    language_model: nn.Module  # transformers *ForCausalLM


def _lm_classes(model_type: str):
    from transformers import LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {
        "phi": (PhiConfig, PhiForCausalLM),
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }
    if model_type not in classes:
        raise ValueError(f"reference supports LM types {sorted(classes)}, not {model_type!r}")
    return classes[model_type]


def read_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint."""
    d = Path(checkpoint_dir)
    index = d / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(d / name)))
    return state


def _take(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_tinyllava_reference(
    checkpoint_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    language_model_hook: Callable[[nn.Module], None] | None = None,
) -> TinyLlavaReference:
    """language_model_hook: called on the built LM before the weights load (e.g. to swap decoder layers)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    d = Path(checkpoint_dir)
    config = json.loads((d / "config.json").read_text())
    if config.get("connector_type") != "mlp2x_gelu":
        raise ValueError(f"reference supports connector mlp2x_gelu only, not {config.get('connector_type')!r}")

    text_config = dict(config["text_config"])
    config_cls, lm_cls = _lm_classes(text_config["model_type"])
    lm_config = config_cls.from_dict(text_config)
    lm_config._attn_implementation = "eager"
    language_model = lm_cls(lm_config)
    if language_model_hook is not None:
        language_model_hook(language_model)

    vision_dict = {
        k: v for k, v in config["vision_config"].items() if k not in ("model_name_or_path", "model_name_or_path2")
    }
    vision_config = SiglipVisionConfig.from_dict(vision_dict)
    vision_config._attn_implementation = "eager"
    vision_tower = SiglipVisionModel(vision_config)

    h, vh = lm_config.hidden_size, vision_config.hidden_size
    connector = nn.Sequential(nn.Linear(vh, h), nn.GELU(), nn.Linear(h, h))

    state = read_state_dict(d)
    parts = {LM_PREFIX: language_model, VISION_PREFIX: vision_tower, CONNECTOR_PREFIX: connector}
    claimed = set()
    for prefix, module in parts.items():
        sub = _take(state, prefix)
        module.load_state_dict(sub, strict=True)
        claimed.update(prefix + k for k in sub)
    left = sorted(set(state) - claimed)
    if left:
        raise ValueError(f"{len(left)} checkpoint tensors belong to no module, e.g. {left[:5]}")

    for module in parts.values():
        module.to(dtype).eval()
    return TinyLlavaReference(config, vision_tower, connector, language_model)


@torch.no_grad()
def encode_images(ref: TinyLlavaReference, pixel_values: torch.Tensor) -> torch.Tensor:
    """[num_images, 3, H, W] -> [num_images, patches - 1, hidden] (TinyLLaVA's "patch" strategy)."""
    cfg = ref.config
    out = ref.vision_tower(pixel_values.to(next(ref.vision_tower.parameters()).dtype), output_hidden_states=True)
    features = out.hidden_states[cfg.get("vision_feature_layer", -2)]
    strategy = cfg.get("vision_feature_select_strategy", "patch")
    if strategy == "patch":
        features = features[:, 1:]
    elif strategy != "cls_patch":
        raise ValueError(f"unexpected vision_feature_select_strategy {strategy!r}")
    return ref.connector(features)


@torch.no_grad()
def reference_inputs_embeds(
    ref: TinyLlavaReference, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None
) -> torch.Tensor:
    """[1, T] ids with -200 placeholders -> [1, T', hidden] embeddings with image features spliced in."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"reference takes one sequence [1, T], got shape {tuple(input_ids.shape)}")
    ids = input_ids[0]
    embed = ref.language_model.get_input_embeddings()
    positions = torch.where(ids == IMAGE_TOKEN_INDEX)[0].tolist()
    if not positions:
        pieces = [embed(ids)]
    else:
        if pixel_values is None or pixel_values.shape[0] != len(positions):
            n = 0 if pixel_values is None else pixel_values.shape[0]
            raise ValueError(f"{len(positions)} image placeholders (-200) but {n} images")
        features = encode_images(ref, pixel_values)
        bounds = [-1] + positions + [ids.shape[0]]
        pieces = []
        for i in range(len(bounds) - 1):
            pieces.append(embed(ids[bounds[i] + 1 : bounds[i + 1]]))
            if i < len(positions):
                pieces.append(features[i].to(pieces[-1].dtype))
    embeds = torch.cat(pieces, dim=0)
    max_length = ref.config.get("tokenizer_model_max_length")
    if max_length is not None:
        embeds = embeds[:max_length]
    return embeds.unsqueeze(0)


@torch.no_grad()
def reference_logits(
    ref: TinyLlavaReference, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None
) -> torch.Tensor:
    """TinyLLaVA's logits [1, T', vocab] for ids with -200 placeholders (T' = T - n_images + n_images * n_tokens)."""
    embeds = reference_inputs_embeds(ref, input_ids, pixel_values)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    return ref.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
