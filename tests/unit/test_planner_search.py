"""The planner's search: only valid plans, fitting ones ranked by step time, clear errors when nothing fits."""

from __future__ import annotations

import pytest

from plait.cli import main
from plait.config import Plan
from plait.models.gpt_config import GPTConfig
from plait.models.presets import get_preset
from plait.planner import Cluster, Link, ModelShape, SearchSpace, Workload, parse_bytes, search
from plait.planner.advice import explain_no_fit
from plait.planner.search import is_valid

GIB = 2**30


@pytest.fixture(scope="module")
def llama_7b_on_8_h100():
    """The search two tests read (a few seconds each time): llama-7b, 64 x 4096 tokens, one node of 8 H100."""
    return search(ModelShape(get_preset("llama-7b")), Workload(64, 4096), cluster=Cluster.preset("h100", nodes=1))


def test_every_plan_is_valid_and_fitting_plans_come_fastest_first(llama_7b_on_8_h100) -> None:
    shape = ModelShape(get_preset("llama-7b"))
    result = llama_7b_on_8_h100
    assert result.best is not None and result.num_invalid > 0
    for est in result.estimates:
        plan = est.plan
        assert plan.dp * plan.tp * plan.pp * plan.cp == 8
        assert shape.config.num_heads % plan.tp == 0 and shape.config.resolved_num_kv_heads % plan.tp == 0
        assert is_valid(plan, shape, Workload(64, 4096))
    times = [e.step_s for e in result.fitting]
    assert times == sorted(times)
    assert all(e.memory.total <= 80 * GIB for e in result.fitting)
    assert all(not e.fits for e in result.estimates[len(result.fitting) :])


def test_heads_limit_tensor_parallel() -> None:
    config = GPTConfig(vocab_size=1024, max_seq_len=256, d_model=384, num_layers=4, num_heads=6)
    result = search(ModelShape(config), Workload(16, 256), cluster=Cluster.preset("a100-40gb", nodes=1))
    assert {e.plan.tp for e in result.estimates} == {1, 2}  # 6 heads: tp 4 and 8 do not divide them


def test_nothing_fits_names_the_smallest_change() -> None:
    shape = ModelShape(get_preset("llama-1b"))
    workload = Workload(8, 8192)
    space = SearchSpace(recompute=("none",))
    cluster = Cluster.preset("a100-40gb", nodes=1, devices_per_node=1)
    result = search(shape, workload, cluster=cluster, space=space)
    assert result.best is None
    message = explain_no_fit(result, shape, workload=workload, space=space)
    assert "no plan fits in 40.0 GiB" in message
    assert "smallest change that fits: plan.recompute='full'" in message


def test_nothing_fits_asks_for_more_nodes_when_the_plan_options_are_exhausted() -> None:
    shape = ModelShape(get_preset("llama-7b"))
    workload = Workload(8, 4096)
    cluster = Cluster.preset("a100-40gb", nodes=1, devices_per_node=1)
    result = search(shape, workload, cluster=cluster)
    message = explain_no_fit(result, shape, workload=workload, space=SearchSpace())
    assert "smallest change that fits: --nodes 4" in message


def test_cluster_and_sizes_reject_bad_input() -> None:
    assert parse_bytes("80GiB") == 80 * GIB and parse_bytes("40GB") == 40 * 10**9
    with pytest.raises(ValueError, match="80GiB"):
        parse_bytes("eighty")
    with pytest.raises(ValueError, match="a100-80gb"):
        Cluster.preset("tpu")
    with pytest.raises(ValueError, match="bandwidth"):
        Link(bandwidth=0, latency=0)
    with pytest.raises(ValueError, match="reserved_bytes"):
        Cluster.preset("h100").replace(device_memory=GIB)
    with pytest.raises(ValueError, match="precision"):
        SearchSpace(precision="fp8")


def test_plan_command_prints_the_ranked_table_and_why(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", "--model", "gpt2-124m", "--nodes", "1", "--gpus-per-node", "8", "--gpu-mem", "80GiB",
                 "--global-batch", "64", "--seq", "1024", "--top", "3"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "tokens/s" in out and "MFU" in out and "best: dp" in out
    assert len([line for line in out.splitlines() if line.strip().startswith(("1 ", "2 ", "3 "))]) == 3


def test_plan_command_explains_when_nothing_fits(capsys: pytest.CaptureFixture[str]) -> None:
    """Without offload (with it, llama-7b fits one A100-40GB: tests/unit/test_planner_offload.py)."""
    code = main(["plan", "--model", "llama-7b", "--nodes", "1", "--gpus-per-node", "1", "--gpu", "a100-40gb",
                 "--global-batch", "8", "--seq", "4096", "--offload", "none"])  # fmt: skip
    assert code == 1
    assert "smallest change that fits: --nodes" in capsys.readouterr().out


def test_plan_command_reads_a_hugging_face_config(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from plait.checkpoint.hf_config import hf_config_dict

    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(hf_config_dict(get_preset("llama-1b"), family="llama", dtype="bfloat16", eos_token_id=None))
    )
    assert main(["plan", "--model", str(config), "--gpus-per-node", "8", "--seq", "2048", "--top", "1"]) == 0
    assert "1.24B parameters" in capsys.readouterr().out


def test_the_chosen_plan_is_accepted_by_plan_validation() -> None:
    shape = ModelShape(get_preset("gpt2-124m"))
    result = search(shape, Workload(32, 1024), cluster=Cluster.preset("a100-40gb", nodes=1))
    best = result.best
    assert best is not None
    Plan(**{k: getattr(best.plan, k) for k in ("dp", "tp", "pp", "zero", "microbatches")}).check_available()


def test_interleaving_chunks_range_from_two_to_one_layer_per_virtual_stage() -> None:
    shape = ModelShape(GPTConfig(vocab_size=256, max_seq_len=64, d_model=64, num_layers=12, num_heads=4))
    space = SearchSpace(zero=(1,), recompute=("none",), schedules=("interleaved",), tp=(1,), pp=(2, 4))
    result = search(shape, Workload(16, 64), cluster=Cluster.preset("h100", nodes=1), space=space)
    chunks = {(e.plan.pp, e.plan.pp_chunks) for e in result.estimates if e.plan.pp > 1}
    assert chunks == {(2, c) for c in range(2, 7)} | {(4, c) for c in range(2, 4)}


def test_cp_is_searched_where_sequences_run_out_and_only_then(llama_7b_on_8_h100) -> None:
    shape = ModelShape(get_preset("llama-7b"))
    long_and_few = Workload(2, 131072)  # 2 sequences on 32 GPUs: dp <= 2, tp <= 8 leaves pp or cp
    cluster = Cluster.preset("h100", nodes=4)
    best = search(shape, long_and_few, cluster=cluster).best
    without_cp = search(shape, long_and_few, cluster=cluster, space=SearchSpace(cp=(1,))).best
    assert best is not None and without_cp is not None
    assert best.plan.cp > 1 and without_cp.plan.pp > 1  # a pipeline of 1 micro-batch per rank is mostly bubble
    assert best.step_s < without_cp.step_s
    plenty = llama_7b_on_8_h100
    assert plenty.best is not None and all(e.plan.cp == 1 for e in plenty.estimates)  # dp does the same work
