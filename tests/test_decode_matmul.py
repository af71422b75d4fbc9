"""decode_matmul.py's kernels against a float64 computation of the same formula and against their PyTorch references
(F.linear, the modules): in Triton's interpreter on the CPU (float16: the interpreter's bf16 dot is wrong), compiled
on the GPU (`gpu` marker, bf16 at TinyLLaVA's sizes)."""

import pytest
import torch
import torch.nn.functional as F
from test_decode_kernels import require_triton, run_in_interpreter
from torch import nn

from matvlm_hf import decode_matmul
from matvlm_hf.decode_matmul import block_end, decode_linear


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def linear_inputs(rows, n, k, dtype, device="cpu"):
    """x as a column slice of a wider projection (strided rows, as the fused step slices them), W, b."""
    gen = torch.Generator(device=device).manual_seed(rows)
    wide = torch.randn(rows, 1, k + 48, generator=gen, device=device).to(dtype)
    w = (torch.randn(n, k, generator=gen, device=device) / k**0.5).to(dtype)
    b = torch.randn(n, generator=gen, device=device).to(dtype)
    return wide[..., 16 : 16 + k], w, b


def block_inputs(rows, d, k1, k2, dtype, device="cpu"):
    """mixed, activated (a strided slice, GELU's output), residual (offset and scaled: LayerNorm must remove both),
    out_proj, fc2, norm."""
    gen = torch.Generator(device=device).manual_seed(rows)
    mixed = torch.randn(rows, 1, k1, generator=gen, device=device).to(dtype)
    activated = gelu(torch.randn(rows, 1, k2 + 32, generator=gen, device=device).to(dtype))[..., 32:]
    residual = (4 * torch.randn(rows, 1, d, generator=gen, device=device) + 3).to(dtype)
    out_proj, fc2 = nn.Linear(k1, d, device=device, dtype=dtype), nn.Linear(k2, d, device=device, dtype=dtype)
    norm = nn.LayerNorm(d, device=device, dtype=dtype)
    with torch.no_grad():
        for p in (*out_proj.parameters(), *fc2.parameters(), norm.bias):
            p.copy_(torch.randn(p.shape, generator=gen, device=device) / p.shape[-1] ** 0.5)
        norm.weight.copy_(torch.randn(d, generator=gen, device=device))
    return mixed, activated, residual, out_proj, fc2, norm


def exact_block_end(mixed, activated, residual, out_proj, fc2, norm):
    """The block's end in float64 from the same rounded inputs."""
    f = torch.float64
    hidden = F.linear(mixed.to(f), out_proj.weight.to(f), out_proj.bias.to(f))
    hidden = hidden + F.linear(activated.to(f), fc2.weight.to(f), fc2.bias.to(f)) + residual.to(f)
    return hidden, F.layer_norm(hidden, (hidden.shape[-1],), norm.weight.to(f), norm.bias.to(f), norm.eps)


def test_paths_outside_the_kernels():
    """Where the kernels do not apply (CPU without the interpreter, a gradient needed, more than MAX_ROWS rows) the
    functions are exactly the reference modules."""
    x, w, b = linear_inputs(3, 24, 40, torch.float32)
    torch.testing.assert_close(decode_linear(x, w, b), F.linear(x, w, b), rtol=0, atol=0)
    ref = F.linear(x, w, b)
    ref = torch.cat([ref[..., :10], gelu(ref[..., 10:])], -1)
    torch.testing.assert_close(decode_linear(x, w, b, gelu_from=10), ref, rtol=0, atol=0)
    mixed, act, residual, out_proj, fc2, norm = block_inputs(decode_matmul.MAX_ROWS + 1, 24, 16, 40, torch.float32)
    with torch.no_grad():
        hidden, normed = block_end(mixed, act, residual, out_proj, fc2, norm, interpret=True)
        ref = out_proj(mixed) + fc2(act) + residual
    torch.testing.assert_close(hidden, ref, rtol=0, atol=0)
    torch.testing.assert_close(normed, norm(ref), rtol=0, atol=0)


