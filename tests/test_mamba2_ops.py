"""The chunked SSD scan and the one-step paths against a naive step-by-step recurrence (float64)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from test_decode_kernels import require_triton

from matvlm_hf.mamba2_ops import (
    causal_conv1d,
    causal_conv1d_step,
    rmsnorm_gated,
    ssd_scan_reference,
    ssd_step_reference,
)


def naive_ssm(x, dt, A, B, C, D, state=None):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T;  y_t = h_t C_t + D x_t, one head and one step at a time."""
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    state = torch.zeros(b, h, p, n, dtype=x.dtype) if state is None else state.clone()
    ys = torch.zeros_like(x)
    for t in range(l):
        for head in range(h):
            grp = head // (h // g)
            decay = torch.exp(dt[:, t, head] * A[head])[:, None, None]
            state[:, head] = (
                decay * state[:, head] + dt[:, t, head, None, None] * x[:, t, head, :, None] * B[:, t, grp, None, :]
            )
            ys[:, t, head] = torch.einsum("bpn,bn->bp", state[:, head], C[:, t, grp]) + D[head] * x[:, t, head]
    return ys, state


def random_ssm(b=2, l=19, h=4, p=3, g=2, n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    x, B, C = r(b, l, h, p), r(b, l, g, n), r(b, l, g, n)
    dt = F.softplus(r(b, l, h))
    A = -torch.rand(h, generator=gen, dtype=torch.float64) * 2 - 0.1
    D = r(h)
    return x, dt, A, B, C, D


@pytest.mark.parametrize("length,chunk", [(19, 4), (19, 8), (17, 32), (1, 4), (24, 8), (33, 16)])
def test_chunked_scan_equals_recurrence(length, chunk):
    x, dt, A, B, C, D = random_ssm(l=length)
    init = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    y, final = ssd_scan_reference(x, dt, A, B, C, chunk, D=D, initial_state=init)
    y_ref, final_ref = naive_ssm(x, dt, A, B, C, D, init)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)


def test_scan_split_in_two_equals_whole():
    x, dt, A, B, C, D = random_ssm(l=21)
    y, final = ssd_scan_reference(x, dt, A, B, C, 8, D=D)
    y1, s1 = ssd_scan_reference(x[:, :9], dt[:, :9], A, B[:, :9], C[:, :9], 8, D=D)
    y2, s2 = ssd_scan_reference(x[:, 9:], dt[:, 9:], A, B[:, 9:], C[:, 9:], 8, D=D, initial_state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, final, rtol=1e-10, atol=1e-10)


def test_zero_dt_steps_leave_the_state_unchanged():
    x, dt, A, B, C, D = random_ssm(l=12)
    dt[:, :5] = 0  # left padding
    _, final = ssd_scan_reference(x, dt, A, B, C, 4, D=D)
    _, final_unpadded = ssd_scan_reference(x[:, 5:], dt[:, 5:], A, B[:, 5:], C[:, 5:], 4, D=D)
    torch.testing.assert_close(final, final_unpadded, rtol=1e-10, atol=1e-10)


def test_step_equals_recurrence():
    x, dt, A, B, C, D = random_ssm(l=6)
    state = torch.zeros(2, 4, 3, 5, dtype=torch.float64)
    ys = torch.stack([ssd_step_reference(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D) for t in range(6)], 1)
    y_ref, final_ref = naive_ssm(x, dt, A, B, C, D)
    torch.testing.assert_close(ys, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, final_ref, rtol=1e-10, atol=1e-10)


def test_conv_step_equals_sequence_conv():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 11, generator=gen, dtype=torch.float64)
    w, bias = torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    full = causal_conv1d(x, w, bias)
    manual = torch.stack(
        [
            F.silu(sum(w[:, j] * (x[:, :, t - 3 + j] if t - 3 + j >= 0 else 0) for j in range(4)) + bias)
            for t in range(11)
        ],
        -1,
    )
    torch.testing.assert_close(full, manual)
    state = torch.zeros(2, 6, 4, dtype=torch.float64)
    steps = torch.stack([causal_conv1d_step(x[:, :, t], state, w, bias) for t in range(11)], -1)
    torch.testing.assert_close(steps, full)


