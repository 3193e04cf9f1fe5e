"""A stand-in for FlashAttention 3's `flash_attn_interface`, so the record script (PR #1855) can run on
machines without FA3 (bench/record_fidelity.sh puts this folder on PYTHONPATH). Bench only: pgolf never
imports it.

Both entry points run PyTorch's scaled_dot_product_attention (the flash backend the script leaves on):
- flash_attn_func(q, k, v, causal=True): (B, T, H, D) tensors, grouped-query heads (H a multiple of Hkv);
- flash_attn_varlen_func(...): packed (T, H, D) tensors whose documents `cu_seqlens` delimits. The
  segments are gathered into one padded batch and attended causally; padding sits after each segment's
  last token, so causal attention never lets a real query see it. It is a custom op (opaque to
  torch.compile: the segment lengths live on the host) with a recomputing backward.
FA3 semantics kept: query head h reads key/value head h // (H / Hkv); softmax scale 1/sqrt(D); only
causal=True and window_size=(-1, -1) (what the record script passes) are accepted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _sdpa_bthd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention on (B, T, H, D) inputs with Hkv ≤ H key/value heads, in the inputs' layout."""
    group = q.size(2) // k.size(2)
    if group > 1:
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    dtype = q.dtype
    if dtype not in (torch.bfloat16, torch.float16) and q.is_cuda:  # the flash backend's dtypes
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return y.transpose(1, 2).to(dtype)


def flash_attn_func(q, k, v, causal=True, **kwargs):
    if not causal:
        raise NotImplementedError("the shim implements causal attention only")
    return _sdpa_bthd(q, k, v)


def _segments(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather indices [n, L] of the non-empty segments and the mask of their real positions."""
    cu = cu_seqlens.tolist()
    bounds = [(a, b) for a, b in zip(cu[:-1], cu[1:]) if b > a]
    if not bounds or bounds[0][0] != 0 or bounds[-1][1] != total:
        raise ValueError(f"cu_seqlens {cu[:8]}… do not cover the {total} packed tokens")
    starts = torch.tensor([a for a, _ in bounds], device=cu_seqlens.device)
    lengths = torch.tensor([b - a for a, b in bounds], device=cu_seqlens.device)
    offsets = torch.arange(int(lengths.max()), device=cu_seqlens.device)
    real = offsets[None, :] < lengths[:, None]
    return (starts[:, None] + offsets[None, :]).clamp(max=total - 1), real


def _varlen(q, k, v, cu_seqlens):
    index, real = _segments(cu_seqlens, q.size(0))
    y = _sdpa_bthd(q[index], k[index], v[index])  # [n, L, H, D]
    out = torch.empty_like(q)
    out[index[real]] = y[real]
    return out


@torch.library.custom_op("pgolf_bench::varlen_attn", mutates_args=())
def varlen_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    return _varlen(q, k, v, cu_seqlens)


@varlen_attn.register_fake
def _(q, k, v, cu_seqlens):
    return torch.empty_like(q)


@torch.library.custom_op("pgolf_bench::varlen_attn_backward", mutates_args=())
def varlen_attn_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # torch.func's own autograd level: plain autograd is switched off inside a custom op
    _, vjp = torch.func.vjp(lambda q_, k_, v_: _varlen(q_, k_, v_, cu_seqlens), q, k, v)
    return vjp(grad)


@varlen_attn_backward.register_fake
def _(grad, q, k, v, cu_seqlens):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    q, k, v, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = varlen_attn_backward(grad.contiguous(), q, k, v, cu_seqlens)
    return dq, dk, dv, None


varlen_attn.register_autograd(_backward, setup_context=_setup_context)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                           causal=True, window_size=(-1, -1), **kwargs):
    if not causal or tuple(window_size) != (-1, -1) or cu_seqlens_q is not cu_seqlens_k and not torch.equal(
            cu_seqlens_q, cu_seqlens_k):
        raise NotImplementedError("the shim implements causal self-attention without a window only")
    return varlen_attn(q, k, v, cu_seqlens_q)
