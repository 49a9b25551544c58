"""Several nodes: the flags `plait train` takes for them and the torchrun flags that join them.

    plait train CONFIG --nproc 2 --nnodes 2 --node-rank 0 --rdzv-endpoint 10.0.0.1:29400   # on node 0
    plait train CONFIG --nproc 2 --nnodes 2 --node-rank 1 --rdzv-endpoint 10.0.0.1:29400   # on node 1

Each node's launcher starts `--nproc` ranks through torchrun's static rendezvous: node 0 serves
the rendezvous store at the endpoint (one of its own addresses), and global ranks are numbered
node by node (node R holds ranks R*nproc .. R*nproc+nproc-1), so a plan's tensor-parallel peers,
its fastest-varying axis, share a node and its data-parallel groups span the nodes.

`--nnodes MIN:MAX` is elastic (torchrun's c10d rendezvous, node 0 hosting its store): the job
starts with as many nodes as join, up to MAX, and after a node is lost a restart
(`--max-restarts`) continues on the nodes left, down to MIN, from the newest checkpoint,
resharded to the smaller world (the plan's dp follows the world: `plan.dp = -1`). `--rdzv-conf`
tunes that rendezvous with torchrun's keys: after a loss the nodes left wait for the lost node's
keep-alive to expire (keep_alive_interval x keep_alive_max_attempt, 15 s by default) and then
last_call_timeout (30 s) for late joiners before they restart.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

NODE_FLAGS = ("--nnodes", "--node-rank", "--rdzv-endpoint", "--rdzv-conf")
RDZV_KEYS = (
    "join_timeout",
    "last_call_timeout",
    "close_timeout",
    "heartbeat_timeout",
    "keep_alive_interval",
    "keep_alive_max_attempt",
    "read_timeout",
)  # torchrun's c10d rendezvous options, each a whole number (seconds or a count)


def add_node_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("several nodes (torchrun's static rendezvous; --nproc is ranks per node)")
    group.add_argument(
        "--nnodes", default="1", metavar="N|MIN:MAX", help="nodes in the job (default 1); MIN:MAX is elastic"
    )
    group.add_argument(
        "--node-rank", type=int, default=0, help="this node's index, 0 .. nnodes-1; node 0 serves the rendezvous"
    )
    group.add_argument(
        "--rdzv-endpoint",
        default=None,
        metavar="HOST:PORT",
        help="node 0's address and a free port, the same on every node",
    )
    group.add_argument(
        "--rdzv-conf",
        default="",
        metavar="KEY=N,...",
        help=f"elastic rendezvous options (--nnodes MIN:MAX), as torchrun's: {', '.join(RDZV_KEYS)}",
    )


@dataclass(frozen=True)
class Nodes:
    """Where this launcher sits among the job's nodes."""

    num_nodes: int = 1  # the most nodes (MAX of MIN:MAX)
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    min_nodes: int | None = None  # fewer than num_nodes: elastic; None: exactly num_nodes
    rdzv_conf: str = ""  # extra torchrun --rdzv-conf items for the elastic rendezvous, "KEY=N,..."

    def __post_init__(self) -> None:
        if self.num_nodes < 1:
            raise ValueError(f"--nnodes {self.num_nodes}: use 1 or more")
        if self.min_nodes is not None and not 1 <= self.min_nodes <= self.num_nodes:
            raise ValueError(
                f"--nnodes {self.min_nodes}:{self.num_nodes}: MIN must be between 1 and MAX, e.g. --nnodes 1:2"
            )
        if not 0 <= self.node_rank < self.num_nodes:
            raise ValueError(
                f"--node-rank {self.node_rank}: give this node's index, 0 to {self.num_nodes - 1} (--nnodes {self.num_nodes})"
            )
        if self.num_nodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(
                f"--nnodes {self.num_nodes} needs --rdzv-endpoint HOST:PORT: node 0's address and a free port, "
                "the same on every node"
            )
        if self.num_nodes > 1:
            _check_endpoint(self.rdzv_endpoint)
        if self.rdzv_conf:
            _check_rdzv_conf(self.rdzv_conf, elastic=self.elastic)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Nodes:
        least, most = parse_nnodes(str(getattr(args, "nnodes", 1)))
        return cls(
            num_nodes=most,
            min_nodes=least if least != most else None,
            node_rank=getattr(args, "node_rank", 0),
            rdzv_endpoint=getattr(args, "rdzv_endpoint", None),
            rdzv_conf=getattr(args, "rdzv_conf", "") or "",
        )

    @property
    def elastic(self) -> bool:
        return self.min_nodes is not None and self.min_nodes < self.num_nodes

    @property
    def node_counts(self) -> range:
        """Every number of nodes the job may run on."""
        return range(self.min_nodes or self.num_nodes, self.num_nodes + 1)

    @property
    def is_first(self) -> bool:
        """Node 0 holds global rank 0: checks that must run once for the whole job (is the
        shared out_dir already used?) run on its launcher only, so nodes do not refuse each other."""
        return self.node_rank == 0

    def world_size(self, ranks_wanted: int, *, per_node: bool) -> int:
        """All ranks of the job: `ranks_wanted` per node when --nproc gave it, else the plan's whole world."""
        world = ranks_wanted * self.num_nodes if per_node else ranks_wanted
        if world % self.num_nodes:
            raise ValueError(
                f"the plan's {world} ranks do not split evenly over --nnodes {self.num_nodes}; "
                "pass --nproc with the ranks each node runs"
            )
        return world

    def ranks_per_node(self, world_size: int) -> int:
        return world_size // self.num_nodes

    def torchrun_flags(self) -> list[str]:
        """How torchrun joins the nodes: --standalone for one node, the c10d rendezvous for a range of
        nodes (node 0 hosts its store, so a lost node never takes the store with it), else the static one."""
        if self.elastic:
            return [
                f"--nnodes={self.min_nodes}:{self.num_nodes}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={self.rdzv_endpoint}",
                "--rdzv-id=plait",
                "--rdzv-conf=" + ",".join(filter(None, [f"is_host={int(self.is_first)}", self.rdzv_conf])),
            ]
        if self.num_nodes == 1:
            return ["--standalone"]
        return [f"--nnodes={self.num_nodes}", f"--node-rank={self.node_rank}", f"--rdzv-endpoint={self.rdzv_endpoint}"]


