"""verify: re-evaluate someone else's artifact against the data and the claim it comes with.

The checks are pgolf.audit.checks (header, payload hash, size, decode, vocab, tokenizer, val shards,
BPB vs the claim), each a row PASS / FAIL / SKIP. Whatever the outcome, --report gets the metrics row
(passed, the measured BPB) and the report beside it every check row; any FAIL rejects the artifact (exit 1).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pgolf.audit.checks import FORMATS, Context, Row, detect_format, run_checks
from pgolf.audit.claims import eval_settings, load_claim
from pgolf.config.sections import EvalConfig, VerifyConfig
from pgolf.errors import PgolfError, Rejected
from pgolf.formats.blob import read_capped
from pgolf.formats.files import read_json, sha256_file
from pgolf.report.metrics import write_metrics


def print_table(rows: list[Row], blob: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    style = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow"}
    table = Table(title=f"verify {blob}")
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    for row in rows:
        table.add_row(row.name, f"[{style[row.status]}]{row.status}[/]", row.detail)
    console = Console()
    if not console.is_terminal:  # logs and CI: wide enough that names are not cut
        console = Console(width=120)
    console.print(table)


def run(blob: Path, data: Path, cfg: VerifyConfig, eval_cfg: EvalConfig, eval_from_command_line: dict[str, Any],
        claim: float | None, claims: Path | None, fmt: str, report: Path) -> None:
    """eval_cfg: the params' evaluation settings; eval_from_command_line: those the command line set (they
    win over the claim's own)."""
    t0 = time.perf_counter()
    if fmt not in ("auto",) + FORMATS:
        raise PgolfError(f"--format {fmt!r}: choose one of auto, {', '.join(FORMATS)}")
    blob, data = Path(blob), Path(data)
    raw = read_capped(blob, cfg.limit)  # sized before it is read: a few times the limit at most
    manifest_path = data / "manifest.json"
    manifest = read_json(manifest_path, "tokenized-data manifest")
    claimed, claim_settings, claim_source = load_claim(claim, claims)
    ecfg, eval_sources = eval_settings(eval_cfg, claim_settings, eval_from_command_line)
    ctx = Context(blob, data, raw, detect_format(raw) if fmt == "auto" else fmt, manifest, manifest_path, cfg, ecfg,
                  claimed)
    rows = run_checks(ctx)
    failed = [r.name for r in rows if r.status == "FAIL"]
    measured = (ctx.measured or {}).get("val_bpb")
    row = {"passed": not failed, "val_bpb": measured, "seconds": round(time.perf_counter() - t0, 1)}
    detail = write_metrics(report, row, {
        "passed": not failed,
        "blob": str(blob), "blob_sha256": sha256_file(blob), "format": ctx.fmt, "data": str(data),
        "checks": [asdict(r) for r in rows],
        "claim": {"val_bpb": claimed, "source": claim_source, "tolerance": cfg.tolerance},
        "measured": ctx.measured,
        "sizes": ctx.sizes,
        "eval": asdict(ecfg), "eval_sources": eval_sources,
        "model_config": asdict(ctx.model_cfg) if ctx.model_cfg is not None else None,
    })
    print_table(rows, blob)
    if failed:
        raise Rejected(f"verify: FAILED ({', '.join(failed)}); report in {detail}")
    print(f"verify: all checks passed; report in {detail}")
