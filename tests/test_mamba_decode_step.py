"""mamba2_ops.mamba_decode_step (the Mamba-2 mixer's decode step as one Triton kernel) against the unfused reference
built from mamba2_ops' reference functions (conv step, one-step recurrence, gated RMSNorm; each tested against a naive
computation in test_mamba2_ops.py): Triton's interpreter on the CPU, compiled on the GPU (marked `gpu`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_decode_kernels import require_triton, run_in_interpreter

from matvlm_hf import mamba2_ops
from matvlm_hf.mamba2_ops import causal_conv1d_step, mamba_decode_step, rmsnorm_gated, ssd_step_reference

EXTRA_COLUMNS = 5  # columns after [z | x B C | dt], as the fused decode step's fc1 part


def decode_inputs(dtype, device, b=3, heads=4, kv_heads=2, p=8, k=4, conv_bias=True, steps=3, seed=0) -> dict:
    """Random inputs of `steps` decode steps of one mixer: x and B on `kv_heads` heads of `p` channels, C, z and the
    norm on `heads` heads; the states float32 (SSM) and `dtype` (conv), as the caches hold them."""
    gen = torch.Generator().manual_seed(seed)
    d_inner, d_xb = heads * p, kv_heads * p
    conv_dim = 2 * d_xb + d_inner

    def rnd(*shape, scale=1.0, dtype=dtype):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    return {
        "projected": [rnd(b, d_inner + conv_dim + heads + EXTRA_COLUMNS) for _ in range(steps)],
        "conv_state": rnd(b, conv_dim, k),
        "conv_weight": rnd(conv_dim, k, scale=0.5),
        "conv_bias": rnd(conv_dim) if conv_bias else None,
        "state": rnd(b, heads, p, p, dtype=torch.float32),
        "A_log": (torch.rand(heads, generator=gen) * 2.7).to(device=device, dtype=dtype),  # A in -[1, 15]
        "dt_bias": rnd(heads),
        "D": rnd(heads),
        "norm_weight": 1 + rnd(d_inner, scale=0.1),
        "eps": 1e-5,
        "d_xb": d_xb,
    }


def unfused_step(projected, conv_state, conv_weight, conv_bias, state, A_log, dt_bias, D, norm_weight, eps, d_xb):
    """The mixer's decode step through the reference functions (MaTVLMMamba2Mixer.decode_mix without kernels)."""
    heads, p = state.shape[1], state.shape[2]
    d_inner = heads * p
    z, xBC, dt = projected[:, : 2 * d_inner + 2 * d_xb + heads].split([d_inner, d_inner + 2 * d_xb, heads], -1)
    xBC = causal_conv1d_step(xBC, conv_state, conv_weight, conv_bias, use_kernel=False)
    x, B, C = xBC.split([d_xb, d_xb, d_inner], -1)
    x = x.unflatten(-1, (-1, p)).repeat_interleave(d_inner // d_xb, dim=1)
    B = B.unflatten(-1, (-1, p)).repeat_interleave(d_inner // d_xb, dim=1)
    step = F.softplus(dt.float() + dt_bias.float())
    y = ssd_step_reference(state, x, step, -torch.exp(A_log.float()), B, C.unflatten(-1, (heads, p)), D)
    return rmsnorm_gated(y.flatten(-2), z, norm_weight, eps, p, use_kernel=False)


def check_decode_step(dtype: str, device: str, interpret: bool, **sizes) -> None:
    """`steps` fused steps against the unfused ones from the same states. float32: every step's output and the final
    SSM state within 1e-4 of the reference's (the sums run in another order). float16 / bfloat16, where both round
    (the conv outputs and y_ssm to the dtype, the unfused conv also inside), both are measured against the same
    formula in float64 from the same inputs: the kernel's mean error at most 1.5x the reference's, its largest output
    and state errors at most 3x (seeds 0-3 at TinyLLaVA's sizes: ratios 0.15-1.9; a wrong index or formula is off
    by the values' own size). The conv states are copies: equal, bit for bit."""
    inputs = decode_inputs(getattr(torch, dtype), device, **sizes)
    rest = {name: value for name, value in inputs.items() if name not in ("projected", "conv_state", "state")}
    exact = {name: value.double() if torch.is_tensor(value) else value for name, value in rest.items()}
    conv = {kind: inputs["conv_state"].clone() for kind in ("fused", "unfused")}
    state = {kind: inputs["state"].clone() for kind in ("fused", "unfused")}
    conv["float64"], state["float64"] = inputs["conv_state"].double(), inputs["state"].double()
    group = inputs["state"].shape[-1]
    outs = {kind: [] for kind in ("fused", "unfused", "float64")}
    for projected in inputs["projected"]:
        out = mamba_decode_step(
            projected, conv["fused"], state=state["fused"], group_size=group, interpret=interpret, **rest
        )
        assert out is not None and out.dtype == projected.dtype
        outs["fused"].append(out)
        outs["unfused"].append(unfused_step(projected, conv["unfused"], state=state["unfused"], **rest))
        outs["float64"].append(unfused_step(projected.double(), conv["float64"], state=state["float64"], **exact))
    out = {kind: torch.stack(values).double() for kind, values in outs.items()}
    torch.testing.assert_close(conv["fused"], conv["unfused"], rtol=0, atol=0)
    if dtype == "float32":
        torch.testing.assert_close(out["fused"], out["unfused"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(state["fused"], state["unfused"], rtol=1e-4, atol=1e-4)
        return
    err = {kind: (out[kind] - out["float64"]).abs() for kind in ("fused", "unfused")}
    state_err = {kind: (state[kind].double() - state["float64"]).abs().max() for kind in ("fused", "unfused")}
    assert err["fused"].mean() <= 1.5 * err["unfused"].mean(), (err["fused"].mean(), err["unfused"].mean())
    assert err["fused"].max() <= 3 * err["unfused"].max(), (err["fused"].max(), err["unfused"].max())
    assert state_err["fused"] <= 3 * state_err["unfused"], state_err


# (dtype, sizes): x and B shared by 2 heads (and not), conv bias or none, a head dim that is not a power of two
CASES = [
    ("float32", {"heads": 4, "kv_heads": 2, "p": 8}),
    ("float32", {"heads": 3, "kv_heads": 3, "p": 6, "conv_bias": False}),
    ("float16", {"heads": 4, "kv_heads": 4, "p": 80, "b": 2}),
    ("bfloat16", {"heads": 32, "kv_heads": 32, "p": 80, "b": 2}),
]


def test_fused_decode_step_in_the_interpreter_matches_the_reference():
    """The kernel body run by Triton's interpreter on the CPU (a subprocess: the interpreter is switched on before
    triton is imported)."""
    require_triton()
    script = """
from test_mamba_decode_step import CASES, check_decode_step
for dtype, sizes in CASES:
    check_decode_step(dtype, "cpu", True, **sizes)
print("OK")
"""
    run_in_interpreter(script)


def test_fused_decode_step_declines_what_it_does_not_compute():
    """None (the caller runs the unfused step) for a head dim other than the state size, a norm group other than a
    head, and whenever a gradient is needed (the kernel is forward-only); never on the CPU without `interpret`."""
    inputs = decode_inputs(torch.float32, "cpu")
    inputs.pop("projected")
    projected = torch.randn(3, 4 * 8 + (4 * 8 + 2 * 16) + 4)
    assert mamba_decode_step(projected, group_size=8, **inputs) is None  # CPU, not interpreted
    assert mamba_decode_step(projected, group_size=16, interpret=True, **inputs) is None
    wide = {**inputs, "state": torch.zeros(3, 4, 8, 6)}
    assert mamba_decode_step(projected, group_size=8, interpret=True, **wide) is None
    weight = inputs["norm_weight"].clone().requires_grad_()
    assert mamba_decode_step(projected, group_size=8, interpret=True, **{**inputs, "norm_weight": weight}) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine: pytest -m gpu)")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize(
    "sizes",
    [{"heads": 32, "kv_heads": 32, "p": 80, "b": 16}, {"heads": 4, "kv_heads": 2, "p": 8}],
    ids=["tinyllava", "shared-xB"],
)
@pytest.mark.parametrize("warps", [4, 8])
def test_fused_decode_step_on_the_gpu_matches_the_reference(dtype, sizes, warps, monkeypatch):
    """Compiled on the GPU: TinyLLaVA-3.1B's mixer (32 heads of 80, batch 16) and x / B shared by two heads; with 8
    warps several threads hold each channel and each state cell (without the kernel's barriers between reading and
    writing the states, this case failed: a conv window or state shifted twice)."""
    monkeypatch.setattr(mamba2_ops, "MAMBA_DECODE_WARPS", warps)
    check_decode_step(dtype, "cuda", False, **sizes)
