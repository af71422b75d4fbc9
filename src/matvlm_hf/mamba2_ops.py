"""Mamba-2 math: the pure-PyTorch reference (chunked SSD scan, one-step recurrence, causal conv, gated RMSNorm) and
the optional kernels of `mamba_ssm` / `causal_conv1d` behind the same small interface; this module's own Triton
kernels (the conv on in_proj's (b, l, c) layout, the conv step, and `mamba_decode_step`: a mixer's whole decode step
between its projections as one kernel), each tested against the reference.

Shapes: b batch, l length, h heads, p head dim, g groups, n state size, c conv channels, k conv width.
The SSM is h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,  y_t = h_t C_t + D x_t  (per head; h_t is p x n).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .decode_kernels import dependent_launch

try:  # optional accelerators, detected, never required
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn as _rmsnorm_gated_kernel
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update as _state_update_kernel
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as _chunk_scan_kernel
except ImportError:
    _chunk_scan_kernel = _state_update_kernel = _rmsnorm_gated_kernel = None
try:
    from causal_conv1d import causal_conv1d_fn as _conv_kernel
    from causal_conv1d import causal_conv1d_update as _conv_update_kernel
except ImportError:
    _conv_kernel = _conv_update_kernel = None

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

HAS_MAMBA_SSM = _chunk_scan_kernel is not None

# Which kernels have a backward. mamba_chunk_scan_combined, rmsnorm_fn and causal_conv1d_fn are autograd Functions
# (their gradients are tested against the reference in tests/test_gpu_gradients.py); selective_state_update,
# causal_conv1d_update and this module's Triton kernels (conv, conv step, decode step) are forward-only: they write
# into fresh or cached tensors outside autograd, so they run only when no gradient is needed and the differentiable
# path runs otherwise.


def grad_needed(*tensors: torch.Tensor | None) -> bool:
    """True when autograd is recording and one of `tensors` requires grad: a forward-only kernel must not run then
    (its output would carry no graph, and every parameter below it would get a wrong gradient)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """x (..., T) -> (..., T, T) with out[i, j] = sum_{j < m <= i} x[m] for j <= i, -inf above the diagonal."""
    T = x.size(-1)
    x = x[..., None].expand(*x.shape, T)
    x = x.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), -1), 0)
    out = torch.cumsum(x, dim=-2)
    return out.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), 0), -torch.inf)


