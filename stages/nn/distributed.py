"""One process or a torchrun group: the launcher's protocol (RANK, WORLD_SIZE, LOCAL_RANK) and the
few collectives the stages need."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from pgolf.nn.model import resolve_device


class Dist:
    """The torchrun launch protocol (RANK / WORLD_SIZE / LOCAL_RANK), or a single process."""

    def __init__(self, device_name: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(device_name)
        if device == "cuda":
            device = f"cuda:{self.local_rank}"
            torch.cuda.set_device(device)
        self.device = torch.device(device)
        self.enabled = self.world > 1
        if self.enabled and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        # host flags (stop at the cap, suspend) agree over gloo on CPU tensors: an NCCL all-reduce read back with
        # .item() would wait for the GPU to finish the step, every step
        self.host_group = dist.new_group(backend="gloo") if self.enabled and self.device.type == "cuda" else None
        self.main = self.rank == 0

    def any(self, flag: bool) -> bool:
        """Whether any rank's flag is set (a collective of host values; no GPU sync)."""
        if not self.enabled:
            return flag
        t = torch.tensor(int(flag))
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.host_group)
        return bool(t.item())

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def all_reduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or max) `t` across ranks in place (a no-op for one process)."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t

    def mine(self, items: list) -> list:
        """This rank's share of a work list every rank built the same way: every world-th item from its rank
        on. A deterministic queue (no shared counter, no files): a list sorted longest first stays balanced."""
        return items[self.rank::self.world]

