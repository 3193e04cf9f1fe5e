"""The fused softcapped cross-entropy (pgolf.nn.fused_ce) against the plain expression, on a GPU:
    python bench/ce_bench.py --out FILE.json
Agreement with the float32 expression (loss and gradient, ε = 0 and 0.1, bf16 logits), then forward + backward
time and extra peak memory at `record`'s micro-batch on one GPU (98,304 × 8,192), eager and compiled.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from pgolf.nn.fused_ce import softcapped_cross_entropy

CAP = 30.0


def plain(z, t, eps):
    return F.cross_entropy((CAP * torch.tanh(z / CAP)).float(), t, label_smoothing=eps)


def fused(z, t, eps):
    return softcapped_cross_entropy(z, t, CAP, eps)


def loss_and_grad(fn, z, t, eps):
    z = z.clone().requires_grad_()
    loss = fn(z, t, eps)
    loss.backward()
    return loss.item(), z.grad.float()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "agreement": [], "timing": {}}
    for n, v in ((37, 1001), (4096, 8192), (98_304, 8192)):
        for eps in (0.0, 0.1):
            z = (torch.randn(n, v, device="cuda") * 20).bfloat16()
            t = torch.randint(0, v, (n,), device="cuda")
            lf, gf = loss_and_grad(fused, z, t, eps)
            l32, g32 = loss_and_grad(lambda a, b, e: plain(a.float(), b, e), z, t, eps)
            result["agreement"].append({"n": n, "v": v, "eps": eps, "loss_diff_vs_fp32": abs(lf - l32),
                                        "grad_max_diff_vs_fp32": (gf - g32).abs().max().item(),
                                        "grad_max": g32.abs().max().item()})
            print(result["agreement"][-1], flush=True)
    n, v = 98_304, 8192
    z = (torch.randn(n, v, device="cuda") * 20).bfloat16().requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda")
    for name, fn in (("fused", fused), ("fused_compiled", torch.compile(fused, fullgraph=True)),
                     ("plain", plain), ("plain_compiled", torch.compile(plain, fullgraph=True))):
        def step():
            z.grad = None
            fn(z, t, 0.1).backward()
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms = do_bench(step, warmup=5, rep=50)
        result["timing"][name] = {"fwd_bwd_ms": ms,
                                  "peak_extra_gb": (torch.cuda.max_memory_allocated() - base) / 1e9}
        print(name, result["timing"][name], flush=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
