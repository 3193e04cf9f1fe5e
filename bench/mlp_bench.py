"""The fused LeakyReLU² up-projection (pgolf.nn.fused_mlp) against the compiled plain expression, on a GPU:
    python bench/mlp_bench.py --out FILE.json
`record`'s micro-batch on one GPU: x [98,304, 512] bf16, W [2,048, 512]; forward + backward (median of 20), the
largest differences from the plain expression in float32, and peak memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from pgolf.nn.fused_mlp import leaky_relu2_linear


def plain(x, w):
    return F.leaky_relu(x @ w.to(x.dtype).T, 0.5).square()


def timed(fn, x, w, g, reps: int = 20) -> tuple[float, float]:
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(reps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a = fn(x, w)
        a.backward(g)
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
        x.grad = w.grad = None
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    M, d, hidden = 98_304, 512, 2048
    x = torch.randn(M, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(hidden, d, device="cuda") / d ** 0.5).requires_grad_()
    g = torch.randn(M, hidden, device="cuda", dtype=torch.bfloat16)
    result = {"device": torch.cuda.get_device_name(), "shape": [M, d, hidden]}
    compiled_plain = torch.compile(plain, fullgraph=True)
    compiled_fused = torch.compile(leaky_relu2_linear, fullgraph=True)
    for name, fn in (("plain_compiled", compiled_plain), ("fused", leaky_relu2_linear),
                     ("fused_compiled", compiled_fused)):
        ms, gib = timed(fn, x, w, g)
        result[name] = {"fwd_bwd_ms": ms, "peak_gib": gib}
        print(name, result[name], flush=True)
    ref = plain(x.float(), w)
    ref.backward(g.float())
    rx, rw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    out = leaky_relu2_linear(x, w)
    out.backward(g)
    bf16_plain = plain(x, w)
    result["max_abs_diff_vs_fp32"] = {"a": (out.float() - ref).abs().max().item(),
                                      "a_plain_bf16": (bf16_plain.float() - ref).abs().max().item(),
                                      "grad_x_rel": ((x.grad.float() - rx).norm() / rx.norm()).item(),
                                      "grad_w_rel": ((w.grad - rw).norm() / rw.norm()).item()}
    print(result["max_abs_diff_vs_fp32"], flush=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