def test_rmsnorm_gated_per_group():
    gen = torch.Generator().manual_seed(0)
    x, z, w = (torch.randn(3, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    out = rmsnorm_gated(x, z, w[0], 1e-5, group_size=4)
    gated = x * z * torch.sigmoid(z)
    for grp in range(2):
        part = gated[:, grp * 4 : (grp + 1) * 4]
        expected = part / torch.sqrt(part.pow(2).mean(-1, keepdim=True) + 1e-5) * w[0, grp * 4 : (grp + 1) * 4]
        torch.testing.assert_close(out[:, grp * 4 : (grp + 1) * 4], expected)


def test_blc_conv_reference_matches_channel_first_conv():
    from matvlm_hf.mamba2_ops import causal_conv1d_blc

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 13, 6, generator=gen, dtype=torch.float64)
    w, bias = torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(
        causal_conv1d_blc(x, w, bias, use_kernel=False), causal_conv1d(x.transpose(1, 2), w, bias).transpose(1, 2)
    )


def test_blc_conv_triton_kernel_in_the_interpreter():
    """The Triton kernel's body, run on the CPU by Triton's interpreter (set before triton is imported, hence a
    subprocess), on a strided (b, l, c) view like in_proj's output."""
    require_triton()
    script = textwrap.dedent("""
        import torch
        import matvlm_hf.mamba2_ops as ops
        gen = torch.Generator().manual_seed(0)
        packed = torch.randn(2, 70, 200, generator=gen)
        x = packed[:, :, 10:140]
        w, bias = torch.randn(130, 4, generator=gen), torch.randn(130, generator=gen)
        out = ops.causal_conv1d_blc(x, w, bias, interpret=True)
        ref = ops.causal_conv1d_blc(x, w, bias, use_kernel=False)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        print("OK")
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "1"}
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]


def test_grad_needed_rule():
    from matvlm_hf.mamba2_ops import grad_needed

    x, w = torch.randn(2, 3), torch.randn(3, requires_grad=True)
    assert grad_needed(x, w, None) and not grad_needed(x, None)
    with torch.no_grad():
        assert not grad_needed(x, w)


def test_blc_conv_uses_the_forward_only_kernel_only_without_gradients(monkeypatch):
    """The (b, l, c) Triton conv has no backward: with autograd recording and a tensor that requires grad the
    differentiable path must run (gradients equal the reference's); without, the kernel runs. The kernel launch is
    replaced by a spy (Triton is not needed: `interpret=True` takes the kernel branch on the CPU)."""
    import matvlm_hf.mamba2_ops as ops

    calls = []

    def forward_only_kernel(x, weight, bias):  # what the real launch returns: the right values, no graph
        calls.append(x.shape)
        with torch.no_grad():
            return ops.causal_conv1d_blc(x, weight, bias, use_kernel=False)

    monkeypatch.setattr(ops, "triton", object())
    monkeypatch.setattr(ops, "_conv_silu_blc_triton", forward_only_kernel)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 11, 6, generator=gen)
    w, bias = torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen)

    with torch.no_grad():  # inference: the kernel
        ops.causal_conv1d_blc(x, w, bias, interpret=True)
    assert len(calls) == 1
    ops.causal_conv1d_blc(x, w, bias, interpret=True)  # grad mode on but nothing requires grad: the kernel too
    assert len(calls) == 2

    grads = {}
    for kernel in (True, False):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, bias))
        out = ops.causal_conv1d_blc(xs, ws, bs, use_kernel=kernel, interpret=kernel)
        assert out.requires_grad
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads[kernel] = (xs.grad, ws.grad, bs.grad)
    assert len(calls) == 2  # not used while gradients were needed
    for a, b in zip(grads[True], grads[False]):
        assert a is not None
        torch.testing.assert_close(a, b)