def strip_node_flags(argv: Sequence[str]) -> list[str]:
    """argv without the node flags (`--flag VALUE` or `--flag=VALUE`): the ranks learn their place from torchrun."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in NODE_FLAGS:
            skip = True
        elif not any(item.startswith(flag + "=") for flag in NODE_FLAGS):
            out.append(item)
    return out


def parse_nnodes(text: str) -> tuple[int, int]:
    """`--nnodes` as (MIN, MAX): "2" is (2, 2), "1:2" is (1, 2)."""
    least, _, most = text.partition(":")
    try:
        return int(least), int(most or least)
    except ValueError:
        raise ValueError(f"--nnodes {text}: give a number of nodes (2) or an elastic range MIN:MAX (1:2)") from None


def _check_endpoint(endpoint: str | None) -> None:
    host, _, port = (endpoint or "").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"--rdzv-endpoint {endpoint}: give node 0's address and a free port as HOST:PORT, the same on every "
            "node (e.g. 10.0.0.1:29400)"
        )


def _check_rdzv_conf(text: str, *, elastic: bool) -> None:
    if not elastic:
        raise ValueError(f"--rdzv-conf {text}: it tunes the elastic rendezvous; add --nnodes MIN:MAX or drop it")
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in RDZV_KEYS or not value.isdigit():
            raise ValueError(
                f"--rdzv-conf {text}: {item!r} is not KEY=N with KEY one of {', '.join(RDZV_KEYS)} "
                "(e.g. last_call_timeout=5,keep_alive_interval=2)"
            )
