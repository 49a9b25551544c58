"""plait on two emulated nodes: tokens/s and inter-node bytes per step, 1 vs 2.5 Gbit/s vs one node.

Two nodes are two network namespaces joined by a veth pair shaped with tc tbf
(scripts/netns.py, root only). Each node's launcher runs `plait train --nproc 2
--nnodes 2 --node-rank R --rdzv-endpoint NODE0:PORT` inside its namespace with gloo
bound to its veth end (GLOO_SOCKET_IFNAME); the plan is tp=2 inside each node and dp=2
across, so the gradient all-reduce crosses the link and tensor-parallel traffic stays
inside a node. "one node" runs the same plan as 4 ranks of one launcher, unshaped.

For each link rate the rate the link actually achieved is measured first, two ways:
one TCP stream of --probe-mib MiB from node 0 to node 1 (Python sockets, timed at the
receiver from first byte to EOF), and a gloo all-reduce of as many bytes between one
process in each namespace (median of 3 after a warm-up; for 2 ranks a ring all-reduce
sends the tensor's size once each way, so Gbit/s = bytes * 8 / seconds).

Per run, from rank 0's rows of out_dir/metrics.csv: step time (median over the steps
after --skip), tokens/s = global_batch * seq_len / that median, and the bytes rank 0 sent
per step across nodes (comm_inter_bytes) and inside its node (comm_intra_bytes); "link s" is
the time those bytes take on the measured TCP rate (both of a node's ranks send that much
over the one link each way), and "max loss diff" the largest relative difference of a step's
loss from the one-node run's (the same plan: 0 up to float rounding). The model
is configs/gpt-tiny.toml widened to d_model 256 (3.7M parameters, vocab 8192) so the
all-reduce is ~7 MB per rank per step: big enough for the link to show, small enough
for 2 cores.

    sudo .venv/bin/python benchmarks/multinode.py                       # ~3 min on 2 cores
    sudo .venv/bin/python benchmarks/multinode.py --rates 1gbit 2.5gbit 10gbit --steps 30
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, environment, format_bytes, format_table, load_average, write_json

REPO = Path(__file__).resolve().parents[1]
NETNS = REPO / "scripts" / "netns.py"
CONFIG = REPO / "configs" / "gpt-tiny.toml"
NAME, NET = "plbench", "10.213.9"  # namespaces plbench0 / plbench1, addresses 10.213.9.1 / .2
NODE0, NODE1 = f"{NET}.1", f"{NET}.2"
RDZV_PORT, PROBE_PORT, STORE_PORT = 29500, 5201, 29600
GLOBAL_BATCH, SEQ_LEN, RANKS_PER_NODE = 8, 64, 2

TCP_RECEIVER = """
import socket, sys, time
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
conn, _ = server.accept()
first = conn.recv(1 << 20)
start, total = time.perf_counter(), 0
while chunk := conn.recv(1 << 20):
    total += len(chunk)
print(total * 8 / (time.perf_counter() - start) / 1e9)
"""

TCP_SENDER = """
import socket, sys, time
deadline = time.monotonic() + 10
while True:
    try:
        conn = socket.create_connection((sys.argv[1], int(sys.argv[2])))
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
block = b"x" * (1 << 20)
for _ in range(int(sys.argv[3])):
    conn.sendall(block)
