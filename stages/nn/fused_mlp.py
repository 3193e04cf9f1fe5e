"""The MLP's up-projection with its activation fused in: a = LeakyReLU(x·Wᵀ, 0.5)².

Why: unfused, the matmul (cuBLAS under torch.compile) writes h = x·Wᵀ ([M, hidden] bf16: 400 MB at
M = 98304, hidden = 2048), a second kernel reads h back and writes a, and the backward reads h once more.
The challenge's record (openai/parameter-golf PR #1530) puts the activation in the matmul's epilogue;
this is our own version of the idea. Not yet measured on a GPU: `model.fused_mlp` stays off by default
until a side-by-side with the compiled plain MLP shows it pays.

  forward   one Triton matmul, fp32 accumulation; per output tile it writes a (x's dtype, what the
            down-projection reads) and, when a gradient will be needed, h (x's dtype) for the backward.
  backward  grad_h = grad_a ⊙ d with d = dLeakyReLU²/dh = 2h (h > 0) or h/2 (h ≤ 0), one elementwise
            Triton kernel; then grad_x = grad_h·W and grad_W = grad_hᵀ·x as torch matmuls.

Why h and not d is saved: both are one [M, hidden] tensor, and d is h times an exact power of two, so they
carry the same bits; h is what the eager fallback has in hand anyway (no extra tensor there), and the
backward recomputes d from it for one compare and one multiply in a memory-bound kernel.

On CPU, or without triton, an eager fallback computes exactly `F.leaky_relu(x @ W.T, 0.5).square()`, so
CPU training is unchanged. Both sit behind the custom ops `pgolf::leaky_relu2_linear_fwd` /
`pgolf::leaky_relu2_linear_bwd`, so torch.compile(fullgraph=True) keeps them as opaque ops.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:  # triton is optional (the `gpu` extra): CPU machines and CI import this module without it
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = tl = None
    HAS_TRITON = False

__all__ = ["leaky_relu2_linear", "HAS_TRITON"]

# Tile sizes: the common choice for a bf16 matmul on H100/H200 (the Triton tutorial's range); NOT tuned
# on a GPU yet. 128×128 fp32 accumulator over 8 warps; 3 stages of 128×64 + 64×128 bf16 tiles = 96 KiB
# of shared memory. GROUP_M row tiles run next to each other so a column tile of W stays in L2.
_BLOCK_M, _BLOCK_N, _BLOCK_K, _GROUP_M, _WARPS, _STAGES = 128, 128, 64, 8, 8, 3
_BWD_BLOCK, _BWD_WARPS = 4096, 8  # elementwise backward: also untuned
_SLOPE = 0.5  # LeakyReLU's negative slope
# Triton's CPU interpreter (tests) multiplies bf16 tiles in tl.dot as their raw uint16 bits, so there the
# tiles go to fp32 first: the same products (exact in fp32) and fp32 sums as the GPU's bf16 dot.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


if HAS_TRITON:
    _SLOPE_C = tl.constexpr(_SLOPE)  # a jit function reads only constexpr globals

    @triton.jit
    def _fwd_kernel(x_ptr, w_ptr, a_ptr, h_ptr, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr, STORE_H: tl.constexpr, PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr):
        # Program id → (row tile, column tile), column-major inside groups of GROUP_M row tiles.
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        group_m = min(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_m
        pid_n = (pid % per_group) // group_m

        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        # int64 rows: row · stride overflows int32 once a tensor has 2³¹ elements
        x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :] * stride_xk
        w_ptrs = w_ptr + rn.to(tl.int64)[None, :] * stride_wn + rk[:, None] * stride_wk  # a [BK, BN] tile of Wᵀ
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            x = tl.load(x_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < K - k), other=0.0)
            w = tl.load(w_ptrs, mask=(rk[:, None] < K - k) & (rn[None, :] < N), other=0.0)
            if UPCAST:
                x, w = x.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk

        # The epilogue: the activation on the fp32 accumulator, rounded once to the output dtype.
        lr = tl.where(acc > 0, acc, _SLOPE_C * acc)
        offs = rm.to(tl.int64)[:, None] * N + rn[None, :]  # a and h are fresh contiguous [M, N]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(a_ptr + offs, (lr * lr).to(a_ptr.dtype.element_ty), mask=mask)
        if STORE_H:
            tl.store(h_ptr + offs, acc.to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_kernel(g_ptr, h_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(h > 0, 2.0 * h, (2.0 * _SLOPE_C * _SLOPE_C) * h)  # d(lr²)/dh = 2·lr·lr'
        tl.store(out_ptr + offs, (g * d).to(out_ptr.dtype.element_ty), mask=mask)


def _triton_forward(x: torch.Tensor, w: torch.Tensor, save_h: bool):
    """Triton path, forced (tests run it on CPU under TRITON_INTERPRET=1): (a, h or an empty tensor)."""
    (m, k), n = x.shape, w.shape[0]
    a = x.new_empty((m, n))
    h = x.new_empty((m, n) if save_h else (0,))
    if m and n:
        # fp32 inputs: tf32 only where torch's own matmuls may use it, else the same function as torch's.
        tf32 = x.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
        grid = (triton.cdiv(m, _BLOCK_M) * triton.cdiv(n, _BLOCK_N),)
        _fwd_kernel[grid](x, w, a, h if save_h else a, m, n, k, x.stride(0), x.stride(1), w.stride(0),
                          w.stride(1), BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, GROUP_M=_GROUP_M,
                          STORE_H=save_h, PRECISION="tf32" if tf32 else "ieee", UPCAST=_INTERPRET,
                          num_warps=_WARPS, num_stages=_STAGES)
    return a, h


def _triton_backward(grad_a: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    grad_h = torch.empty_like(h)
    if h.numel():
        _bwd_kernel[(triton.cdiv(h.numel(), _BWD_BLOCK),)](grad_a, h, grad_h, h.numel(), BLOCK=_BWD_BLOCK,
                                                          num_warps=_BWD_WARPS)
    return grad_h


def _eager_forward(x: torch.Tensor, w: torch.Tensor, save_h: bool):
    with torch.autocast(x.device.type, enabled=False):  # in x's dtype: CUDA autocast would run pow in fp32
        h = x @ w.T
        a = F.leaky_relu(h, _SLOPE).square()
    return a, h if save_h else h.new_empty((0,))


def _eager_backward(grad_a: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    # As autograd of the plain expression: 2h and h/2 are exact, so one rounding, as in its grad·(2·lr).
    with torch.autocast(h.device.type, enabled=False):
        return grad_a * torch.where(h > 0, 2.0 * h, (2.0 * _SLOPE * _SLOPE) * h)


def _use_triton(x: torch.Tensor) -> bool:
    return HAS_TRITON and x.is_cuda


@torch.library.custom_op("pgolf::leaky_relu2_linear_fwd", mutates_args=())
def _fwd(x: torch.Tensor, w: torch.Tensor, save_h: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return (_triton_forward if _use_triton(x) else _eager_forward)(x, w, save_h)


@_fwd.register_fake
def _(x, w, save_h):
    return x.new_empty((x.shape[0], w.shape[0])), x.new_empty((x.shape[0], w.shape[0]) if save_h else (0,))


@torch.library.custom_op("pgolf::leaky_relu2_linear_bwd", mutates_args=())
def _bwd(grad_a: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    grad_a, h = grad_a.contiguous(), h.contiguous()  # the kernel indexes both flat
    return (_triton_backward if _use_triton(h) else _eager_backward)(grad_a, h)


@_bwd.register_fake
def _(grad_a, h):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, w, save_h = inputs
    ctx.save_for_backward(x, w, output[1])
    ctx.mark_non_differentiable(output[1])  # h is saved for the backward, not a differentiable output


def _backward(ctx, grad_a, grad_h_unused):
    x, w, h = ctx.saved_tensors
    if h.numel() != grad_a.numel():
        raise RuntimeError("leaky_relu2_linear_fwd ran with save_h=False; it has no h to differentiate with")
    grad_h = _bwd(grad_a, h)
    grad_x = grad_h @ w if ctx.needs_input_grad[0] else None
    grad_w = grad_h.T @ x if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def leaky_relu2_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """LeakyReLU(x·weightᵀ, 0.5)² [..., hidden] for x [..., d] and weight [hidden, d] (e.g. an fp32 master).

    As `CastedLinear` then the activation: weight is cast to x's dtype, and under autocast both go to the
    autocast dtype as F.linear's inputs would; the result and the gradient w.r.t. x come back in that
    dtype, the gradient w.r.t. weight in weight's. h is stored only when a gradient will be asked for.
    """
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    w = weight.to(dtype)
    x2 = x.to(dtype).reshape(-1, x.shape[-1])
    save_h = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    a, _ = _fwd(x2, w, save_h)
    return a.reshape(*x.shape[:-1], w.shape[0])
