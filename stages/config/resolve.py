"""The one resolver: a stage's params from defaults < preset < params.yaml < the command line.

Every spelling reaches its key or fails naming it: `--set KEY=VALUE` (the stage's own section first,
then the other sections it reads), `--set SECTION.KEY=VALUE`, and DVC's `-S SECTION.KEY=VALUE` (which
edits params.yaml). Which sections a stage reads is data (STAGE_SECTIONS), so cross-section needs —
quantize measuring with pack's codec, verify re-scoring with the evaluation settings — are resolved here,
not in the CLI. Each value remembers where it came from, so an error blames the command line, params.yaml
or the preset, whichever set it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from pgolf.config.build import build
from pgolf.config.presets import PRESETS
from pgolf.config.sections import SECTIONS
from pgolf.errors import PgolfError

# The sections each stage reads, its own first (plain --set keys look there first).
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "tokenize": ("tokenize",),
    "train": ("train", "model"),
    "calibrate": ("calibrate",),
    "quantize": ("quantize", "pack"),  # --budget measures sizes as pack will pack
    "pack": ("pack",),
    "ttt-eval": ("ttt_eval",),
    "verify": ("verify", "ttt_eval"),  # re-scores with the evaluation settings
}
DEFAULT_PRESET = "baseline"
COMMAND_LINE = "command line"


def load_params(path: str | Path | None) -> dict[str, Any]:
    """params.yaml as a dict ({} when `path` is None or absent), every section and key checked to exist."""
    if path is None or not Path(path).is_file():
        return {}
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise PgolfError(f"{path}: invalid YAML ({exc}); fix the file") from None
    if not isinstance(data, dict):
        raise PgolfError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)})")
    for section, values in data.items():
        if section == "preset":
            continue
        if section not in SECTIONS:
            raise PgolfError(f"{path}: unknown section {section!r}; known: preset, {', '.join(SECTIONS)}")
        if values is not None and not isinstance(values, dict):
            raise PgolfError(f"{path}: section {section!r} must be a mapping of keys")
        known = {f.name for f in fields(SECTIONS[section])}
        for key in values or {}:
            if key not in known:
                raise PgolfError(f"{path}: unknown key {section}.{key}; {section} has: {', '.join(sorted(known))}")
    return data


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """`["iterations=5", "model.num_layers=4"]` -> {"iterations": 5, "model.num_layers": 4} (values as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PgolfError(f"--set {item!r}: expected KEY=VALUE, e.g. --set iterations=100 or --set train.iterations=100")
        try:
            out[key.strip()] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def preset_sections(name: Any, source: str) -> dict[str, dict[str, Any]]:
    if name not in PRESETS:
        raise PgolfError(f"{source}: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass
class StageParams:
    """The resolved sections of one stage (`params.train`, `params.model`, ...) and where each value came from."""

    stage: str
    preset: str
    sections: dict[str, Any]
    sources: dict[str, dict[str, str]]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["sections"][name]
        except KeyError:
            raise AttributeError(name) from None

    def from_command_line(self, section: str) -> dict[str, Any]:
        """The keys of `section` that the command line set, with their values."""
        cfg = self.sections[section]
        return {k: getattr(cfg, k) for k, src in self.sources[section].items() if src == COMMAND_LINE}


def route(stage: str, key: str) -> tuple[str, str]:
    """(section, key) that a command-line KEY or SECTION.KEY names for `stage`."""
    readable = STAGE_SECTIONS[stage]
    section, dot, name = key.rpartition(".")
    if dot:
        if section not in SECTIONS or "." in section:
            raise PgolfError(f"--set {key}: unknown section {section!r}; pgolf {stage} reads {', '.join(readable)}")
        if section not in readable:
            raise PgolfError(f"--set {key}: pgolf {stage} does not read section {section!r} (it reads "
                             f"{', '.join(readable)})")
        if name not in {f.name for f in fields(SECTIONS[section])}:
            known = ", ".join(sorted(f.name for f in fields(SECTIONS[section])))
            raise PgolfError(f"--set {key}: unknown key {name!r} in section {section}; known: {known}")
        return section, name
    for section in readable:
        if key in {f.name for f in fields(SECTIONS[section])}:
            return section, key
    known = "; ".join(f"{s}: {', '.join(sorted(f.name for f in fields(SECTIONS[s])))}" for s in readable)
    raise PgolfError(f"--set {key}: unknown key for pgolf {stage}; known keys ({known})")


def resolve(stage: str, params_path: str | Path | None, sets: list[str] | dict[str, Any] | None = None,
            named: dict[str, Any] | None = None) -> StageParams:
    """The params of `stage`: defaults < preset < params.yaml < `sets` and `named` options (None: not given).

    `sets`: --set items (or an already parsed {key: value}); `named`: {"section.key" or "key": value} from
    a stage's named options such as --iterations.
    """
    if stage not in STAGE_SECTIONS:
        raise PgolfError(f"unknown stage {stage!r}; stages: {', '.join(STAGE_SECTIONS)}")
    params = load_params(params_path)
    where = str(params_path) if params_path is not None else "params"
    given = dict(sets) if isinstance(sets, dict) else parse_sets(sets)
    given.update({k: v for k, v in (named or {}).items() if v is not None})
    preset_cli = given.pop("preset", None)
    command_line: dict[str, dict[str, Any]] = {s: {} for s in STAGE_SECTIONS[stage]}
    for key, value in given.items():
        section, name = route(stage, key)
        command_line[section][name] = value
    named_preset = preset_cli if preset_cli is not None else params.get("preset")
    preset = str(named_preset if named_preset is not None else DEFAULT_PRESET)
    where_preset = COMMAND_LINE if preset_cli is not None else f"{where}: preset"
    chosen = preset_sections(preset, where_preset)
    if named_preset is not None and all(
            {f.name for f in fields(SECTIONS[s])} <= set(params.get(s) or {}) for s in STAGE_SECTIONS[stage]):
        raise PgolfError(f"{where_preset}: preset {preset!r} has no effect, because {where} lists every key of "
                         f"{', '.join(STAGE_SECTIONS[stage])}; write that preset's params with "
                         f"`python -m pgolf.config {preset} > {where}`, or pass --params none.yaml")
    sections, sources = {}, {}
    for section in STAGE_SECTIONS[stage]:
        layers = [(chosen.get(section, {}), f"preset {preset!r}"), (params.get(section) or {}, where),
                  (command_line[section], COMMAND_LINE)]
        sections[section], sources[section] = build(SECTIONS[section], layers, section)
    return StageParams(stage, preset, sections, sources)
