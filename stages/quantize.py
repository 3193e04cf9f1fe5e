"""quantize: ckpt.safetensors (+ hessians) → quantized.safetensors (codes + scales + schema), metrics, a report
(every tensor's encoding, size and errors) and a chart of bits and bytes per tensor.

The encoders are pgolf.quant (recipe, GPTQ, LQER, the budget search). The output is self-describing:
its metadata carries the per-tensor schema that pgolf.formats.dequant needs, the model config and
tokenizer hash copied from the checkpoint, the params, and the sha256 of every input. Given Hessians,
the report also holds each tensor's weighted error trace((W − Ŵ) H (W − Ŵ)ᵀ), whatever the method.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from pgolf.config.sections import PackConfig, QuantizeConfig
from pgolf.errors import PgolfError
from pgolf.formats.files import load_tensors, read_meta, save_tensors, sha256_file
from pgolf.formats.submission import check_data_matches, data_identity
from pgolf.quant.budget import BudgetSearch
from pgolf.quant.calibration import split_statistics
from pgolf.quant.recipe import gradient_guided_bits, quantize_state_dict
from pgolf.report.metrics import companion, write_metrics
from pgolf.report.plots import bits_chart

# Methods that read the Hessians; for the others a given --hessians file only feeds the report.
HESSIAN_METHODS: tuple[str, ...] = ("gptq",)


def check_hessians(path: Path, ckpt_sha256: str) -> str:
    """sha256 of a pgolf hessians file made from this very checkpoint; an error otherwise."""
    meta = read_meta(path, kind="hessians")
    inputs = meta.get("inputs") or {}
    made_from = inputs.get("checkpoint")
    if made_from is None:
        raise PgolfError(f"{path}: does not record which checkpoint it was calibrated on; re-run `pgolf calibrate`")
    if made_from != ckpt_sha256:
        raise PgolfError(f"{path}: was calibrated on checkpoint {str(made_from)[:12]}…, not on this one "
                         f"({ckpt_sha256[:12]}…); re-run `pgolf calibrate` on the checkpoint you quantize")
    return sha256_file(path)


def check_hessian_shapes(path: Path, hessians: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Every H must be in×in for the weight of the same name; a mismatch means another model."""
    for name, h in hessians.items():
        w = state.get(name)
        if w is None:
            continue  # e.g. a Hessian for a buffer the checkpoint does not save: unused
        if w.ndim != 2 or tuple(h.shape) != (w.shape[1], w.shape[1]):
            raise PgolfError(f"{path}: the Hessian of {name!r} has shape {tuple(h.shape)}, but the weight is "
                             f"{tuple(w.shape)} (expected {w.shape[-1]}×{w.shape[-1]}); re-run `pgolf calibrate` "
                             "on this checkpoint")


def check_out_grads(path: Path, out_grads: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                    cfg: QuantizeConfig) -> None:
    """--budget's loss objective needs G for every weight that has an H; each G has one entry per output row."""
    if cfg.budget and cfg.budget_objective == "loss" and not out_grads:
        raise PgolfError(f"{path}: holds no output-gradient moments (an older calibrate, or output_grads=false), "
                         "which --budget's loss objective needs; re-run `pgolf calibrate`, or set "
                         "quantize.budget_objective=layer")
    for name, g in out_grads.items():
        w = state.get(name)
        if w is not None and (w.ndim != 2 or tuple(g.shape) != (w.shape[0],)):
            raise PgolfError(f"{path}: the output-gradient moments of {name!r} have shape {tuple(g.shape)}, but the "
                             f"weight is {tuple(w.shape)} (expected {w.shape[0]}); re-run `pgolf calibrate` on this "
                             "checkpoint")


