"""Bytes each rank moves per optimizer step, and a projection of the step time to more GPUs (issue 16).

    python bench/comm_volume.py --preset record --preset pr2071 [--bus-gbps 400] [--out FILE.json]

What a data-parallel step of pgolf communicates, from the model's real parameters (built on the meta device,
grouped by pgolf.nn.optim's table) and the precision they train in on CUDA (pgolf.nn.model.prepare_for_device:
the embedding bf16, every other parameter an fp32 master):
- DDP's all-reduce of the gradients, once a step (the last micro-batch's backward; the others run under
  no_sync), in the parameters' dtypes. Under `ddp_graph: buckets` it overlaps the backward bucket by bucket, so
  about its last bucket (DDP's 25 MB default) is exposed; under `whole` it runs after the backward;
- Muon's all-reduce of the orthogonalised updates (pgolf.nn.muon: each rank orthogonalises every world-th
  matrix and the bf16 update vector is summed across ranks), exposed: the updates wait for it.
A ring all-reduce of S bytes sends and receives 2(N − 1)/N · S bytes a rank and takes that ÷ the bus bandwidth
(nccl-tests' "busbw"). The bandwidth is an assumption (`--bus-gbps`, 400 GB/s by default for NVLink 4
through NVSwitch), neither measured here nor checked: the 2-GPU profiles' NCCL kernel time includes the ranks
waiting for each other, so it does not give the bandwidth. The projection: the 1-GPU step ÷ N (compute, Muon's share included, scales perfectly) plus
the exposed communication. The 1- and 2-GPU steps are read from the side-by-side's results. It leaves out the host's launch overhead, which the 2-GPU profiles found to matter for
pr2071's 12-sequence micro-batches; compare it with the measured 2-GPU step where there is one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pgolf.config.resolve import resolve
from pgolf.nn.model import GPT
from pgolf.nn.optim import grouped_parameters

DDP_BUCKET_BYTES = 25 * 2**20  # torch DDP's default bucket_cap_mb
SIDE_BY_SIDE = Path(__file__).parent / "results" / "2026-11-30_speed_sidebyside.json"


def measured_ms(preset: str, world: int, results: Path = SIDE_BY_SIDE) -> float | None:
    """pgolf's ms/step for the preset (fa4 + fused CE) at this world size in the side-by-side, if it ran."""
    runs = json.loads(results.read_text())["runs"] if results.exists() else []
    return next((r["ms_per_step"] for r in runs if r["side"].startswith("pgolf") and r["preset"] == preset
                 and r["world_size"] == world and "flex" not in r["side"]), None)


def step_bytes(preset: str, vocab: int = 8192) -> dict:
    """Bytes of one step's two all-reduces (payload S, before the ring's 2(N−1)/N), by what is reduced."""
    p = resolve("train", None, {"preset": preset})
    with torch.device("meta"):
        model = GPT(type(p.model)(**{**p.model.__dict__, "vocab_size": vocab}))
    embed = model.tok_emb.weight  # bf16 on CUDA; every other parameter an fp32 master
    gradient = sum(t.numel() * (2 if t is embed else 4) for t in model.parameters() if t.requires_grad)
    muon = sum(t.numel() for t in grouped_parameters(model)["matrix"]) * 2 if p.train.matrix_optimizer == "muon" else 0
    return {"params": sum(t.numel() for t in model.parameters()), "gradient_allreduce_bytes": gradient,
            "muon_update_allreduce_bytes": muon, "ddp_graph": p.train.ddp_graph}


def ring_ms(payload: int, world: int, bus_gbps: float) -> float:
    """A ring all-reduce's time: 2(N − 1)/N · S bytes a rank at the bus bandwidth."""
    return 0.0 if world < 2 else 2 * (world - 1) / world * payload / (bus_gbps * 1e9) * 1e3


def projection(preset: str, worlds: list[int], bus_gbps: float, one_gpu_ms: float | None) -> dict:
    b = step_bytes(preset)
    out = {"preset": preset, **b, "bus_gbps_assumed": bus_gbps, "one_gpu_ms_per_step": one_gpu_ms, "worlds": {}}
    for n in worlds:
        exposed_gradient = min(b["gradient_allreduce_bytes"], DDP_BUCKET_BYTES) if b["ddp_graph"] != "whole" \
            else b["gradient_allreduce_bytes"]
        row = {"bytes_sent_per_rank": round(2 * (n - 1) / n * (b["gradient_allreduce_bytes"] + b["muon_update_allreduce_bytes"])),
               "gradient_allreduce_ms": round(ring_ms(b["gradient_allreduce_bytes"], n, bus_gbps), 2),
               "muon_allreduce_ms": round(ring_ms(b["muon_update_allreduce_bytes"], n, bus_gbps), 2),
               "exposed_ms": round(ring_ms(exposed_gradient, n, bus_gbps) + ring_ms(b["muon_update_allreduce_bytes"], n, bus_gbps), 2)}
        if one_gpu_ms:
            row["projected_ms_per_step"] = round(one_gpu_ms / n + row["exposed_ms"], 1)
            row["projected_scaling"] = round(one_gpu_ms / (n * row["projected_ms_per_step"]), 3)
        out["worlds"][n] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", action="append", default=[])
    ap.add_argument("--bus-gbps", type=float, default=400.0, help="assumed NCCL all-reduce bus bandwidth, GB/s")
    ap.add_argument("--worlds", default="2,8")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    rows = [projection(p, worlds, args.bus_gbps, measured_ms(p, 1)) for p in args.preset or ["record", "pr2071"]]
    for r in rows:
        r["measured_2gpu_ms_per_step"] = measured_ms(r["preset"], 2)
        print(json.dumps(r))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
