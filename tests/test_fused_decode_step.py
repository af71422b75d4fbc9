"""The fused decode step (fused_decode_step.py) against the step through transformers' own modules."""

import pytest
import torch

from conftest import tiny_model
from matvlm_hf import MaTVLMForConditionalGeneration
from matvlm_hf.fast_generation import SamplingParams, StaticDecoder
from matvlm_hf.fused_decode_step import PhiFusedDecodeStep, packed_rows
from matvlm_hf.mamba2_mixer import MaTVLMMamba2Mixer
from test_decode_kernels import require_triton, run_in_interpreter
from test_fast_generation import left_padded


def cache_tensors(decoder: StaticDecoder) -> list[torch.Tensor]:
    out = []
    for layer in decoder.cache.layers:
        if getattr(layer, "keys", None) is not None:
            out += [layer.keys, layer.values, layer.cumulative_length]
        if hasattr(layer, "recurrent_states"):
            out += [layer.recurrent_states[0], layer.conv_states[0]]
    return out


def random_biases(model) -> None:
    """transformers initialises biases to zero, where a kernel that dropped one would pass: N(0, 0.1) instead."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def check_kernels_step_matches_modules(mamba_layers, dtype, device, tol: float) -> None:
    """A tiny `dtype` model with random biases on `device`: after 6 decode steps on a left-padded batch with images,
    the fused step gives the same tokens as the step through transformers' modules (their Mamba mixers on the
    reference path), and caches within `tol`."""
    model = tiny_model("phi", mamba_layers, dtype=dtype)
    random_biases(model)
    model = model.to(device)
    ids, mask = (t.to(device) for t in left_padded(model.config, (3, 9, 6)))
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    fused, modules = (StaticDecoder(model, 3, 64, SamplingParams()) for _ in range(2))
    modules.fused = None
    assert torch.equal(fused.prefill(ids, mask, pixels), modules.prefill(ids, mask, pixels))
    tokens = fused.decode(6)
    for layer in model.decoder_layers:  # the modules' step runs the Mamba reference (conv step, recurrence, norm)
        if isinstance(layer.self_attn, MaTVLMMamba2Mixer):
            layer.self_attn.use_kernels = False
    assert torch.equal(tokens, modules.decode(6))
    for a, b in zip(cache_tensors(fused), cache_tensors(modules), strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("mamba_layers", [(0, 2, 5), ()])
def test_fused_step_equals_the_transformers_modules_step(mamba_layers):
    """Same tokens and the same cache (keys, values, fill pointers, conv and SSM states) after 12 decode steps on a
    left-padded batch with images, float64: the fused projections change nothing but the number of GEMMs."""
    model = tiny_model("phi", mamba_layers, dtype=torch.float64)
    ids, mask = left_padded(model.config, (3, 9, 6))
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fused, modules = (StaticDecoder(model, 3, 64, SamplingParams()) for _ in range(2))
    assert isinstance(fused.fused, PhiFusedDecodeStep)
    modules.fused = None  # transformers' PhiModel / PhiDecoderLayer / PhiAttention, the mixer's forward
    assert torch.equal(fused.prefill(ids, mask, pixels), modules.prefill(ids, mask, pixels))
    assert torch.equal(fused.decode(12), modules.decode(12))
    for a, b in zip(cache_tensors(fused), cache_tensors(modules), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_packing_moves_weights_without_a_copy_and_saves_them(tmp_path):
    """After a decoder is built, q/k/v (and a Mamba layer's in_proj and fc1) are rows of one buffer: the same
    Parameter objects and values, no second copy, and save_pretrained / from_pretrained round-trip every tensor."""
    model = tiny_model("phi", (0, 2, 5))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    params = dict(model.named_parameters())
    StaticDecoder(model, 1, 32, SamplingParams())
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    attn, mamba = model.decoder_layers[1], model.decoder_layers[0]
    weight, bias = attn._matvlm_fused_front
    q, k, v = attn.self_attn.q_proj, attn.self_attn.k_proj, attn.self_attn.v_proj
    assert q.weight.data_ptr() == weight.data_ptr() and v.weight.data_ptr() == weight[2 * q.out_features].data_ptr()
    assert k.bias.data_ptr() == bias[q.out_features].data_ptr()
    assert (
        mamba.mlp.fc1.weight.data_ptr() == mamba._matvlm_fused_front[0][mamba.self_attn.in_proj.out_features].data_ptr()
    )
    assert "_matvlm_fused_front" not in str(list(model.state_dict()))
    model.save_pretrained(tmp_path)
    reloaded = MaTVLMForConditionalGeneration.from_pretrained(tmp_path)
    for name, p in reloaded.named_parameters():
        assert torch.equal(p, before[name]), name


def test_packing_follows_a_move_and_refuses_mismatched_projections():
    """A dtype change replaces the weights' tensors: the next decoder packs them again (greedy tokens still equal
    generate()'s); projections of different input sizes cannot be one GEMM (ValueError)."""
    model = tiny_model("phi", (0, 2, 5))
    StaticDecoder(model, 1, 32, SamplingParams())
    model.to(torch.float64)
    ids = torch.randint(3, model.config.text_config.vocab_size - 1, (1, 7))
    kw = dict(input_ids=ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(**kw, fast_decode=True), model.generate(**kw))
    layer = model.decoder_layers[1]
    assert layer._matvlm_fused_front[0].dtype == torch.float64
    assert layer.self_attn.q_proj.weight.data_ptr() == layer._matvlm_fused_front[0].data_ptr()
    with pytest.raises(ValueError, match="differ in input size"):
        packed_rows(layer, "_other", [layer.mlp.fc1, layer.mlp.fc2])


def test_fused_step_with_kernels_in_the_interpreter_matches_the_modules():
    """The fused step with its Triton kernels (GEMV with GELU, block end, rotary + cache write + split-KV attention,
    the Mamba mixer's step) run by Triton's interpreter on the CPU, float16 (the interpreter's bf16 dot is wrong):
    after 6 decode steps on a left-padded batch with images, the same tokens as the step through transformers'
    modules and caches within fp16 rounding of theirs; with and without Mamba layers. Checks the step's wiring of the
    kernels (slices, strides, the GELU columns, the splits) where the GPU test below needs a GPU."""
    require_triton()
    script = """
import functools
import torch
from test_fused_decode_step import check_kernels_step_matches_modules
import matvlm_hf.fused_decode_step as step
import matvlm_hf.mamba2_mixer as mixer
for name in ("decode_linear", "block_end", "attention_step"):  # the fused step's kernels only
    setattr(step, name, functools.partial(getattr(step, name), interpret=True))
fused_mamba_steps = []
def interpreted_mamba_step(*args, kernel=mixer.mamba_decode_step, **kwargs):
    out = kernel(*args, **kwargs, interpret=True)
    fused_mamba_steps.append(out is not None)
    return out
mixer.mamba_decode_step = interpreted_mamba_step
for mamba_layers in ((0, 2, 5), ()):
    check_kernels_step_matches_modules(mamba_layers, torch.float16, "cpu", tol=1e-2)
assert fused_mamba_steps and all(fused_mamba_steps), fused_mamba_steps  # the kernel ran, every Mamba step
print("OK")
"""
    run_in_interpreter(script)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine: pytest -m gpu)")
@pytest.mark.parametrize("mamba_layers", [(0, 2, 5), ()])
def test_fused_step_with_kernels_matches_the_modules_on_the_gpu(mamba_layers):
    """bf16 on CUDA, where the fused step runs its Triton kernels (GEMV with GELU, block end, rotary + cache write,
    split-KV attention, the Mamba decode kernels): after 6 decode steps on a left-padded batch with images, the same
    tokens as the step through transformers' modules and caches within bf16 rounding of theirs."""
    check_kernels_step_matches_modules(mamba_layers, torch.bfloat16, "cuda", tol=2e-2)
