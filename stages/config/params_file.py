"""A full params.yaml: every key of every section, resolved from a preset (plus overrides), one comment each.

Why list every key: DVC tracks and edits only the keys a params file lists (`dvc exp run -S train.iterations=5`,
`dvc params diff`), so a file of overrides alone would hide the values a run actually used. Keys that
differ from the preset are marked, so a project's own choices stay readable among the defaults.
"""

from __future__ import annotations

from dataclasses import asdict, fields

import yaml

from pgolf.config.build import build
from pgolf.config.resolve import parse_sets, preset_sections
from pgolf.config.sections import SECTIONS, doc_of
from pgolf.errors import PgolfError

OVERRIDE_MARK = "◀"


def scalar(value) -> str:
    """A value as a YAML scalar that reads back as the same type."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).removesuffix("\n...\n").strip()


def render(preset: str, sets: list[str] | None = None, command: str = "") -> str:
    """params.yaml text for `preset` with `sets` ("section.key=value") applied and marked."""
    chosen = preset_sections(preset, "preset")
    overrides: dict[str, dict] = {section: {} for section in SECTIONS}
    for key, value in parse_sets(sets).items():
        section, dot, name = key.partition(".")
        if not dot or section not in SECTIONS:
            raise PgolfError(f"--set {key}: name the section, e.g. --set tokenize.val_docs=2")
        overrides[section][name] = value
    lines = [
        "# pgolf params: every key of every stage (each stage reads the sections dvc.yaml lists for it).",
        f"# Written by `{command or f'python -m pgolf.config {preset}'}`;",
        f"# keys marked {OVERRIDE_MARK} differ from preset {preset!r}. Change a key here, or for one run with",
        "#   dvc exp run -S train.iterations=50      or      pgolf train --set train.iterations=50",
        "# and `dvc repro` re-runs only the stages it touches. Another preset: python -m pgolf.config NAME > params.yaml",
    ]
    for section, cls in SECTIONS.items():
        base, _ = build(cls, [(chosen.get(section, {}), f"preset {preset!r}")], section)
        cfg, _ = build(cls, [(asdict(base), f"preset {preset!r}"), (overrides[section], "--set")], section)
        lines.append("")
        lines.append(f"{section}:")
        rows = []
        for f in fields(cls):
            value = getattr(cfg, f.name)
            mark = f" {OVERRIDE_MARK} {preset}: {scalar(getattr(base, f.name))};" if value != getattr(base, f.name) else ""
            rows.append((f"  {f.name}: {scalar(value)}", f"#{mark} {doc_of(cls, f.name)}"))
        width = max(len(r[0]) for r in rows) + 2
        lines.extend(f"{left:<{width}}{comment}" for left, comment in rows)
    return "\n".join(lines) + "\n"
