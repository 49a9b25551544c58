"""`plait train --nnodes/--node-rank/--rdzv-endpoint`: the flags, the torchrun command, and the
used-out_dir check that only node 0 runs (nodes share an out_dir on a shared filesystem)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from plait import cli
from plait.cli import launching
from plait.distributed.nodes import Nodes, strip_node_flags

ENDPOINT = "10.0.0.1:29400"


@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        (dict(num_nodes=0), "--nnodes 0: use 1 or more"),
        (dict(num_nodes=2, node_rank=2, rdzv_endpoint=ENDPOINT), "--node-rank 2: give this node's index, 0 to 1"),
        (dict(num_nodes=2, node_rank=-1, rdzv_endpoint=ENDPOINT), "--node-rank -1"),
        (dict(num_nodes=2), "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
        (
            dict(num_nodes=2, rdzv_endpoint="10.0.0.1"),
            "--rdzv-endpoint 10.0.0.1: give node 0's address and a free port",
        ),
        (dict(num_nodes=2, rdzv_endpoint="host:99999"), "as HOST:PORT"),
        (dict(num_nodes=2, rdzv_endpoint=ENDPOINT, rdzv_conf="last_call_timeout=1"), "add --nnodes MIN:MAX"),
        (
            dict(num_nodes=2, min_nodes=1, rdzv_endpoint=ENDPOINT, rdzv_conf="is_host=1"),
            "'is_host=1' is not KEY=N with KEY one of join_timeout",
        ),
        (dict(num_nodes=2, min_nodes=1, rdzv_endpoint=ENDPOINT, rdzv_conf="join_timeout=1.5"), "not KEY=N"),
    ],
)
def test_wrong_node_flags_are_refused_with_the_fix(nodes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Nodes(**nodes)


def test_the_world_is_nproc_per_node_times_the_nodes_or_the_plan_split_over_them() -> None:
    two = Nodes(num_nodes=2, node_rank=1, rdzv_endpoint=ENDPOINT)
    assert two.world_size(2, per_node=True) == 4 and two.ranks_per_node(4) == 2
    assert two.world_size(4, per_node=False) == 4
    with pytest.raises(ValueError, match="do not split evenly over --nnodes 2; pass --nproc"):
        two.world_size(3, per_node=False)
    assert not two.is_first and Nodes().is_first


def test_torchrun_joins_the_nodes_with_the_static_rendezvous() -> None:
    assert Nodes().torchrun_flags() == ["--standalone"]
    flags = Nodes(num_nodes=2, node_rank=1, rdzv_endpoint=ENDPOINT).torchrun_flags()
    assert flags == ["--nnodes=2", "--node-rank=1", f"--rdzv-endpoint={ENDPOINT}"]
    from torch.distributed.run import get_args_parser

    parsed = get_args_parser().parse_args([*flags, "--nproc-per-node=2", "x.py"])
    assert (parsed.nnodes, parsed.node_rank, parsed.rdzv_endpoint, parsed.rdzv_backend) == ("2", 1, ENDPOINT, "static")


def test_the_ranks_do_not_see_the_node_flags() -> None:
    argv = ["train", "c.toml", "--nnodes", "2", "--node-rank=1", "--rdzv-endpoint", ENDPOINT, "--set", "a.b=1"]
    argv += ["--rdzv-conf", "last_call_timeout=2"]
    assert strip_node_flags(argv) == ["train", "c.toml", "--set", "a.b=1"]


def test_plait_run_passes_the_node_flags_to_torchrun() -> None:
    from torch.distributed.run import get_args_parser

    argv = ["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", ENDPOINT, "--nproc-per-node", "2", "s.py"]
    parsed = get_args_parser().parse_args(argv)  # what `plait run ARGV` hands torchrun, unchanged
    assert (parsed.nnodes, parsed.node_rank, parsed.rdzv_endpoint) == ("2", 1, ENDPOINT)


def write_config(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(24):
        (corpus / f"doc{i:02d}.py").write_text(f"def f{i}(x):\n    return x * {i} + sum(range({i}))\n" * 12)
    config = tmp_path / "c.toml"
    config.write_text(
        f"[model]\npreset = 'tiny'\n[data]\ncorpus = ['{corpus}']\nvocab_size = 300\nseq_len = 32\n"
        f"val_fraction = 0.3\ncache_dir = '{tmp_path / 'cache'}'\n[plan]\ndp = 2\ntp = 2\n"
        f"[train]\nsteps = 2\nglobal_batch = 4\nout_dir = '{tmp_path / 'shared'}'\n"
    )
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "metrics.csv").write_text("step,loss\n1,5.0\n")  # node 0's ranks started already
    return config


def test_only_node_0_refuses_a_used_out_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    launched: list[tuple[int, list[str], Nodes | None]] = []

    def launch(nproc: int, argv: list[str], *, nodes: Nodes | None = None, **options: object) -> int:
        launched.append((nproc, argv, nodes))
        return 0

    monkeypatch.setattr(launching, "launch", launch)

    def train(node_rank: int) -> int:
        flags = ["--nproc", "2", "--nnodes", "2", "--node-rank", str(node_rank), "--rdzv-endpoint", ENDPOINT]
        return cli.main(["train", str(config), *flags])

    assert train(0) == 2
    assert "already holds a run (metrics.csv)" in capsys.readouterr().err
    assert launched == []
    assert train(1) == 0  # node 1 may start after node 0's ranks began writing the shared out_dir
    assert launched == [(2, ["train", str(config)], Nodes(num_nodes=2, node_rank=1, rdzv_endpoint=ENDPOINT))]


def test_parser_takes_the_node_flags() -> None:
    args = cli.build_parser().parse_args(["train", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", ENDPOINT])
    assert isinstance(args, argparse.Namespace)
    assert Nodes.from_args(args) == Nodes(num_nodes=2, node_rank=1, rdzv_endpoint=ENDPOINT)


def test_an_elastic_range_joins_through_the_c10d_rendezvous_hosted_by_node_0() -> None:
    args = cli.build_parser().parse_args(["train", "--nnodes", "1:2", "--node-rank", "1", "--rdzv-endpoint", ENDPOINT])
    nodes = Nodes.from_args(args)
    assert nodes == Nodes(num_nodes=2, min_nodes=1, node_rank=1, rdzv_endpoint=ENDPOINT)
    assert (
        nodes.elastic
        and list(nodes.node_counts) == [1, 2]
        and not Nodes(num_nodes=2, min_nodes=2, rdzv_endpoint=ENDPOINT).elastic
    )
    from torch.distributed.run import get_args_parser

    parsed = get_args_parser().parse_args([*nodes.torchrun_flags(), "--nproc-per-node=1", "x.py"])
    assert (parsed.nnodes, parsed.rdzv_backend, parsed.rdzv_endpoint) == ("1:2", "c10d", ENDPOINT)
    assert parsed.rdzv_conf == "is_host=0"  # node 0 hosts the store, so losing another node never loses it
    assert "--rdzv-conf=is_host=1" in Nodes(num_nodes=2, min_nodes=1, rdzv_endpoint=ENDPOINT).torchrun_flags()


def test_rdzv_conf_reaches_torchruns_rendezvous_beside_is_host() -> None:
    argv = ["train", "--nnodes", "1:2", "--rdzv-endpoint", ENDPOINT, "--rdzv-conf", "last_call_timeout=2"]
    nodes = Nodes.from_args(cli.build_parser().parse_args(argv))
    from torch.distributed.run import config_from_args, get_args_parser

    parsed = get_args_parser().parse_args([*nodes.torchrun_flags(), "--nproc-per-node=1", "x.py"])
    config, _, _ = config_from_args(parsed)
    assert config.rdzv_configs["is_host"] == "1" and config.rdzv_configs["last_call_timeout"] == "2"


@pytest.mark.parametrize(
    ("nnodes", "message"),
    [("two", "--nnodes two: give a number of nodes (2) or an elastic range MIN:MAX (1:2)"), ("3:2", "MIN must be")],
)
def test_a_wrong_node_range_is_refused(nnodes: str, message: str) -> None:
    args = cli.build_parser().parse_args(["train", "--nnodes", nnodes, "--rdzv-endpoint", ENDPOINT])
    with pytest.raises(ValueError, match=re.escape(message)):
        Nodes.from_args(args)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--nproc", "1"], "plan.dp=2 is fixed; set plan.dp=-1"),
        (["--set", "plan.dp=-1"], "--nnodes 1:2 is elastic: pass --nproc"),
        (["--nproc", "2", "--set", "plan.dp=-1", "--set", "train.global_batch=3"], "global_batch"),
    ],
)
def test_an_elastic_job_is_checked_for_every_world_it_may_run_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    monkeypatch.setattr(launching, "launch", lambda *args, **kwargs: pytest.fail("launched"))
    config = write_config(tmp_path)
    code = cli.main(["train", str(config), "--nnodes", "1:2", "--rdzv-endpoint", ENDPOINT, *flags])
    assert code == 2
    assert message in capsys.readouterr().err
