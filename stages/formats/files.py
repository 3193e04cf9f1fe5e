"""Files passed between stages: atomic writes, hashes, and safetensors with pgolf metadata.

Every tensor file pgolf writes is a safetensors file whose metadata key "pgolf" holds JSON:
{"kind": ..., "format_version": ..., "model_config": {...}, "params": {...}, "inputs": {name: sha256}}.
Reading never unpickles anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from pgolf.errors import PgolfError

if TYPE_CHECKING:  # torch is imported where tensors are touched, so `pgolf --help` starts fast
    import torch

FORMAT_VERSION = 1
META_KEY = "pgolf"
MAX_META_BYTES = 1 << 20  # pgolf metadata is a few KB: model config, params, input hashes (and a schema)
# JSON from a file pgolf did not necessarily write (a blob header, safetensors metadata) is parsed only
# within these bounds: real files nest a handful of levels and hold 64-bit sizes, while the json module
# would recurse until RecursionError or raise ValueError past Python's int-string limit.
MAX_JSON_DEPTH = 32
MAX_NUMBER_CHARS = 32
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to `path`; rename it over `path` only if the block succeeds.

    A killed or failing stage therefore never leaves a half-written artifact under the real name; what a
    killed one (SIGKILL) leaves is a hidden `.NAME.tmp-PID-*` file, removed by the next write of NAME.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp (and some writers, safetensors among them) make 0600 files; outputs get the usual mode
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise PgolfError(f"{path}: {what} not found; run the stage that writes it first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSON syntax, giant integers
        raise PgolfError(f"{path}: not a valid {what} ({str(exc)[:200]}); re-run the stage that writes it") from None


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_depth(text: str) -> int:
    """How deep `text`'s arrays and objects nest, from its brackets outside strings, without parsing it
    (so no recursion); iterated in C, fast on megabytes."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


def loads_bounded(data: bytes | str, what: str, fix: str, max_bytes: int) -> Any:
    """Parse JSON that may be hostile, refusing with one PgolfError ("{what}: problem; {fix}") what is
    over `max_bytes`, not UTF-8, nested deeper than MAX_JSON_DEPTH, holds a number longer than
    MAX_NUMBER_CHARS characters, NaN/Infinity or a duplicate key: checked before or while parsing, so
    neither a RecursionError nor Python's int-string ValueError can escape and no giant int is built."""
    def refuse(problem: str) -> PgolfError:
        return PgolfError(f"{what}: {problem}; {fix}")

    if len(data) > max_bytes:  # characters of a str: never fewer than its UTF-8 bytes
        raise refuse(f"{len(data):,} {'characters' if isinstance(data, str) else 'bytes'} of JSON, more than the "
                     f"{max_bytes:,} allowed")
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise refuse(f"not UTF-8 ({exc})") from None
    depth = json_depth(data)
    if depth > MAX_JSON_DEPTH:
        raise refuse(f"JSON nested {depth:,} levels deep, more than the {MAX_JSON_DEPTH} allowed")

    def number(text: str, convert: Any) -> Any:
        if len(text) > MAX_NUMBER_CHARS:
            raise refuse(f"a {len(text):,}-character number {text[:20]}…, longer than the {MAX_NUMBER_CHARS} allowed")
        value = convert(text)
        if value != value or value in (math.inf, -math.inf):  # 1e999 parses as inf
            raise refuse(f"number {text} is not finite")
        return value

    def constant(name: str) -> Any:
        raise refuse(f"{name} is not a JSON number")

    def mapping(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            seen: set[str] = set()
            dup = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise refuse(f"duplicate key {dup[:80]!r} (readers could disagree on which one counts)")
        return out

    try:
        return json.loads(data, parse_int=lambda t: number(t, int), parse_float=lambda t: number(t, float),
                          parse_constant=constant, object_pairs_hook=mapping)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise refuse(f"not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], kind: str, meta: dict[str, Any]) -> None:
    """Write `tensors` as safetensors with pgolf metadata (kind, format version, `meta`)."""
    from safetensors.torch import save_file

    header = {"kind": kind, "format_version": FORMAT_VERSION, **meta}
    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata={META_KEY: json.dumps(header)})


def read_meta(path: str | Path, kind: str) -> dict[str, Any]:
    """The pgolf metadata of a safetensors file, checked to be of `kind`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise PgolfError(f"{path}: file not found; run the stage that writes the {kind} first")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as exc:  # safetensors raises its own error types for truncated/foreign files
        raise PgolfError(f"{path}: not a readable safetensors file ({exc}); it is truncated or of another format") from None
    if raw is None:
        raise PgolfError(f"{path}: safetensors file without pgolf metadata; expected a pgolf {kind}")
    meta = loads_bounded(raw, f"{path}: pgolf metadata", f"re-run the stage that writes the {kind}", MAX_META_BYTES)
    if not isinstance(meta, dict):
        raise PgolfError(f"{path}: pgolf metadata is not a JSON object; re-run the stage that writes the {kind}")
    if meta.get("kind") != kind:
        raise PgolfError(f"{path}: is a pgolf {meta.get('kind')!r}, expected a {kind!r}; check the file argument")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise PgolfError(f"{path}: pgolf metadata has format_version {str(version)[:40]!r}, not a number; re-run the "
                         f"stage that writes the {kind}")
    if version > FORMAT_VERSION:
        raise PgolfError(f"{path}: format version {meta['format_version']} is newer than this pgolf "
                         f"({FORMAT_VERSION}); upgrade pgolf")
    return meta


def load_tensors(path: str | Path, kind: str, check_finite: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a pgolf safetensors file of `kind`; refuse NaN/inf in float tensors when `check_finite`."""
    import torch
    from safetensors.torch import load_file

    meta = read_meta(path, kind)
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise PgolfError(f"{path}: cannot read tensors ({exc}); the file is truncated or corrupt") from None
    if check_finite:
        for name, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise PgolfError(f"{path}: tensor {name!r} holds NaN or inf; the run that wrote it diverged "
                                 "(lower the learning rate or re-train)")
    return tensors, meta


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN; metrics write null instead."""
    return x if math.isfinite(x) else None


class staging_dir:
    """A temp directory next to `out`, renamed over `out` only when the block succeeds.

    Until that rename the old output (if any) stays untouched; a failure removes the temp directory,
    and a killed run leaves only a hidden `.NAME.tmp-PID-*` directory, swept by the next run.
    """

    def __init__(self, out: Path):
        self.out = Path(out)

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(self.out)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-{os.getpid()}-", dir=self.out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary directory
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.out.exists():
            if not self.out.is_dir():
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise PgolfError(f"{self.out}: exists and is not a directory; remove it or choose another --out")
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-{os.getpid()}-old-", dir=self.out.parent))
            os.replace(self.out, old / "x")
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def sweep_stale(out: Path) -> None:
    """Remove the temp files and directories that killed runs left beside `out` (their process is gone)."""
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        pid = p.name[len(f".{out.name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
