"""MaTVLM by transformers' own rules: the cache under either keyword, stateful generation modes, the static-cache path,
resizing, tuple outputs, config flags, the headless base model, image-feature outputs, and generation-time handling of
images (expansion per prompt) and of the image token id (never generated)."""

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoModelForImageTextToText, DynamicCache, StaticCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from conftest import image_prompt, tiny_model
from matvlm_hf import MaTVLMForConditionalGeneration, MaTVLMModel
from matvlm_hf.mamba2_mixer import CACHE_ARG

HYBRID = (0, 2, 5)


def _greedy(model, ids, pixel_values, n, **kw):
    return model.generate(
        input_ids=ids, pixel_values=pixel_values, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw
    )


@pytest.mark.parametrize("mamba_layers", [HYBRID, ()])
def test_cached_greedy_equals_uncached_greedy_over_40_tokens(mamba_layers, pixel_values):
    """Fails when a Mamba layer decodes without its state (the transformers 5.2x `cache=` rename)."""
    model = tiny_model("phi", mamba_layers)
    ids = image_prompt(model.config)
    cached = _greedy(model, ids, pixel_values, 40)
    uncached = _greedy(model, ids, pixel_values, 40, use_cache=False)
    assert torch.equal(cached, uncached)


def test_mixer_takes_the_cache_under_either_keyword():
    model = tiny_model("phi", HYBRID, dtype=torch.float64)
    mixer = model.decoder_layers[0].self_attn
    x = torch.randn(1, 5, 64, dtype=torch.float64)
    outs = []
    for name in ("cache", "past_key_values"):
        cache = DynamicCache(config=model.config)
        outs.append(mixer(x, use_cache=True, **{name: cache})[0])
        assert cache.layers[0].has_previous_state[0]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_mixer_refuses_a_cached_call_without_a_cache():
    model = tiny_model("phi", HYBRID)
    with pytest.raises(ValueError, match="received no cache"):
        model.decoder_layers[0].self_attn(torch.randn(1, 3, 64), use_cache=True)


def test_outputs_carry_the_cache_under_the_installed_name(pixel_values):
    model = tiny_model("phi", HYBRID)
    out = model(input_ids=image_prompt(model.config), pixel_values=pixel_values, use_cache=True)
    assert isinstance(out[CACHE_ARG], DynamicCache)


def test_hybrids_are_stateful_and_refuse_assisted_and_prompt_lookup_decoding(pixel_values):
    hybrid, teacher = tiny_model("phi", HYBRID), tiny_model("phi", ())
    assert hybrid._is_stateful and not teacher._is_stateful
    ids = image_prompt(hybrid.config)
    with pytest.raises(ValueError, match="stateful"):
        hybrid.generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=5, prompt_lookup_num_tokens=3)
    with pytest.raises(ValueError, match="stateful"):
        hybrid.generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=5, assistant_model=teacher)


def test_teacher_assisted_and_prompt_lookup_decoding_equal_greedy():
    teacher = tiny_model("phi", ())
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(4))
    kw = dict(input_ids=ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    greedy = teacher.generate(**kw)
    assert torch.equal(teacher.generate(**kw, prompt_lookup_num_tokens=3), greedy)
    assert torch.equal(teacher.generate(**kw, assistant_model=tiny_model("phi", (), seed=1)), greedy)


@pytest.mark.parametrize("mamba_layers", [HYBRID, ()])
def test_static_cache_generate_equals_dynamic_cache_generate(mamba_layers, pixel_values):
    model = tiny_model("phi", mamba_layers)
    ids = image_prompt(model.config)
    dynamic = _greedy(model, ids, pixel_values, 24)
    assert torch.equal(_greedy(model, ids, pixel_values, 24, cache_implementation="static"), dynamic)
    given = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 24)
    assert torch.equal(_greedy(model, ids, pixel_values, 24, **{CACHE_ARG: given}), dynamic)


