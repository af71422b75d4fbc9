"""TinyLLaVA checkpoint -> MaTVLM checkpoint (the paper's initialisation of the Mamba layers from attention).

Streams the source shards tensor by tensor (never two copies of the model in memory), renames the TinyLLaVA keys to
MaTVLM's, turns the attention weights of the chosen layers into Mamba-2 mixer weights (x <- W_V, B <- W_K, C <- W_Q,
out_proj <- W_O, the rest freshly initialised) and writes safetensors shards, config with remote code, tokenizer,
processor, generation config and a model card into a temporary folder that is renamed into place only when complete.

    python conversion/convert_tinyllava_to_matvlm.py --input TINYLLAVA_DIR --output OUT_DIR --mamba-ratio 0.25
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import GenerationConfig
from transformers.dynamic_module_utils import custom_object_save

from ..configuration_matvlm import MaTVLMConfig, mamba_layer_indices
from ..mamba2_mixer import MaTVLMMamba2Mixer
from ..modeling_matvlm import MaTVLMForConditionalGeneration, checkpoint_key
from .model_card import front_matter
from .tinyllava_format import (  # noqa: F401 (ConversionError, read_tinyllava_config: public here too)
    KEY_PREFIXES,
    SUPPORTED_VISION_MODEL_TYPES,
    ConversionError,
    read_tinyllava_config,
    resolve_checkpoint,
)
from .paper_preset import FreshDecoderLayers, paper_mamba_layers, preset_mixer_options, resolve_init
from ..processing_matvlm import processor_from_tinyllava
from ..safe_output import check_output, staged_output

ATTENTION_OUT = {"phi": "dense", "llama": "o_proj", "qwen2": "o_proj"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> file, from model.safetensors.index.json or a single model.safetensors; every file checked."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        key_to_file = {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    elif (folder / "model.safetensors").is_file():
        key_to_file = {}
        single = folder / "model.safetensors"
    elif list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
        raise ConversionError(
            f"{folder} holds pickle weights only; convert them to safetensors first (no pickle here)."
        )
    else:
        raise ConversionError(f"{folder} has no model.safetensors or model.safetensors.index.json.")
    files = sorted(set(key_to_file.values())) if key_to_file else [single]
    for file in files:
        if not file.is_file():
            raise ConversionError(f"Weight file {file.name} listed in the index is missing from {folder}.")
        try:
            with safe_open(str(file), "pt") as f:
                keys = list(f.keys())
        except (SafetensorError, OSError) as err:
            raise ConversionError(f"Weight file {file} is damaged or truncated: {err}") from err
        if not key_to_file:
            key_to_file = dict.fromkeys(keys, file)
        elif missing := [k for k, v in key_to_file.items() if v == file and k not in keys]:
            raise ConversionError(f"{file.name} lacks {len(missing)} tensors the index lists, e.g. {missing[0]}.")
    return key_to_file


def iter_tensors(key_to_file: dict[str, Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields the source tensors file by file; only one tensor is materialised at a time."""
    by_file: dict[Path, list[str]] = {}
    for key, file in key_to_file.items():
        by_file.setdefault(file, []).append(key)
    for file, keys in by_file.items():
        with safe_open(str(file), "pt") as f:
            for key in keys:
                try:
                    yield key, f.get_tensor(key)
                except (SafetensorError, OSError, RuntimeError) as err:
                    raise ConversionError(f"Could not read {key} from {file}: {err}") from err


# --- the conversion --------------------------------------------------------------------------------------------


def matvlm_config_from_tinyllava(
    tinyllava: dict, mamba_layers: list[int], processor_image_token_id: int | None = None, **mamba_kwargs
) -> MaTVLMConfig:
    text = dict(tinyllava["text_config"])
    vocab = text.get("vocab_size", tinyllava.get("vocab_size"))
    return MaTVLMConfig(
        text_config=text,
        vision_config=dict(tinyllava["vision_config"]),
        vision_feature_layer=tinyllava.get("vision_feature_layer", -2),
        vision_feature_select_strategy=tinyllava.get("vision_feature_select_strategy", "patch"),
        image_token_id=processor_image_token_id if processor_image_token_id is not None else vocab - 1,
        mamba_layers=mamba_layers,
        **mamba_kwargs,
    )


