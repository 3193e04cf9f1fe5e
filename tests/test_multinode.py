"""Multi-node training: two torchrun "nodes" of one process each (c10d rendezvous on localhost, gloo)
match one process, as `torchrun --standalone --nproc_per_node=2` does in test_train.py."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pgolf.formats.files import load_tensors

from test_train import cli_train_args as train_args  # the run test_train.py's torchrun tests make

TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, chars: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no output)"
    return text[-chars:]


def run_nodes(cmds: list[list[str]], logs: Path, timeout: float = TIMEOUT_S) -> None:
    """Start every node's command at once; wait for all, within one deadline. On a failure or a timeout,
    kill every node's whole process group (torchrun and its workers) and fail with each node's stderr tail."""
    # torchrun sets OMP_NUM_THREADS=1 only for nproc_per_node > 1; set it as the 2-process test gets it,
    # so that two nodes on one host do not oversubscribe its cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs, files = [], []
    try:
        for i, cmd in enumerate(cmds):
            out, err = open(logs / f"node{i}.out", "w"), open(logs / f"node{i}.err", "w")
            files += [out, err]
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True))
        deadline, problem = time.monotonic() + timeout, None
        while problem is None and any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                problem = "a node failed"
            elif time.monotonic() > deadline:
                problem = f"timed out after {timeout:.0f} s"
            else:
                time.sleep(0.2)
        if problem is None and any(p.returncode != 0 for p in procs):
            problem = "a node failed"
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        for f in files:
            f.close()
    if problem is not None:
        report = "\n".join(f"--- node {i} (exit {p.returncode}) stderr tail:\n{tail(logs / f'node{i}.err')}"
                           for i, p in enumerate(procs))
        pytest.fail(f"two-node torchrun: {problem}\n{report}", pytrace=False)


@pytest.mark.slow
def test_two_node_torchrun_matches_one_process(tokenized_dir, tmp_path):
    """Two `torchrun --nnodes=2 --nproc_per_node=1 --node_rank=0/1` launches, as on a two-node cluster;
    LOCAL_RANK is 0 on both (fine on CPU). With c10d torchrun ignores --node_rank (it warns) and ranks the
    nodes itself; both write to one tmp dir here, so whichever is rank 0 writes the checkpoint."""
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    one_dir.mkdir()
    two_dir.mkdir()
    one = subprocess.run([sys.executable, *train_args(tokenized_dir, one_dir)], capture_output=True, text=True,
                         timeout=TIMEOUT_S)
    assert one.returncode == 0, one.stderr[-3000:]

    port = free_port()
    nodes = [[sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
              f"--node_rank={rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
              f"--rdzv_id=pgolf-multinode-{port}", *train_args(tokenized_dir, two_dir)] for rank in (0, 1)]
    run_nodes(nodes, tmp_path)

    one = load_tensors(one_dir / "ckpt.safetensors", "checkpoint")[0]
    two = load_tensors(two_dir / "ckpt.safetensors", "checkpoint")[0]
    assert one.keys() == two.keys()
    for name in one:
        # Same math, different summation order: differences stay at float rounding level.
        assert torch.allclose(one[name].float(), two[name].float(), atol=2e-4, rtol=1e-3), \
            (name, (one[name].float() - two[name].float()).abs().max().item())
    assert json.loads((two_dir / "m_report.json").read_text())["world_size"] == 2
    assert one["blocks.0.attn.proj.weight"].abs().max() > 0  # trained away from its zero init