def test_static_cache_generate_on_a_left_padded_batch_equals_each_prompt_alone():
    model = tiny_model("llama", HYBRID)
    prompts = [torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 11)]
    ids = torch.stack([torch.cat([torch.zeros(11 - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(11 - len(p)), torch.ones(len(p))]).long() for p in prompts])
    batch = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=12,
        min_new_tokens=12,
        do_sample=False,
        cache_implementation="static",
    )
    for row, p in enumerate(prompts):
        alone = model.generate(input_ids=p[None], max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert torch.equal(batch[row, 11:], alone[0, len(p) :])


def test_resize_token_embeddings_resizes_input_and_output(pixel_values):
    model = tiny_model("phi", HYBRID)
    old = model.lm_head.weight.detach().clone()
    model.resize_token_embeddings(336)
    assert model.get_input_embeddings().weight.shape[0] == 336
    assert model.lm_head.weight.shape[0] == 336 and model.lm_head.bias.shape[0] == 336
    assert torch.equal(model.lm_head.weight[:320], old)
    out = model(input_ids=image_prompt(model.config), pixel_values=pixel_values)
    assert out.logits.shape[-1] == 336


def test_return_dict_false_gives_the_tuple(pixel_values):
    model = tiny_model("phi", HYBRID)
    ids = image_prompt(model.config)
    out = model(
        input_ids=ids,
        pixel_values=pixel_values,
        labels=ids.masked_fill(ids == model.config.image_token_id, -100),
        return_dict=True,
    )
    tup = model(
        input_ids=ids,
        pixel_values=pixel_values,
        labels=ids.masked_fill(ids == model.config.image_token_id, -100),
        return_dict=False,
    )
    assert isinstance(tup, tuple)
    torch.testing.assert_close(tup[0], out.loss)
    torch.testing.assert_close(tup[1], out.logits)
    base = model.model(input_ids=ids, pixel_values=pixel_values, return_dict=False)
    torch.testing.assert_close(base[0], out.hidden_states[-1] if out.hidden_states else base[0])


def test_text_config_flags_reach_the_language_model(pixel_values):
    model = tiny_model("phi", HYBRID)
    assert model.language_model.config is model.config.text_config
    model.config.text_config.output_hidden_states = True
    out = model(input_ids=image_prompt(model.config), pixel_values=pixel_values)
    assert out.hidden_states is not None and len(out.hidden_states) == model.config.text_config.num_hidden_layers + 1


def test_headless_base_model_and_checkpoint_layout(tmp_path, pixel_values):
    model = tiny_model("phi", HYBRID)
    assert MaTVLMForConditionalGeneration.base_model_prefix == "model" and model.base_model is model.model
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:  # the on-disk layout is TinyLLaVA's, unchanged
        keys = set(f.keys())
    assert "language_model.model.embed_tokens.weight" in keys and "language_model.lm_head.weight" in keys
    assert "connector.0.weight" in keys and any(k.startswith("vision_tower.") for k in keys)
    assert not any(k.startswith("model.") for k in keys)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_matvlm.MaTVLMModel"
    assert auto_map["AutoModelForImageTextToText"] == "modeling_matvlm.MaTVLMForConditionalGeneration"

    base = AutoModel.from_pretrained(tmp_path).eval()
    full = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(base) is MaTVLMModel and type(full) is MaTVLMForConditionalGeneration
    ids = image_prompt(model.config)
    with torch.no_grad():
        hidden = base(input_ids=ids, pixel_values=pixel_values).last_hidden_state
        logits = full(input_ids=ids, pixel_values=pixel_values).logits
        reference = model(input_ids=ids, pixel_values=pixel_values).logits
    assert torch.equal(logits, reference)
    assert torch.equal(full.lm_head(hidden), reference)


def test_get_image_features_returns_the_pooling_output(pixel_values):
    model = tiny_model("phi", HYBRID)
    out = model.get_image_features(pixel_values, output_hidden_states=True)
    assert isinstance(out, BaseModelOutputWithPooling)
    assert out.pooler_output.shape == (1, model.config.num_image_tokens, 64)
    assert len(out.hidden_states) == model.config.vision_config.num_hidden_layers + 1
    assert model.get_image_features(pixel_values).hidden_states is None
    as_tuple = model.get_image_features(pixel_values, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[1], out.pooler_output)


# --- images stay with their prompt; the image token id is never generated -----------------------------------------


def _two_image_prompt(model):
    return image_prompt(model.config, n_images=2, seed=3)


@pytest.mark.parametrize(
    "mode",
    [dict(num_return_sequences=2, do_sample=True, top_k=1), dict(num_beams=3, num_return_sequences=3, do_sample=False)],
)
def test_several_sequences_per_two_image_prompt_keep_their_images(mode):
    model = tiny_model("phi", HYBRID)
    ids = _two_image_prompt(model)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=10, min_new_tokens=10, **mode)
    with torch.no_grad():
        embeds = model.embed_inputs(ids, pixels)  # the images scattered once, no expansion involved
    reference = model.generate(inputs_embeds=embeds, max_new_tokens=10, min_new_tokens=10, **mode)
    assert torch.equal(out[:, ids.shape[1] :], reference)
    if "num_beams" not in mode:  # greedy copies: each equals the one-by-one answer
        alone = _greedy(model, ids, pixels, 10)
        assert all(torch.equal(row, alone[0]) for row in out)