def print_report(report: dict[str, Any], cfg: QuantizeConfig, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"quantize: {cfg.method}, {cfg.bits} bits, clip {cfg.clip} → {out}")
    budget = report.get("budget")
    if budget:
        table.title = f"quantize: {cfg.method}, bits chosen for a budget of {budget['budget']:,} bytes → {out}"
    columns = ["tensor", "shape", "method", "stored as", "bytes", "max |err|", "rmse", "rel err", "H-weighted err"]
    if budget:
        columns.insert(5, f"est. {budget['estimate_codec']}")
    for col in columns:
        table.add_column(col, justify="left" if col in ("tensor", "method", "stored as") else "right",
                         no_wrap=col == "tensor")

    def weighted(x: float | None) -> str:
        return "-" if x is None else f"{x:.3g}"

    for r in report["tensors"]:
        method = r["method"] + (" (fallback)" if r.get("fallback") else "")
        est = [f"{r['est_bytes']:,}" if r.get("est_bytes") is not None else "-"] if budget else []
        table.add_row(r["name"], "×".join(map(str, r["shape"])) or "scalar", method, r["stored_as"],
                      f"{r['stored_bytes']:,}", *est, f"{r['max_abs_err']:.3g}", f"{r['rmse']:.3g}",
                      f"{r['rel_err']:.3g}", weighted(r["weighted_err"]))
    t = report["totals"]
    table.add_section()
    table.add_row("total", f"{t['params']:,} params", "", f"{t['quantized_tensors']}/{t['tensors']} quantized",
                  f"{t['stored_bytes']:,}", *([""] if budget else []), f"{t['max_abs_err']:.3g}",
                  f"{t['quantized_rmse']:.3g}", "", weighted(t["weighted_err"]))
    console = Console()
    if not console.is_terminal:  # logs and CI: wide enough that names are not cut
        console = Console(width=180)
    console.print(table)
    if budget:
        b = budget
        console.print(f"budget {b['budget']:,} bytes (codec {b['codec']}): packed size predicted "
                      f"{b['predicted_bytes']:,}, measured {b['measured_bytes']:,} (blob + {b['code_bytes']:,} code"
                      + (f" + {b['reserve_bytes']:,} reserve, data identity not given" if b["reserve_bytes"] else "")
                      + f"); {b['upgrades']}/{b['path_length']} upgrades taken ({b['predicted_upgrades']} predicted, "
                      f"{b['real_builds']} real builds); LQER on {len(b['lqer_tensors'])} tensors; "
                      f"range {b['smallest_bytes']:,}..{b['largest_bytes']:,} bytes")


def run(ckpt: Path, out: Path, cfg: QuantizeConfig, pack: PackConfig, hessians: Path | None, metrics: Path,
        data: Path | None) -> None:
    """pack: how pack will compress (its codec and chunking), which --budget measures sizes with;
    data: the tokenized data pack will be given, so that --budget predicts pack's header exactly
    (None: budget_reserve bytes are held back)."""
    t0 = time.perf_counter()
    state, meta = load_tensors(ckpt, kind="checkpoint")  # refuses NaN/inf weights
    if not isinstance(meta.get("model_config"), dict):
        raise PgolfError(f"{ckpt}: checkpoint metadata has no model config; re-run `pgolf train`")
    ckpt_sha = sha256_file(ckpt)
    hessians_sha, hessian_tensors, out_grads = None, None, None
    if hessians is not None:
        hessians_sha = check_hessians(hessians, ckpt_sha)
        hessian_tensors, out_grads = split_statistics(load_tensors(hessians, kind="hessians")[0])  # refuses NaN/inf
        check_hessian_shapes(hessians, hessian_tensors, state)
        check_out_grads(hessians, out_grads, state, cfg)
        if cfg.method not in HESSIAN_METHODS:
            print(f"quantize: note: method {cfg.method!r} does not use Hessians; {hessians} feeds the report's "
                  "weighted error only")
    elif cfg.method in HESSIAN_METHODS:
        print(f"quantize: note: no --hessians given, so {cfg.method} falls back to rtn for every tensor; "
              "run `pgolf calibrate` and pass its output with --hessians")

    inputs = {"checkpoint": ckpt_sha, "hessians": hessians_sha}
    out_meta = {"model_config": meta["model_config"], "tokenizer_sha256": meta.get("tokenizer_sha256"),
                "params": asdict(cfg), "inputs": inputs}
    chosen = None
    if cfg.budget:
        ident = None
        if data is not None:
            check_data_matches(data, meta.get("tokenizer_sha256"), meta["model_config"].get("vocab_size"), str(ckpt))
            ident = data_identity(data)
        chosen = BudgetSearch(state, cfg, pack, hessian_tensors, out_meta, ident, out_grads).fit(cfg.budget)
    bits = gradient_guided_bits(state, cfg, hessian_tensors or {}, out_grads or {}) if cfg.gradient_bits else None
    tensors, schema, report = quantize_state_dict(state, cfg, hessian_tensors,
                                                  encoded=chosen.encoded if chosen else None, bits=bits)
    if chosen:
        report["budget"] = chosen.report
        for row in report["tensors"]:
            row["est_bytes"] = (chosen.report["tensors"].get(row["name"]) or {}).get("est_bytes")
    save_tensors(out, tensors, "quantized", {**out_meta, "schema": schema})
    t = report["totals"]
    row = {"bytes": t["stored_bytes"], "seconds": round(time.perf_counter() - t0, 1)}  # bytes: before compression
    write_metrics(metrics, row, {"params": asdict(cfg), "inputs": inputs, "output": str(out), **report})
    bits_chart(companion(metrics, "bits", ".png"), report["tensors"], f"{out.name}: {t['quantized_tensors']}/"
               f"{t['tensors']} tensors quantized, {t['stored_bytes']:,} bytes stored")
    print_report(report, cfg, out)