def ssd_scan_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan (Mamba-2 paper, 'ssd_minimal') in float32 or float64.

    x (b, l, h, p); dt (b, l, h) already positive (softplus applied, 0 = skip the step); A (h,);
    B, C (b, l, g, n) with h % g == 0; D (h,); initial_state (b, h, p, n).
    Returns y (b, l, h, p) in x's dtype and the final state (b, h, p, n) in the compute dtype.
    """
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x_in = x
    x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
    B = B.repeat_interleave(h // g, dim=2)
    C = C.repeat_interleave(h // g, dim=2)
    pad = (-l) % chunk_size
    if pad:  # dt = 0 on padded steps: no decay, no input, so the final state is unchanged
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    nc = (l + pad) // chunk_size
    x, dt, B, C = (t.reshape(b, nc, chunk_size, *t.shape[2:]) for t in (x, dt, B, C))
    xdt = x * dt[..., None]  # (b, c, s, h, p)
    dA = (dt * A).permute(0, 3, 1, 2)  # (b, h, c, s)
    dA_cumsum = torch.cumsum(dA, dim=-1)

    # 1. within each chunk: y_t = sum_{s<=t} C_t.B_s exp(dA[s+1..t]) dt_s x_s
    decay = torch.exp(_segsum(dA))  # (b, h, c, t, s)
    scores = torch.einsum("bcthn,bcshn->bhcts", C, B) * decay
    y = torch.einsum("bhcts,bcshp->bcthp", scores, xdt)

    # 2. state each chunk contributes at its end
    decay_to_end = torch.exp(dA_cumsum[..., -1:] - dA_cumsum)  # (b, h, c, s)
    chunk_states = torch.einsum("bcshn,bhcs,bcshp->bchpn", B, decay_to_end, xdt)

    # 3. pass states across chunks
    if initial_state is None:
        initial_state = torch.zeros(b, h, p, n, dtype=dtype, device=x.device)
    states = torch.cat([initial_state.to(dtype)[:, None], chunk_states], dim=1)  # (b, c+1, h, p, n)
    chunk_decay = torch.exp(_segsum(F.pad(dA_cumsum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    states, final_state = states[:, :-1], states[:, -1]

    # 4. contribution of the state entering each chunk
    y = y + torch.einsum("bcthn,bchpn,bhct->bcthp", C, states, torch.exp(dA_cumsum))
    y = y.reshape(b, nc * chunk_size, h, p)[:, :l]
    if D is not None:
        y = y + x_in.to(dtype) * D.to(dtype)[:, None]
    return y.to(x_in.dtype), final_state


def ssd_step_reference(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """One recurrence step, updating `state` (b, h, p, n) in place. x (b, h, p); dt (b, h) positive; B, C (b, g, n)."""
    h = x.shape[1]
    B = B.repeat_interleave(h // B.shape[1], dim=1).to(state.dtype)
    C = C.repeat_interleave(h // C.shape[1], dim=1).to(state.dtype)
    dt = dt.to(state.dtype)
    xs = x.to(state.dtype)
    # under autograd, read a copy: the in-place update below must not change a tensor saved for the backward
    prev = state.clone() if grad_needed(state, x, dt, A, B, C, D) else state
    new_state = (
        prev * torch.exp(dt * A.to(state.dtype))[..., None, None] + (dt[..., None] * xs)[..., None] * B[:, :, None]
    )
    state.copy_(new_state)
    y = torch.einsum("bhpn,bhn->bhp", new_state, C)
    if D is not None:
        y = y + xs * D.to(state.dtype)[:, None]
    return y.to(x.dtype)


def ssd_scan(x, dt, A, B, C, chunk_size, D=None, initial_state=None, use_kernel: bool = True):
    """Chunked scan: mamba_ssm's mamba_chunk_scan_combined on CUDA when available (an autograd Function, gradients
    to x, dt, A, B, C, D and initial_state), else the reference. Same contract."""
    if use_kernel and _chunk_scan_kernel is not None and x.is_cuda:
        y, final_state = _chunk_scan_kernel(
            x, dt, A, B, C, chunk_size, D=D, initial_states=initial_state, return_final_states=True
        )
        return y, final_state.float()
    return ssd_scan_reference(x, dt, A, B, C, chunk_size, D=D, initial_state=initial_state)


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    use_kernel: bool = True,
    dt_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step (state updated in place): mamba_ssm's selective_state_update on CUDA when no gradient is
    needed (it has no backward), else the reference. dt (b, h) is the step size; with `dt_bias` (h,) it is the raw
    projection and the step size is softplus(dt + dt_bias) in float32 (Mamba-2's dt; inside the kernel, its
    `dt_softplus`, where the 4 elementwise kernels of the torch form would run before it)."""
    if (
        use_kernel
        and _state_update_kernel is not None
        and x.is_cuda
        and not grad_needed(state, x, dt, A, B, C, D, dt_bias)
    ):
        p, n = x.shape[-1], B.shape[-1]
        bias = dt_bias if dt_bias is not None else torch.zeros_like(dt[0])
        # broadcast views (stride 0) let the kernel take its tied-head-dim fast path; dt_bias and D must not be None
        return _state_update_kernel(
            state,
            x,
            dt[..., None].expand(-1, -1, p),
            A[:, None, None].expand(-1, p, n).float(),
            B,
            C,
            D=D[:, None].expand(-1, p),
            dt_bias=bias[:, None].expand(-1, p),
            dt_softplus=dt_bias is not None,
        )
    if dt_bias is not None:
        dt = F.softplus(dt.float() + dt_bias.float())
    return ssd_step_reference(state, x, dt, A, B, C, D)


def uses_conv_kernel(device: torch.device, use_kernel: bool = True) -> bool:
    """Whether `causal_conv1d` (the conv path under autograd, i.e. while training) runs causal_conv1d's kernel for
    inputs on `device`: installed, on CUDA and `use_kernel` (the config's use_mamba_kernels); else the reference."""
    return use_kernel and _conv_kernel is not None and device.type == "cuda"


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, use_kernel: bool = True
) -> torch.Tensor:
    """Depthwise causal conv + SiLU over x (b, c, l) with weight (c, k); zero left context. causal_conv1d's
    autograd Function on CUDA when installed (differentiable; `uses_conv_kernel`), else the reference."""
    if uses_conv_kernel(x.device, use_kernel):
        return _conv_kernel(x, weight, bias, activation="silu")
    k = weight.shape[-1]
    return F.silu(F.conv1d(x, weight[:, None], bias, padding=k - 1, groups=x.shape[1])[..., : x.shape[-1]])