def test_batch_of_prompts_with_different_image_counts_expands_per_prompt():
    model = tiny_model("phi", HYBRID)
    one, two = image_prompt(model.config, n_images=1, seed=1), image_prompt(model.config, n_images=2, seed=2)
    width = max(one.shape[1], two.shape[1])
    pad = lambda t: torch.cat([torch.zeros(1, width - t.shape[1], dtype=torch.long), t], 1)  # noqa: E731
    ids = torch.cat([pad(one), pad(two)])
    mask = torch.cat([pad(torch.ones_like(one)), pad(torch.ones_like(two))])
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=pixels,
        max_new_tokens=8,
        min_new_tokens=8,
        num_return_sequences=2,
        do_sample=True,
        top_k=1,
    )
    first = _greedy(model, one, pixels[:1], 8)[0, one.shape[1] :]
    second = _greedy(model, two, pixels[1:], 8)[0, two.shape[1] :]
    for row, expected in zip(out[:, width:], (first, first, second, second)):
        assert torch.equal(row, expected)


def _image_id_lover():
    """A model whose LM head prefers the image token id everywhere (an undertrained row is enough in practice)."""
    model = tiny_model("phi", HYBRID)
    with torch.no_grad():
        model.lm_head.bias[model.config.image_token_id] = 50.0
    return model


def test_generate_never_emits_the_image_token_id_and_cache_paths_agree(pixel_values):
    model = _image_id_lover()
    ids = image_prompt(model.config)
    cached = _greedy(model, ids, pixel_values, 12)
    uncached = _greedy(model, ids, pixel_values, 12, use_cache=False)
    assert torch.equal(cached, uncached)
    assert not (cached[:, ids.shape[1] :] == model.config.image_token_id).any()
    fast = model.generate(
        input_ids=ids,
        pixel_values=pixel_values,
        max_new_tokens=12,
        do_sample=False,
        fast_decode=True,
        eos_token_id=None,
    )
    assert not (fast[:, ids.shape[1] :] == model.config.image_token_id).any()


def test_prompt_plus_answer_can_be_rescored(pixel_values):
    model = _image_id_lover()
    ids = image_prompt(model.config)
    seq = _greedy(model, ids, pixel_values, 8)
    labels = seq.clone()
    labels[:, : ids.shape[1]] = -100
    out = model(input_ids=seq, pixel_values=pixel_values, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_a_prompt_past_the_position_limit_is_refused():
    model = tiny_model("phi", HYBRID)
    ids = torch.randint(0, 300, (1, model.config.text_config.max_position_embeddings + 1))
    with pytest.raises(ValueError, match="position limit"):
        model.generate(input_ids=ids, max_new_tokens=2)


def test_a_config_that_does_not_match_the_weights_is_refused(tmp_path):
    model = tiny_model("phi", HYBRID)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["mamba_layers"] = [1, 3]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"weights hold Mamba mixers at layers \[0, 2, 5\].*missing tensors"):
        AutoModelForImageTextToText.from_pretrained(tmp_path)


