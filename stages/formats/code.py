"""The code a submission counts: the decode path, found from the sources, bundled and compressed.

The challenge counts code bytes + compressed model bytes against 16,000,000. pgolf's rule: the code
bytes are the modules needed to read a blob and score it, the import closure of the ttt-eval stage
(derived from the sources' import statements, module level and inside functions), so a decoder,
codec glue (the `ans` coder's) or evaluation mode is counted the moment the scoring path imports it,
and the encoders (GPTQ, LQER fitting, the budget search) never are. Each module counts as it runs:
its syntax tree written back without comments and docstrings (runnable_source). The bundle is
compressed with pack's codec (the smallest text codec when that is `auto`, `ans` or lrzip).
Libraries (torch, numpy, constriction, brotli) are not counted, as the challenge treats imports. The same closure tells DVC what each stage depends on (dvc.yaml, held to it by a test).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from pgolf.errors import PgolfError
from pgolf.formats import codecs

PACKAGE = "pgolf"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the directory that `import pgolf` maps to
SOURCE_ROOT = PACKAGE_DIR.name  # how paths are written in bundles and reports (stages/...)
DECODE_ENTRY = "pgolf.ttt_eval"


def module_file(module: str) -> Path | None:
    """The source file of a pgolf module (a package's __init__.py), or None if there is none."""
    parts = module.split(".")[1:]
    base = PACKAGE_DIR.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(module: str) -> set[str]:
    """The pgolf modules `module` imports anywhere in its source (not under `if TYPE_CHECKING:`)."""
    path = module_file(module)
    if path is None:
        raise PgolfError(f"{module}: no source file under {PACKAGE_DIR}; reinstall pgolf")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.split(".")[0] == PACKAGE)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    anchor = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if base.split(".")[0] != PACKAGE:
                    continue
                for alias in child.names:  # `from pgolf.formats import codecs` imports a module
                    sub = f"{base}.{alias.name}"
                    found.add(sub if module_file(sub) is not None else base)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    # importing a.b.c runs a/__init__.py and a/b/__init__.py first
    for name in list(found):
        parts = name.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts)))
    found.discard(module)
    return found


def import_closure(module: str) -> list[str]:
    """`module` and every pgolf module it imports, directly or not, sorted."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(imported_modules(name) - seen)
    return sorted(seen)


def source_path(module: str) -> str:
    """A module's file as the repository names it, e.g. stages/formats/blob.py."""
    path = module_file(module)
    assert path is not None, module
    return str(Path(SOURCE_ROOT) / path.relative_to(PACKAGE_DIR))


def decode_path() -> list[str]:
    """The source files a blob needs to be read and scored, as the repository names them."""
    return sorted(source_path(m) for m in import_closure(DECODE_ENTRY))


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def runnable_source(path: Path) -> str:
    """The module as it runs: its syntax tree written back (ast.unparse) without comments and docstrings,
    as the record scripts minify theirs before counting (PR #1855: python-minifier)."""
    return ast.unparse(_strip_docstrings(ast.parse(path.read_text(encoding="utf-8"), str(path))))


def code_bundle(files: list[str]) -> bytes:
    """The listed sources' runnable text (runnable_source) concatenated, each behind a one-line path marker."""
    parts = []
    for name in files:
        path = PACKAGE_DIR.parent / name
        if not path.is_file():
            raise PgolfError(f"{path}: source file needed to decode a blob is missing; reinstall pgolf")
        parts.append(f"# ---- {name} ----\n{runnable_source(path)}\n".encode())
    return b"".join(parts)


CODE_CODECS = ("zlib", "zstd", "brotli", "lzma")  # text codecs: `ans` and lrzip are for the weights


def measure_code(codec: str) -> dict[str, Any]:
    """Code bytes: the decode path's bundle compressed by `codec` where it is a text codec, else by the
    smallest of CODE_CODECS."""
    files = decode_path()
    bundle = code_bundle(files)
    used, compressed, sizes = codecs.choose(codec if codec in CODE_CODECS else "auto", bundle, CODE_CODECS)
    return {"files": files, "raw_bytes": len(bundle), "codec": used, "bytes": len(compressed), "sizes": sizes}
