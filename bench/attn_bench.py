"""Attention kernels at the record's shapes: forward + backward time of one layer's attention, with the
document mask (causal, never across a BOS) and, for reference, plain causal.

    python bench/attn_bench.py [--batch 12] [--mean-doc 1000] [--out results.json]

Kernels: PyTorch SDPA (flash backend, causal only; memory-efficient backend with the dense [B,1,T,T]
mask), flex_attention compiled with a BlockMask (pgolf's training path), and FlashAttention-4
(`flash_attn.cute`, when installed) over the same documents as varlen segments (cu_seqlens) and causal
only. Document lengths are drawn from an exponential distribution (mean --mean-doc tokens) and cut at the
2048-token window edges, as a packed training batch is.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def doc_ids(batch: int, seq: int, mean_doc: float, gen: torch.Generator) -> torch.Tensor:
    """[B, T] document index of every position (a new document starts where a drawn length runs out)."""
    starts = torch.zeros(batch, seq, dtype=torch.bool)
    for b in range(batch):
        pos = 0
        while pos < seq:
            starts[b, pos] = True
            pos += max(1, int(torch.empty(1).exponential_(1 / mean_doc, generator=gen)))
    return torch.cumsum(starts.long(), dim=1)


def cu_seqlens(doc: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Boundaries of every (window, document) segment over the flattened [B·T] tokens, and the longest."""
    B, T = doc.shape
    flat = (doc + torch.arange(B)[:, None] * (T + 1)).reshape(-1)
    change = torch.ones_like(flat, dtype=torch.bool)
    change[1:] = flat[1:] != flat[:-1]
    starts = torch.nonzero(change).flatten()
    bounds = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
    return bounds, int((bounds[1:] - bounds[:-1]).max())


def timed(fn, iters: int, warmup: int) -> float:
    """Median milliseconds of fn() over iters calls (after warmup), by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=12)  # pr2071 on one GPU: 196,608 tokens / 8 micro-steps / 2048
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--mean-doc", type=float, default=1000.0)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev = "cuda"
    B, T, H, KV, D = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    gen = torch.Generator().manual_seed(0)
    doc = doc_ids(B, T, args.mean_doc, gen).to(dev)
    bounds, max_len = cu_seqlens(doc.cpu())
    bounds = bounds.to(dev)
    q0 = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16)
    k0 = torch.randn(B, T, KV, D, device=dev, dtype=torch.bfloat16)
    v0 = torch.randn(B, T, KV, D, device=dev, dtype=torch.bfloat16)
    grad = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16)
    dense = (torch.ones(T, T, dtype=torch.bool, device=dev).tril() & (doc[:, :, None] == doc[:, None, :]))[:, None]

    def same_document_causal(b, h, q, kv):
        return (q >= kv) & (doc[b, q] == doc[b, kv])

    block_mask = create_block_mask(same_document_causal, B, None, T, T, device=dev)
    flex = torch.compile(flex_attention, dynamic=False)

    # Each kernel: a function of (q, k, v) in [B, T, heads, D] layout returning [B, T, H, D].
    def bhtd(fn):
        return lambda q, k, v: fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    kernels = {
        "sdpa_flash_causal (no doc mask)": bhtd(lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True)),
        "sdpa_dense_doc_mask": bhtd(lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, attn_mask=dense, enable_gqa=True)),
        "flex_block_mask": bhtd(lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=True)),
    }
    fa4_version = None
    try:
        import flash_attn.cute as fa4
        from importlib.metadata import version

        fa4_version = version("flash-attn-4")

        def first(r):
            return r[0] if isinstance(r, tuple) else r

        kernels["fa4_varlen_doc_mask"] = lambda q, k, v: first(fa4.flash_attn_varlen_func(
            q.reshape(B * T, H, D), k.reshape(B * T, KV, D), v.reshape(B * T, KV, D), cu_seqlens_q=bounds,
            cu_seqlens_k=bounds, max_seqlen_q=max_len, max_seqlen_k=max_len, causal=True)).reshape(B, T, H, D)
        kernels["fa4_causal (no doc mask)"] = lambda q, k, v: first(fa4.flash_attn_func(q, k, v, causal=True))
    except Exception as exc:  # not installed, or no kernel for this GPU
        print(f"flash-attn-4 unavailable: {type(exc).__name__}: {exc}")

    reference = kernels["sdpa_dense_doc_mask"](q0, k0, v0).float()
    results = {}
    for name, fn in kernels.items():
        q, k, v = (t.clone().requires_grad_(True) for t in (q0, k0, v0))

        def fwd_bwd():
            out = fn(q, k, v)
            out.backward(grad)

        def fwd():
            with torch.no_grad():
                fn(q0, k0, v0)

        t0 = time.perf_counter()
        try:
            fwd_bwd()
            torch.cuda.synchronize()
        except Exception as exc:
            print(f"{name}: failed: {type(exc).__name__}: {exc}")
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        first_call_s = time.perf_counter() - t0
        with torch.no_grad():
            diff = (fn(q0, k0, v0).float() - reference).abs().max().item()
        results[name] = {"fwd_bwd_ms": timed(fwd_bwd, args.iters, 3), "fwd_ms": timed(fwd, args.iters, 3),
                         "max_abs_diff_vs_dense": diff, "first_call_s": round(first_call_s, 2)}
        print(name, json.dumps(results[name]))
    mask_ms = timed(lambda: create_block_mask(same_document_causal, B, None, T, T, device=dev), args.iters, 3)
    out = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "flash_attn_4": fa4_version,
        "shape": {"batch": B, "seq": T, "heads": H, "kv_heads": KV, "head_dim": D, "mean_doc": args.mean_doc,
                  "segments": int(bounds.numel() - 1)},
        "create_block_mask_ms": mask_ms, "kernels": results,
    }
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