def test_batched_generation_with_the_processor_equals_each_prompt_alone(tmp_path):
    from matvlm_hf import MaTVLMProcessor
    from matvlm_hf.fabricate import build_tokenizer
    from matvlm_hf.processing_matvlm import siglip_image_processor
    from PIL import Image

    model = tiny_model("phi", HYBRID)
    processor = MaTVLMProcessor(
        siglip_image_processor(32),
        build_tokenizer("phi", vocab_size=290),  # ids < 320
        image_token_id=model.config.image_token_id,
        num_image_tokens=model.config.num_image_tokens,
    )
    processor.save_pretrained(tmp_path)
    processor = MaTVLMProcessor.from_pretrained(tmp_path)  # the saved processor pads for generation
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True
        )
        for q in ("What colour is the large shape in the top left corner?", "Why?")
    ]
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    batch = processor(images=images, text=prompts, padding=True)
    out = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    for i, (prompt, image) in enumerate(zip(prompts, images)):
        alone = processor(images=[image], text=prompt)
        expected = model.generate(**alone, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert torch.equal(out[i, -6:], expected[0, -6:])


def test_outputs_carry_the_vision_towers_output(pixel_values):
    """transformers' VLM outputs (5.2x) carry `image_outputs`; output_attentions reaches the vision tower too."""
    model = tiny_model("phi", HYBRID)
    model.set_attn_implementation("eager")  # SDPA returns no attention weights
    ids = image_prompt(model.config)
    out = model(input_ids=ids, pixel_values=pixel_values, output_attentions=True)
    features = model.get_image_features(pixel_values).pooler_output
    torch.testing.assert_close(out.image_outputs.pooler_output, features)
    torch.testing.assert_close(out.image_hidden_states, features)
    assert len(out.image_outputs.attentions) == model.config.vision_config.num_hidden_layers


def test_image_features_follow_the_towers_output_hidden_states_flag(pixel_values):
    model = tiny_model("phi", HYBRID)
    assert model.get_image_features(pixel_values).hidden_states is None
    model.config.vision_config.output_hidden_states = True
    hidden = model.get_image_features(pixel_values).hidden_states
    assert len(hidden) == model.config.vision_config.num_hidden_layers + 1


def test_the_old_cache_name_warns_only_where_transformers_renamed_it(pixel_values):
    """From 5.2x transformers' models take the cache as `cache` and warn for `past_key_values`; before, no warning."""
    model = tiny_model("phi", HYBRID)
    ids = image_prompt(model.config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = model(input_ids=ids, pixel_values=pixel_values, past_key_values=DynamicCache(config=model.config))
    warned = any("`past_key_values` is deprecated" in str(w.message) for w in caught)
    assert warned == (CACHE_ARG == "cache")
    new = model(input_ids=ids, pixel_values=pixel_values, **{CACHE_ARG: DynamicCache(config=model.config)})
    torch.testing.assert_close(old.logits, new.logits)


def test_tied_head_is_sharded_with_the_embedding():
    """A tied head is the embedding's parameter: the tensor-parallel plan shards both (Llava's `lm_head` entry)."""
    model = tiny_model("phi", HYBRID)
    assert model.tp_plan.get("lm_head") == "colwise_gather_output"


def test_load_state_dict_takes_the_checkpoint_layout(tmp_path):
    """Trainer's resume_from_checkpoint loads a checkpoint file's keys with load_state_dict(strict=False): the on-disk
    layout must land in the model, not be dropped."""
    from safetensors.torch import load_file

    model = tiny_model("phi", HYBRID, seed=0)
    model.save_pretrained(tmp_path)
    on_disk = load_file(str(tmp_path / "model.safetensors"))
    other = tiny_model("phi", HYBRID, seed=1)
    result = other.load_state_dict(on_disk, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    base = MaTVLMModel(model.config)
    result = base.load_state_dict({k: v for k, v in on_disk.items() if not k.startswith("language_model.lm_head")})
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(base.language_model.embed_tokens.weight, model.language_model.embed_tokens.weight)
