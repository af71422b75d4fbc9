"""Write a random TinyLLaVA checkpoint in the published on-disk layout (no download, no hub).

    from matvlm_hf.fabricate import write_tinyllava_checkpoint
    path = write_tinyllava_checkpoint(tmp_path / "tinyllava", lm_type="phi", size="tiny")

The folder holds what `tinyllava/TinyLLaVA-Phi-2-SigLIP-3.1B` holds, custom-code parts included:
- `config.json`: model_type "tinyllava" with the full `text_config` / `vision_config` dicts and the `auto_map`
  that points transformers at the remote code beside the weights (`configuration.py`,
  `modeling_tinyllava_<lm>.py`). Those two files are stand-ins (TinyLLaVA's own code is not shipped here): by
  default importing them raises, and tests pass `remote_code=` a body that writes a marker file, so that any
  loader which executes a source's code fails a test (matvlm-hf reads checkpoints, it never runs their code);
- weights as safetensors (`model.safetensors`, or `model-0000i-of-0000n.safetensors` shards plus
  `model.safetensors.index.json`) under the TinyLLaVA prefixes:
  `language_model.` + the transformers CausalLM state dict,
  `vision_tower._vision_tower.vision_model.` + the SigLIP vision state dict (head included),
  `connector._connector.{0,2}.{weight,bias}` (mlp2x_gelu);
- tokenizer files built here with `tokenizers` (byte-level BPE trained on a small built-in corpus), as published:
  phi writes what TinyLLaVA's slow `CodeGenTokenizer` saved (`vocab.json`, `merges.txt`, `added_tokens.json`,
  `special_tokens_map.json`, `tokenizer_config.json`; no `tokenizer.json`), llama / qwen2 a `tokenizer.json`;
  `generation_config.json`.

`save_tinyllava_checkpoint(model, tokenizer, out)` writes a *trained* attention-only MaTVLM (e.g. the teacher
`matvlm quickstart` trains from scratch) in the same layout, through the same config/tokenizer writers, so that the
real conversion path starts from it. `tinyllava_configs(tokenizer, size=..., lm=..., vision=...)` gives the
(text, vision) configs of a preset with some dimensions overridden.

Note: transformers 5 dropped the `vision_model.` level from `SiglipVisionModel`'s own state dict
(`embeddings.patch_embedding.weight`); checkpoints written by transformers 4 (TinyLLaVA's) keep it
(`vision_model.embeddings.patch_embedding.weight`), so it is added back here.

Weights never exist as one model: the key list and shapes come from the transformers modules built on the
`meta` device, and tensors are filled shard by shard (one shard in memory at a time), so size="full"
(3.1B parameters) runs in a few GB of RAM. Every tensor is drawn from its own generator seeded from
(seed, key): the weights do not depend on the shard layout.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from pathlib import Path
from typing import Any

import torch

from ..modeling_matvlm import checkpoint_key
from .tinyllava_format import (  # noqa: F401 (the names fabricate always had)
    CONNECTOR_PREFIX,
    LM_NAMES,
    LM_PREFIX,
    REMOTE_CODE_STAND_IN,
    TOKENIZER_MODEL_MAX_LENGTH,
    VISION_NAME,
    VISION_PREFIX,
    _tinyllava_config,
    remote_code_files,
)

# ----------------------------------------------------------------------------------------------------------
# Sizes. "tiny" is for CPU tests; "full" is TinyLLaVA-Phi-2-SigLIP-3.1B.
TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
)  # 4 x 4 = 16 patches -> 15 image tokens
TINY_LM = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, vocab_size=1280
)  # embedding rows; the tokenizer has fewer tokens
TINY_NUM_KV_HEADS = 2  # llama / qwen2: GQA (2 kv heads for 4 query heads)
TINY_TOKENIZER_VOCAB = 1000  # BPE target (byte alphabet + merges), before special tokens
TINY_INIT_STD = 0.1  # larger than 0.02 so that tiny conversion tests compare non-negligible values

FULL_VISION = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
)  # google/siglip-so400m-patch14-384
FULL_PHI = dict(
    hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32, vocab_size=51200
)  # microsoft/phi-2
FULL_PHI_EOS_ID = 50256  # Phi-2: <|endoftext|> = 50256, 50295 tokens in all
FULL_PHI_TOKENIZER_LEN = 50295
FULL_INIT_STD = 0.02
FULL_SHARD_SIZE = 2 * 1024**3


# A small built-in English corpus for the tokenizer (conversation words, image descriptions, digits).
CORPUS = """
A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed,
and polite answers to the user's questions. USER: What is shown in the image? ASSISTANT: The image shows a cat.
USER: Describe the picture in detail. ASSISTANT: In the picture, a brown dog is running across a green field
while a child throws a red ball. The sky is blue with a few white clouds, and trees line the horizon.
What color is the car? The car is red. How many people are in the photo? There are three people in the photo.
Is there a person riding a bicycle? Yes, a woman in a yellow jacket is riding a bicycle along the street.
Where is this photo taken? It appears to be taken in a busy city street with tall buildings and shops.
What is the man holding? He is holding an umbrella because it is raining. What time of day is it? It is evening.
The kitchen has a wooden table, four chairs, a white refrigerator and a window above the sink.
A plate of food with rice, vegetables and grilled chicken sits on the table next to a glass of water.
Two giraffes stand near a tree in a zoo enclosure; one of them is eating leaves from a high branch.
A train is arriving at the station. Passengers wait on the platform with their bags and suitcases.
The sign says "STOP". The clock on the tower reads 10:45. The bus number is 27 and the street is Main Street.
Please answer the question with a single word or phrase. Answer: yes. Answer: no. Answer: two. Answer: blue.
What is the relationship between the objects? The laptop is on the desk, and the mouse is to its right.
Can you explain why the scene is unusual? The elephant is standing in a swimming pool, which is not common.
The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 15 20 25 50 100 2024 3.14.
Write a short story about the image. Once upon a time, a small boat sailed across a calm lake at sunset.
The teddy bear is sitting on a bed with blue sheets. A vase of flowers is placed on the windowsill.
People are skiing down a snowy mountain. A snowboarder jumps off a ramp. The slope is steep and white.
A man is surfing on a large wave in the ocean. Birds fly over the beach where children build sandcastles.
Question: What is the main object? Options: (A) a horse (B) a cow (C) a sheep (D) a goat. Answer with the letter.
This is a photograph of a living room with a sofa, a television, a lamp and a bookshelf full of books.
The pizza has cheese, tomatoes, olives and mushrooms. It has been cut into eight slices on a wooden board.
""".strip()


def parse_size(size: int | str | None) -> int | None:
    """'2GB' / '500MB' / '20KB' / 1234 -> bytes (decimal prefixes as transformers: 1GB = 10**9)."""
    if size is None or isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMG]i?B)?\s*", size.upper().replace("IB", "iB"))
    if not m:
        raise ValueError(f"cannot parse shard size {size!r}: use an int (bytes) or e.g. '2GB', '500MB'")
    unit = {None: 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[m.group(2)]
    return int(float(m.group(1)) * unit)


# ----------------------------------------------------------------------------------------------------------
# Configs


def _vision_config(size: str, dims: dict[str, Any] | None = None):
    from transformers import SiglipVisionConfig

    dims = {**(TINY_VISION if size == "tiny" else FULL_VISION), **(dims or {})}
    return SiglipVisionConfig(
        **dims, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, num_channels=3, attention_dropout=0.0
    )


def _lm_config(
    lm_type: str, size: str, special: dict[str, int | None], dtype: torch.dtype, dims: dict[str, Any] | None = None
):
    from transformers import LlamaConfig, PhiConfig, Qwen2Config

    overrides = dims or {}
    if lm_type == "phi":
        dims = {**(TINY_LM if size == "tiny" else FULL_PHI), **overrides}
        cfg = PhiConfig(
            **dims,
            num_key_value_heads=dims["num_attention_heads"],
            hidden_act="gelu_new",
            max_position_embeddings=2048,
            layer_norm_eps=1e-5,
            partial_rotary_factor=0.4,
            resid_pdrop=0.1 if size == "full" else 0.0,
            embd_pdrop=0.0,
            attention_dropout=0.0,
            qk_layernorm=False,
            tie_word_embeddings=False,
            use_cache=True,
            bos_token_id=special["bos"],
            eos_token_id=special["eos"],
        )
    elif lm_type == "llama":
        cfg = LlamaConfig(
            **{**TINY_LM, **overrides},
            num_key_value_heads=TINY_NUM_KV_HEADS,
            hidden_act="silu",
            max_position_embeddings=2048,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            use_cache=True,
            bos_token_id=special["bos"],
            eos_token_id=special["eos"],
        )
    elif lm_type == "qwen2":
        cfg = Qwen2Config(
            **{**TINY_LM, **overrides},
            num_key_value_heads=TINY_NUM_KV_HEADS,
            hidden_act="silu",
            max_position_embeddings=2048,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            use_cache=True,
            bos_token_id=special["bos"],
            eos_token_id=special["eos"],
        )
    else:
        raise ValueError(f"lm_type must be 'phi', 'llama' or 'qwen2', got {lm_type!r}")
    cfg.architectures = [type(cfg).__name__.replace("Config", "ForCausalLM")]
    cfg._name_or_path = LM_NAMES[lm_type]
    cfg.dtype = dtype
    return cfg


def _special_ids(tokenizer) -> dict[str, int | None]:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return {"bos": bos, "eos": tokenizer.eos_token_id}


def tinyllava_configs(
    tokenizer,
    lm_type: str = "phi",
    size: str = "tiny",
    *,
    dtype: torch.dtype = torch.float32,
    lm: dict[str, Any] | None = None,
    vision: dict[str, Any] | None = None,
):
    """(text_config, vision_config) of a TinyLLaVA checkpoint: the `size` preset ("tiny" / "full"), with the
    dimensions in `lm` / `vision` overriding it (e.g. `vision={"image_size": 48}`), special ids from `tokenizer`."""
    text_config = _lm_config(lm_type, size, _special_ids(tokenizer), dtype, lm)
    vision_config = _vision_config(size, vision)
    if len(tokenizer) >= text_config.vocab_size:
        raise AssertionError(f"tokenizer has {len(tokenizer)} tokens, not fewer than {text_config.vocab_size} rows")
    return text_config, vision_config


def _write_metadata(
    out: Path,
    lm_type: str,
    tokenizer,
    text_config,
    vision_config,
    image_aspect_ratio: str,
    dtype: torch.dtype,
    feature_select: tuple[int, str] = (-2, "patch"),
    remote_code: str = REMOTE_CODE_STAND_IN,
) -> None:
    """Tokenizer files, config.json (with `auto_map`), the remote-code files it names (each holding the text
    `remote_code`) and generation_config.json of a TinyLLaVA checkpoint folder."""
    _save_tokenizer(tokenizer, lm_type, out)
    for ref in remote_code_files(lm_type).values():
        (out / (ref.split(".", 1)[0] + ".py")).write_text(remote_code)
    config = _tinyllava_config(
        lm_type, text_config, vision_config, tokenizer, image_aspect_ratio, dtype, feature_select
    )
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = _special_ids(tokenizer)
    generation = {
        "_from_model_config": True,
        "bos_token_id": special["bos"],
        "eos_token_id": special["eos"],
        "transformers_version": config["transformers_version"],
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def save_tinyllava_checkpoint(
    model,
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    image_aspect_ratio: str = "square",
    remote_code: str = REMOTE_CODE_STAND_IN,
) -> Path:
    """Write a trained MaTVLM teacher (a `MaTVLMForConditionalGeneration` with no Mamba layers) in the published
    TinyLLaVA layout, as `write_tinyllava_checkpoint` does for random weights: config.json (model_type
    "tinyllava"), `model.safetensors` under the TinyLLaVA prefixes, tokenizer files, generation_config.json.

    `tokenizer` must be the one the model was trained with; lm_type comes from the model's text config.
    remote_code: the text of the stand-in remote-code files (see the module docstring).
    """
    config = model.config
    if config.mamba_layers:
        raise ValueError(
            f"only an attention teacher can be saved as TinyLLaVA; this model has Mamba layers {config.mamba_layers}"
        )
    lm_type = config.text_config.model_type
    if lm_type not in LM_NAMES:
        raise ValueError(f"lm_type must be one of {sorted(LM_NAMES)}, got {lm_type!r}")
    if image_aspect_ratio not in ("square", "pad"):
        raise ValueError(f"image_aspect_ratio must be 'square' or 'pad', got {image_aspect_ratio!r}")
    # the LM's own config as TinyLLaVA stores it: without the layer_types MaTVLM adds for its caches
    text = {k: v for k, v in config.text_config.to_dict().items() if k not in ("layer_types", "model_type")}
    if "layer_types" in type(config.text_config)().to_dict():  # a model type that has them natively keeps them
        text["layer_types"] = config.attention_text_config().layer_types
    text_config = type(config.text_config).from_dict(text)
    text_config.architectures = [type(text_config).__name__.replace("Config", "ForCausalLM")]
    text_config._name_or_path = LM_NAMES[lm_type]
    vision_config = config.vision_config
    dtype = next(model.parameters()).dtype

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_metadata(
        out,
        lm_type,
        tokenizer,
        text_config,
        vision_config,
        image_aspect_ratio,
        dtype,
        (config.vision_feature_layer, config.vision_feature_select_strategy),
        remote_code,
    )
    renames = {"language_model.": LM_PREFIX, "vision_tower.": VISION_PREFIX, "connector.": CONNECTOR_PREFIX}
    tensors = {}
    for key, t in model.state_dict().items():
        key = checkpoint_key(key)  # MaTVLM's on-disk names, then TinyLLaVA's
        prefix = next(p for p in renames if key.startswith(p))
        tensors[renames[prefix] + key[len(prefix) :]] = t.detach().to("cpu").contiguous().clone()
    from safetensors.torch import save_file

    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


def build_tokenizer(
    lm_type: str = "phi",
    *,
    vocab_size: int = TINY_TOKENIZER_VOCAB,
    phi2_ids: bool = False,
    model_max_length: int = TOKENIZER_MODEL_MAX_LENGTH,
):
    """A byte-level BPE trained in-process on CORPUS, wrapped as a transformers fast tokenizer.

    phi: `<|endoftext|>` after the BPE vocab (as GPT-2/Phi-2), eos = bos = unk = pad. With `phi2_ids` the BPE
    vocab is padded with unreachable filler entries so that `<|endoftext|>` = 50256 and the tokenizer has
    50295 tokens, as Phi-2's. llama: `<unk>`, `<s>`, `</s>` = 0, 1, 2, a BOS on every sequence, pad = unk.
    qwen2: `<|endoftext|>` (eos, pad), `<|im_start|>`, `<|im_end|>` after the BPE vocab, no BOS.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    leading_special = ["<unk>", "<s>", "</s>"] if lm_type == "llama" else []
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + len(leading_special),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=leading_special,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer)

    if phi2_ids:  # pad the BPE vocab with entries no merge produces, to reach Phi-2's ids
        data = json.loads(tok.to_str())
        vocab = data["model"]["vocab"]
        for i in range(len(vocab), FULL_PHI_EOS_ID):
            vocab[f"<|unused_{i}|>"] = i
        tok = Tokenizer.from_str(json.dumps(data))

    if lm_type == "phi":
        tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
        if phi2_ids:  # Phi-2 has 38 added (non-special) tokens after <|endoftext|>
            n_extra = FULL_PHI_TOKENIZER_LEN - tok.get_vocab_size()
            tok.add_tokens([AddedToken(f"<|extra_{i}|>", normalized=False) for i in range(n_extra)])
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        names = dict(
            bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token="<|endoftext|>"
        )
    elif lm_type == "llama":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
        names = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")
    elif lm_type == "qwen2":
        tok.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]
        )
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        names = dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    else:
        raise ValueError(f"lm_type must be 'phi', 'llama' or 'qwen2', got {lm_type!r}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        **names,
    )


