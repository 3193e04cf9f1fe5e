"""Host against device time per step, from bench/step_profile.py's Chrome traces (issue 16's "what is left").

    python bench/trace_summary.py TRACE.json.gz [...] [--steps 3] [--out FILE.json]

Per trace, per optimizer step: the span of device work, the busy union of kernels (the record_function labels'
device spans are not work and are left out), its NCCL part, device idle time and the largest gaps; and per
micro-batch the host time of the `pgolf.micro_batch` label and of its compiled forward and backward (AOT
`CompiledFunction` / `CompiledFunctionBackward` calls, summed over the graphs it ran) beside the device time
of its compute kernels (NCCL left out) and the step's kernels over its micro-batches. A step whose host time per micro-batch exceeds the
device's is bound by the host: the GPU waits for launches. A step whose device is busy is bound by its kernels:
`kernel_ms_per_step_by_kind` says which (attention, matmuls, the compiled elementwise kernels, ...), summed
durations, so kernels that overlap count twice; `top_kernels` names the largest. `host_us_per_pgolf_op_call`:
the host time of each call of pgolf's custom ops (the fa4 attention's Python interface, issue 16), which CUDA
graphs remove and a host-bound step pays in full.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from pathlib import Path


def union(spans):
    out = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


# a kernel's kind by its name, first match wins: flex_attention's kernels are Triton templates, so attention
# is asked before Triton; cuBLAS's Hopper kernels are named nvjet_* and split-K GEMMs add a reduce kernel
KINDS = (("attention", ("flex_attention", "flash", "fmha", "attention")),
         ("matmul", ("nvjet", "gemm", "cutlass", "splitkreduce", "xmma")),
         ("nccl", ("nccl",)),
         ("cross_entropy", ("_ce_",)),
         ("compiled_elementwise", ("triton_",)))


def kind(kernel_name: str) -> str:
    name = kernel_name.lower()
    return next((k for k, marks in KINDS if any(m in name for m in marks)), "other")


def by_kind(kernels: list[dict], steps: int) -> dict:
    """ms a step of each kind of kernel (summed durations), largest first."""
    out: dict[str, float] = {}
    for e in kernels:
        k = kind(e["name"])
        out[k] = out.get(k, 0.0) + e["dur"] / 1000.0 / steps
    return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def top_kernels(kernels: list[dict], steps: int, n: int = 12) -> list[dict]:
    """The n largest kernels by summed duration, instances of one kernel together (Inductor numbers its kernels,
    `triton_poi_fused_add_7`; the number is dropped), in ms and calls a step."""
    total: dict[str, list[float]] = {}
    for e in kernels:
        name = re.sub(r"_\d+$", "", e["name"])[:100]
        t = total.setdefault(name, [0.0, 0])
        t[0] += e["dur"]
        t[1] += 1
    rows = sorted(total.items(), key=lambda kv: -kv[1][0])[:n]
    return [{"kernel": k, "ms_per_step": round(d / 1000.0 / steps, 1), "calls_per_step": round(c / steps, 1)}
            for k, (d, c) in rows]


def host_us_per_op_call(events: list[dict], prefix: str = "pgolf::") -> dict:
    """Mean host µs of each call of the custom ops named prefix…, with their count."""
    calls: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "cpu_op" and e["name"].startswith(prefix):
            calls.setdefault(e["name"], []).append(e["dur"])
    return {k: {"calls": len(v), "host_us_per_call": round(sum(v) / len(v), 1)} for k, v in sorted(calls.items())}


def summarize(path: Path, steps: int) -> dict:
    events = [e for e in json.load(gzip.open(path))["traceEvents"] if e.get("ph") == "X"]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    busy = union([(e["ts"], e["ts"] + e["dur"]) for e in kernels])
    nccl = union([(e["ts"], e["ts"] + e["dur"]) for e in kernels if "nccl" in e["name"].lower()])
    compute = union([(e["ts"], e["ts"] + e["dur"]) for e in kernels if "nccl" not in e["name"].lower()])
    gaps = sorted((busy[i + 1][0] - busy[i][1] for i in range(len(busy) - 1)), reverse=True)
    host = [e for e in events if e.get("cat") == "user_annotation"]
    micro = [e["dur"] for e in host if e["name"] == "pgolf.micro_batch"]
    optimizer = [e["dur"] for e in host if e["name"] == "pgolf.optimizer_step"]
    graphs = [e["dur"] for e in events if e.get("cat") == "cpu_op" and e["name"] == "CompiledFunction"]
    backward = [e["dur"] for e in events if e.get("cat") == "cpu_op" and e["name"] == "CompiledFunctionBackward"]
    ms = 1000.0
    n_micro = max(1, len(micro))
    return {
        "trace": path.name,
        "device_span_ms_per_step": round((busy[-1][1] - busy[0][0]) / steps / ms, 1) if busy else 0.0,  # CPU: none
        "kernels_busy_ms_per_step": round(sum(b - a for a, b in busy) / steps / ms, 1),
        "nccl_busy_ms_per_step": round(sum(b - a for a, b in nccl) / steps / ms, 1),
        "device_idle_ms_per_step": round(sum(gaps) / steps / ms, 1),
        "largest_gaps_ms": [round(g / ms, 1) for g in gaps[:5]],
        "micro_batches_per_step": round(len(micro) / steps, 1),
        "host_ms_per_micro_batch": round(sum(micro) / n_micro / ms, 1),
        "compute_kernels_ms_per_micro_batch": round(sum(b - a for a, b in compute) / n_micro / ms, 1),
        "compiled_graphs_per_micro_batch": round(len(graphs) / n_micro, 1),
        "host_ms_compiled_forward_per_micro_batch": round(sum(graphs) / n_micro / ms, 1),
        "host_ms_compiled_backward_per_micro_batch": round(sum(backward) / n_micro / ms, 1),
        "kernels_per_micro_batch": round(len(kernels) / n_micro),
        "host_ms_optimizer_step": round(sum(optimizer) / max(1, len(optimizer)) / ms, 1),
        "kernel_ms_per_step_by_kind": by_kind(kernels, steps),
        "top_kernels": top_kernels(kernels, steps),
        "host_us_per_pgolf_op_call": host_us_per_op_call(events),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("traces", type=Path, nargs="+")
    ap.add_argument("--steps", type=int, default=3, help="the profiled steps in each trace (step_profile's --profile-steps)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = [summarize(p, args.steps) for p in args.traces]
    for r in rows:
        print(json.dumps(r))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