if triton is not None:

    @triton.jit
    def _conv_silu_blc_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        out_ptr,
        L,
        C,
        stride_xb,
        stride_xl,
        stride_ob,
        stride_ol,
        K: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """out[b, t, c] = silu(bias[c] + sum_k w[c, k] x[b, t - K + 1 + k, c]) on (batch, length, channel) layout."""
        pid_b, pid_l, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        acc = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
        for k in tl.static_range(K):
            src = offs_l - (K - 1) + k
            m = (src >= 0) & (src < L)
            xk = tl.load(
                x_ptr + pid_b * stride_xb + src[:, None] * stride_xl + offs_c[None, :],
                mask=m[:, None] & mask_c[None, :],
                other=0.0,
            ).to(tl.float32)
            wk = tl.load(w_ptr + offs_c * K + k, mask=mask_c, other=0.0).to(tl.float32)
            acc += xk * wk[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        acc = acc * tl.sigmoid(acc)
        tl.store(
            out_ptr + pid_b * stride_ob + offs_l[:, None] * stride_ol + offs_c[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=(offs_l < L)[:, None] & mask_c[None, :],
        )


def causal_conv1d_blc(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, use_kernel: bool = True, interpret: bool = False
) -> torch.Tensor:
    """causal_conv1d on the (b, l, c) layout in_proj produces (channels contiguous, any length stride).

    Without gradients (inference): a forward-only Triton kernel on CUDA (no transposes, one pass). When a gradient
    is needed (`grad_needed`): `causal_conv1d` on the transposed copy, i.e. causal_conv1d's autograd Function on
    CUDA when installed, else the PyTorch reference; both differentiable. `interpret` runs the Triton kernel body
    on the CPU through Triton's interpreter (TRITON_INTERPRET=1), for tests."""
    if (
        use_kernel
        and triton is not None
        and (x.is_cuda or interpret)
        and x.stride(-1) == 1
        and not grad_needed(x, weight, bias)
    ):
        return _conv_silu_blc_triton(x, weight, bias)
    return causal_conv1d(x.transpose(1, 2).contiguous(), weight, bias, use_kernel).transpose(1, 2)


def _conv_silu_blc_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Launch `_conv_silu_blc_kernel` (forward only: the result carries no autograd graph)."""
    b, l, c = x.shape
    out = torch.empty(b, l, c, dtype=x.dtype, device=x.device)
    w = weight.contiguous()
    grid = (b, triton.cdiv(l, 64), triton.cdiv(c, 128))
    _conv_silu_blc_kernel[grid](
        x,
        w,
        bias if bias is not None else w,
        out,
        l,
        c,
        x.stride(0),
        x.stride(1),
        out.stride(0),
        out.stride(1),
        K=w.shape[-1],
        HAS_BIAS=bias is not None,
        BLOCK_L=64,
        BLOCK_C=128,
    )
    return out


if triton is not None:

    @triton.jit
    def _conv_window(
        u_ptr, state_ptr, w_ptr, b_ptr, channels, inside, stride_sc, K: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS
    ):
        """The conv step of `channels` (a vector of channel indices) of one sequence, reads only: returns the new
        window [state[c, 1:], u[c]] (BLOCK_C, BLOCK_K) in state's dtype, for `_store_window`, and silu(bias[c] +
        sum_k w[c, k] window[c, k]) in float32 (state's last axis contiguous, weight (C, K) contiguous). Where the
        program's threads outnumber the channels, several threads hold one channel: its window is written only after
        a CTA barrier that follows every read of it, or a thread could read a tap another already shifted."""
        taps = tl.arange(0, BLOCK_K)
        row = state_ptr + channels[:, None] * stride_sc + taps[None, :]
        shifted = tl.load(row + 1, mask=inside[:, None] & (taps < K - 1)[None, :], other=0.0)
        u = tl.load(u_ptr + channels, mask=inside, other=0.0).to(state_ptr.dtype.element_ty)
        window = tl.where((taps == K - 1)[None, :], u[:, None], shifted)
        w = tl.load(
            w_ptr + channels[:, None] * K + taps[None, :], mask=inside[:, None] & (taps < K)[None, :], other=0.0
        )
        acc = tl.sum(window.to(tl.float32) * w.to(tl.float32), axis=1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + channels, mask=inside, other=0.0).to(tl.float32)
        return window, acc * tl.sigmoid(acc)

    @triton.jit
    def _store_window(state_ptr, window, channels, inside, stride_sc, K: tl.constexpr, BLOCK_K: tl.constexpr):
        """Writes `_conv_window`'s window back into the conv state (after a CTA barrier that follows its reads)."""
        taps = tl.arange(0, BLOCK_K)
        row = state_ptr + channels[:, None] * stride_sc + taps[None, :]
        tl.store(row, window, mask=inside[:, None] & (taps < K)[None, :])

    @triton.jit
    def _conv_step_kernel(
        x_ptr,
        state_ptr,
        w_ptr,
        b_ptr,
        out_ptr,
        C,
        stride_xb,
        stride_sb,
        stride_sc,
        stride_ob,
        K: tl.constexpr,
        BLOCK_K: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """Program (b, channel block): state[b, c] <- [state[b, c, 1:], x[b, c]]; out[b, c] = silu(bias[c] +
        sum_k w[c, k] state[b, c, k])."""
        pid_b, pid_c = tl.program_id(0), tl.program_id(1)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        inside = offs_c < C
        x_row, state_row = x_ptr + pid_b * stride_xb, state_ptr + pid_b * stride_sb
        window, out = _conv_window(x_row, state_row, w_ptr, b_ptr, offs_c, inside, stride_sc, K, BLOCK_K, HAS_BIAS)
        tl.debug_barrier()
        _store_window(state_row, window, offs_c, inside, stride_sc, K, BLOCK_K)
        tl.store(out_ptr + pid_b * stride_ob + offs_c, out.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _mamba_decode_kernel(
        proj_ptr,
        conv_state_ptr,
        conv_w_ptr,
        conv_b_ptr,
        state_ptr,
        a_log_ptr,
        dt_bias_ptr,
        d_ptr,
        norm_w_ptr,
        out_ptr,
        eps,
        stride_pb,
        stride_cb,
        stride_cc,
        stride_sb,
        stride_sh,
        stride_sp,
        stride_ob,
        D_INNER: tl.constexpr,
        D_XB: tl.constexpr,
        P: tl.constexpr,
        REP: tl.constexpr,
        K: tl.constexpr,
        BLOCK_K: tl.constexpr,
        HAS_CONV_BIAS: tl.constexpr,
        BLOCK: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """Program (b, j), j a key/value head (its x and B channels serve heads j REP .. j REP + REP - 1): the conv
        step of x_j and B_j, then for each of those heads h the conv step of C_h, dt = softplus(dt_raw + dt_bias),
        the state update state_h <- exp(dt A) state_h + dt x B^T (P x P: head dim = state size), y = state_h C + D x
        rounded to the input dtype (as the reference's y), and y * silu(z_h) RMS-normalised over the head (group
        size = head dim) times the norm weight, written to out[b, h P : (h + 1) P]. Every intermediate in float32;
        the conv outputs rounded to the input dtype (as the unfused conv step's output is). A head's reads (conv
        windows, state, z, dt) are issued together, then one CTA barrier, then its writes: where threads outnumber
        a tile's cells, several hold one cell, and none may write it before all have read it."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        b, j = tl.program_id(0), tl.program_id(1)
        offs = tl.arange(0, BLOCK)
        inside = offs < P
        dtype = proj_ptr.dtype.element_ty
        row = proj_ptr + b * stride_pb
        xbc, conv_row = row + D_INNER, conv_state_ptr + b * stride_cb
        x_channels, b_channels = j * P + offs, D_XB + j * P + offs
        x_window, x = _conv_window(
            xbc, conv_row, conv_w_ptr, conv_b_ptr, x_channels, inside, stride_cc, K, BLOCK_K, HAS_CONV_BIAS
        )
        b_window, B = _conv_window(
            xbc, conv_row, conv_w_ptr, conv_b_ptr, b_channels, inside, stride_cc, K, BLOCK_K, HAS_CONV_BIAS
        )
        x, B = x.to(dtype).to(tl.float32), B.to(dtype).to(tl.float32)
        tile = inside[:, None] & inside[None, :]
        for r in range(REP):
            h = j * REP + r
            c_channels = 2 * D_XB + h * P + offs
            c_window, C = _conv_window(
                xbc, conv_row, conv_w_ptr, conv_b_ptr, c_channels, inside, stride_cc, K, BLOCK_K, HAS_CONV_BIAS
            )
            cell = state_ptr + b * stride_sb + h * stride_sh + offs[:, None] * stride_sp + offs[None, :]
            state = tl.load(cell, mask=tile, other=0.0).to(tl.float32)
            z = tl.load(row + h * P + offs, mask=inside, other=0.0).to(tl.float32)
            dt = tl.load(row + 2 * D_INNER + 2 * D_XB + h).to(tl.float32) + tl.load(dt_bias_ptr + h).to(tl.float32)
            tl.debug_barrier()  # this head's reads before any of its writes (and, the first time, x's and B's)
            _store_window(conv_row, c_window, c_channels, inside, stride_cc, K, BLOCK_K)
            C = C.to(dtype).to(tl.float32)
            dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)  # softplus, torch's threshold
            decay = tl.exp(dt * -tl.exp(tl.load(a_log_ptr + h).to(tl.float32)))
            state = state * decay + (dt * x)[:, None] * B[None, :]
            tl.store(cell, state.to(state_ptr.dtype.element_ty), mask=tile)
            y = tl.sum(state * C[None, :], axis=1) + x * tl.load(d_ptr + h).to(tl.float32)
            gated = y.to(dtype).to(tl.float32) * (z * tl.sigmoid(z))  # 0 outside the head (z = 0 there)
            scale = tl.rsqrt(tl.sum(gated * gated, axis=0) / P + tl.cast(eps, tl.float32))  # (float64 under compile)
            weight = tl.load(norm_w_ptr + h * P + offs, mask=inside, other=0.0).to(tl.float32)
            tl.store(out_ptr + b * stride_ob + h * P + offs, (gated * scale * weight).to(dtype), mask=inside)
        _store_window(conv_row, x_window, x_channels, inside, stride_cc, K, BLOCK_K)  # after the loop's barrier
        _store_window(conv_row, b_window, b_channels, inside, stride_cc, K, BLOCK_K)


def causal_conv1d_step(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    use_kernel: bool = True,
    interpret: bool = False,
) -> torch.Tensor:
    """One conv step for x (b, c): shifts x into conv_state (b, c, k) in place, returns SiLU(conv) (b, c).
    When no gradient is needed on CUDA: causal_conv1d_update if installed, else this module's one-kernel Triton step
    (`interpret`: the Triton kernel on the CPU through Triton's interpreter, for tests); else the reference."""
    forward_only = use_kernel and not grad_needed(x, conv_state, weight, bias)
    if forward_only and _conv_update_kernel is not None and x.is_cuda:
        return _conv_update_kernel(x, conv_state, weight, bias, activation="silu")
    if forward_only and triton is not None and (x.is_cuda or interpret) and conv_state.stride(-1) == 1:
        b, c = x.shape
        out = torch.empty_like(x)
        w = weight.contiguous()
        _conv_step_kernel[(b, triton.cdiv(c, 256))](
            x,
            conv_state,
            w,
            bias if bias is not None else w,
            out,
            c,
            x.stride(0),
            conv_state.stride(0),
            conv_state.stride(1),
            out.stride(0),
            K=w.shape[-1],
            BLOCK_K=triton.next_power_of_2(w.shape[-1]),
            HAS_BIAS=bias is not None,
            BLOCK_C=256,
        )
        return out
    window = torch.cat([conv_state[..., 1:], x[..., None].to(conv_state.dtype)], dim=-1)
    conv_state.copy_(window)
    out = (window * weight).sum(-1)  # the new tensor, not the state buffer that the next step overwrites
    if bias is not None:
        out = out + bias
    return F.silu(out).to(x.dtype)


# the largest head dim (= state size) the fused decode kernel takes: its program holds a head's P x P state
MAMBA_DECODE_MAX_HEADDIM = 128
# warps of the fused decode kernel's program (one head's P x P state: 128 x 128 padded at MaTVLM's head dim 80).
# H200, bf16, TinyLLaVA-3.1B's mixer (`examples/decode_shapes.py --parts mamba`): 4 warps 4.8 / 12.7 us at batch
# 1 / 16, 8 warps 3.9 / 16.5; the unfused step 10.8 / 21.1
MAMBA_DECODE_WARPS = 4


def mamba_decode_step(
    projected: torch.Tensor,
    conv_state: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    state: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    D: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    group_size: int,
    d_xb: int,
    interpret: bool = False,
) -> torch.Tensor | None:
    """The Mamba-2 mixer's whole decode step between its projections as ONE Triton kernel, or None where it does not
    apply (the caller then runs `causal_conv1d_step`, `ssd_step` and `rmsnorm_gated`, which compute the same).

    projected (b, >= d_inner + conv_dim + h): in_proj's output [z | x B C | dt] for one token (further columns
    ignored); conv_state (b, conv_dim, k) and state (b, h, p, n) are updated in place; conv_weight (conv_dim, k);
    A_log, dt_bias, D (h,); norm_weight (d_inner,); x and B hold d_xb channels each (key/value heads, repeated to
    the heads as `repeat_kv` does) -> y (b, d_inner) in projected's dtype: RMSNorm(y_ssm * silu(z)) over groups of
    `group_size` channels, times norm_weight (Mamba-2's gated norm, norm_before_gate=False). Applies on CUDA (or in
    Triton's interpreter, `interpret`) when no gradient is needed and the layout is MaTVLM's default: one C group and
    one norm group per head, head dim = state size (<= MAMBA_DECODE_MAX_HEADDIM), d_inner a multiple of d_xb, the
    states' last axes contiguous. It replaces the unfused step's 6 kernels (conv step, A = -exp(A_log) as 3 torch ops,
    mamba_ssm's selective_state_update and gated norm): on an H200 at TinyLLaVA's sizes 4.8 vs 10.8 us at batch 1,
    12.7 vs 21.1 us at batch 16 (docs/benchmarks, `examples/decode_shapes.py --parts mamba`)."""
    b, heads, p, n = state.shape
    d_inner = heads * p
    applies = (
        triton is not None
        and (projected.is_cuda or interpret)
        and not grad_needed(projected, conv_state, state, conv_weight, conv_bias, A_log, dt_bias, D, norm_weight)
        and p == n == group_size <= MAMBA_DECODE_MAX_HEADDIM
        and norm_weight.shape[0] == d_inner
        and d_xb % p == 0
        and d_inner % d_xb == 0
        and conv_state.shape[1] == 2 * d_xb + d_inner
        and conv_state.stride(-1) == 1
        and state.stride(-1) == 1
        and projected.stride(-1) == 1
    )
    if not applies:
        return None
    rows = projected.reshape(b, -1)
    out = torch.empty(b, d_inner, dtype=projected.dtype, device=projected.device)
    w = conv_weight.contiguous()
    block = triton.next_power_of_2(p)
    pdl = dependent_launch(projected)
    _mamba_decode_kernel[(b, d_xb // p)](
        rows,
        conv_state,
        w,
        conv_bias if conv_bias is not None else w,
        state,
        A_log,
        dt_bias,
        D,
        norm_weight,
        out,
        eps,
        rows.stride(0),
        conv_state.stride(0),
        conv_state.stride(1),
        state.stride(0),
        state.stride(1),
        state.stride(2),
        out.stride(0),
        D_INNER=d_inner,
        D_XB=d_xb,
        P=p,
        REP=d_inner // d_xb,
        K=w.shape[-1],
        BLOCK_K=triton.next_power_of_2(w.shape[-1]),
        HAS_CONV_BIAS=conv_bias is not None,
        BLOCK=block,
        PDL=pdl,
        num_warps=MAMBA_DECODE_WARPS,
        **({"launch_pdl": True} if pdl else {}),
    )
    return out


def rmsnorm_gated(
    x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int, use_kernel: bool = True
) -> torch.Tensor:
    """RMSNorm(x * SiLU(z)) over groups of `group_size` channels, times weight (Mamba-2, norm_before_gate=False).
    mamba_ssm's rmsnorm_fn on CUDA (an autograd Function), else the reference."""
    if use_kernel and _rmsnorm_gated_kernel is not None and x.is_cuda:
        return _rmsnorm_gated_kernel(x, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=False)
    dtype = x.dtype
    x = x.float() * F.silu(z.float())
    xg = x.unflatten(-1, (-1, group_size))
    xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)
    return (xg.flatten(-2) * weight.float()).to(dtype)