conn.close()
"""

GLOO_ALL_REDUCE = """
import statistics, sys, time
from datetime import timedelta
import torch, torch.distributed as dist
rank, host, port, num_bytes = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
store = dist.TCPStore(host, port, 2, rank == 0, timeout=timedelta(seconds=60))
dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
tensor = torch.ones(num_bytes // 4)
dist.all_reduce(tensor)  # warm-up: the connections
seconds = []
for _ in range(3):
    dist.barrier()
    start = time.perf_counter()
    dist.all_reduce(tensor)
    seconds.append(time.perf_counter() - start)
if rank == 0:
    print(statistics.median(seconds))
dist.destroy_process_group()
"""


def netns(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(NETNS), *args, "--name", NAME, "--net", NET], capture_output=True, text=True
    )
    if done.returncode != 0:
        print(done.stderr.strip() or f"scripts/netns.py {args[0]} exited {done.returncode}", file=sys.stderr)
        sys.exit(done.returncode)
    return done.stdout


def in_node(node: int, command: list[str], **kwargs: Any) -> subprocess.Popen:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": f"{NAME}{node}-v"}
    return subprocess.Popen(["ip", "netns", "exec", f"{NAME}{node}", *command], env=env, **kwargs)


def measure_tcp_gbit_s(num_mib: int) -> float:
    receiver = in_node(
        1, [sys.executable, "-c", TCP_RECEIVER, NODE1, str(PROBE_PORT)], stdout=subprocess.PIPE, text=True
    )
    assert receiver.stdout is not None and receiver.stdout.readline().strip() == "ready"
    sender = in_node(0, [sys.executable, "-c", TCP_SENDER, NODE1, str(PROBE_PORT), str(num_mib)])
    sender.wait(timeout=120)
    output, _ = receiver.communicate(timeout=120)
    return float(output.strip())


def measure_gloo_gbit_s(num_mib: int) -> tuple[float, float]:
    """(seconds per all-reduce of num_mib MiB between the two nodes, the Gbit/s each way that is)."""
    num_bytes = num_mib << 20
    args = [NODE0, str(STORE_PORT), str(num_bytes)]
    ranks = [
        in_node(node, [sys.executable, "-c", GLOO_ALL_REDUCE, str(node), *args], stdout=subprocess.PIPE, text=True)
        for node in (0, 1)
    ]
    outputs = [rank.communicate(timeout=180)[0] for rank in ranks]
    seconds = float(outputs[0].strip())
    return seconds, num_bytes * 8 / seconds / 1e9


def overrides(args: argparse.Namespace, out_dir: Path) -> list[str]:
    items = [
        "model.d_model=256",
        "model.num_layers=2",
        f"data.seq_len={SEQ_LEN}",
        "plan.dp=2",
        "plan.tp=2",
        f"train.steps={args.steps}",
        f"train.global_batch={GLOBAL_BATCH}",
        "train.warmup=2",
        "train.log_every=1",
        f"train.eval_every={args.steps}",
        "train.eval_batches=1",
        f"train.checkpoint_every={args.steps}",
        f"train.out_dir='{out_dir}'",
    ]
    return [arg for item in items for arg in ("--set", item)]


def train_command(args: argparse.Namespace, out_dir: Path, *node_flags: str) -> list[str]:
    nproc = "2" if node_flags else "4"
    return [
        sys.executable,
        "-m",
        "plait.cli",
        "train",
        str(CONFIG),
        "--nproc",
        nproc,
        *node_flags,
        *overrides(args, out_dir),
    ]


def run_one_node(args: argparse.Namespace, out_dir: Path) -> None:
    done = subprocess.run(train_command(args, out_dir), cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the one-node run failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}")


def run_two_nodes(args: argparse.Namespace, out_dir: Path) -> None:
    endpoint = f"{NODE0}:{RDZV_PORT}"
    nodes = [
        in_node(
            rank,
            train_command(args, out_dir, "--nnodes", "2", "--node-rank", str(rank), "--rdzv-endpoint", endpoint),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    for rank, node in enumerate(nodes):
        output, _ = node.communicate(timeout=900)
        if node.returncode != 0:
            raise SystemExit(f"node {rank} failed ({node.returncode}):\n{output[-3000:]}")


def summarize(out_dir: Path, *, skip: int, tokens_per_step: int) -> dict[str, Any]:
    with open(out_dir / "metrics.csv", newline="") as file:
        rows = [row for row in csv.DictReader(file) if row["loss"]]
    steady = rows[skip:]
    step_s = statistics.median(float(row["step_s"]) for row in steady)
    return {
        "steps": len(rows),
        "step_s_median": step_s,
        "step_s": [float(row["step_s"]) for row in steady],
        "tokens_per_s": tokens_per_step / step_s,
        "inter_bytes_per_step": statistics.median(float(row["comm_inter_bytes"]) for row in steady),
        "intra_bytes_per_step": statistics.median(float(row["comm_intra_bytes"]) for row in steady),
        "dp_bytes_per_step": statistics.median(float(row["comm_dp_bytes"]) for row in steady),
        "losses": [float(row["loss"]) for row in rows],
    }


def run_setup(args: argparse.Namespace, rate: str | None, work: Path) -> dict[str, Any]:
    out_dir = work / (rate or "one-node")
    record: dict[str, Any] = {"setup": f"2 nodes x 2, {rate} link" if rate else "1 node x 4", "rate": rate}
    if rate is None:
        run_one_node(args, out_dir)
    else:
        print(netns("up", "--rate", rate).strip())
        try:
            record["tcp_gbit_s"] = measure_tcp_gbit_s(args.probe_mib)
            record["gloo_all_reduce_s"], record["gloo_gbit_s"] = measure_gloo_gbit_s(args.probe_mib)
            run_two_nodes(args, out_dir)
        finally:
            netns("down")
    record |= summarize(out_dir, skip=args.skip, tokens_per_step=GLOBAL_BATCH * SEQ_LEN)
    if rate is not None:  # both of a node's ranks send their dp share over the one link, each direction
        link_bytes = RANKS_PER_NODE * record["inter_bytes_per_step"]
        record["link_s_per_step_est"] = link_bytes * 8 / (record["tcp_gbit_s"] * 1e9)
    record["load_average"] = load_average()
    print(f"  {record['setup']}: {record['tokens_per_s']:.0f} tokens/s, step {record['step_s_median']:.3f} s")
    return record


def table(records: list[dict[str, Any]]) -> str:
    def gbit(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    headers = ["setup", "TCP Gbit/s", "gloo Gbit/s", "step s", "link s (est.)", "tokens/s", "inter-node/step"]
    headers += ["intra-node/step", "max loss diff"]
    rows = [
        [
            r["setup"],
            gbit(r.get("tcp_gbit_s")),
            gbit(r.get("gloo_gbit_s")),
            f"{r['step_s_median']:.3f}",
            "-" if "link_s_per_step_est" not in r else f"{r['link_s_per_step_est']:.3f}",
            f"{r['tokens_per_s']:.0f}",
            format_bytes(r["inter_bytes_per_step"]),
            format_bytes(r["intra_bytes_per_step"]),
            f"{r['max_rel_loss_diff']:.1e}",
        ]
        for r in records
    ]
    return format_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", nargs="+", default=["1gbit", "2.5gbit"], help="link rates in tc's syntax")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2, help="steps left out of the median (warm-up)")
    parser.add_argument("--probe-mib", type=int, default=64, help="MiB sent by each link probe")
    parser.add_argument("--out", default=str(RESULTS_DIR / "multinode.json"))
    args = parser.parse_args()
    netns("check")  # not root, no ip or no tbf: its one line and exit code
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="plait-multinode-"))
    try:
        records = [run_setup(args, rate, work) for rate in [None, *args.rates]]
        for record in records:  # the same plan on every link: the same losses
            pairs = zip(record["losses"], records[0]["losses"], strict=True)
            record["max_rel_loss_diff"] = max(abs(a - b) / abs(b) for a, b in pairs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(records))
    payload = {
        "benchmark": "multinode",
        "environment": environment(),
        "settings": {**vars(args), "plan": "tp=2 x dp=2", "model": "tiny, d_model 256, 2 layers, vocab 8192"},
        "wall_s": time.perf_counter() - start,
        "results": records,
        "notes": "bytes are rank 0's per step (comm_inter_bytes, comm_intra_bytes of metrics.csv); a node's two "
        "ranks each send as much across the link; the link is shared by both dp groups (ranks 0-2 and 1-3)",
    }
    print(f"wrote {write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
