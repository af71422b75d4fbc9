"""TinyLLaVA's on-disk format, in one place: read by the conversion, written by the fabricator.

A TinyLLaVA checkpoint folder (e.g. TinyLLaVA-Phi-2-SigLIP-3.1B) holds config.json (model_type "tinyllava", with
`text_config` and `vision_config` dicts, `connector_type` "mlp2x_gelu", an `auto_map` naming its remote code), the
tokenizer files and safetensors weights under the prefixes below. `resolve_checkpoint` finds the folder (local or
Hub), `read_tinyllava_config` checks its config.json, `_tinyllava_config` writes one (`fabricate.py` the weights).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..configuration_matvlm import SUPPORTED_TEXT_MODEL_TYPES
from ..errors import UserError
from ..input_checks import local_or_hub

LM_NAMES = {"phi": "microsoft/phi-2", "llama": "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "qwen2": "Qwen/Qwen2-0.5B"}
VISION_NAME = "google/siglip-so400m-patch14-384"
TOKENIZER_MODEL_MAX_LENGTH = 3072

# TinyLLaVA's remote code: the files the published config.json's `auto_map` names, beside the weights
REMOTE_CODE_STAND_IN = (
    "# Stand-in for TinyLLaVA's remote code (written by matvlm_hf.fabricate); matvlm-hf never imports it.\n"
    "raise ImportError(\"a stand-in for TinyLLaVA's remote code was imported: a loader ran a checkpoint's code\")\n"
)


def remote_code_files(lm_type: str) -> dict[str, str]:
    """`auto_map` of a published TinyLLaVA config.json: auto class -> "module.Class" (module = a file beside it)."""
    return {
        "AutoConfig": "configuration.TinyLlavaConfig",
        "AutoModelForCausalLM": f"modeling_tinyllava_{lm_type}.TinyLlavaForConditionalGeneration",
    }


LM_PREFIX = "language_model."
VISION_PREFIX = "vision_tower._vision_tower.vision_model."
CONNECTOR_PREFIX = "connector._connector."

# TinyLLaVA state-dict prefix -> MaTVLM prefix (transformers 5's SiglipVisionModel has no vision_model.)
KEY_PREFIXES = {
    LM_PREFIX: "language_model.",
    VISION_PREFIX: "vision_tower.",
    "vision_tower._vision_tower.": "vision_tower.",
    CONNECTOR_PREFIX: "connector.",
}
SUPPORTED_VISION_MODEL_TYPES = ("siglip_vision_model",)  # the key renames below assume SigLIP's layout


class ConversionError(UserError):
    """The input cannot be converted (not a TinyLLaVA checkpoint, missing or damaged weights, bad options)."""


# --- reading the source ------------------------------------------------------------------------------------------


def resolve_checkpoint(path_or_repo: str | Path, option: str = "--input") -> Path:
    """A local folder, else a Hub repo id fetched through huggingface_hub (fails clearly when offline).

    Which strings are Hub ids: `input_checks.is_hub_id`; a local path that does not exist raises ConversionError.
    """
    try:
        where = local_or_hub(path_or_repo, option)
    except UserError as err:
        raise ConversionError(str(err)) from err
    if isinstance(where, Path):
        if not where.is_dir():
            raise ConversionError(f"{option} {where} is a file; expected a TinyLLaVA checkpoint folder.")
        return where
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(str(path_or_repo), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
        )
    except Exception as err:  # offline, unknown repo, no access: all say the same thing to the user
        raise ConversionError(
            f"Could not fetch {path_or_repo!r} from the Hugging Face Hub ({type(err).__name__}: {err}). "
            "Without network access, download the checkpoint elsewhere and pass its local folder to --input."
        ) from err


def read_tinyllava_config(folder: Path) -> dict:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{folder} has no config.json: not a TinyLLaVA checkpoint folder.")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{config_file} is not valid JSON: {err}") from err
    archs = config.get("architectures") or []
    if config.get("model_type") != "tinyllava" and not any("TinyLlava" in a for a in archs):
        raise ConversionError(
            f"{folder} is not a TinyLLaVA checkpoint: config.json has model_type {config.get('model_type')!r} "
            "(expected 'tinyllava')."
        )
    for field in ("text_config", "vision_config"):
        if not isinstance(config.get(field), dict):
            raise ConversionError(f"{config_file} lacks the '{field}' dict that TinyLLaVA checkpoints carry.")
    lm_type = config["text_config"].get("model_type")
    if lm_type not in SUPPORTED_TEXT_MODEL_TYPES:
        raise ConversionError(
            f"Unsupported language model type {lm_type!r} in {config_file}: supported are "
            f"{', '.join(SUPPORTED_TEXT_MODEL_TYPES)}."
        )
    vision_type = config["vision_config"].get("model_type")
    if vision_type not in SUPPORTED_VISION_MODEL_TYPES:
        raise ConversionError(
            f"Unsupported vision_config.model_type {vision_type!r} in {config_file}: supported are "
            f"{', '.join(SUPPORTED_VISION_MODEL_TYPES)} (TinyLLaVA's SigLIP tower)."
        )
    if config.get("connector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ConversionError(f"Unsupported connector_type {config['connector_type']!r}: only mlp2x_gelu.")
    return config


def _tinyllava_config(
    lm_type: str,
    text_config,
    vision_config,
    tokenizer,
    image_aspect_ratio: str,
    dtype: torch.dtype,
    feature_select: tuple[int, str] = (-2, "patch"),
) -> dict[str, Any]:
    import transformers

    text = text_config.to_dict()
    vision = vision_config.to_dict()
    vision["model_name_or_path"] = VISION_NAME  # TinyLLaVA stores these in its vision_config
    vision["model_name_or_path2"] = ""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["TinyLlavaForConditionalGeneration"],
        "model_type": "tinyllava",
        "llm_model_name_or_path": LM_NAMES[lm_type],
        "tokenizer_name_or_path": LM_NAMES[lm_type],
        "vision_model_name_or_path": VISION_NAME,
        "vision_model_name_or_path2": "",
        "connector_type": "mlp2x_gelu",
        "text_config": text,
        "vision_config": vision,
        "hidden_size": text_config.hidden_size,
        "vocab_size": text_config.vocab_size,
        "vision_hidden_size": vision_config.hidden_size,
        "ignore_index": -100,
        "image_token_index": -200,
        "pad_token": tokenizer.pad_token,
        "pad_token_id": tokenizer.pad_token_id,
        "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": TOKENIZER_MODEL_MAX_LENGTH,
        "tokenizer_use_fast": False,
        "vision_feature_layer": feature_select[0],
        "vision_feature_select_strategy": feature_select[1],
        "image_aspect_ratio": image_aspect_ratio,
        "resampler_hidden_size": None,
        "num_queries": None,
        "num_resampler_layers": None,
        "use_cache": True,
        "cache_dir": None,
        "tune_type_llm": "full",
        "tune_type_connector": "full",
        "tune_type_vision_tower": "frozen",
        "tune_vision_tower_from_layer": 0,
        "torch_dtype": dtype_name,
        "transformers_version": transformers.__version__,
        "auto_map": remote_code_files(lm_type),
    }