def _save_tokenizer(tokenizer, lm_type: str, out_dir: Path) -> None:
    tokenizer.save_pretrained(out_dir)
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    # Phi-2 (and TinyLLaVA-Phi-2) name CodeGenTokenizer; transformers 5 rebuilds it from the vocab/merges
    # with the same byte-level pipeline. Llama/Qwen2 tokenizer classes in transformers 5 rebuild their own
    # pre-tokenizers, so the generic class keeps tokenizer.json as written.
    cfg["tokenizer_class"] = "CodeGenTokenizer" if lm_type == "phi" else "PreTrainedTokenizerFast"
    cfg["add_bos_token"] = lm_type == "llama"
    if lm_type == "phi":  # as TinyLLaVA's slow CodeGenTokenizer saved it: vocab + merges + added tokens
        tokenizer.backend_tokenizer.model.save(str(out_dir))
        (out_dir / "tokenizer.json").unlink()
        added = sorted(tokenizer.added_tokens_decoder.items())
        (out_dir / "added_tokens.json").write_text(json.dumps({t.content: i for i, t in added}, indent=2) + "\n")
        fields = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
        cfg["added_tokens_decoder"] = {str(i): {k: getattr(t, k) for k in fields} for i, t in added}
        cfg.pop("backend", None)  # a transformers 5 field; the published file predates it
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    special = {
        k: getattr(tokenizer, k)
        for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        if getattr(tokenizer, k) is not None
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------
# Weights


def _param_specs(text_config, vision_config) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, kind) in the published order; kind in {"norm", "bias", "weight"}."""
    from transformers import AutoModelForCausalLM, SiglipVisionModel

    specs: list[tuple[str, tuple[int, ...], str]] = []

    def collect(module: torch.nn.Module, prefix: str) -> None:
        norm_params = {
            f"{n}.{p}" if n else p
            for n, m in module.named_modules()
            if "Norm" in type(m).__name__
            for p, _ in m.named_parameters(recurse=False)
        }
        for key, t in module.state_dict().items():
            kind = (
                "norm"
                if key in norm_params and key.endswith("weight")
                else ("bias" if key.endswith("bias") else "weight")
            )
            specs.append((prefix + key, tuple(t.shape), kind))

    with torch.device("meta"):
        collect(AutoModelForCausalLM.from_config(text_config), LM_PREFIX)
        collect(SiglipVisionModel(vision_config), VISION_PREFIX)
    vh, h = vision_config.hidden_size, text_config.hidden_size
    specs += [
        (CONNECTOR_PREFIX + "0.weight", (h, vh), "weight"),
        (CONNECTOR_PREFIX + "0.bias", (h,), "bias"),
        (CONNECTOR_PREFIX + "2.weight", (h, h), "weight"),
        (CONNECTOR_PREFIX + "2.bias", (h,), "bias"),
    ]
    return specs


def _make_tensor(
    key: str, shape: tuple[int, ...], kind: str, *, seed: int, size: str, dtype: torch.dtype
) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))
    t = torch.empty(shape, dtype=dtype)
    if size == "full":  # LayerNorm weights 1, biases 0, the rest N(0, 0.02)
        if kind == "norm":
            return t.fill_(1.0)
        if kind == "bias":
            return t.zero_()
        return t.normal_(0.0, FULL_INIT_STD, generator=gen)
    # tiny: everything random (norm weights near 1, small random biases), so that a conversion that
    # drops or swaps a bias or a norm fails the tests
    if kind == "norm":
        return t.normal_(1.0, 0.1, generator=gen)
    if kind == "bias":
        return t.normal_(0.0, 0.02, generator=gen)
    return t.normal_(0.0, TINY_INIT_STD, generator=gen)


def _plan_shards(specs, itemsize: int, max_shard_size: int | None) -> list[list[tuple[str, tuple, str]]]:
    if max_shard_size is None:
        return [list(specs)]
    shards: list[list] = [[]]
    used = 0
    for spec in specs:
        nbytes = itemsize * int(torch.Size(spec[1]).numel())
        if shards[-1] and used + nbytes > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += nbytes
    return shards


def _write_weights(
    out_dir: Path, specs, *, seed: int, size: str, dtype: torch.dtype, max_shard_size: int | None
) -> None:
    from safetensors.torch import save_file

    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = _plan_shards(specs, itemsize, max_shard_size)
    if len(shards) == 1:
        tensors = {k: _make_tensor(k, s, kind, seed=seed, size=size, dtype=dtype) for k, s, kind in shards[0]}
        save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: _make_tensor(k, s, kind, seed=seed, size=size, dtype=dtype) for k, s, kind in shard}
        total += sum(t.numel() * itemsize for t in tensors.values())
        save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        del tensors  # one shard in memory at a time
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------


def write_tinyllava_checkpoint(
    out_dir: str | os.PathLike,
    *,
    lm_type: str = "phi",
    size: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str | None = None,
    image_aspect_ratio: str = "square",
    remote_code: str = REMOTE_CODE_STAND_IN,
) -> Path:
    """Write a random TinyLLaVA checkpoint (config, safetensors weights, tokenizer) to `out_dir`.

    lm_type: "phi" (Phi-2), "llama" or "qwen2" (both GQA in the tiny size). size: "tiny" (CPU tests) or
    "full" (TinyLLaVA-Phi-2-SigLIP-3.1B dimensions, phi only). dtype: float32 for tiny, bfloat16 for full
    when None. max_shard_size: bytes or "2GB"-style; None = one file for tiny, 2 GiB shards for full.
    image_aspect_ratio: "square" or "pad" (stored in config.json for the preprocessing). remote_code: the text of
    the files `auto_map` names (default: a stand-in that raises ImportError when imported).
    """
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    if lm_type not in LM_NAMES:
        raise ValueError(f"lm_type must be one of {sorted(LM_NAMES)}, got {lm_type!r}")
    if size == "full" and lm_type != "phi":
        raise NotImplementedError("only lm_type='phi' has a full size (TinyLLaVA-Phi-2-SigLIP-3.1B)")
    if image_aspect_ratio not in ("square", "pad"):
        raise ValueError(f"image_aspect_ratio must be 'square' or 'pad', got {image_aspect_ratio!r}")
    if dtype is None:
        dtype = torch.bfloat16 if size == "full" else torch.float32
    max_shard_size = parse_size(max_shard_size)
    if max_shard_size is None and size == "full":
        max_shard_size = FULL_SHARD_SIZE

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(lm_type, phi2_ids=(size == "full"))
    text_config, vision_config = tinyllava_configs(tokenizer, lm_type, size, dtype=dtype)
    _write_metadata(
        out, lm_type, tokenizer, text_config, vision_config, image_aspect_ratio, dtype, remote_code=remote_code
    )

    specs = _param_specs(text_config, vision_config)
    _write_weights(out, specs, seed=seed, size=size, dtype=dtype, max_shard_size=max_shard_size)
    return out
