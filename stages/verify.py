"""verify: re-evaluate someone else's artifact against the data and the claim it comes with.

The checks are pgolf.audit.checks (header, payload hash, size, decode, vocab, tokenizer, val shards,
the validation files' identity, the model-level checks, BPB vs the claim; and for a challenge submission's
logs and submission.json: their agreement, the claimed size, the byte denominator), each a row PASS / FAIL /
SKIP. Without an artifact only the claims are audited. Whatever the outcome, --report gets the metrics row
(passed, the measured BPB) and the report beside it every check row; any FAIL rejects the artifact (exit 1).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pgolf.audit.checks import FORMATS, NO_BLOB, Context, Row, detect_format, run_checks
from pgolf.audit.claims import eval_settings, load_claim
from pgolf.audit.identity import read_expected
from pgolf.config.sections import EvalConfig, VerifyConfig
from pgolf.errors import PgolfError, Rejected
from pgolf.formats.blob import read_capped
from pgolf.formats.files import read_json, sha256_file, write_bytes
from pgolf.report.metrics import write_metrics


def print_table(rows: list[Row], subject: Path | str) -> None:
    from rich.console import Console
    from rich.table import Table

    style = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow"}
    table = Table(title=f"verify {subject}")
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    for row in rows:
        table.add_row(row.name, f"[{style[row.status]}]{row.status}[/]", row.detail)
    console = Console()
    if not console.is_terminal:  # logs and CI: wide enough that names are not cut
        console = Console(width=120)
    console.print(table)


def review_markdown(rows: list[Row], subject: str, data: Path, claimed: float | None, claim_source: str | None,
                    measured: float | None) -> str:
    """The summary a reviewer pastes into a pull request: what was checked, each check's evidence, the verdict."""
    failed = [r.name for r in rows if r.status == "FAIL"]
    cell = lambda text: text.replace("|", "\\|").replace("\n", " ")  # noqa: E731 — a table cell
    lines = [f"### pgolf verify: {'FAILED (' + ', '.join(failed) + ')' if failed else 'all checks passed'}", "",
             f"- subject: `{subject}`", f"- validation data: `{data}`",
             f"- claim: {f'{claimed:.8f} ({claim_source})' if claimed is not None else 'none given'}",
             f"- measured: {f'{measured:.8f}' if measured is not None else 'not re-scored'}", "",
             "| check | status | evidence |", "|---|---|---|"]
    lines += [f"| {r.name} | **{r.status}** | {cell(r.detail)} |" for r in rows]
    return "\n".join(lines) + "\n"


def run(blob: Path | None, data: Path, cfg: VerifyConfig, eval_cfg: EvalConfig, eval_from_command_line: dict[str, Any],
        claim: float | None, claims: list[Path] | Path | None, fmt: str, report: Path,
        markdown: Path | None = None, expect_manifest: Path | None = None) -> None:
    """blob: None audits the claims alone (their arithmetic against the data); eval_cfg: the params'
    evaluation settings; eval_from_command_line: those the command line set (they win over the claim's own)."""
    claims = [claims] if isinstance(claims, (str, Path)) else claims
    t0 = time.perf_counter()
    if fmt not in ("auto",) + FORMATS:
        raise PgolfError(f"--format {fmt!r}: choose one of auto, {', '.join(FORMATS)}")
    data = Path(data)
    if blob is None and not claims and expect_manifest is None:
        raise PgolfError("give an artifact to verify, or --claims (a submission's logs / submission.json) or "
                         "--expect-manifest to audit")
    blob = Path(blob) if blob is not None else None
    raw = read_capped(blob, cfg.limit) if blob else b""  # sized before it is read: a few times the limit at most
    manifest_path = data / "manifest.json"
    manifest = read_json(manifest_path, "tokenized-data manifest")
    claimed, claim_settings, claim_source, challenge = load_claim(claim, claims)
    ecfg, eval_sources = eval_settings(eval_cfg, claim_settings, eval_from_command_line)
    fmt = NO_BLOB if blob is None else detect_format(raw) if fmt == "auto" else fmt
    ctx = Context(blob, data, raw, fmt, manifest, manifest_path, cfg, ecfg, claimed, challenge=challenge,
                  expected=read_expected(expect_manifest) if expect_manifest is not None else None)
    rows = run_checks(ctx)
    failed = [r.name for r in rows if r.status == "FAIL"]
    measured = (ctx.measured or {}).get("val_bpb")
    row = {"passed": not failed, "val_bpb": measured, "seconds": round(time.perf_counter() - t0, 1)}
    detail = write_metrics(report, row, {
        "passed": not failed,
        "blob": str(blob) if blob else None, "blob_sha256": sha256_file(blob) if blob else None, "format": ctx.fmt,
        "data": str(data),
        "checks": [asdict(r) for r in rows],
        "claim": {"val_bpb": claimed, "source": claim_source, "tolerance": cfg.tolerance,
                  "runs": [asdict(r) for r in challenge.runs] if challenge else None,
                  "stated": [asdict(r) for r in challenge.stated] if challenge else None},
        "measured": ctx.measured,
        "sizes": ctx.sizes,
        "eval": asdict(ecfg), "eval_sources": eval_sources,
        "model_config": asdict(ctx.model_cfg) if ctx.model_cfg is not None else None,
    })
    subject = blob or claim_source or data
    print_table(rows, subject)
    if markdown is not None:
        write_bytes(markdown, review_markdown(rows, str(subject), data, claimed, claim_source,
                                              measured).encode())
        print(f"verify: review summary in {markdown}")
    if failed:
        raise Rejected(f"verify: FAILED ({', '.join(failed)}); report in {detail}")
    print(f"verify: all checks passed; report in {detail}")
