"""Challenge-format token shards and the loaders that read them.

A shard is 256 little-endian int32 (magic 20240520, version 1, token count, zeros) followed by that
many uint16 tokens. Files: fineweb_train_%06d.bin, fineweb_val_%06d.bin and the byte sidecar
fineweb_val_bytes_%06d.bin (same layout, one uint16 byte count per validation token).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pgolf.errors import PgolfError
from pgolf.formats.files import atomic_path

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
SPLITS = {"train": "fineweb_train_", "val": "fineweb_val_", "val_bytes": "fineweb_val_bytes_"}


def shard_name(split: str, index: int) -> str:
    return f"{SPLITS[split]}{index:06d}.bin"


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    tokens = np.asarray(tokens)
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= 1 << 16):
        raise PgolfError(f"{path}: values outside uint16; a vocabulary of 65,536 or more does not fit the shard format")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2", copy=False).tobytes())


def read_header(path: str | Path) -> int:
    """Validate a shard's header and size; return its token count."""
    path = Path(path)
    if not path.is_file():
        raise PgolfError(f"{path}: shard not found; run `pgolf tokenize` first")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise PgolfError(f"{path}: {size} bytes is shorter than the 1024-byte shard header; the file is truncated")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if int(header[0]) != MAGIC:
        raise PgolfError(f"{path}: bad magic {int(header[0])} (expected {MAGIC}); not a challenge token shard")
    if int(header[1]) != VERSION:
        raise PgolfError(f"{path}: unsupported shard version {int(header[1])} (expected {VERSION})")
    n = int(header[2])
    if size != HEADER_BYTES + 2 * n:
        raise PgolfError(f"{path}: header says {n} tokens ({HEADER_BYTES + 2 * n} bytes) but the file has {size} bytes; "
                         "the file is truncated or corrupt, re-create it with `pgolf tokenize`")
    return n


def read_shard(path: str | Path) -> np.ndarray:
    """The tokens of a validated shard as a read-only uint16 memmap."""
    n = read_header(path)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))


def shard_paths(data_dir: str | Path, split: str) -> list[Path]:
    """Sorted shards of `split` (train | val | val_bytes); the val list never includes the sidecar."""
    data_dir = Path(data_dir)
    paths = sorted(data_dir.glob(f"{SPLITS[split]}[0-9]*.bin"))
    return [p for p in paths if split != "val" or "_bytes_" not in p.name]


def require_shards(data_dir: str | Path, split: str) -> list[Path]:
    paths = shard_paths(data_dir, split)
    if not paths:
        raise PgolfError(f"{data_dir}: no {SPLITS[split]}*.bin shards; run `pgolf tokenize` into this directory")
    return paths


def load_split(data_dir: str | Path, split: str) -> np.ndarray:
    """All tokens of a split, concatenated in shard order."""
    parts = [np.asarray(read_shard(p)) for p in require_shards(data_dir, split)]
    return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()


