"""FlashAttention 3's `flash_attn_interface`, served by FlashAttention-4 through pgolf's varlen custom op, so the
record script (PR #1855) trains on the same attention kernel as pgolf's `attn_backend: fa4` in the speed
side-by-side (bench/speed_sidebyside.sh puts this folder first on PYTHONPATH). The lent machines have no FA3;
with both sides on one kernel, the comparison measures everything else. Bench only: pgolf never imports it.

FA3 semantics kept: (T, H, D) packed varlen tensors delimited by cu_seqlens, or (B, T, H, D) batches; grouped
key/value heads; softmax scale 1/sqrt(D); causal=True and window_size=(-1, -1) only (what the script passes).
"""

from __future__ import annotations

import torch

from pgolf.nn.attention import varlen_attention


def _check(causal, window_size):
    if not causal or tuple(window_size) not in ((-1, -1), (None, None)):
        raise NotImplementedError("the FA4-backed shim implements causal, unwindowed attention only")


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
                           window_size=(-1, -1), **kwargs):
    _check(causal, window_size)
    return varlen_attention(q, k, v, cu_seqlens_q, int(max_seqlen_q))[0]


def flash_attn_func(q, k, v, causal=False, window_size=(-1, -1), **kwargs):
    _check(causal, window_size)
    B, T, H, D = q.shape
    cu = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=q.device)
    flat = [t.reshape(B * T, t.size(2), D) for t in (q, k, v)]
    return varlen_attention(*flat, cu, T)[0].view(B, T, H, D)
