"""The static-cache decode path (`generate(fast_decode=True)`) against transformers' generate()."""

import pytest
import torch

from conftest import image_prompt, tiny_model
from matvlm_hf.fast_generation import SamplingParams, choose_tokens


def left_padded(cfg, lengths, seed=0):
    prompts = [image_prompt(cfg, text_len=n, seed=seed + n)[0] for n in lengths]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    return ids, mask


@pytest.mark.parametrize("mamba_layers", [(0, 2, 5), ()])
def test_fast_greedy_equals_generate_on_a_left_padded_batch(mamba_layers):
    model = tiny_model("phi", mamba_layers)
    ids, mask = left_padded(model.config, (3, 9, 6))
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=pixels,
        max_new_tokens=70,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    assert torch.equal(model.generate(**kw, fast_decode=True), model.generate(**kw))


def test_generation_config_switch_and_cache_reuse(pixel_values):
    model = tiny_model("llama", (0, 3))
    ids = image_prompt(model.config)
    expected = model.generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=20, do_sample=False)
    model.generation_config.fast_decode = True
    for _ in range(2):  # the second call reuses the static decoder (same bucket)
        out = model.generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=20, do_sample=False)
        assert torch.equal(out, expected)
    assert model.fast_decoders.decoder is not None


def test_eos_stops_and_pads_like_generate(pixel_values):
    model = tiny_model("phi", (0, 2, 5))
    ids = image_prompt(model.config)
    free = model.generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=30, do_sample=False)
    eos = int(free[0, ids.shape[1] + 4])  # a token the model emits at step 5
    kw = dict(
        input_ids=ids, pixel_values=pixel_values, max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=0
    )
    assert torch.equal(model.generate(**kw, fast_decode=True), model.generate(**kw))


def test_sampling_top_k_one_is_greedy_and_sampling_is_seeded(pixel_values):
    model = tiny_model("phi", (0, 2, 5))
    ids = image_prompt(model.config)
    greedy = model.generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=12, do_sample=False)
    top1 = model.generate(
        input_ids=ids, pixel_values=pixel_values, max_new_tokens=12, do_sample=True, top_k=1, fast_decode=True
    )
    assert torch.equal(top1, greedy)
    draws = []
    for _ in range(2):
        torch.manual_seed(3)
        draws.append(
            model.generate(
                input_ids=ids,
                pixel_values=pixel_values,
                max_new_tokens=12,
                do_sample=True,
                temperature=1.5,
                top_p=0.9,
                fast_decode=True,
            )
        )
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], greedy)


def test_choose_tokens_top_p_keeps_the_smallest_prefix():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {int(choose_tokens(logits, SamplingParams(True, 1.0, None, 0.7))) for _ in range(200)}
    assert seen == {0, 1}


def test_unsupported_options_are_clear_errors(pixel_values):
    model = tiny_model("phi", (0,))
    ids = image_prompt(model.config)
    with pytest.raises(ValueError, match="greedy and sampling only.*num_beams"):
        model.generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=4, num_beams=2, fast_decode=True)


@pytest.mark.parametrize("chunk", [5, 16])
def test_chunked_prefill_equals_whole_prefill(chunk):
    from matvlm_hf.fast_generation import StaticDecoder

    model = tiny_model("phi", (0, 2, 5), dtype=torch.float64)
    ids, mask = left_padded(model.config, (3, 14))  # the image block spans chunk boundaries
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    whole, chunked = (StaticDecoder(model, 2, 64, SamplingParams()) for _ in range(2))
    first = whole.prefill(ids, mask, pixels)
    assert torch.equal(chunked.prefill(ids, mask, pixels, chunk_size=chunk), first)
    for a, b in zip(whole.cache.layers, chunked.cache.layers):
        for name in ("keys", "values"):
            if getattr(a, name, None) is not None:
                torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-9, atol=1e-9)
        if hasattr(a, "recurrent_states"):
            torch.testing.assert_close(b.recurrent_states[0], a.recurrent_states[0], rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(b.conv_states[0], a.conv_states[0], rtol=1e-9, atol=1e-9)
    assert torch.equal(whole.decode(10), chunked.decode(10))


def test_generate_fast_decode_with_small_prefill_chunks(pixel_values):
    model = tiny_model("phi", (0, 2, 5))
    ids = image_prompt(model.config)
    kw = dict(input_ids=ids, pixel_values=pixel_values, max_new_tokens=20, do_sample=False)
    assert torch.equal(model.generate(**kw, fast_decode=True, prefill_chunk_size=7), model.generate(**kw))


def test_prefill_chunk_length_splits_a_token_budget_over_the_batch():
    from matvlm_hf.fast_generation import PREFILL_TOKEN_BUDGET, prefill_chunk_length

    assert prefill_chunk_length(1) == PREFILL_TOKEN_BUDGET
    assert prefill_chunk_length(16, 8192) == 512  # batch 16 x 8K context: 16 chunks of 8192 tokens in all
    assert prefill_chunk_length(3, 8192) == 2688  # 2730 rounded down to a multiple of 64
    assert prefill_chunk_length(3, 100) == 33 and prefill_chunk_length(500, 100) == 1
    assert prefill_chunk_length(16, 8192, per_sequence=7) == 7  # generation config prefill_chunk_size wins


def test_generate_fast_decode_with_a_small_prefill_token_budget():
    model = tiny_model("phi", (0, 2, 5))
    ids, mask = left_padded(model.config, (3, 14))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=12, do_sample=False)
    expected = model.generate(**kw)
    # 10 tokens per chunk in all: 5 per sequence, so the image block and the padding span chunk boundaries
    assert torch.equal(model.generate(**kw, fast_decode=True, prefill_token_budget=10), expected)
    model.fast_decoders.clear()
    assert model.fast_decoders.decoder is None