def load_val(data_dir: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Validation tokens and, when the sidecar exists, their canonical byte counts (checked parallel)."""
    tokens = load_split(data_dir, "val")
    if not shard_paths(data_dir, "val_bytes"):
        return tokens, None
    counts = load_split(data_dir, "val_bytes")
    if counts.shape != tokens.shape:
        raise PgolfError(f"{data_dir}: byte sidecar has {counts.size} entries for {tokens.size} val tokens; "
                         "re-run `pgolf tokenize`")
    return tokens, counts


class TokenStream:
    """Reads train shards in order, wrapping around, like the reference TokenStream."""

    def __init__(self, paths: list[Path], position: tuple[int, int] = (0, 0)):
        self.paths = paths
        self.file_idx, self.pos = position
        self.tokens = read_shard(self.paths[self.file_idx])

    def state(self) -> tuple[int, int]:
        return self.file_idx, self.pos

    def take(self, n: int) -> np.ndarray:
        chunks, remaining = [], n
        while remaining > 0:
            avail = self.tokens.size - self.pos
            if avail <= 0:
                self.file_idx = (self.file_idx + 1) % len(self.paths)
                self.tokens, self.pos = read_shard(self.paths[self.file_idx]), 0
                continue
            k = min(remaining, avail)
            chunks.append(self.tokens[self.pos:self.pos + k])
            self.pos += k
            remaining -= k
        return np.concatenate(chunks) if len(chunks) > 1 else np.array(chunks[0])


def staged(t: torch.Tensor, device: torch.device | str, pinned: bool) -> torch.Tensor:
    """Host tensor `t`, in page-locked memory when `pinned` and it is bound for a GPU. From pageable memory CUDA
    synchronises the stream before a copy, so the host would stall each micro-batch until the previous one
    finished and the GPU would idle while the next one is launched; from pinned memory (PyTorch's caching host
    allocator, which keeps the buffer until the copy is done) the copy is queued like a kernel."""
    return t.pin_memory() if pinned and torch.device(device).type == "cuda" else t


class DistributedTokenLoader:
    """Each call takes one contiguous span for all ranks; rank r keeps its slice (reference semantics).

    With world size W and A accumulation steps, a step of B tokens gives each rank B/(W·A) tokens per
    micro-batch, so equal global batches see the same tokens whatever W is.
    """

    def __init__(self, data_dir: str | Path, rank: int, world_size: int, device: torch.device | str,
                 position: tuple[int, int] = (0, 0), pinned: bool = True):
        """pinned: stage batches in page-locked memory, so the copy to the GPU is asynchronous (bench/step_trace.py
        compares it with pageable memory)."""
        self.stream = TokenStream(require_shards(data_dir, "train"), position)
        self.rank, self.world_size, self.device = rank, world_size, device
        self.pinned = pinned

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self._take(global_tokens, seq_len, grad_accum_steps)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def next_segmented_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int,
                             planner) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """next_batch, plus the batch's cu_seqlens from `planner` (pgolf.nn.attention.SegmentPlanner), planned
        on the host tokens before they move, so the step needs no host sync to find its documents."""
        x, y = self._take(global_tokens, seq_len, grad_accum_steps)
        cu = staged(planner.plan(x.numpy()), self.device, self.pinned)
        return (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                cu.to(self.device, non_blocking=True))

    def _take(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        local_tokens = global_tokens // (self.world_size * grad_accum_steps)
        span = local_tokens + 1
        chunk = self.stream.take(span * self.world_size)
        local = torch.from_numpy(chunk[self.rank * span:(self.rank + 1) * span].astype(np.int64))
        local = staged(local, self.device, self.pinned)  # one staging copy: x and y are views of it
        return local[:-1].reshape(-1, seq_len), local[1:].reshape(-1, seq_len)


class ShardWriter:
    """Accumulates one split's token stream and writes it as shards of `shard_tokens` tokens."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, with_sidecar: bool = False):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.with_sidecar = with_sidecar
        self.parts: list[np.ndarray] = []
        self.side_parts: list[np.ndarray] = []
        self.buffered = 0
        self.total = 0
        self.files: list[str] = []
        self.sidecar_files: list[str] = []

    def add(self, tokens: np.ndarray, byte_counts: np.ndarray | None = None) -> None:
        self.parts.append(tokens)
        if self.with_sidecar:
            self.side_parts.append(byte_counts)
        self.buffered += tokens.size
        self.total += tokens.size
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def close(self) -> None:
        if self.buffered:
            self._flush(self.buffered)

    def _flush(self, n: int) -> None:
        # The sidecar is cut at the same positions, so val shard k and bytes shard k stay aligned 1:1.
        tokens, self.parts = split_parts(self.parts, n)
        index = len(self.files)
        self.files.append(shard_name(self.split, index))
        write_shard(self.out_dir / self.files[-1], tokens)
        if self.with_sidecar:
            counts, self.side_parts = split_parts(self.side_parts, n)
            self.sidecar_files.append(shard_name("val_bytes", index))
            write_shard(self.out_dir / self.sidecar_files[-1], counts)
        self.buffered -= n


def split_parts(parts: list[np.ndarray], n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    whole = np.concatenate(parts)
    return whole[:n], ([whole[n:]] if whole.size > n else [])
