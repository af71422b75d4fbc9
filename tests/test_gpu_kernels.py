"""mamba_ssm kernel path against the PyTorch reference path on the GPU (bf16 tolerances). Marked `gpu`."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from conftest import image_prompt, tiny_model
from matvlm_hf import mamba2_ops

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not mamba2_ops.HAS_MAMBA_SSM, reason="mamba_ssm is not installed")]


def ssm_inputs(b=2, l=300, h=8, p=64, g=8, n=64, dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=gen)
    x, B, C = r(b, l, h, p).to(dtype), r(b, l, g, n).to(dtype), r(b, l, g, n).to(dtype)
    dt = F.softplus(r(b, l, h) - 2)
    dt[0, :17] = 0  # left padding of the first sequence
    A = -torch.rand(h, device="cuda") * 4 - 0.5
    D = r(h)
    return x, dt, A, B, C, D


def close(a, b, tol):
    err = (a.float() - b.float()).norm() / b.float().norm()
    assert err < tol, f"relative error {err:.2e} >= {tol}"


@pytest.mark.parametrize("length", [64, 300, 1100])
def test_chunk_scan_kernel_matches_reference(length):
    x, dt, A, B, C, D = ssm_inputs(l=length)
    init = torch.randn(2, 8, 64, 64, device="cuda") * 0.1
    y_k, s_k = mamba2_ops.ssd_scan(x, dt, A, B, C, 256, D=D, initial_state=init, use_kernel=True)
    y_r, s_r = mamba2_ops.ssd_scan_reference(x, dt, A, B, C, 256, D=D, initial_state=init)
    close(y_k, y_r, 1e-2)
    close(s_k, s_r, 1e-2)


@pytest.mark.parametrize("raw_dt", [False, True])
def test_state_update_kernel_matches_reference(raw_dt):
    """Step sizes given, or the raw projection + dt_bias with the softplus inside the kernel (the decode step's
    form) against softplus(dt + dt_bias) in torch, on a bf16 strided dt as sliced from in_proj's output."""
    x, dt, A, B, C, D = ssm_inputs(l=8)
    s_k = torch.randn(2, 8, 64, 64, device="cuda")
    s_r = s_k.clone()
    dt_bias = torch.linspace(-7, 2, dt.shape[-1], device="cuda").bfloat16() if raw_dt else None
    projected = torch.randn(*dt.shape[:2], 3 * dt.shape[-1], device="cuda").bfloat16()
    for t in range(8):
        if raw_dt:
            raw = projected[:, t, dt.shape[-1] : 2 * dt.shape[-1]]
            y_k = mamba2_ops.ssd_step(s_k, x[:, t], raw, A, B[:, t], C[:, t], D, use_kernel=True, dt_bias=dt_bias)
            step = F.softplus(raw.float() + dt_bias.float())
            y_r = mamba2_ops.ssd_step_reference(s_r, x[:, t], step, A, B[:, t], C[:, t], D)
        else:
            y_k = mamba2_ops.ssd_step(s_k, x[:, t], dt[:, t], A, B[:, t], C[:, t], D, use_kernel=True)
            y_r = mamba2_ops.ssd_step_reference(s_r, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        close(y_k, y_r, 1e-2)
    close(s_k, s_r, 1e-3)


def test_gated_norm_kernel_matches_reference():
    gen = torch.Generator(device="cuda").manual_seed(0)
    x, z = (torch.randn(3, 50, 512, device="cuda", generator=gen).bfloat16() for _ in range(2))
    w = torch.rand(512, device="cuda") + 0.5
    close(
        mamba2_ops.rmsnorm_gated(x, z, w, 1e-5, 64, use_kernel=True),
        mamba2_ops.rmsnorm_gated(x, z, w, 1e-5, 64, use_kernel=False),
        1e-2,
    )


@pytest.mark.parametrize("lm_type", ["phi", "llama"])
def test_model_kernel_path_matches_torch_path_prefill_and_decode(lm_type):
    model = tiny_model(lm_type, (0, 2, 5), dtype=torch.bfloat16).cuda()
    ids = image_prompt(model.config, text_len=40).cuda()
    pixels = torch.randn(1, 3, 32, 32, device="cuda", dtype=torch.bfloat16)
    outputs = {}
    for use_kernels in (True, False):
        for layer in model.decoder_layers:
            if hasattr(layer.self_attn, "use_kernels"):
                layer.self_attn.use_kernels = use_kernels
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            steps = [model(input_ids=ids[:, :30], pixel_values=pixels, past_key_values=cache).logits]
            for t in range(30, ids.shape[1]):
                steps.append(model(input_ids=ids[:, t : t + 1], past_key_values=cache).logits)
        outputs[use_kernels] = torch.cat(steps, 1)
    close(outputs[True], outputs[False], 2e-2)


# --- the CUDA-graph decode path (fast_decode) against transformers' generate on the same GPU --------------------


@pytest.mark.parametrize("mamba_layers", [(0, 2, 5), ()])
def test_cuda_graph_greedy_equals_generate_for_80_steps(mamba_layers):
    model = tiny_model("phi", mamba_layers).cuda()
    cfg = model.config
    prompts = [image_prompt(cfg, text_len=n, seed=n)[0] for n in (5, 12)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(
        input_ids=ids.cuda(),
        attention_mask=mask.cuda(),
        pixel_values=pixels.cuda(),
        max_new_tokens=80,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    fast = model.generate(**kw, fast_decode=True)
    assert model.fast_decoders.decoder is not None and model.fast_decoders.decoder.graph is not None
    assert torch.equal(fast, model.generate(**kw))


def test_cuda_graph_sampling_is_seeded_and_valid():
    model = tiny_model("phi", (0, 2, 5)).cuda()
    ids = image_prompt(model.config).cuda()
    pixels = torch.randn(1, 3, 32, 32, device="cuda")
    draws = []
    for _ in range(2):
        torch.manual_seed(7)
        draws.append(
            model.generate(
                input_ids=ids,
                pixel_values=pixels,
                max_new_tokens=40,
                do_sample=True,
                top_k=20,
                top_p=0.9,
                temperature=1.3,
                fast_decode=True,
            )
        )
    assert torch.equal(draws[0], draws[1])
    assert (draws[0] < model.config.text_config.vocab_size).all()


@pytest.mark.parametrize("length", [5, 300, 4100])
def test_blc_conv_kernel_matches_reference(length):
    gen = torch.Generator(device="cuda").manual_seed(0)
    packed = torch.randn(2, length, 12832, device="cuda", generator=gen).bfloat16()  # in_proj's width
    x = packed[:, :, 2560 : 2560 + 7680]  # xBC as a column slice of in_proj's output
    w = torch.randn(7680, 4, device="cuda", generator=gen).bfloat16()
    bias = torch.randn(7680, device="cuda", generator=gen).bfloat16()
    close(
        mamba2_ops.causal_conv1d_blc(x, w, bias, use_kernel=True),
        mamba2_ops.causal_conv1d_blc(x.float(), w.float(), bias.float(), use_kernel=False),
        1e-2,
    )