def rename_key(key: str) -> str:
    for old, new in KEY_PREFIXES.items():
        if key.startswith(old):
            return new + key[len(old) :]
    raise ConversionError(f"Unexpected tensor {key!r}: not under language_model, vision_tower or connector.")


def mixer_from_attention(
    config: MaTVLMConfig, layer: int, attention: dict[str, torch.Tensor] | None, generator_seed: int
) -> dict[str, torch.Tensor]:
    """State dict of the Mamba-2 mixer replacing attention layer `layer` (paper Eq. 6).

    attention: {"q_proj.weight", "k_proj.weight", "v_proj.weight", "<out>.weight", and biases when present}; None
    gives a wholly fresh mixer (the initialisation ablation). z, dt, A, D, conv and norm are freshly initialised.
    """
    torch.manual_seed(generator_seed + layer)
    mixer = MaTVLMMamba2Mixer(config, layer)
    mixer.init_ssm_parameters()
    state = {k: v.detach().clone() for k, v in mixer.state_dict().items()}
    if attention is None:
        return state
    d_inner, d_xb = mixer.d_inner, mixer.d_xb
    out_name = ATTENTION_OUT[config.text_config.model_type]
    rows = {
        "v_proj": slice(d_inner, d_inner + d_xb),
        "k_proj": slice(d_inner + d_xb, d_inner + 2 * d_xb),
        "q_proj": slice(d_inner + 2 * d_xb, 2 * d_inner + 2 * d_xb),
    }
    for name, sl in rows.items():
        state["in_proj.weight"][sl] = attention[f"{name}.weight"].float()
        if "in_proj.bias" in state:
            bias = attention.get(f"{name}.bias")
            state["in_proj.bias"][sl] = bias.float() if bias is not None else 0.0
    if "in_proj.bias" in state:  # z and dt rows: no bias (dt has its own dt_bias)
        state["in_proj.bias"][:d_inner] = 0.0
        state["in_proj.bias"][2 * d_inner + 2 * d_xb :] = 0.0
    state["out_proj.weight"] = attention[f"{out_name}.weight"].float().clone()
    if "out_proj.bias" in state:
        bias = attention.get(f"{out_name}.bias")
        state["out_proj.bias"] = bias.float().clone() if bias is not None else torch.zeros_like(state["out_proj.bias"])
    return state


