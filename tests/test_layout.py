"""The layout, read from the sources: stage doors never import each other, no import cycle, the decode path
holds no encoder, dvc.yaml's deps and params are what the code really uses, and registries match config."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from pgolf.config.resolve import STAGE_SECTIONS
from pgolf.config.sections import CODECS, NS_COEFFICIENT_SETS, QUANT_METHODS
from pgolf.formats.code import PACKAGE_DIR, decode_path, import_closure, imported_modules, source_path

REPO = Path(__file__).resolve().parents[1]
STAGE_MODULES = {"tokenize": "pgolf.tokenize", "train": "pgolf.train", "calibrate": "pgolf.calibrate",
                 "quantize": "pgolf.quantize", "pack": "pgolf.pack", "ttt-eval": "pgolf.ttt_eval",
                 "verify": "pgolf.verify"}


def all_modules() -> list[str]:
    out = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR).with_suffix("").parts
        out.append(".".join(("pgolf",) + (parts[:-1] if parts[-1] == "__init__" else parts)))
    return out


def test_no_stage_module_imports_another():
    doors = set(STAGE_MODULES.values())
    for module in doors:
        assert not imported_modules(module) & doors, f"{module} imports {imported_modules(module) & doors}"
    # and no building block reaches back into a door (the CLI is the one module above them)
    for module in all_modules():
        if module not in doors and module not in ("pgolf.cli", "pgolf.__main__"):
            assert not imported_modules(module) & doors, f"{module} imports a stage module"


def find_cycle(modules: list[str]) -> list[str] | None:
    """An import cycle among `modules` (module-level and function-local imports alike), or None."""
    graph = {m: imported_modules(m) for m in modules}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        if module not in graph:
            graph[module] = imported_modules(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep, path + [dep])):
                return found
        state[module] = 2
        return None

    for module in graph:
        if module not in state and (found := visit(module, [module])):
            return found
    return None


def test_there_is_no_import_cycle():
    assert find_cycle(all_modules()) is None


def test_the_cycle_check_catches_a_planted_cycle(tmp_path, monkeypatch):
    """A function-local import back into a module's importer is a cycle too (it once hid one)."""
    from pgolf.formats import code

    monkeypatch.setattr(code, "PACKAGE_DIR", tmp_path)
    (tmp_path / "__init__.py").write_text('"""planted"""\n')
    (tmp_path / "a.py").write_text("from pgolf.b import f\n")
    (tmp_path / "b.py").write_text("def f():\n    from pgolf import a\n")
    assert find_cycle(["pgolf", "pgolf.a", "pgolf.b"]) == ["pgolf.a", "pgolf.b", "pgolf.a"]
    (tmp_path / "b.py").write_text("def f():\n    pass\n")
    assert find_cycle(["pgolf", "pgolf.a", "pgolf.b"]) is None


def test_the_decode_path_reads_and_scores_but_never_encodes():
    files = set(decode_path())
    assert {"stages/ttt_eval.py", "stages/formats/blob.py", "stages/formats/dequant.py", "stages/nn/model.py",
            "stages/text/bpb.py"} <= files
    encoders = [f for f in files if f.startswith("stages/quant/") or f.endswith(("blob_writer.py", "resolve.py",
                                                                                   "presets.py", "cli.py"))]
    assert not encoders, encoders


def stage_deps(module: str) -> set[str]:
    """The sources a stage's outputs depend on: its import closure, plus the decode path it bundles when it
    measures code bytes."""
    closure = import_closure(module)
    files = {source_path(m) for m in closure}
    if "pgolf.formats.code" in closure:
        files |= set(decode_path())
    return files


def expand(dep: str) -> set[str]:
    path = REPO / dep
    return {str(p.relative_to(REPO)) for p in path.rglob("*.py")} if path.is_dir() else {dep}


def test_dvc_deps_and_params_are_what_each_stage_really_uses():
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    modules = {**STAGE_MODULES, "corpus": "pgolf.text.corpus"}
    assert set(pipeline) == set(modules)
    for stage, spec in pipeline.items():
        declared = set().union(*(expand(d) for d in spec["deps"] if d.startswith("stages")))
        want = stage_deps(modules[stage])
        assert declared == want, (f"dvc.yaml stage {stage}: missing {sorted(want - declared)}, "
                                  f"not imported {sorted(declared - want)}")
        if stage in STAGE_SECTIONS:
            assert spec.get("params", []) == list(STAGE_SECTIONS[stage]), stage


def test_every_package_is_installed_and_nothing_imports_the_directory_name():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = set(project["tool"]["setuptools"]["packages"])
    found = {"pgolf" + "".join(f".{p}" for p in d.relative_to(PACKAGE_DIR).parts)
             for d in [PACKAGE_DIR, *PACKAGE_DIR.rglob("*")] if (d / "__init__.py").is_file()}
    assert packages == found
    for path in [*PACKAGE_DIR.rglob("*.py"), *(REPO / "tests").glob("*.py"), *(REPO / "bench").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] == "stages" for n in names), f"{path} imports `stages`; use pgolf"


def test_package_init_files_hold_only_their_docstring():
    """Importing a room must not import its contents: every module is imported by its full name."""
    for init in PACKAGE_DIR.rglob("__init__.py"):
        body = ast.parse(init.read_text()).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr), init


def test_registries_match_the_names_config_accepts():
    from pgolf.formats.codecs import CODECS as codec_registry
    from pgolf.nn.muon import NS_COEFFICIENTS
    from pgolf.quant.encode import QUANTIZERS

    assert tuple(codec_registry) == CODECS
    assert tuple(QUANTIZERS) == QUANT_METHODS
    assert tuple(NS_COEFFICIENTS) == NS_COEFFICIENT_SETS


def test_no_building_block_restates_a_config_default():
    """A parameter named like a config key must not carry that key's default: the value comes from config."""
    from dataclasses import fields

    from pgolf.config.sections import SECTIONS

    defaults = {(f.name, repr(f.default)) for cls in SECTIONS.values() for f in fields(cls)}
    restated = []
    for path in PACKAGE_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                pairs = list(zip(a.args[len(a.args) - len(a.defaults):], a.defaults))
                pairs += [(arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
                for arg, default in pairs:
                    try:
                        value = repr(ast.literal_eval(default))
                    except ValueError:
                        continue
                    if (arg.arg, value) in defaults:
                        restated.append(f"{path.name}:{node.name}({arg.arg}={value})")
    assert not restated, restated
