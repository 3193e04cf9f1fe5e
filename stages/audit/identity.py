"""Validation identity: which files were scored, by their digests, and what kind of text they hold.

Reviewers ask for a validation shard's MD5 (PR #2071's review) as often as its sha256, so both are given
for every validation shard, byte sidecar and the tokenizer, and held to a known-good list when one is
supplied (`--expect-manifest`: a JSON of file name → hex digest, or → {"sha256": …, "md5": …}). CaseOps
data is recognised from the tokenizer's reserved operator pieces, whatever its manifest says: scoring it
needs the original-byte sidecar, since its tokenizer-LUT bytes count the transformed text.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pgolf.audit.challenge_claims import read_claims_json
from pgolf.errors import PgolfError
from pgolf.formats.shards import shard_paths
from pgolf.text.caseops import is_caseops_tokenizer
from pgolf.text.tokenizer import load_tokenizer

DIGEST_BY_LENGTH = {64: "sha256", 32: "md5"}


def file_digests(path: Path) -> dict[str, str]:
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
            md5.update(block)
    return {"sha256": sha.hexdigest(), "md5": md5.hexdigest()}


def scored_files(data: Path, manifest: dict) -> list[Path]:
    tokenizer = data / str(manifest.get("tokenizer", "tokenizer.model"))
    return sorted(shard_paths(data, "val") + shard_paths(data, "val_bytes")) + [tokenizer]


def digests(data: Path, manifest: dict) -> dict[str, dict[str, str]]:
    return {p.name: file_digests(p) for p in scored_files(data, manifest) if p.is_file()}


def read_expected(path: Path) -> dict[str, dict[str, str]]:
    """A known-good list: {name: hex} or {name: {"sha256"/"md5": hex}}, optionally under "files"."""
    obj = read_claims_json(path, "expected manifest")
    files = obj.get("files", obj) if isinstance(obj, dict) else None
    if not isinstance(files, dict) or not files:
        raise PgolfError(f"{path}: expected a JSON object of file name → digest (sha256 or MD5 hex)")
    expected: dict[str, dict[str, str]] = {}
    for name, value in files.items():
        entries = value if isinstance(value, dict) else {DIGEST_BY_LENGTH.get(len(str(value)), "?"): value}
        kinds = {k: str(v).lower() for k, v in entries.items() if k in ("sha256", "md5")}
        if not kinds:
            raise PgolfError(f"{path}: {name!r} has no sha256 (64 hex digits) or md5 (32) digest")
        expected[str(name)] = kinds
    return expected


def compare(actual: dict[str, dict[str, str]], expected: dict[str, dict[str, str]]) -> list[str]:
    """What differs from the known-good list (files it names that are missing, or digests that differ)."""
    problems = []
    for name, want in sorted(expected.items()):
        have = actual.get(name)
        if have is None:
            problems.append(f"{name}: missing")
            continue
        problems += [f"{name}: {kind} {have[kind]} ≠ expected {digest}" for kind, digest in want.items()
                     if have[kind] != digest]
    return problems


def text_kind(data: Path, manifest: dict) -> str:
    """'CaseOps' or 'plain', from the tokenizer; PgolfError where the data cannot be scored canonically."""
    tokenizer = data / str(manifest.get("tokenizer", "tokenizer.model"))
    caseops = is_caseops_tokenizer(load_tokenizer(tokenizer), str(tokenizer))
    if bool(manifest.get("caseops", False)) != caseops:
        raise PgolfError(f"{data}: the manifest says caseops {manifest.get('caseops')}, its tokenizer says "
                         f"{caseops}: re-tokenize with `pgolf tokenize`")
    if caseops and not shard_paths(data, "val_bytes"):
        raise PgolfError(f"{data}: CaseOps data (its tokenizer reserves the case operators) without the original-byte "
                         "sidecar: its tokenizer-LUT bytes count the transformed text, so a BPB on them is refused")
    return "CaseOps (the tokenizer reserves the case operators), with the original-byte sidecar" if caseops else "plain"
