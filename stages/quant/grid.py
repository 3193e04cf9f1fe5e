"""The quantization grid: symmetric integer levels, where each row is clipped, and round-to-nearest.

With `bits=8` and the percentile clip, `quantize_rtn_tensor` is the challenge baseline's int8 export
(the reference `train_gpt.py`): per-row clip at the 99.99984th percentile of |w|, fp16 row scales floored
at 1/127. Every other setting rounds with the fp16 scale that is stored, so the codes use exactly the
grid a reader decodes.
"""

from __future__ import annotations

import torch

# The reference's int8 floor: a row whose clip is below 1 still gets step 1/127. Kept bit-exact for the
# reference path only; at lower bits a floor of 1/R would round every trained weight to 0 (R = 1 at
# 2 bits), so there the scale only avoids zero (fp16's smallest subnormal) for all-zero rows.
REFERENCE_INT8_SCALE_FLOOR = 1.0 / 127.0
ZERO_ROW_GUARD = 2.0 ** -24
# torch.quantile refuses inputs above 2^24 elements; rows are processed in chunks below that.
QUANTILE_MAX_NUMEL = 1 << 24


def levels(bits: int) -> int:
    """R: codes run over −R..R (symmetric, so zero is exact)."""
    return 2 ** (bits - 1) - 1


def is_reference_int8(bits: int, clip: str) -> bool:
    return bits == 8 and clip == "percentile"


def _quantile_flat(x: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(x, q) (linear interpolation) for 1-D inputs of any size."""
    if x.numel() <= QUANTILE_MAX_NUMEL:
        return torch.quantile(x, q)
    values = x.sort().values
    rank = torch.tensor(q, dtype=x.dtype) * (x.numel() - 1)
    below = int(rank.floor())
    above = min(int(rank.ceil()), x.numel() - 1)
    return torch.lerp(values[below], values[above], rank - below)


def _row_quantile(a: torch.Tensor, q: float) -> torch.Tensor:
    rows_per_chunk = max(1, QUANTILE_MAX_NUMEL // max(1, a.shape[1]))
    return torch.cat([torch.quantile(chunk, q, dim=1) for chunk in a.split(rows_per_chunk)])


def clip_values(w: torch.Tensor, per_row: bool, clip: str, clip_percentile: float, sdclip_k: float) -> torch.Tensor:
    """|w| beyond the returned value saturates: one value per row (per_row) or a 0-d tensor."""
    if clip == "percentile":
        q = clip_percentile / 100.0
        return _row_quantile(w.abs(), q) if per_row else _quantile_flat(w.abs().flatten(), q)
    # SDClip: c = k·std; the grid spans ±kσ, so k sets how many levels the bulk of the row uses.
    std = w.std(dim=1) if per_row else w.std()
    return (sdclip_k * torch.nan_to_num(std, nan=0.0)).float()


def row_scales(w: torch.Tensor, bits: int, clip: str, clip_percentile: float, sdclip_k: float) -> torch.Tensor:
    """The fp16 per-row step of a 2-D weight, as it will be stored (GPTQ rounds on this grid too)."""
    c = clip_values(w, True, clip, clip_percentile, sdclip_k)
    return (c / levels(bits)).clamp_min(ZERO_ROW_GUARD).to(torch.float16)


def quantize_rtn_tensor(t: torch.Tensor, bits: int, clip: str, clip_percentile: float, sdclip_k: float
                        ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(int8 codes, scale, scheme). 2-D: per-row fp16 scales; other ranks: one fp32 scale.

    The reference int8 export rounds with the fp32 scale floored at 1/127 and stores it fp16 afterwards.
    Other settings round with the fp16 scale that is stored, so |w − ŵ| ≤ scale/2 holds exactly for
    every unclipped weight.
    """
    w = t.detach().float()
    R = levels(bits)
    if w.ndim == 2:
        c = clip_values(w, True, clip, clip_percentile, sdclip_k)
        clipped = torch.clamp(w, -c[:, None], c[:, None])
        if is_reference_int8(bits, clip):
            scale = (c / 127.0).clamp_min(REFERENCE_INT8_SCALE_FLOOR)
            q = torch.clamp(torch.round(clipped / scale[:, None]), -R, R)
            return q.to(torch.int8).contiguous(), scale.to(torch.float16).contiguous(), "per_row"
        scale16 = (c / R).clamp_min(ZERO_ROW_GUARD).to(torch.float16)
        q = torch.clamp(torch.round(clipped / scale16.float()[:, None]), -R, R)
        return q.to(torch.int8).contiguous(), scale16.contiguous(), "per_row"
    c = clip_values(w, False, clip, clip_percentile, sdclip_k)
    c_value = float(c)
    scale = torch.tensor(c_value / R if c_value > 0 else 1.0, dtype=torch.float32)
    q = torch.clamp(torch.round(torch.clamp(w, -c_value, c_value) / scale), -R, R)
    return q.to(torch.int8).contiguous(), scale, "per_tensor"


def round_to_scale(x: torch.Tensor, scale: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes in [lo, hi], fp16 scale): codes are rounded with the fp16 scale that is stored (low-rank
    factors: LQER's, embed_rank's)."""
    scale16 = scale.clamp_min(ZERO_ROW_GUARD).to(torch.float16)
    return torch.clamp(torch.round(x / scale16.float()), lo, hi).to(torch.int8), scale16


KMEANS_ITERS = 25  # Lloyd iterations; the distortion has settled to < 1e-4 relative by then on weight matrices


def kmeans_codebook(w: torch.Tensor, bits: int, iters: int = KMEANS_ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, fp16 codebook of 2^bits levels): 1-D k-means of all of a tensor's weights (PR #212's
    codebooks). Lloyd's algorithm from the uniform grid over [min, max], so its squared error never exceeds
    that grid's; the indices are assigned last, to the fp16 levels as stored."""
    x = w.detach().float().flatten()
    levels = 2 ** bits
    book = torch.linspace(float(x.min()), float(x.max()), levels)
    for _ in range(iters):
        idx = torch.bucketize(x, (book[1:] + book[:-1]) / 2)  # nearest level: the book is sorted
        sums = torch.zeros(levels).index_add_(0, idx, x)
        counts = torch.bincount(idx, minlength=levels)
        book = torch.where(counts > 0, sums / counts.clamp_min(1), book).sort().values
    book16 = book.half()
    stored = book16.float()
    idx = torch.bucketize(x, (stored[1:] + stored[:-1]) / 2)
    return idx.view(w.shape), book16
