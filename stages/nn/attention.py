"""Document-masked causal attention, by backend: which kernel runs it is a speed choice, never a numerics one.

A training window packs several documents; a token may attend only to earlier tokens of its own document
(documents start at BOS). Three ways to compute the same thing:
- `sdpa`: PyTorch's scaled_dot_product_attention with a dense [B, 1, T, T] boolean mask (no compiled kernel
  needed; memory grows with T², so it is the evaluation default);
- `flex`: flex_attention with a BlockMask, whose fully masked blocks are skipped (compiled on CUDA);
- `fa4`: FlashAttention-4's varlen kernel (flash-attn-4, CuTe DSL, SM90+), on the packed tokens cut into
  segments by `cu_seqlens` — the layout the record (PR #1855, with FA3) trains with. It is a torch custom op
  with its own backward, so `torch.compile(fullgraph=True)` keeps it as one node.

Segments for `fa4` are planned on the host (`plan_segments`) from the tokens the loader already has there:
their number changes per batch, and a graph cannot size a tensor from data without a host sync. The plan is
padded with empty segments to a capacity that only grows (`SegmentPlanner`), so the compiled graph sees one
shape and recompiles at most a few times per run.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from pgolf.errors import PgolfError

# ---- dense and flex masks (sdpa, flex)


def document_mask(input_ids: torch.Tensor, bos_id: int, prefix: int = 0) -> torch.Tensor:
    """[B, 1, T, T] boolean: causal, and only within the query's document (documents start at BOS).

    Tokens before a window's first BOS form a document of their own (the tail of one cut by the window).
    `prefix`: the attended sequence is [P shared positions; the T tokens] (memory tokens, pgolf.nn.studies), the
    mask [B, 1, P + T, P + T]: every position also sees all of the prefix before it (causal among itself).
    """
    doc = _document_index(input_ids, bos_id, prefix)
    T = doc.size(1)
    pos = torch.arange(T, device=input_ids.device)
    same = (doc[:, :, None] == doc[:, None, :]) | (pos < prefix)[None, None, :]
    return (same & (pos[:, None] >= pos[None, :]))[:, None]


def flex_document_mask(input_ids: torch.Tensor, bos_id: int, prefix: int = 0):
    """The same mask as `document_mask`, as a flex_attention BlockMask: fully masked blocks are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc = _document_index(input_ids, bos_id, prefix)

    def prefix_or_same_document_causal(b, h, q, kv):
        return (q >= kv) & ((kv < prefix) | (doc[b, q] == doc[b, kv]))

    B, T = doc.shape
    return create_block_mask(prefix_or_same_document_causal, B, None, T, T, device=input_ids.device)


def _document_index(input_ids: torch.Tensor, bos_id: int, prefix: int) -> torch.Tensor:
    """Each position's document number [B, P + T]; the P prefix positions form a document (−1) of their own."""
    doc = torch.cumsum(input_ids == bos_id, dim=1)
    return F.pad(doc, (prefix, 0), value=-1) if prefix else doc


_compiled_flex = None


def flex_attention_fn(cuda: bool):
    """flex_attention, compiled on CUDA (a fused kernel; eager materialises every score), eager on CPU."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if not cuda:
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


# ---- varlen segments (fa4)


def segment_starts(tokens: np.ndarray, bos_id: int) -> np.ndarray:
    """Start offsets, in the flattened [B·T] tokens, of every segment: each row's first position and every
    BOS after it. A segment never crosses a row (window) edge or a document start."""
    is_start = tokens == bos_id
    is_start[:, 0] = True
    return np.flatnonzero(is_start.reshape(-1)).astype(np.int32)


def cu_seqlens_from_starts(starts: np.ndarray, total: int, capacity: int) -> np.ndarray:
    """FlashAttention's cumulative boundaries [capacity + 1]: the starts, then `total` repeated (empty segments)."""
    cu = np.full(capacity + 1, total, dtype=np.int32)
    cu[:starts.size] = starts
    return cu