class _ShardWriter:
    """Accumulates tensors and writes `model-0000i.safetensors` shards of at most `max_bytes`."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.size = 0
        self.shards: list[dict[str, torch.Tensor] | list[str]] = []
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.size + nbytes > self.max_bytes:
            self.flush()
        self.buffer[key] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f"model-{len(self.shards) + 1:05d}.safetensors"
        save_file(self.buffer, str(self.folder / name), metadata={"format": "pt"})
        self.shards.append(list(self.buffer))
        self.weight_map.update(dict.fromkeys(self.buffer, name))
        self.buffer, self.size = {}, 0

    def finish(self) -> None:
        self.flush()
        if len(self.shards) == 1:
            (self.folder / "model-00001.safetensors").rename(self.folder / "model.safetensors")
            return
        total = len(self.shards)
        renames = {
            f"model-{i:05d}.safetensors": f"model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)
        }
        for old, new in renames.items():
            (self.folder / old).rename(self.folder / new)
        index = {
            "metadata": {"total_size": self.total},
            "weight_map": {k: renames[v] for k, v in sorted(self.weight_map.items())},
        }
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def convert_tinyllava_to_matvlm(
    input_path: str | Path,
    output_path: str | Path,
    *,
    mamba_ratio: float | None = None,
    mamba_layers: list[int] | None = None,
    placement: str = "even",
    init: str = "attention",
    preset: str = "matvlm",
    dtype: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    max_shard_size: int = 2 * 1024**3,
    push_to_hub: str | None = None,
    progress: bool = True,
) -> Path:
    """Convert a TinyLLaVA checkpoint folder (or Hub id) to a MaTVLM checkpoint folder; returns the output path.

    mamba_ratio / mamba_layers: which layers become Mamba (ratio 0 repackages the teacher); placement: even | start |
    middle | end; init: attention (paper) | random (fresh mixer) | random-layer (fresh mixer, MLP and norms: the
    authors' init_with_kqvo=False); preset: matvlm (this project's choices) | paper (the authors': bias-free mixers,
    their layer lists, `random` meaning random-layer; see paper_preset.py); dtype: float32 | bfloat16 | float16
    (default: keep the source's).
    """
    output = Path(output_path)
    check_output(output, [("--input", input_path)], overwrite=overwrite)
    if init not in ("attention", "random", "random-layer"):
        raise ConversionError(f"init must be 'attention', 'random' or 'random-layer', got {init!r}.")
    try:
        init = resolve_init(preset, init)
    except ValueError as err:
        raise ConversionError(str(err)) from err
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    source = resolve_checkpoint(input_path)
    tinyllava = read_tinyllava_config(source)
    n_layers = tinyllava["text_config"]["num_hidden_layers"]
    if mamba_layers is None and preset == "paper" and mamba_ratio:
        try:
            mamba_layers, placement = paper_mamba_layers(n_layers, mamba_ratio), "paper"
        except ValueError as err:
            raise ConversionError(f"--mamba-ratio {mamba_ratio}: {err}") from err
    mamba_layers = choose_mamba_layers(n_layers, mamba_ratio, mamba_layers, placement)
    try:
        config = matvlm_config_from_tinyllava(tinyllava, list(mamba_layers), **preset_mixer_options(preset))
    except ValueError as err:
        raise ConversionError(str(err)) from err
    key_to_file = weight_files(source)
    check_shapes(config, key_to_file)
    processor = load_processor(source, config)  # before any weight is written: a missing tokenizer fails here
    target_dtype = DTYPES[dtype] if dtype else None

    with staged_output(output, overwrite=overwrite, inputs=[("--input", source)]) as staging:
        _write_weights(config, key_to_file, staging, target_dtype, init, seed, max_shard_size, progress)
        _write_metadata(
            config, processor, tinyllava, source, staging, init, placement, target_dtype or _source_dtype(key_to_file)
        )
    if push_to_hub:
        upload_folder(output, push_to_hub)
    return output


def choose_mamba_layers(
    n_layers: int, mamba_ratio: float | None, mamba_layers: list[int] | None, placement: str
) -> list[int]:
    """The Mamba layer list of `--mamba-ratio` / `--mamba-layers`; ConversionError when a ratio above 0 or an
    explicit list gives no Mamba layer (that would silently be the teacher) or a layer is out of range."""
    if mamba_layers is not None:
        if not mamba_layers:
            raise ConversionError(
                "--mamba-layers names no layer; give e.g. --mamba-layers 0,4 (or --mamba-ratio 0 for the teacher)."
            )
        bad = [i for i in mamba_layers if not 0 <= i < n_layers]
        if bad:
            raise ConversionError(
                f"--mamba-layers {bad} out of range: the language model has layers 0..{n_layers - 1}."
            )
        return sorted(set(mamba_layers))
    ratio = 0.0 if mamba_ratio is None else mamba_ratio
    try:
        layers = mamba_layer_indices(n_layers, ratio, placement)
    except ValueError as err:
        raise ConversionError(f"--mamba-ratio {ratio}: {err}") from err
    if ratio > 0 and not layers:
        raise ConversionError(
            f"--mamba-ratio {ratio} of {n_layers} layers rounds to no Mamba layer (the output would "
            f"be the teacher); use at least {0.5 / n_layers:.3g}, or --mamba-layers."
        )
    return layers


def check_shapes(config: MaTVLMConfig, key_to_file: dict[str, Path]) -> None:
    """ConversionError naming the tensor (and its layer) whose shape differs from what config.json implies.

    Every source tensor the teacher model has is compared with the teacher built from the same config on the meta
    device (no memory); the attention weights of the layers that become Mamba are checked the same way, so the mixer
    initialisation never meets a wrong shape.
    """
    teacher_config = MaTVLMConfig(**{**config.to_dict(), "mamba_layers": []})
    with torch.device("meta"):
        expected = {
            checkpoint_key(k): tuple(v.shape)
            for k, v in MaTVLMForConditionalGeneration(teacher_config).state_dict().items()
        }
    by_file: dict[Path, list[str]] = {}
    for key, file in key_to_file.items():
        by_file.setdefault(file, []).append(key)
    for file, keys in by_file.items():
        with safe_open(str(file), "pt") as f:
            for key in keys:
                want = expected.get(rename_key(key))
                found = tuple(f.get_slice(key).get_shape())
                if want is not None and found != want:
                    layer = key.split("layers.", 1)[1].split(".", 1)[0] if "layers." in key else None
                    where = f" (layer {layer})" if layer is not None else ""
                    raise ConversionError(
                        f"Tensor {key}{where} in {file.name} has shape {list(found)}, but config.json implies "
                        f"{list(want)}: the weights and config.json of the checkpoint do not match; restore the "
                        "original files."
                    )


@contextlib.contextmanager
def _without_config_type_warning() -> Iterator[None]:
    """Drops transformers' "You are using a model of type `tinyllava` to instantiate a model of type ``" warning,
    which AutoTokenizer prints while it reads the TinyLLaVA config.json only to find the tokenizer class."""
    config_logger = logging.getLogger("transformers.configuration_utils")

    def keep(record: logging.LogRecord) -> bool:
        return "to instantiate a model of type" not in record.getMessage()

    config_logger.addFilter(keep)
    try:
        yield
    finally:
        config_logger.removeFilter(keep)


def load_processor(source: Path, config: MaTVLMConfig):
    """The MaTVLM processor of a TinyLLaVA folder; ConversionError naming the folder when its tokenizer files are
    missing or unreadable."""
    try:
        with _without_config_type_warning():
            return processor_from_tinyllava(source, config.image_token_id, config.num_image_tokens)
    except Exception as err:  # noqa: BLE001 - every tokenizer/processor load failure reads the same to a user
        raise ConversionError(
            f"Could not load the tokenizer or processor files of {source} ({type(err).__name__}: {err}). The folder "
            "needs the TinyLLaVA tokenizer files (tokenizer.json or vocab.json + merges.txt, tokenizer_config.json); "
            "copy them from the original checkpoint."
        ) from err


def _source_dtype(key_to_file: dict[str, Path]) -> torch.dtype:
    key, file = next(iter(key_to_file.items()))
    with safe_open(str(file), "pt") as f:
        return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[f.get_slice(key).get_dtype()]


def _write_weights(
    config: MaTVLMConfig,
    key_to_file: dict[str, Path],
    folder: Path,
    dtype: torch.dtype | None,
    init: str,
    seed: int,
    max_shard_size: int,
    progress: bool,
) -> None:
    out_name = ATTENTION_OUT[config.text_config.model_type]
    fresh = (
        FreshDecoderLayers(config.attention_text_config(), config.mamba_layers, seed)
        if init == "random-layer"
        else None
    )
    attn_parts = ("q_proj", "k_proj", "v_proj", out_name)
    mamba = set(config.mamba_layers)
    pending: dict[int, dict[str, torch.Tensor]] = {}  # attention tensors of Mamba layers until complete
    expected = {
        i: {
            k.split(".self_attn.", 1)[1]
            for k in key_to_file
            if k.startswith(f"language_model.model.layers.{i}.self_attn.")
        }
        for i in mamba
    }
    for i, names in expected.items():
        if not {f"{p}.weight" for p in attn_parts} <= names:
            raise ConversionError(
                f"Layer {i}'s attention weights are incomplete in the checkpoint: found {sorted(names)}."
            )
    writer = _ShardWriter(folder, max_shard_size)
    seen = set()
    for key, tensor in tqdm(
        iter_tensors(key_to_file), total=len(key_to_file), desc="converting", unit="tensor", disable=not progress
    ):
        new_key = rename_key(key)
        seen.add(new_key)
        layer = _mamba_layer_of(new_key, mamba)
        if layer is None:
            if fresh is not None and (new := fresh.get(new_key)) is not None:
                tensor = new.to(tensor.dtype)
            writer.add(new_key, tensor.to(dtype) if dtype and tensor.is_floating_point() else tensor)
            continue
        pending.setdefault(layer, {})[key.split(".self_attn.", 1)[1]] = tensor
        if set(pending[layer]) == expected[layer]:
            attention = pending.pop(layer)
            mixer = mixer_from_attention(config, layer, attention if init == "attention" else None, seed)
            out_dtype = dtype or attention["q_proj.weight"].dtype
            prefix = f"language_model.model.layers.{layer}.self_attn."
            for name, value in mixer.items():
                writer.add(prefix + name, value.to(out_dtype))
    if pending:
        raise ConversionError(f"Attention weights of layers {sorted(pending)} were incomplete.")
    if not any(k.startswith("language_model.model.embed_tokens") for k in seen):
        raise ConversionError("The checkpoint has no language_model.model.embed_tokens weights: not a TinyLLaVA LM.")
    writer.finish()


def _mamba_layer_of(key: str, mamba: set[int]) -> int | None:
    prefix = "language_model.model.layers."
    if not key.startswith(prefix) or ".self_attn." not in key:
        return None
    layer = int(key[len(prefix) :].split(".", 1)[0])
    return layer if layer in mamba else None


def _write_metadata(
    config: MaTVLMConfig,
    processor,
    tinyllava: dict,
    source: Path,
    folder: Path,
    init: str,
    placement: str,
    dtype: torch.dtype,
) -> None:
    """Config + remote code, tokenizer, processor, generation config and model card.

    The special ids in the config and the generation config are the tokenizer's (TinyLLaVA's text_config may lack
    pad_token_id), so that Trainer / generate find nothing to realign."""
    tokenizer = processor.tokenizer
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    bos = tokenizer.bos_token_id
    ids = {"eos_token_id": eos, "pad_token_id": pad, "bos_token_id": bos}
    config.text_config.update(ids)
    config.update(ids)  # transformers < 5.2x's Trainer compares the top-level config's ids
    config.dtype = dtype
    with torch.device("meta"):
        shell = MaTVLMForConditionalGeneration(config)
    custom_object_save(shell, folder, config=config)
    config.architectures = [type(shell).__name__]
    config.save_pretrained(folder)
    processor.save_pretrained(folder)
    # the image token id marks prompt placeholders only: generation never emits it
    GenerationConfig(
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=bos,
        max_new_tokens=256,
        suppress_tokens=[config.image_token_id],
    ).save_pretrained(folder)
    (folder / "README.md").write_text(model_card(config, tinyllava, source, init, placement))


def model_card(config: MaTVLMConfig, tinyllava: dict, source: Path, init: str, placement: str) -> str:
    n = config.text_config.num_hidden_layers
    base = tinyllava.get("_name_or_path") or source.name
    return (
        front_matter(base)
        + f"""# MaTVLM hybrid of {base}

