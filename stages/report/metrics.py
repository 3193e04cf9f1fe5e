"""A stage's metrics file is one row of `dvc metrics show`; everything else it measured goes beside it.

DVC puts every key of every metrics file in one table, one column per key, so a file holding a whole
config (or a list of tensors) makes the table unreadable. A row therefore holds numbers, booleans, None
and short strings only, few of them, under column names the stages share where they mean the same kind
of thing (`seconds`, `tokens`, `bytes`, `val_bpb`, `passed`): the seven rows fit 120 columns, and each new
name costs its length + 4. The full record — params, per-tensor rows, check rows, histories — goes to the
report beside it, `X_report.json` for `X_metrics.json` (or `X.json`), which DVC does not tabulate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pgolf.formats.files import write_json

MAX_TEXT = 24  # a longer string is a detail, not a table cell


def companion(metrics: str | Path, what: str, suffix: str) -> Path:
    """A file beside a metrics file, named for it: quantize_metrics.json → quantize_{what}{suffix}."""
    metrics = Path(metrics)
    stem = metrics.stem.removesuffix("_metrics")
    return metrics.with_name(f"{stem}_{what}{suffix}")


def check_row(row: dict[str, Any], where: str) -> None:
    """Refuse a value that is no table cell (a programming error in the stage that built the row)."""
    for key, value in row.items():
        if not (value is None or isinstance(value, (bool, int, float))
                or (isinstance(value, str) and len(value) <= MAX_TEXT)):
            raise ValueError(f"{where}: metric {key!r} is {type(value).__name__} {str(value)[:40]!r}; a metrics "
                             f"row holds numbers, booleans and strings up to {MAX_TEXT} characters (details go to "
                             "the report)")


def write_metrics(metrics: str | Path, row: dict[str, Any], detail: dict[str, Any]) -> Path:
    """Write the row to `metrics` and the full record to its report; returns the report's path."""
    check_row(row, str(metrics))
    report = companion(metrics, "report", ".json")
    write_json(report, detail)
    write_json(metrics, row)
    return report
