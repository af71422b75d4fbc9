"""decode_kernels.py and the Mamba decode kernels of mamba2_ops.py against their PyTorch references: in Triton's
interpreter on the CPU, compiled on the GPU (`gpu` marker)."""

import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from matvlm_hf.decode_kernels import rotary_and_cache


def require_triton() -> None:
    """Skip without Triton (the dev extra installs it on Linux x86_64); with MATVLM_REQUIRE_TRITON=1 (.ci/run) fail."""
    if os.environ.get("MATVLM_REQUIRE_TRITON") == "1":
        import triton  # noqa: F401  (an ImportError fails the test)
    else:
        pytest.importorskip("triton")


def run_in_interpreter(script: str) -> None:
    """Runs `script` (which prints OK) with Triton's interpreter on, set before triton is imported: a subprocess.
    Skipped with Triton < 3.9 (CI installs the newest): 3.6's interpreter cannot run a loop whose bound is computed in
    the kernel ("only 0-dimensional arrays can be converted to Python scalars"); the GPU tests compile the kernels."""
    import triton

    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 9):
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run these kernels (needs >= 3.9)")
    # the tests folder ahead of whatever PYTHONPATH the run already has (the GPU machine puts src/ there)
    path = os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]


def rotary_inputs(dtype, heads, kv_heads, device="cpu", b=3, d=80, rot=32, capacity=40):
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = getattr(torch, dtype)
    qkv = torch.randn(b, 1, (heads + 2 * kv_heads) * d, generator=gen, device=device).to(dtype)
    angles = torch.randn(b, 1, rot // 2, generator=gen, device=device)
    emb = torch.cat([angles, angles], -1)  # transformers' rotary module: cat(freqs, freqs)
    caches = [torch.zeros(b, kv_heads, capacity, d, dtype=dtype, device=device) for _ in range(4)]
    return qkv, emb.cos().to(dtype), emb.sin().to(dtype), caches, torch.tensor([7], device=device), heads, rot


ROTARY_CASES = [("float32", 4, 4), ("bfloat16", 4, 2)]


def test_rotary_kernel_in_the_interpreter():
    """The rotary + cache-write kernel against transformers' apply_rotary_pos_emb + index_copy_: equal in float32;
    bf16 within one rounding step (the interpreter's float -> bf16 cast truncates, the GPU's rounds; bitwise equality
    is the GPU test's)."""
    require_triton()
    script = textwrap.dedent("""
        import torch
        from test_decode_kernels import ROTARY_CASES, rotary_inputs
        from matvlm_hf.decode_kernels import rotary_and_cache
        for case in ROTARY_CASES:
            qkv, cos, sin, (k1, v1, k2, v2), slot, heads, rot = rotary_inputs(*case)
            qkv = torch.cat([qkv, qkv[..., :16]], -1)[..., :-16]  # strided rows, as sliced from the fused GEMM
            with torch.no_grad():
                q1 = rotary_and_cache(qkv, cos, sin, k1, v1, slot, heads, rot, interpret=True)
                q2 = rotary_and_cache(qkv, cos, sin, k2, v2, slot, heads, rot)
            tol = dict(rtol=0, atol=0) if case[0] == "float32" else dict(rtol=1e-2, atol=4e-2)
            for a, b in ((q1, q2), (k1, k2), (v1, v2)):
                torch.testing.assert_close(a, b, **tol)
            assert k1[:, :, 7].abs().sum() > 0 and k1[:, :, :7].abs().sum() == 0  # written at the slot only
        print("OK")
    """)
    run_in_interpreter(script)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine: pytest -m gpu)")
@pytest.mark.parametrize("case", ROTARY_CASES)
def test_rotary_kernel_on_the_gpu_matches_the_reference(case):
    """Within one rounding step: on the H200 the kernel's products contract into FMAs, the reference rounds each."""
    qkv, cos, sin, (k1, v1, k2, v2), slot, heads, rot = rotary_inputs(*case, device="cuda")
    with torch.no_grad():
        q1 = rotary_and_cache(qkv, cos, sin, k1, v1, slot, heads, rot)
        torch.set_grad_enabled(True)  # the reference path
        q2 = rotary_and_cache(qkv, cos, sin, k2, v2, slot, heads, rot)
    tol = dict(rtol=1e-6, atol=1e-6) if case[0] == "float32" else dict(rtol=1e-2, atol=4e-2)
    for a, b in ((q1, q2), (k1, k2)):
        torch.testing.assert_close(a, b, **tol)
    assert torch.equal(v1, v2)