def test_decode_matmul_kernels_in_the_interpreter():
    """decode_linear (rows 1 and 3, strided rows, with and without bias and GELU columns; N and K not multiples of the
    tiles) and block_end (K split in 1 + 3 splits) in float16, against float64 within the output's rounding, and no
    further from it than the reference modules (plus one rounding step)."""
    require_triton()
    script = """
import torch
from test_decode_matmul import block_inputs, exact_block_end, gelu, linear_inputs
from matvlm_hf import decode_matmul
from matvlm_hf.decode_matmul import block_end, decode_linear
decode_matmul.SPLIT_K_LENGTH = 40
dt = torch.float16
small = dict(block_n=16, block_k=16)
with torch.no_grad():
    for rows in (1, 3):
        x, w, b = linear_inputs(rows, 90, 200, dt)
        for bias, gelu_from in ((b, None), (None, None), (b, 37)):
            out = decode_linear(x, w, bias, gelu_from=gelu_from, interpret=True, tiles=dict(block_n=16, block_k=32))
            exact = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
            if gelu_from is not None:  # GELU of the rounded projection, as torch's modules
                exact[..., gelu_from:] = gelu(exact[..., gelu_from:].to(dt).double())
            assert out.shape == (rows, 1, 90) and out.dtype == dt
            assert (out.double() - exact).abs().max() <= 2e-3 * exact.abs().max(), (out.double() - exact).abs().max()
        mixed, act, residual, out_proj, fc2, norm = block_inputs(rows, 48, 40, 120, dt)
        exact_hidden, exact_normed = exact_block_end(mixed, act, residual, out_proj, fc2, norm)
        ref_hidden, ref_normed = block_end(mixed, act, residual, out_proj, fc2, norm)
        hidden, normed = block_end(mixed, act, residual, out_proj, fc2, norm, interpret=True, tiles=small)
        for got, ref, exact in ((hidden, ref_hidden, exact_hidden), (normed, ref_normed, exact_normed)):
            step = exact.abs().max() * 2**-10
            assert (got.double() - exact).abs().max() <= (ref.double() - exact).abs().max() + step
            torch.testing.assert_close(got, ref, rtol=0, atol=2 * step.item())
print("OK")
"""
    run_in_interpreter(script)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine: pytest -m gpu)")
@pytest.mark.parametrize("rows", [1, 16, 40])
def test_decode_matmul_kernels_on_the_gpu(rows):
    """bf16 at TinyLLaVA's decode shapes ([q|k|v|fc1] 17 920 x 2 560; out-projection 2 560 + fc2 10 240 -> 2 560)
    with the default tiles: decode_linear (GELU on the fc1 columns) within one rounding step of cuBLAS + F.gelu;
    block_end no further from float64 than
    the modules (plus one rounding step) and within two steps of them."""
    dt = torch.bfloat16
    with torch.no_grad():
        x, w, b = linear_inputs(rows, 17920, 2560, dt, device="cuda")
        out = decode_linear(x, w, b, gelu_from=7680)  # [q | k | v | fc1]: GELU on fc1's columns
        ref = F.linear(x, w, b)
        ref[..., 7680:] = gelu(ref[..., 7680:])
        exact = F.linear(x.double(), w.double(), b.double())
        exact[..., 7680:] = gelu(exact[..., 7680:].to(dt).double())
        step = exact.abs().max().item() * 2**-7
        assert (out.double() - exact).abs().max() <= (ref.double() - exact).abs().max() + step
        torch.testing.assert_close(out, ref, rtol=0, atol=step)
        mixed, act, residual, out_proj, fc2, norm = block_inputs(rows, 2560, 2560, 10240, dt, device="cuda")
        hidden, normed = block_end(mixed, act, residual, out_proj, fc2, norm)
        torch.set_grad_enabled(True)  # the reference path
        ref_hidden, ref_normed = block_end(mixed, act, residual, out_proj, fc2, norm)
    exact_hidden, exact_normed = exact_block_end(mixed, act, residual, out_proj, fc2, norm)
    for got, ref, exact in ((hidden, ref_hidden, exact_hidden), (normed, ref_normed, exact_normed)):
        step = exact.abs().max().item() * 2**-7
        assert (got.double() - exact).abs().max() <= (ref.detach().double() - exact).abs().max() + step
        torch.testing.assert_close(got, ref.detach(), rtol=0, atol=2 * step)
