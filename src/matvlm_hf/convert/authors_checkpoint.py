"""The authors' checkpoint layout (hustvl/MaTVLM, e.g. `hustvl/MaTVLM_0_25_Mamba2`) <-> matvlm-hf checkpoints.

The authors save their `HybridTinyLlavaForConditionalGeneration` with `save_pretrained`: TinyLLaVA's folder
(config.json with model_type "tinyllava", safetensors shards under TinyLLaVA's prefixes, tokenizer files) in which
every Mamba layer's decoder layer is their `PhiMambaDecoderLayer`, plus `mamba_config.json` (their `PhiMambaConfig`
dataclass). A Mamba layer N holds

    language_model.model.layers.N.mamba.in_proj.weight   (2 d_inner + 2 d_xb + nheads, d_model)  rows [z|x|B|C|dt]
    language_model.model.layers.N.mamba.conv1d.weight    (d_inner + 2 d_xb, 1, d_conv), conv1d.bias (d_inner + 2 d_xb)
    language_model.model.layers.N.mamba.{dt_bias, A_log, D}  (nheads,)
    language_model.model.layers.N.mamba.norm.weight      (d_inner,)   gated RMSNorm, group size d_inner / ngroups
    language_model.model.layers.N.mamba.out_proj.weight  (d_model, d_inner)
        (+ in_proj.bias / out_proj.bias if is_bias)
    language_model.model.layers.N.{mlp.fc1, mlp.fc2, input_layernorm}.{weight, bias}   (Phi's, unchanged names)

and computes residual + mamba(LN(h)) + mlp(LN(h)), which is a Phi decoder layer with its attention swapped for the
mixer, i.e. exactly matvlm-hf's layer. mamba_config.json: d_model, ssm_cfg ({"expand": 1, "ngroups": heads,
"d_state": head_dim}), layer_norm_eps, vocab_size, d_inner, d_xb, intermediate_size, hidden_act, n_layer,
attn_layers (the layers that KEEP attention), resid_pdrop, bidirectional, is_bias. Their mixer forces
nheads = ngroups and headdim = d_state (mamba2/hybrid_mamba_layer.py).

Import renames `.mamba.X` to `.self_attn.X` (`norm.weight` to `norm_weight`) and the TinyLLaVA prefixes as
conversion.py does; tensors are copied bit for bit (or cast with --dtype). Export is the reverse. Both stream shard by
shard into a staging folder renamed into place when complete.

    matvlm import --input hustvl/MaTVLM_0_25_Mamba2 --output out/matvlm-paper-25
    matvlm export --format authors --input out/matvlm-paper-25 --output out/authors-25
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import GenerationConfig
from transformers.dynamic_module_utils import custom_object_save

from ..configuration_matvlm import MaTVLMConfig
from ..safe_output import staged_output
from .conversion import (
    DTYPES,
    ConversionError,
    _ShardWriter,
    _source_dtype,
    _without_config_type_warning,
    iter_tensors,
    matvlm_config_from_tinyllava,
    read_tinyllava_config,
    rename_key,
    resolve_checkpoint,
    upload_folder,
    weight_files,
)
from .fabricate import LM_NAMES, _tinyllava_config
from ..modeling_matvlm import MaTVLMForConditionalGeneration, checkpoint_key
from ..processing_matvlm import MaTVLMProcessor, processor_from_tinyllava

MAMBA_CONFIG_NAME = "mamba_config.json"
AUTHORS_ARCHITECTURE = "HybridTinyLlavaForConditionalGeneration"
LAYERS = "language_model.model.layers."
#: authors' mixer tensor name -> matvlm-hf's
MIXER_NAMES = {
    "in_proj.weight": "in_proj.weight",
    "in_proj.bias": "in_proj.bias",
    "conv1d.weight": "conv1d.weight",
    "conv1d.bias": "conv1d.bias",
    "dt_bias": "dt_bias",
    "A_log": "A_log",
    "D": "D",
    "norm.weight": "norm_weight",
    "out_proj.weight": "out_proj.weight",
    "out_proj.bias": "out_proj.bias",
}
#: matvlm-hf prefix -> TinyLLaVA's (transformers 4's SiglipVisionModel keeps `vision_model.`)
EXPORT_PREFIXES = {
    "language_model.": "language_model.",
    "vision_tower.": "vision_tower._vision_tower.vision_model.",
    "connector.": "connector._connector.",
}
#: ssm_cfg entries of the authors' Mamba2 and the values matvlm-hf's mixer computes (None: any value, init or
#: bookkeeping only); anything else changes the computation and is refused
SSM_CFG_FIXED = {
    "D_has_hdim": False,
    "rmsnorm": True,
    "norm_before_gate": False,
    "repeat_kv_before_conv": False,
    "dt_limit": [0.0, float("inf")],
    "d_ssm": None,
    "bias": None,
}
SSM_CFG_FREE = ("expand", "headdim", "use_mem_eff_path", "conv_init", "layer_idx", "sequence_parallel")
SSM_CFG_MAPPED = {
    "ngroups": "mamba_ngroups",
    "d_state": "mamba_d_state",
    "d_conv": "mamba_d_conv",
    "chunk_size": "mamba_chunk_size",
    "conv_bias": "mamba_conv_bias",
    "dt_min": "mamba_dt_min",
    "dt_max": "mamba_dt_max",
    "dt_init_floor": "mamba_dt_init_floor",
    "A_init_range": "mamba_A_init_range",
}
AUTHORS_DEFAULTS = {"d_conv": 4, "chunk_size": 256, "conv_bias": True}  # their Mamba2 defaults
AUTHORS_NORM_EPS = 1e-5  # their RMSNormGated's eps (fixed in their code)


# --- reading the authors' configs --------------------------------------------------------------------------------


def read_mamba_config(folder: Path) -> dict:
    """mamba_config.json of an authors'-layout folder; ConversionError if absent or not JSON."""
    path = folder / MAMBA_CONFIG_NAME
    if not path.is_file():
        raise ConversionError(
            f"{folder} has no {MAMBA_CONFIG_NAME}: not an authors'-layout MaTVLM checkpoint (a plain TinyLLaVA "
            "checkpoint is converted with `matvlm convert`; a matvlm-hf checkpoint needs no import)."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON: {err}") from err


def matvlm_config_from_authors(tinyllava: dict, mamba: dict) -> MaTVLMConfig:
    """The MaTVLMConfig computing what the authors' model computes; ConversionError for what it cannot express."""
    text = tinyllava["text_config"]
    where = MAMBA_CONFIG_NAME
    if text.get("model_type") != "phi":
        raise ConversionError(
            f"The authors' hybrid layer (PhiMambaDecoderLayer) is Phi's; this checkpoint's language "
            f"model is {text.get('model_type')!r}."
        )
    if mamba.get("bidirectional"):
        raise ConversionError(f"{where} has bidirectional: true (their BidMamba2): not a causal model, not supported.")
    n_layers, hidden = text["num_hidden_layers"], text["hidden_size"]
    heads = text["num_attention_heads"]
    checks = {
        "d_model": hidden,
        "n_layer": n_layers,
        "intermediate_size": text["intermediate_size"],
        "hidden_act": text["hidden_act"],
        "layer_norm_eps": text["layer_norm_eps"],
    }
    for name, expected in checks.items():
        if mamba.get(name, expected) != expected:
            raise ConversionError(
                f"{where} has {name} = {mamba[name]!r} but the language model's config has "
                f"{expected!r}: the two configs do not describe one model."
            )
    ssm = dict(mamba.get("ssm_cfg") or {})
    unknown = sorted(set(ssm) - set(SSM_CFG_FIXED) - set(SSM_CFG_FREE) - set(SSM_CFG_MAPPED))
    if unknown:
        raise ConversionError(f"{where}: ssm_cfg entries {unknown} are not part of the authors' Mamba2 as released.")
    for name, value in SSM_CFG_FIXED.items():
        if name in ssm and value is not None and ssm[name] != value:
            raise ConversionError(f"{where}: ssm_cfg {name} = {ssm[name]!r} is not supported (only {value!r}).")
    d_inner = mamba.get("d_inner") or hidden
    if ssm.get("d_ssm") not in (None, d_inner):
        raise ConversionError(
            f"{where}: ssm_cfg d_ssm = {ssm['d_ssm']} differs from d_inner {d_inner} (gated-MLP part): not supported."
        )
    ngroups = ssm.get("ngroups", 1)
    d_state = ssm.get("d_state", 128)
    if d_inner != ngroups * d_state or d_inner != heads * (hidden // heads):
        raise ConversionError(
            f"{where}: d_inner {d_inner} must equal ngroups x d_state ({ngroups} x {d_state}) and "
            f"the attention width ({heads} heads x {hidden // heads})."
        )
    attn_layers = mamba.get("attn_layers")
    if not isinstance(attn_layers, list) or not all(isinstance(i, int) and 0 <= i < n_layers for i in attn_layers):
        raise ConversionError(
            f"{where}: attn_layers must list the attention layers (0..{n_layers - 1}), got {attn_layers!r}."
        )
    options = {SSM_CFG_MAPPED[k]: v for k, v in ssm.items() if k in SSM_CFG_MAPPED}
    is_bias = bool(mamba.get("is_bias", False))
    try:
        return matvlm_config_from_tinyllava(
            tinyllava,
            [i for i in range(n_layers) if i not in attn_layers],
            **options,
            mamba_nheads=ngroups,
            mamba_headdim=d_state,
            mamba_d_xb=mamba.get("d_xb") or d_inner,
            mamba_proj_bias=is_bias,
            mamba_out_proj_bias=is_bias,
            mamba_norm_eps=AUTHORS_NORM_EPS,
        )
    except (ValueError, TypeError) as err:
        raise ConversionError(f"{where} describes no MaTVLM model: {err}") from err


def authors_mamba_config(config: MaTVLMConfig) -> dict:
    """The authors' mamba_config.json for a matvlm-hf config; ConversionError where their Mamba2 differs."""
    tc = config.text_config
    if tc.model_type != "phi":
        raise ConversionError(f"The authors' layout exists for Phi language models only, not {tc.model_type!r}.")
    problems = []
    if config.mamba_proj_bias != config.mamba_out_proj_bias:
        problems.append(
            f"in_proj bias {config.mamba_proj_bias} but out_proj bias {config.mamba_out_proj_bias} (their "
            "is_bias sets both)"
        )
    if config.mamba_nheads != config.mamba_ngroups or config.mamba_headdim != config.mamba_d_state:
        problems.append("nheads != ngroups or headdim != d_state (their mixer forces both equal)")
    if config.mamba_norm_eps != AUTHORS_NORM_EPS:
        problems.append(f"gated-norm eps {config.mamba_norm_eps} (theirs is {AUTHORS_NORM_EPS})")
    if problems:
        raise ConversionError(
            "This checkpoint cannot be expressed in the authors' layout: "
            + "; ".join(problems)
            + ". Convert with --preset paper for an exportable hybrid."
        )
    ssm_cfg = {"expand": 1, "ngroups": config.mamba_ngroups, "d_state": config.mamba_d_state}
    ours = {"d_conv": config.mamba_d_conv, "chunk_size": config.mamba_chunk_size, "conv_bias": config.mamba_conv_bias}
    ssm_cfg.update({k: v for k, v in ours.items() if v != AUTHORS_DEFAULTS[k]})
    return {
        "d_model": tc.hidden_size,
        "ssm_cfg": ssm_cfg,
        "layer_norm_eps": tc.layer_norm_eps,
        "vocab_size": None,
        "d_inner": config.mamba_d_inner,
        "d_xb": config.mamba_d_xb,
        "intermediate_size": tc.intermediate_size,
        "hidden_act": tc.hidden_act,
        "n_layer": tc.num_hidden_layers,
        "attn_layers": [i for i in range(tc.num_hidden_layers) if i not in config.mamba_layers],
        "resid_pdrop": tc.resid_pdrop,
        "bidirectional": False,
        "is_bias": bool(config.mamba_proj_bias),
    }


# --- key names ---------------------------------------------------------------------------------------------------


def _layer_part(key: str) -> tuple[int, str] | None:
    if not key.startswith(LAYERS):
        return None
    index, rest = key[len(LAYERS) :].split(".", 1)
    return int(index), rest


def import_key(key: str, mamba_layers: set[int]) -> str:
    """Authors' tensor name -> matvlm-hf's; ConversionError for a name that belongs to neither layer kind."""
    part = _layer_part(key)
    if part is not None:
        index, rest = part
        if rest.startswith("mamba.") != (index in mamba_layers) and rest.startswith(("mamba.", "self_attn.")):
            kind = "attention" if index not in mamba_layers else "Mamba"
            raise ConversionError(f"Tensor {key!r} does not fit layer {index}, a {kind} layer by {MAMBA_CONFIG_NAME}.")
        if rest.startswith("mamba."):
            name = rest[len("mamba.") :]
            if name not in MIXER_NAMES:
                raise ConversionError(
                    f"Unexpected mixer tensor {key!r}: the authors' Mamba2 has {sorted(MIXER_NAMES)}."
                )
            return f"{LAYERS}{index}.self_attn.{MIXER_NAMES[name]}"
    return rename_key(key)


def export_key(key: str, mamba_layers: set[int]) -> str:
    """matvlm-hf tensor name -> the authors'."""
    part = _layer_part(key)
    if part is not None and part[0] in mamba_layers and part[1].startswith("self_attn."):
        ours = part[1][len("self_attn.") :]
        return f"{LAYERS}{part[0]}.mamba.{next(a for a, o in MIXER_NAMES.items() if o == ours)}"
    prefix = next((p for p in EXPORT_PREFIXES if key.startswith(p)), None)
    if prefix is None:
        raise ConversionError(f"Unexpected tensor {key!r}: not under language_model, vision_tower or connector.")
    return EXPORT_PREFIXES[prefix] + key[len(prefix) :]


def _check_layout(config: MaTVLMConfig, key_to_file: dict[str, Path], rename, source: Path) -> None:
    """Every tensor of the model present with its shape, nothing else: checked on the file headers only."""
    with torch.device("meta"):
        expected = {
            checkpoint_key(k): tuple(v.shape) for k, v in MaTVLMForConditionalGeneration(config).state_dict().items()
        }
    found: dict[str, tuple[int, ...]] = {}
    for key, file in key_to_file.items():
        with safe_open(str(file), "pt") as f:
            found[rename(key)] = tuple(f.get_slice(key).get_shape())
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise ConversionError(
            f"{source} does not match its config: {len(missing)} tensors missing (e.g. "
            f"{missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]})."
        )
    wrong = [(k, found[k], s) for k, s in expected.items() if found[k] != s]
    if wrong:
        key, got, want = wrong[0]
        raise ConversionError(
            f"{source}: {len(wrong)} tensors have the wrong shape, e.g. {key} is {got}, the config implies {want}."
        )


# --- output ------------------------------------------------------------------------------------------------------


def _copy_weights(
    key_to_file: dict[str, Path],
    rename,
    folder: Path,
    dtype: torch.dtype | None,
    max_shard_size: int,
    progress: bool,
    desc: str,
) -> None:
    writer = _ShardWriter(folder, max_shard_size)
    for key, tensor in tqdm(
        iter_tensors(key_to_file), total=len(key_to_file), desc=desc, unit="tensor", disable=not progress
    ):
        writer.add(rename(key), tensor.to(dtype) if dtype and tensor.is_floating_point() else tensor)
    writer.finish()


# --- import ------------------------------------------------------------------------------------------------------


def import_authors_checkpoint(
    input_path: str | Path,
    output_path: str | Path,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    max_shard_size: int = 2 * 1024**3,
    push_to_hub: str | None = None,
    progress: bool = True,
) -> Path:
    """An authors'-layout MaTVLM checkpoint (folder or Hub id) -> a matvlm-hf checkpoint folder; returns its path.

    The output holds the same tensors under matvlm-hf's names (cast to `dtype` if given: float32 | bfloat16 |
    float16), config.json (bias-free mixers when is_bias is false) with remote code, tokenizer, processor, generation
    config and a model card naming the source. Raises ConversionError for anything that is not such a checkpoint.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    source = resolve_checkpoint(input_path)
    mamba = read_mamba_config(source)
    tinyllava = read_tinyllava_config(source)
    config = matvlm_config_from_authors(tinyllava, mamba)
    key_to_file = weight_files(source)
    layers = set(config.mamba_layers)
    rename = lambda key: import_key(key, layers)  # noqa: E731
    _check_layout(config, key_to_file, rename, source)
    target_dtype = DTYPES[dtype] if dtype else None
    output = Path(output_path)
    with staged_output(output, overwrite=overwrite, inputs=[("--input", source)]) as staging:
        _copy_weights(key_to_file, rename, staging, target_dtype, max_shard_size, progress, "importing")
        config.dtype = target_dtype or _source_dtype(key_to_file)
        _write_imported_metadata(config, source, staging, str(input_path), cast=target_dtype is not None)
    if push_to_hub:
        upload_folder(output, push_to_hub)
    return output


def _write_imported_metadata(config: MaTVLMConfig, source: Path, folder: Path, name: str, cast: bool) -> None:
    with torch.device("meta"):
        shell = MaTVLMForConditionalGeneration(config)
    custom_object_save(shell, folder, config=config)
    config.architectures = [type(shell).__name__]
    config.save_pretrained(folder)
    try:  # never AutoTokenizer on the folder itself: its config.json auto_map would ask to run remote code
        with _without_config_type_warning():
            processor = processor_from_tinyllava(source, config.image_token_id, config.num_image_tokens)
    except Exception as err:
        raise ConversionError(
            f"Could not load the tokenizer files of {source} ({err}); copy TinyLLaVA's tokenizer "
            "files (tokenizer_config.json, vocab.json, merges.txt, ...) into it."
        ) from err
    processor.save_pretrained(folder)
    tokenizer = processor.tokenizer
    eos = tokenizer.eos_token_id
    GenerationConfig(
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        bos_token_id=tokenizer.bos_token_id,
        max_new_tokens=256,
    ).save_pretrained(folder)
    n = config.text_config.num_hidden_layers
    (folder / "README.md").write_text(f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [matvlm, mamba2, hybrid, tinyllava]
base_model: {name}
---
# MaTVLM: {name}, imported

The MaTVLM hybrid `{name}` (the authors' layout: TinyLLaVA folder + `{MAMBA_CONFIG_NAME}`, code at
https://github.com/hustvl/MaTVLM), imported with `matvlm import` from matvlm-hf. Its tensors are the source's, renamed
(`layers.N.mamba.*` -> `layers.N.self_attn.*`){f", cast to {config.dtype}" if cast else ", bit for bit"}: it computes what
the authors' model computes.

| | |
|---|---|
| source | {name} |
| language model | {config.text_config.model_type}, {n} layers, hidden {config.text_config.hidden_size} |
| Mamba layers | {config.mamba_layers} ({len(config.mamba_layers) / n:.1%}) |
| mixer | d_state {config.mamba_d_state}, {config.mamba_nheads} heads x {config.mamba_headdim}, d_xb {config.mamba_d_xb}, in/out bias {config.mamba_proj_bias} |
| image tokens | {config.num_image_tokens} per image, id {config.image_token_id} |

The authors evaluate in float16 (SSM state in float16 too).

```python
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained("PATH", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("PATH", trust_remote_code=True)
```
""")  # noqa: E501 (a model card: markdown table rows, one a line)


# --- export ------------------------------------------------------------------------------------------------------


def export_authors_checkpoint(
    input_path: str | Path,
    output_path: str | Path,
    *,
    overwrite: bool = False,
    max_shard_size: int = 2 * 1024**3,
    progress: bool = True,
) -> Path:
    """A matvlm-hf checkpoint folder -> the authors' layout (TinyLLaVA config.json, shards, mamba_config.json,
    tokenizer); returns the output path. ConversionError when the model is not expressible there (see
    `authors_mamba_config`: Phi, equal in/out biases, nheads = ngroups, headdim = d_state)."""
    source = Path(input_path)
    if not (source / "config.json").is_file():
        raise ConversionError(f"{source} has no config.json: not a matvlm-hf checkpoint folder.")
    raw = json.loads((source / "config.json").read_text())
    if raw.get("model_type") != MaTVLMConfig.model_type:
        raise ConversionError(f"{source} is not a matvlm-hf checkpoint (model_type {raw.get('model_type')!r}).")
    config = MaTVLMConfig.from_pretrained(source)
    mamba = authors_mamba_config(config)
    key_to_file = weight_files(source)
    layers = set(config.mamba_layers)
    processor = MaTVLMProcessor.from_pretrained(source)
    output = Path(output_path)
    with staged_output(output, overwrite=overwrite, inputs=[("--input", source)]) as staging:
        _copy_weights(
            key_to_file, lambda key: export_key(key, layers), staging, None, max_shard_size, progress, "exporting"
        )
        (staging / MAMBA_CONFIG_NAME).write_text(json.dumps(mamba, indent=4) + "\n")
        (staging / "config.json").write_text(json.dumps(_authors_tinyllava_config(config, processor), indent=2) + "\n")
        processor.tokenizer.save_pretrained(staging)
        processor.image_processor.save_pretrained(staging)
    return output


def _authors_tinyllava_config(config: MaTVLMConfig, processor: MaTVLMProcessor) -> dict:
    """TinyLLaVA's config.json as the authors' training script saves it (architecture HybridTinyLlava...)."""
    tc = config.text_config
    text = {k: v for k, v in tc.to_dict().items() if k not in ("layer_types", "model_type")}
    text_config = type(tc).from_dict(text)
    text_config.architectures = [type(tc).__name__.replace("Config", "ForCausalLM")]
    text_config._name_or_path = LM_NAMES[tc.model_type]
    tinyllava = _tinyllava_config(
        tc.model_type,
        text_config,
        config.vision_config,
        processor.tokenizer,
        processor.image_aspect_ratio,
        config.dtype or torch.float32,
        (config.vision_feature_layer, config.vision_feature_select_strategy),
    )
    tinyllava.update(
        architectures=[AUTHORS_ARCHITECTURE],
        tokenizer_model_max_length=processor.tokenizer.model_max_length,
        tokenizer_padding_side=processor.tokenizer.padding_side,
    )
    return tinyllava