def conv_inputs(dtype, device="cpu"):
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = getattr(torch, dtype)
    r = lambda *shape: torch.randn(*shape, generator=gen, device=device).to(dtype)  # noqa: E731
    packed = r(3, 400)
    return packed[:, 50:350], r(3, 300, 4), r(300, 4), r(300)  # x a strided view, like in_proj's output


CONV_CASES = ["float32", "bfloat16"]


def test_conv_step_kernel_in_the_interpreter():
    """mamba2_ops' Triton conv step (where causal_conv1d is not installed) against the reference: the state shifted
    alike, bit for bit; the output within rounding (bf16: the kernel accumulates in fp32, the reference in bf16)."""
    require_triton()
    script = textwrap.dedent("""
        import torch
        from test_decode_kernels import CONV_CASES, conv_inputs
        from matvlm_hf.mamba2_ops import causal_conv1d_step
        for case in CONV_CASES:
            x, state, w, bias = conv_inputs(case)
            kernel_state, reference_state = state.clone(), state.clone()
            with torch.no_grad():
                out = causal_conv1d_step(x, kernel_state, w, bias, interpret=True)
                ref = causal_conv1d_step(x, reference_state, w, bias, use_kernel=False)
            assert torch.equal(kernel_state, reference_state) and not torch.equal(kernel_state, state)
            tol = 1e-5 if case == "float32" else 2e-2
            torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
        print("OK")
    """)
    run_in_interpreter(script)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine: pytest -m gpu)")
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_step_kernel_on_the_gpu(case):
    from matvlm_hf.mamba2_ops import causal_conv1d_step

    x, state, w, bias = conv_inputs(case, device="cuda")
    kernel_state, reference_state = state.clone(), state.clone()
    with torch.no_grad():
        out = causal_conv1d_step(x, kernel_state, w, bias)
        ref = causal_conv1d_step(x, reference_state, w, bias, use_kernel=False)
    assert torch.equal(kernel_state, reference_state)
    tol = 1e-5 if case == "float32" else 2e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def attention_inputs(dtype, heads, kv_heads, device="cpu", b=3, d=80, rot=32, capacity=40, slot=29):
    """One token's q|k|v per row and a static cache filled before `slot`: row 1 left-padded by 5, the last row by 20
    (whole key tiles masked); keys and values from the slot on hold large values that must not reach the output (the
    slot's own are this step's, from qkv). Returns (qkv, cos, sin, keys, values, mask, slot, heads, rot, scale)."""
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = getattr(torch, dtype)
    qkv = torch.randn(b, 1, (heads + 2 * kv_heads) * d, generator=gen, device=device).to(dtype)
    angles = torch.randn(b, 1, rot // 2, generator=gen, device=device)
    emb = torch.cat([angles, angles], -1)
    keys, values = (torch.randn(b, kv_heads, capacity, d, generator=gen, device=device).to(dtype) for _ in range(2))
    keys[:, :, slot:], values[:, :, slot:] = 30.0, 100.0
    mask = torch.full((b, 1, 1, capacity), torch.finfo(dtype).min, dtype=dtype, device=device)
    mask[..., : slot + 1] = 0.0
    mask[1, ..., :5] = mask[-1, ..., :20] = torch.finfo(dtype).min
    slot = torch.tensor([slot], device=device)
    return qkv, emb.cos().to(dtype), emb.sin().to(dtype), keys, values, mask, slot, heads, rot, d**-0.5


# (dtype, heads, kv_heads, slot): slot 24 starts a split of 8 keys (that split holds only this step's token)
ATTENTION_CASES = [("float32", 4, 4, 29), ("bfloat16", 4, 2, 29), ("float32", 4, 2, 24)]


def check_attention_step(case, device="cpu", size=None, **kernel):
    """attention_step's kernel (`kernel`: its launch options) against its reference (rotary_and_cache + SDPA) on a
    copy of the same cache: the output within float32 / bf16 softmax rounding, the cache written alike (k within
    one rounding step, v exactly), nothing else of it touched."""
    from matvlm_hf.decode_kernels import attention_counters, attention_step

    dtype, heads, kv_heads, slot = case
    qkv, cos, sin, keys, values, mask, slot, heads, rot, scale = attention_inputs(
        dtype, heads, kv_heads, device, slot=slot, **(size or {})
    )
    k_ref, v_ref = keys.clone(), values.clone()
    counters = attention_counters(device, keys.shape[0] * heads + 5)
    with torch.no_grad():
        out = attention_step(
            qkv, cos, sin, keys, values, mask, slot, heads, rot, scale, counters, split_kv=True, **kernel
        )
        torch.set_grad_enabled(True)  # the reference path
        ref = attention_step(qkv, cos, sin, k_ref, v_ref, mask, slot, heads, rot, scale)
        torch.set_grad_enabled(False)
    b, d = keys.shape[0], keys.shape[-1]
    assert out.shape == ref.shape == (b, 1, heads * d)
    tol = 1e-5 if case[0] == "float32" else 2e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(keys, k_ref, rtol=1e-2, atol=4e-2)
    assert torch.equal(values, v_ref)
    s = int(slot)
    assert (keys[:, :, s + 1 :] == 30).all() and (values[:, :, s + 1 :] == 100).all()  # only the slot written
    assert (values[:, :, s] != 100).all()
    assert not counters.any()  # every head's last program reset its counter: the buffer serves the next call


def test_dependent_launch_only_on_cuda_and_switched_off_by_the_environment(monkeypatch):
    """Programmatic dependent launch never for CPU tensors (the interpreter, the references); on by default, off with
    MATVLM_DEPENDENT_LAUNCH=0 (read at import)."""
    from matvlm_hf import decode_kernels

    assert not decode_kernels.dependent_launch(torch.zeros(1))
    # a CUDA tensor on a GPU that has it: on, except while torch.compile traces (its kernel wrapper knows no launch_pdl)
    monkeypatch.setattr(decode_kernels, "_gpu_has_dependent_launch", lambda index: True)
    on_gpu = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    assert decode_kernels.dependent_launch(on_gpu)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not decode_kernels.dependent_launch(on_gpu)
    script = "import matvlm_hf.decode_kernels as k; print(k.DEPENDENT_LAUNCH)"
    for value, expected in (("0", "False"), ("1", "True")):
        env = {**os.environ, "MATVLM_DEPENDENT_LAUNCH": value}
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
        assert result.stdout.strip() == expected, result.stderr[-2000:]


def test_attention_step_kernel_in_the_interpreter():
    """The one-kernel attention step (rotary, cache write, split-KV attention, the last program's combine) against
    rotary_and_cache + SDPA with the same mask, 8-key tiles in 5 splits: a split past the fill pointer (nothing to
    read), two fully masked (left padding), grouped heads, this step's token alone in its split (slot 24)."""
    require_triton()
    script = textwrap.dedent("""
        import torch
        from test_decode_kernels import ATTENTION_CASES, check_attention_step
        for case in ATTENTION_CASES:
            check_attention_step(case, interpret=True, block_n=8, programs=64)
        print("OK")
    """)
    run_in_interpreter(script)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine: pytest -m gpu)")
@pytest.mark.parametrize("case", [*ATTENTION_CASES, ("bfloat16", 32, 32, 1099)])
def test_attention_step_kernel_on_the_gpu(case):
    """Small tiles as in the interpreter test, and TinyLLaVA's decode shape (32 heads, 1100 of 1280 positions filled)
    with the default split, run twice (the counters left at zero serve the next call)."""
    small = case[1] == 4
    size = None if small else dict(b=2, capacity=1280)
    kernel = dict(block_n=8, programs=64) if small else {}
    for _ in range(2):
        check_attention_step(case, "cuda", size, **kernel)
