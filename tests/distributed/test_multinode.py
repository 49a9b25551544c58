"""Two emulated nodes: `plait train --nnodes 2` across network namespaces joined by a 1 Gbit/s link.

scripts/netns.py makes two namespaces and a tbf-shaped veth pair (root only; the test is skipped
with the script's own reason where it cannot). Each node's launcher runs 2 ranks inside its
namespace with gloo bound to its veth end; the plan is tp=2 inside each node and dp=2 across.
Its per-step losses must equal the same plan on one node (4 forked ranks) to 1e-5 relative, and
its data-parallel bytes must be counted as crossing nodes. Both nodes share one out_dir, as on a
shared filesystem: only node 0's launcher checks that it is unused.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from plait.config import load_config
from plait.train.logs import read_metrics
from plait.train.loop import run_training
from plait.train.setup import prepare_data
from tests.distributed.harness import run_ranks

REPO = Path(__file__).resolve().parents[2]
NETNS = REPO / "scripts" / "netns.py"
CONFIG = REPO / "configs" / "gpt-tiny.toml"
NAME = f"pt{os.getpid() % 100_000}"  # namespaces of this test run only: NAME0, NAME1
NET = "10.213.7"
ENDPOINT = f"{NET}.1:29500"  # node 0's own address: free, its namespace is new
STEPS = 5


def tiny_overrides(corpus: list[str], tmp: Path, *, out_dir: Path) -> list[str]:
    """configs/gpt-tiny.toml with a small corpus, few steps and the plan tp=2 x dp=2."""
    quoted = ",".join(f"'{path}'" for path in corpus)
    return [
        f"data.corpus=[{quoted}]",
        "data.vocab_size=512",
        "data.seq_len=32",
        "data.val_fraction=0.1",
        f"data.cache_dir='{tmp / 'cache'}'",
        "plan.dp=2",
        "plan.tp=2",
        f"train.steps={STEPS}",
        "train.global_batch=4",
        "train.warmup=1",
        "train.log_every=1",
        f"train.eval_every={STEPS}",
        "train.eval_batches=1",
        f"train.checkpoint_every={STEPS}",
        f"train.out_dir='{out_dir}'",
    ]


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[tuple[str, str]]:
    made = subprocess.run(
        [sys.executable, str(NETNS), "up", "--name", NAME, "--net", NET, "--rate", "1gbit"],
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        pytest.skip(made.stderr.strip() or f"scripts/netns.py up exited {made.returncode}")
    try:
        yield f"{NAME}0", f"{NAME}1"
    finally:
        subprocess.run([sys.executable, str(NETNS), "down", "--name", NAME], capture_output=True)


def start_node(node_rank: int, namespace: str, overrides: list[str]) -> subprocess.Popen:
    command = ["ip", "netns", "exec", namespace, sys.executable, "-m", "plait.cli", "train", str(CONFIG)]
    command += ["--nproc", "2", "--nnodes", "2", "--node-rank", str(node_rank), "--rdzv-endpoint", ENDPOINT]
    command += [arg for item in overrides for arg in ("--set", item)]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": f"{namespace}-v"}
    return subprocess.Popen(
        command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def finish(node: subprocess.Popen, *, timeout_s: float) -> tuple[int, str]:
    try:
        output, _ = node.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(node.pid, signal.SIGKILL)  # the launcher's own session: torchrun and its ranks
        output, _ = node.communicate()
        return -1, f"timed out after {timeout_s:.0f} s\n{output}"
    return node.returncode, output


def one_node_run(rank: int, world_size: int, overrides: list[str]) -> list[float]:
    return run_training(load_config(str(CONFIG), overrides)).losses


def metrics(out_dir: Path) -> list[dict]:
    return [row for row in read_metrics(out_dir / "metrics.csv") if row.get("loss") is not None]


@pytest.mark.timeout(240)
def test_two_nodes_over_a_1gbit_link_match_one_node(
    two_nodes: tuple[str, str], small_corpus: list[str], tmp_path: Path
) -> None:
    shared = tmp_path / "two-nodes"  # one out_dir for both nodes, as on a shared filesystem
    overrides = tiny_overrides(small_corpus, tmp_path, out_dir=shared)
    prepare_data(load_config(str(CONFIG), overrides))  # the token cache, once, before three launchers read it
    nodes = [start_node(rank, namespace, overrides) for rank, namespace in enumerate(two_nodes)]
    reference = tiny_overrides(small_corpus, tmp_path, out_dir=tmp_path / "one-node")
    one_node_losses = run_ranks(one_node_run, 4, reference, timeout_s=180)[0]
    for node_rank, node in enumerate(nodes):
        code, output = finish(node, timeout_s=180)
        assert code == 0, f"node {node_rank} exited {code}:\n{output[-4000:]}"
    rows = metrics(shared)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert [row["loss"] for row in rows] == pytest.approx(one_node_losses, rel=1e-5)
    assert all(row["comm_inter_bytes"] > 0 and row["comm_inter_bytes"] >= row["comm_dp_bytes"] for row in rows)
    assert all(row["comm_inter_bytes"] == 0 for row in metrics(tmp_path / "one-node"))