class SegmentPlanner:
    """Host-side cu_seqlens for batches of one shape [B, T]. The capacity (segments per batch) starts at B plus
    one per 256 tokens and doubles when a batch needs more, so the compiled step sees a fixed shape."""

    def __init__(self, bos_id: int):
        self.bos_id = bos_id
        self.capacity = 0

    def plan(self, tokens: np.ndarray) -> torch.Tensor:
        """cu_seqlens [capacity + 1] (int32, on the host) for tokens [B, T]."""
        B, T = tokens.shape
        starts = segment_starts(tokens, self.bos_id)
        self.capacity = max(self.capacity, B + B * T // 256)
        while starts.size > self.capacity:
            self.capacity *= 2
        return torch.from_numpy(cu_seqlens_from_starts(starts, B * T, self.capacity))


def segments_of(input_ids: torch.Tensor, bos_id: int) -> torch.Tensor:
    """cu_seqlens for `input_ids` where no planner ran (evaluation, calibration): reads the tokens on the host."""
    B, T = input_ids.shape
    starts = segment_starts(input_ids.detach().cpu().numpy(), bos_id)
    return torch.from_numpy(cu_seqlens_from_starts(starts, B * T, starts.size)).to(input_ids.device)


# ---- the varlen kernel as a custom op, with a reference implementation for CPU


def fa4_interface():
    try:
        from flash_attn.cute import interface
    except ImportError as e:
        raise PgolfError("attn_backend fa4 needs FlashAttention-4 (`pip install flash-attn-4`) and an SM90+ GPU; "
                         "use --set model.attn_backend=flex") from e
    return interface


def training_backend(backend: str, device: torch.device, doc_mask: bool, prefix: int = 0) -> str:
    """The kernel the training step runs for `backend`. `auto` takes fa4 where it is installed and the GPU is
    SM90+ (1.43× flex's forward + backward at `record`'s 48 sequences; bench/README, issue 16), else flex on
    CUDA, the dense mask on CPU. fa4 cannot give documents a shared prefix (memory tokens). An fa4 asked for on
    CUDA without FlashAttention-4 fails here, with the fix, rather than inside the first compiled step."""
    if not doc_mask:
        return backend
    if backend == "fa4" and device.type == "cuda":
        fa4_interface()
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "sdpa"
    if prefix == 0 and torch.cuda.get_device_capability(device)[0] >= 9:
        try:
            fa4_interface()
            return "fa4"
        except PgolfError:
            pass
    return "flex"


def _reference_varlen(q, k, v, cu_seqlens):
    """Attention over packed [N, H, D] tokens, causal within each cu_seqlens segment, in float32; also the
    log-sum-exp [H, N] of each query's scores. For CPU and for tests: one segment at a time."""
    N, H, D = q.shape
    group = H // k.size(1)
    out = torch.zeros(N, H, D, dtype=torch.float32, device=q.device)
    lse = torch.zeros(H, N, dtype=torch.float32, device=q.device)
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b <= a:
            continue  # padding: an empty segment
        qs = q[a:b].float().transpose(0, 1)
        ks = k[a:b].float().repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[a:b].float().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (qs @ ks.transpose(1, 2)) / D ** 0.5
        causal = torch.ones(b - a, b - a, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        lse[:, a:b] = torch.logsumexp(scores, dim=-1)  # finite: a query always sees itself
        out[a:b] = (torch.softmax(scores, dim=-1) @ vs).transpose(0, 1)
    return out.to(q.dtype), lse


@torch.library.custom_op("pgolf::varlen_attention", mutates_args=())
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [N, H, D], lse [H, N] float32) of document-causal attention; grouped KV heads (H a multiple of Hkv)."""
    if q.is_cuda:
        out, lse = fa4_interface().flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                                 max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, causal=True,
                                                 return_lse=True)
        return out, lse
    return _reference_varlen(q, k, v, cu_seqlens)


@varlen_attention.register_fake
def _(q, k, v, cu_seqlens, max_seqlen):
    return torch.empty_like(q), q.new_empty((q.size(1), q.size(0)), dtype=torch.float32)


@torch.library.custom_op("pgolf::varlen_attention_backward", mutates_args=())
def varlen_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor,
                              max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if q.is_cuda:
        dq, dk, dv = fa4_interface()._flash_attn_bwd(q, k, v, out, grad, lse, None, True, 0.0, cu_seqlens_q=cu_seqlens,
                                            cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                                            max_seqlen_k=max_seqlen)
        return dq, dk, dv
    # plain autograd is off inside a custom op; torch.func keeps its own level
    _, vjp = torch.func.vjp(lambda q_, k_, v_: _reference_varlen(q_, k_, v_, cu_seqlens)[0], q, k, v)
    return vjp(grad)


@varlen_attention_backward.register_fake
def _(grad, q, k, v, out, lse, cu_seqlens, max_seqlen):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens)
    ctx.max_seqlen = max_seqlen


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = varlen_attention_backward(grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.max_seqlen)
    return dq, dk, dv, None, None


varlen_attention.register_autograd(_backward, setup_context=_setup_context)


def varlen_bthd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The fa4 backend on the model's [B, T, H, D] tensors: the packed [B·T, H, D] tokens are a view of them."""
    B, T, H, D = q.shape

    def packed(t):
        return t.reshape(B * T, t.size(2), D).contiguous()  # a view: the projections wrote [B, T, H, D]

    y, _ = varlen_attention(packed(q), packed(k), packed(v), cu_seqlens, T)
    return y.view(B, T, H, D)


# PR #375 compared SDPA's kernels on plain causal attention: these backends pin SDPA to one of them
SDPA_KERNELS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION"}


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, backend: str = "auto") -> torch.Tensor:
    """Causal attention of [B, T, H, D] queries on [B, T, Hkv, D] keys/values under `mask`, giving [B, T, H, D]:
    mask None (causal), a dense bool mask, a flex BlockMask, or `Segments` (fa4). `backend` sdpa_flash /
    sdpa_cudnn: SDPA restricted to that kernel (PyTorch has a CPU flash kernel too; cuDNN is CUDA only, so on
    CPU SDPA chooses). SDPA and flex take heads first: they get transposed views."""
    if isinstance(mask, Segments):
        return varlen_bthd(q, k, v, mask.cu_seqlens)
    gqa = k.size(2) != q.size(2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if mask is not None and not isinstance(mask, torch.Tensor):  # a flex_attention BlockMask
        return flex_attention_fn(q.is_cuda)(q, k, v, block_mask=mask, enable_gqa=gqa).transpose(1, 2)
    pinned = contextlib.nullcontext()
    if backend == "sdpa_flash" or (backend == "sdpa_cudnn" and q.is_cuda):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        pinned = sdpa_kernel(getattr(SDPBackend, SDPA_KERNELS[backend]))
    with pinned:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
    return y.transpose(1, 2)


class Segments:
    """The fa4 backend's mask: cu_seqlens over the batch's flattened tokens (a wrapper, so `attend` can tell it
    from a dense mask tensor)."""

    def __init__(self, cu_seqlens: torch.Tensor):
        self.cu_seqlens = cu_seqlens


def mask_for(backend: str, input_ids: torch.Tensor, bos_id: int, cu_seqlens: torch.Tensor | None = None,
             prefix: int = 0):
    """The document mask the chosen backend takes; planned `cu_seqlens` mean fa4 (the trainer chose it, see
    `training_backend`). `auto` otherwise: flex with gradients on CUDA (it skips masked blocks), SDPA's dense
    mask without them (evaluation, calibration: no compiled kernel).
    `prefix`: shared positions before the tokens that every token may read (memory tokens); not for fa4."""
    if backend == "fa4" or cu_seqlens is not None:
        if prefix:
            raise PgolfError("attn_backend fa4 attends within varlen segments and cannot give every document a "
                             "shared prefix (memory_tokens); use attn_backend flex or sdpa")
        return Segments(cu_seqlens if cu_seqlens is not None else segments_of(input_ids, bos_id))
    flex = backend == "flex" or (backend == "auto" and input_ids.is_cuda and torch.is_grad_enabled())
    return (flex_document_mask if flex else document_mask)(input_ids, bos_id, prefix)