A [MaTVLM](https://arxiv.org/abs/2503.13440) hybrid made with `matvlm-hf`: {len(config.mamba_layers)} of {n}
decoder layers ({len(config.mamba_layers) / n:.1%}) of the {config.text_config.model_type} language model had their
attention replaced by a Mamba-2 mixer.

| | |
|---|---|
| teacher | {base} |
| language model | {config.text_config.model_type}, {n} layers, hidden {config.text_config.hidden_size} |
| Mamba layers | {config.mamba_layers} (placement: {placement}) |
| mixer | d_state {config.mamba_d_state}, {config.mamba_nheads} heads x {config.mamba_headdim}, d_xb {config.mamba_d_xb}, conv {config.mamba_d_conv}, in/out bias {config.mamba_proj_bias}/{config.mamba_out_proj_bias} |
| initialisation | {"x <- W_V, B <- W_K, C <- W_Q, out <- W_O (paper Eq. 6); z, dt, A, D, conv, norm fresh" if init == "attention" else f"{init} (ablation)"} |
| image tokens | {config.num_image_tokens} per image, id {config.image_token_id} |

Converted, not yet distilled: distil it from its teacher (`matvlm distill`) before use; until then it answers only as
well as softmax-free attention lets it.

```python
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained("PATH", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("PATH", trust_remote_code=True)
```
"""  # noqa: E501 (a model card: markdown table rows, one a line)
    )


def upload_folder(folder: Path, repo_id: str) -> None:
    """Push the whole folder (weights, remote code, processor, model card) to the Hub as one commit."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    repo_id = api.create_repo(repo_id, exist_ok=True).repo_id
    operations = [
        CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in sorted(folder.iterdir()) if p.is_file()
    ]
    api.create_commit(repo_id, operations=operations, commit_message="Upload MaTVLM hybrid (matvlm-hf)")
