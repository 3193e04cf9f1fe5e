"""The linear layer every block matrix is: fp32 master weights, matmuls in the activation dtype, and the
hooks QAT and test-time LoRA use. A leaf module, so that the model and the seed-study layers
(pgolf.nn.studies) can both build on it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CastedLinear(nn.Linear):
    """Weights stay fp32 (the optimizer's master copy); the matmul runs in the activation dtype.

    With QAT enabled (`enable_qat`), the weight goes through a straight-through per-row fake quantizer,
    blended in by the `qat_mix` buffer (0 off, 1 on): the forward sees the quantized weight, the
    gradient flows to the float weight unchanged. `adapter` (test-time LoRA, pgolf.ttt.lora) adds its
    output; it is a plain callable, not a submodule, so it never enters the state dict."""

    qat_bits = 0
    adapter = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.qat_bits:
            w = w + self.qat_mix * (fake_quantize(w, self.qat_bits) - w).detach()
        out = F.linear(x, w.to(x.dtype))
        return out if self.adapter is None else out + self.adapter(x)


def fake_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-row round-to-nearest on ±(2^(b−1)−1) levels, scale = row absmax (no clipping)."""
    top = 2 ** (bits - 1) - 1
    scale = w.detach().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / top
    return torch.round(w / scale).clamp(-top, top) * scale
