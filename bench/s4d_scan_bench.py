"""Compile time and step time of the S4D scan (`pgolf.nn.studies.s4d_scan`), this tree's against a git revision's:
    python bench/s4d_scan_bench.py --against 7588e47 [--device cuda --shape 48,2048,512,32] [--out results.json]
--against takes a git revision or a copy of stages/nn/studies.py (the GPU machine's checkout has no history).
One forward and backward of the scan over u [B, T, H] with document starts (as training runs it, doc_mask on),
N complex modes: torch.compile(fullgraph=True) time to the first step, then the compiled and the eager step
(median of --steps). Each implementation runs in its own process with an empty Inductor cache, so no compile
is served from an earlier one; --repeats runs alternate them. The outputs of the two on the same inputs are
compared (max abs difference). Why: the scan carried the state across chunks in a Python loop, which
torch.compile unrolls into T/32 steps a call; s4d2's first training step came about 400 s into a GPU call.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def inputs(shape: tuple[int, int, int, int], device: str):
    """u, ΔA, B̄, C and starts of a generic S4D layer (fixed seed): decays from slow to fast, a start every
    ~500 positions. u, B̄ and C take gradients; ΔA does not (the backward through its powers is left out)."""
    B, T, H, N = shape
    g = torch.Generator().manual_seed(0)
    dt = torch.empty(H, 1).uniform_(1e-3, 1e-1, generator=g)
    dta = (dt * -0.5 * torch.ones(H, N), dt * torch.pi * torch.arange(N).float())
    db = (torch.randn(H, N, generator=g), torch.randn(H, N, generator=g))
    c = (torch.randn(H, N, generator=g), torch.randn(H, N, generator=g))
    u = torch.randn(B, T, H, generator=g)
    starts = torch.rand(B, T, generator=g) < 0.002
    db, c = (tuple(t.to(device).requires_grad_() for t in pair) for pair in (db, c))
    return u.to(device).requires_grad_(), tuple(t.to(device) for t in dta), db, c, starts.to(device)


def worker(path: str, shape: tuple[int, int, int, int], device: str, steps: int, save: str) -> dict:
    """Time one implementation (the studies module at `path`) in this process."""
    spec = importlib.util.spec_from_file_location("studies_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    u, dta, db, c, starts = inputs(shape, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step(fn) -> torch.Tensor:
        y, _ = fn(u, dta, db, c, starts)
        y.square().mean().backward()
        return y

    def timed(fn) -> float:
        times = []
        for _ in range(steps):
            sync()
            t0 = time.perf_counter()
            step(fn)
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1000

    compiled = torch.compile(module.s4d_scan, fullgraph=True)
    sync()
    t0 = time.perf_counter()
    y = step(compiled)
    sync()
    first = time.perf_counter() - t0
    torch.save(y.detach().cpu(), save)
    step(compiled)
    return {"compile_and_first_step_s": round(first, 1), "compiled_step_ms": round(timed(compiled), 2),
            "eager_step_ms": round(timed(module.s4d_scan), 2)}


def run(path: str, args, save: str) -> dict:
    """One implementation in a fresh process with an empty Inductor cache."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": cache}
        out = subprocess.run([sys.executable, __file__, "--worker", path, "--shape", args.shape, "--device",
                              args.device, "--steps", str(args.steps), "--save", save],
                             env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"s4d_scan_bench: {path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--against", default="", help="a git revision (its stages/nn/studies.py) or such a file")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="2,2048,64,32", help="B,T,H,N: batch, positions, channels, complex modes")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--save", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = tuple(int(x) for x in args.shape.split(","))
    if args.worker:
        print(json.dumps(worker(args.worker, shape, args.device, args.steps, args.save)))
        return
    here = Path(__file__).resolve().parents[1]
    impls = {"this tree": str(here / "stages/nn/studies.py")}
    with tempfile.TemporaryDirectory() as tmp:
        if Path(args.against).is_file():
            impls = {args.against: args.against, **impls}
        elif args.against:
            old = Path(tmp) / "studies_rev.py"
            old.write_text(subprocess.run(["git", "show", f"{args.against}:stages/nn/studies.py"], cwd=here,
                                          capture_output=True, text=True, check=True).stdout)
            impls = {args.against: str(old), **impls}
        runs = {name: [] for name in impls}
        for repeat in range(args.repeats):
            for i, (name, path) in enumerate(impls.items()):
                runs[name].append(run(path, args, str(Path(tmp) / f"{repeat}_{i}.pt")))
                print(f"{name}: {runs[name][-1]}", flush=True)
        outputs = [torch.load(Path(tmp) / f"0_{i}.pt", weights_only=True) for i in range(len(impls))]
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": args.device,
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "shape_B_T_H_N": list(shape),
              "steps": args.steps, "runs": runs}
    if len(outputs) == 2:
        result["max_abs_difference"] = float((outputs[0] - outputs[1]).abs().max())
        result["max_abs_output"] = float(outputs[0].abs().max())
        print(f"max |Δy| between the two: {result['max_abs_difference']:.2e} (max |y| {result['max_abs_output']:.1f})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
