"""The hybrid model: exactness of prefill/decode, equality with transformers' LM, padding, generation, errors."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from conftest import image_prompt, tiny_config, tiny_model
from matvlm_hf import MaTVLMConfig, MaTVLMForConditionalGeneration
from matvlm_hf.mamba2_mixer import MaTVLMMamba2Mixer


@pytest.mark.parametrize("lm_type,mamba_layers", [("phi", (0, 2, 5)), ("llama", (0, 3, 5)), ("qwen2", (1, 5))])
def test_prefill_then_decode_equals_full_forward(lm_type, mamba_layers, pixel_values):
    model = tiny_model(lm_type, mamba_layers, dtype=torch.float64)
    ids = image_prompt(model.config, text_len=14)
    n_prefill = 20  # chunk size 8: prefill and full length are not multiples of it
    with torch.no_grad():
        full = model(input_ids=ids, pixel_values=pixel_values.double(), use_cache=False).logits
        cache = DynamicCache(config=model.config)
        logits = [model(input_ids=ids[:, :n_prefill], pixel_values=pixel_values.double(), past_key_values=cache).logits]
        for t in range(n_prefill, ids.shape[1]):
            logits.append(model(input_ids=ids[:, t : t + 1], past_key_values=cache).logits)
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-9, atol=1e-9)


def test_multi_token_continuation_uses_the_cached_state():
    model = tiny_model("phi", (0, 2, 5), dtype=torch.float64)
    ids = torch.randint(0, 300, (1, 27), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        a = model(input_ids=ids[:, :11], past_key_values=cache).logits
        b = model(input_ids=ids[:, 11:], past_key_values=cache).logits
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("lm_type", ["phi", "llama", "qwen2"])
def test_teacher_language_model_equals_transformers(lm_type):
    model = tiny_model(lm_type, mamba_layers=())
    text_config = copy.deepcopy(model.config.text_config)
    text_config.layer_types = ["full_attention"] * text_config.num_hidden_layers
    reference = AutoModelForCausalLM.from_config(text_config).eval()
    reference.load_state_dict(
        {
            **{f"model.{k}": v for k, v in model.language_model.state_dict().items()},
            **{f"lm_head.{k}": v for k, v in model.lm_head.state_dict().items()},
        }
    )
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        theirs = reference(input_ids=ids).logits
    assert torch.equal(ours, theirs)


def test_mamba_layers_replace_only_attention():
    model = tiny_model("phi", (0, 2, 5))
    for i, layer in enumerate(model.decoder_layers):
        assert isinstance(layer.self_attn, MaTVLMMamba2Mixer) == (i in (0, 2, 5))
        assert hasattr(layer, "mlp") and hasattr(layer, "input_layernorm")
    assert model.config.text_config.layer_types == [
        "linear_attention",
        "full_attention",
        "linear_attention",
        "full_attention",
        "full_attention",
        "linear_attention",
    ]


@pytest.mark.parametrize("lm_type", ["phi", "llama"])
def test_left_padded_batch_generates_what_each_prompt_generates_alone(lm_type):
    model = tiny_model(lm_type, (0, 2, 5))
    cfg = model.config
    prompts = [image_prompt(cfg, text_len=n, seed=n)[0] for n in (4, 11, 7)]
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    width = max(len(p) for p in prompts)
    pad_id = 0
    batch = torch.full((3, width), pad_id)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=pad_id, eos_token_id=None)
    together = model.generate(input_ids=batch, attention_mask=mask, pixel_values=pixels, **kwargs)[:, width:]
    for i, p in enumerate(prompts):
        alone = model.generate(input_ids=p[None], pixel_values=pixels[i : i + 1], **kwargs)[:, len(p) :]
        assert torch.equal(together[i], alone[0]), f"prompt {i}"


def test_pad_positions_do_not_change_the_mamba_state():
    model = tiny_model("phi", (0, 2, 5), dtype=torch.float64)
    ids = torch.randint(1, 300, (1, 9), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], 1)
    with torch.no_grad():
        c1, c2 = DynamicCache(config=model.config), DynamicCache(config=model.config)
        model(input_ids=ids, past_key_values=c1)
        model(input_ids=padded, attention_mask=mask, past_key_values=c2)
    for i in model.config.mamba_layers:
        torch.testing.assert_close(c2.layers[i].recurrent_states[0], c1.layers[i].recurrent_states[0])
        torch.testing.assert_close(c2.layers[i].conv_states[0], c1.layers[i].conv_states[0])


@pytest.mark.parametrize("mode", [dict(do_sample=True, top_k=5), dict(num_beams=3), dict(do_sample=False)])
def test_generate_modes_with_image(mode, pixel_values):
    model = tiny_model("phi", (0, 2, 5))
    ids = image_prompt(model.config)
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=6, min_new_tokens=6, **mode)
    assert out.shape == (1, ids.shape[1] + 6)


def test_beam_search_with_one_beam_equals_greedy(pixel_values):
    model = tiny_model("phi", (0, 2, 5))
    ids = image_prompt(model.config)
    greedy = model.generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=8, do_sample=False)
    # beam search reorders the cache (reorder_cache on conv/SSM states): 4 beams with length_penalty 0 must
    # contain the greedy continuation's score or better; check the cache reordering path runs and is consistent
    beams = model.generate(
        input_ids=ids,
        pixel_values=pixel_values,
        max_new_tokens=8,
        num_beams=4,
        num_return_sequences=4,
        output_scores=True,
        return_dict_in_generate=True,
        length_penalty=0,
    )
    with torch.no_grad():

        def logprob(seq):
            logits = model(input_ids=seq[None], pixel_values=pixel_values, use_cache=False).logits[
                0, ids.shape[1] - 1 : -1
            ]
            new = seq[ids.shape[1] :]
            eos = (new == model.generation_config.eos_token_id).nonzero()
            n = int(eos[0]) + 1 if len(eos) else len(new)  # a finished beam is scored up to its EOS
            return logits[:n].log_softmax(-1).gather(-1, new[:n, None]).sum()

        best = beams.sequences[0]
        torch.testing.assert_close(logprob(best), beams.sequences_scores[0].double().float(), rtol=1e-4, atol=1e-4)
        assert logprob(best) >= logprob(greedy[0]) - 1e-5


def test_labels_give_the_causal_lm_loss(pixel_values):
    model = tiny_model("phi", (0, 2, 5))
    ids = image_prompt(model.config)
    labels = ids.clone()
    labels[ids == model.config.image_token_id] = -100
    out = model(input_ids=ids, pixel_values=pixel_values, labels=labels)
    logits = out.logits[0, :-1]
    expected = torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_output_hidden_states(pixel_values):
    model = tiny_model("phi", (0, 2, 5))
    out = model(input_ids=image_prompt(model.config), pixel_values=pixel_values, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.text_config.num_hidden_layers + 1


def test_image_features_follow_tinyllava(pixel_values):
    model = tiny_model("phi", ())
    with torch.no_grad():
        feats = model.get_image_features(pixel_values).pooler_output
        hidden = model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        expected = model.connector[2](torch.nn.functional.gelu(model.connector[0](hidden)))
    assert feats.shape == (1, 15, 64)
    torch.testing.assert_close(feats, expected)


# --- bad input ---------------------------------------------------------------------------------------------------


def test_image_count_mismatch_is_a_clear_error(pixel_values):
    model = tiny_model("phi", (0,))
    ids = image_prompt(model.config, n_images=2)
    with pytest.raises(ValueError, match="1 image.*30 image tokens"):
        model(input_ids=ids, pixel_values=pixel_values)
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=ids)


def test_wrong_pixel_shape_is_a_clear_error():
    model = tiny_model("phi", (0,))
    ids = image_prompt(model.config)
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(num_images, 3, 32, 32\)"):
        model(input_ids=ids, pixel_values=torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        model(input_ids=ids, pixel_values=torch.randn(3, 32, 32))


@pytest.mark.parametrize(
    "layers,match",
    [
        ([6], r"\[6\] out of range.*6 decoder layers"),
        ([-1], "out of range"),
        (list(range(6)), "at least one attention layer"),
    ],
)
def test_bad_mamba_layers_are_clear_errors(layers, match):
    with pytest.raises(ValueError, match=match):
        tiny_config("phi", layers)


def test_unsupported_language_model_is_a_clear_error():
    from transformers import GPT2Config
    from conftest import tiny_vision_config

    with pytest.raises(ValueError, match="Unsupported language model type 'gpt2'"):
        MaTVLMConfig(text_config=GPT2Config(n_layer=2), vision_config=tiny_vision_config())


def test_plain_dynamic_cache_without_config_is_a_clear_error():
    model = tiny_model("phi", (0,))
    with pytest.raises(ValueError, match="build the cache from the model's config"):
        model(input_ids=torch.ones(1, 4, dtype=torch.long), past_key_values=DynamicCache())


def test_attention_backends_agree(pixel_values):
    """transformers' own attention backends run inside the hybrid: eager and sdpa give the same logits."""
    models = {}
    for backend in ("eager", "sdpa"):
        torch.manual_seed(0)
        models[backend] = MaTVLMForConditionalGeneration._from_config(
            tiny_config("phi", (0, 2, 5)), attn_implementation=backend
        ).eval()
        assert models[backend].language_model.config._attn_implementation == backend
    ids = image_prompt(models["eager"].config)
    with torch.no_grad():
        a, b = (m(input_ids=ids, pixel_values=pixel_values).logits for m in models.values())
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
