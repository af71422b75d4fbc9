"""The fabricated TinyLLaVA checkpoints have the published layout and load into the reference."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from matvlm_hf.fabricate import (
    TINY_LM,
    TINY_NUM_KV_HEADS,
    TINY_VISION,
    _lm_config,
    _param_specs,
    _vision_config,
    build_tokenizer,
    parse_size,
    write_tinyllava_checkpoint,
)
from tinyllava_reference import load_tinyllava_reference, read_state_dict, reference_logits

LM_TYPES = ["phi", "llama", "qwen2"]
N_IMG = (TINY_VISION["image_size"] // TINY_VISION["patch_size"]) ** 2 - 1


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {lm: write_tinyllava_checkpoint(root / lm, lm_type=lm) for lm in LM_TYPES}


def _keys_and_shapes(path: Path) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in read_state_dict(path).items()}


@pytest.mark.parametrize("lm_type", LM_TYPES)
def test_reference_loads_strictly_and_runs(checkpoints, lm_type):
    ref = load_tinyllava_reference(checkpoints[lm_type])  # strict per prefix, no tensor left over
    ids = torch.tensor([[3, 4, 5, -200, 6, 7]])
    pixel_values = torch.randn(1, 3, TINY_VISION["image_size"], TINY_VISION["image_size"])
    logits = reference_logits(ref, ids, pixel_values)
    assert logits.shape == (1, 5 + N_IMG, TINY_LM["vocab_size"])
    assert torch.isfinite(logits).all()
    # the image really reaches the logits
    assert not torch.allclose(logits, reference_logits(ref, ids, torch.randn_like(pixel_values)))


def test_published_key_names_phi(checkpoints):
    shapes = _keys_and_shapes(checkpoints["phi"])
    h, vh, v = TINY_LM["hidden_size"], TINY_VISION["hidden_size"], TINY_LM["vocab_size"]
    expected = {
        "language_model.model.embed_tokens.weight": (v, h),
        "language_model.model.layers.0.self_attn.q_proj.weight": (h, h),
        "language_model.model.layers.0.self_attn.q_proj.bias": (h,),
        "language_model.model.layers.3.self_attn.dense.weight": (h, h),
        "language_model.model.layers.3.self_attn.dense.bias": (h,),
        "language_model.model.layers.0.mlp.fc1.weight": (TINY_LM["intermediate_size"], h),
        "language_model.model.layers.0.input_layernorm.weight": (h,),
        "language_model.model.final_layernorm.weight": (h,),
        "language_model.lm_head.weight": (v, h),
        "language_model.lm_head.bias": (v,),
        "vision_tower._vision_tower.vision_model.embeddings.patch_embedding.weight": (vh, 3, 8, 8),
        "vision_tower._vision_tower.vision_model.embeddings.position_embedding.weight": (16, vh),
        "vision_tower._vision_tower.vision_model.encoder.layers.1.self_attn.q_proj.weight": (vh, vh),
        "vision_tower._vision_tower.vision_model.encoder.layers.1.mlp.fc2.bias": (vh,),
        "vision_tower._vision_tower.vision_model.post_layernorm.weight": (vh,),
        "vision_tower._vision_tower.vision_model.head.probe": (1, 1, vh),
        "vision_tower._vision_tower.vision_model.head.attention.in_proj_weight": (3 * vh, vh),
        "connector._connector.0.weight": (h, vh),
        "connector._connector.0.bias": (h,),
        "connector._connector.2.weight": (h, h),
        "connector._connector.2.bias": (h,),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    prefixes = (
        "language_model.model.",
        "language_model.lm_head.",
        "vision_tower._vision_tower.vision_model.",
        "connector._connector.",
    )
    assert all(k.startswith(prefixes) for k in shapes)
    assert not any("position_ids" in k or "inv_freq" in k for k in shapes)  # buffers are not saved
    assert len([k for k in shapes if k.startswith("connector.")]) == 4


@pytest.mark.parametrize("lm_type", ["llama", "qwen2"])
def test_gqa_layout(checkpoints, lm_type):
    cfg = json.loads((checkpoints[lm_type] / "config.json").read_text())["text_config"]
    assert cfg["num_key_value_heads"] == TINY_NUM_KV_HEADS < cfg["num_attention_heads"]
    shapes = _keys_and_shapes(checkpoints[lm_type])
    head_dim = TINY_LM["hidden_size"] // TINY_LM["num_attention_heads"]
    assert shapes["language_model.model.layers.0.self_attn.k_proj.weight"] == (
        TINY_NUM_KV_HEADS * head_dim,
        TINY_LM["hidden_size"],
    )
    assert shapes["language_model.model.layers.0.self_attn.o_proj.weight"] == (TINY_LM["hidden_size"],) * 2
    assert "language_model.model.norm.weight" in shapes
    assert ("language_model.model.layers.0.self_attn.q_proj.bias" in shapes) == (lm_type == "qwen2")


@pytest.mark.parametrize("lm_type", LM_TYPES)
def test_config_fields(checkpoints, lm_type):
    cfg = json.loads((checkpoints[lm_type] / "config.json").read_text())
    assert cfg["model_type"] == "tinyllava"
    assert cfg["architectures"] == ["TinyLlavaForConditionalGeneration"]
    fixed = {
        "connector_type": "mlp2x_gelu",
        "ignore_index": -100,
        "image_token_index": -200,
        "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": 3072,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "patch",
        "image_aspect_ratio": "square",
        "vision_model_name_or_path": "google/siglip-so400m-patch14-384",
    }
    for key, value in fixed.items():
        assert cfg[key] == value, key
    for key in (
        "llm_model_name_or_path",
        "tokenizer_name_or_path",
        "pad_token",
        "pad_token_id",
        "use_cache",
        "tokenizer_use_fast",
        "tune_type_llm",
        "tune_type_vision_tower",
        "tune_type_connector",
    ):
        assert key in cfg, key
    assert cfg["text_config"]["model_type"] == lm_type
    assert cfg["vision_config"]["model_type"] == "siglip_vision_model"
    assert cfg["hidden_size"] == cfg["text_config"]["hidden_size"] == TINY_LM["hidden_size"]
    assert cfg["vocab_size"] == cfg["text_config"]["vocab_size"] == TINY_LM["vocab_size"]
    assert cfg["vision_hidden_size"] == cfg["vision_config"]["hidden_size"] == TINY_VISION["hidden_size"]
    if lm_type == "phi":
        assert cfg["text_config"]["rope_parameters"]["partial_rotary_factor"] == 0.4
        assert cfg["pad_token"] == "<|endoftext|>"
    assert (checkpoints[lm_type] / "generation_config.json").exists()


@pytest.mark.parametrize("lm_type", LM_TYPES)
def test_tokenizer_loads_with_autotokenizer(checkpoints, lm_type):
    from transformers import AutoTokenizer, PretrainedConfig

    # as conversion reads it: never through config.json (its auto_map names remote code)
    tok = AutoTokenizer.from_pretrained(checkpoints[lm_type], config=PretrainedConfig(), trust_remote_code=False)
    cfg = json.loads((checkpoints[lm_type] / "config.json").read_text())
    assert 300 < len(tok) < cfg["vocab_size"]  # unused embedding rows remain, as in Phi-2
    assert tok.pad_token_id == cfg["pad_token_id"]
    text = "USER: What is shown in the image? ASSISTANT: A cat."
    ids = tok(text).input_ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    if lm_type == "llama":
        assert ids[0] == tok.bos_token_id and tok.eos_token == "</s>"
    else:
        assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id not in ids
        assert tok("a<|endoftext|>").input_ids[-1] == tok.eos_token_id  # parsed as one special token
    if lm_type == "phi":
        assert tok.bos_token == tok.eos_token == tok.unk_token == tok.pad_token == "<|endoftext|>"
        assert type(tok).__name__ == "CodeGenTokenizer"
    # as published: phi as TinyLLaVA's slow CodeGenTokenizer saved it (no tokenizer.json)
    published = ("vocab.json", "merges.txt", "added_tokens.json") if lm_type == "phi" else ("tokenizer.json",)
    for name in (*published, "tokenizer_config.json", "special_tokens_map.json"):
        assert (checkpoints[lm_type] / name).exists()
    assert (checkpoints[lm_type] / "tokenizer.json").exists() == (lm_type != "phi")


def test_sharded_index_covers_all_keys(checkpoints, tmp_path):
    single = read_state_dict(checkpoints["phi"])
    out = write_tinyllava_checkpoint(tmp_path / "sharded", lm_type="phi", max_shard_size="100KB")
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert set(weight_map) == set(single)
    files = sorted(set(weight_map.values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    total = 0
    for name in files:
        with safe_open(str(out / name), "pt") as f:
            keys = set(f.keys())
            assert keys == {k for k, v in weight_map.items() if v == name}
            total += sum(f.get_tensor(k).numel() * 4 for k in keys)
    assert index["metadata"]["total_size"] == total
    sharded = read_state_dict(out)  # the same tensors: each is seeded from (seed, key)
    assert all(torch.equal(sharded[k], single[k]) for k in single)
    load_tinyllava_reference(out)


def test_seed_changes_weights(checkpoints, tmp_path):
    key = "connector._connector.0.weight"
    a = read_state_dict(checkpoints["phi"])[key]
    b = read_state_dict(write_tinyllava_checkpoint(tmp_path / "s1", seed=1))[key]
    assert not torch.equal(a, b)


def test_full_size_layout_without_writing():
    """The full (3.1B) key list and shapes, from meta-device modules: nothing is allocated."""
    text_config = _lm_config("phi", "full", {"bos": 50256, "eos": 50256}, torch.bfloat16)
    specs = {k: s for k, s, _ in _param_specs(text_config, _vision_config("full"))}
    n_params = sum(torch.Size(s).numel() for s in specs.values())
    assert 3.1e9 < n_params < 3.3e9
    assert specs["language_model.model.embed_tokens.weight"] == (51200, 2560)
    assert specs["language_model.model.layers.31.self_attn.dense.weight"] == (2560, 2560)
    assert specs["vision_tower._vision_tower.vision_model.encoder.layers.26.mlp.fc1.weight"] == (4304, 1152)
    assert specs["vision_tower._vision_tower.vision_model.embeddings.position_embedding.weight"] == (729, 1152)
    assert specs["connector._connector.0.weight"] == (2560, 1152)
    assert text_config.rope_parameters["partial_rotary_factor"] == 0.4 and text_config.num_key_value_heads == 32


def test_full_size_tokenizer_ids():
    tok = build_tokenizer("phi", phi2_ids=True)
    assert tok.eos_token_id == 50256 and len(tok) == 50295
    assert max(tok("The cat sat on the mat.<|endoftext|>").input_ids) == 50256


def test_bad_arguments(tmp_path):
    with pytest.raises(NotImplementedError, match="only lm_type='phi'"):
        write_tinyllava_checkpoint(tmp_path / "x", lm_type="llama", size="full")
    with pytest.raises(ValueError, match="lm_type"):
        write_tinyllava_checkpoint(tmp_path / "x", lm_type="gpt2")
    assert parse_size("2GB") == 2 * 10**9 and parse_size("100KB") == 10**5 and parse_size(7) == 7
    assert parse_size("1GiB") == 2**30
