"""The planner's offload: bytes per tier, I/O per step and its time, the search's offload plans, and the
`plait plan` options that describe host memory and disk."""

from __future__ import annotations

import pytest

from plait.cli import main
from plait.config import Plan
from plait.models.gpt_config import GPTConfig
from plait.models.presets import get_preset
from plait.planner import Cluster, Estimator, ModelShape, SearchSpace, Workload, search
from plait.planner.cluster import Disk
from plait.planner.evaluate import parse_plan_fields
from plait.planner.hardware import parse_disk, parse_host_memory
from plait.planner.offload import offload_bytes
from plait.planner.offload_apply import offload_time
from plait.planner.timing import TimeBreakdown

GIB = 2**30
# vocab 512, d 64, 2 layers, 4 heads (GPT-2 options): units embed 32768, pos 4096, 2 x layer 49984, norm 128
SMALL = GPTConfig(vocab_size=512, max_seq_len=64, d_model=64, num_layers=2, num_heads=4)
S = (32768 + 4096 + 2 * 49984 + 128) // 2  # shard elements per rank at dp=2: 68480
BIGGEST = 49984 // 2  # the largest unit's shard (a layer)


def _units(plan: Plan) -> list:
    return ModelShape(SMALL).stage_units(0, num_layers=2, pp=1, tp=plan.tp)


def _plan(precision: str, tier: str, **more: object) -> Plan:
    return Plan(
        dp=2, zero=3, precision=precision, microbatches=2, offload_params=tier, offload_optimizer=tier,
        offload_gradients=tier, offload_dir="/x" if tier == "disk" else "", **more,
    )  # fmt: skip


def test_small_model_shard_is_what_the_units_say() -> None:
    assert SMALL.num_parameters() == 2 * S == 136960


def test_bytes_per_tier_fp32_everything_on_disk() -> None:
    off = offload_bytes(_plan("fp32", "disk"), _units(_plan("fp32", "disk")))
    # fp32 parameters share the master's file: master + moments 12S, gradient shard 4S
    assert off.disk == 16 * S == 1_095_680
    # staging in host memory: two units each of parameters (4), master + moments (12), gradients (4)
    assert off.host == 2 * (4 + 12 + 4) * BIGGEST == 999_680
    assert off.off_device == {"params": 4 * S, "master": 0.0, "grads": 4 * S, "optimizer": 8 * S}
    # device: two staged parameter shards and gradient shards, plus one more gathered layer (49984 x 4)
    assert off.device_working == 2 * 4 * BIGGEST + 4 * 49984 + 2 * 4 * BIGGEST


def test_bytes_per_tier_bf16_everything_on_host() -> None:
    plan = _plan("bf16", "cpu")
    off = offload_bytes(plan, _units(plan))
    assert off.host == (2 + 12 + 4) * S == 1_232_640  # params 2S, master 4S + moments 8S, gradients 4S
    assert off.disk == 0
    assert off.off_device == {"params": 2 * S, "master": 4 * S, "grads": 4 * S, "optimizer": 8 * S}


def test_io_per_step_fp32_zero3_everything_on_disk() -> None:
    plan = _plan("fp32", "disk")
    off = offload_bytes(plan, _units(plan))  # clipping: the gradient norm is taken in backward
    m = 2
    assert off.update == "norm-in-backward"
    # forward + backward: each param shard read before 2 gathers per micro-batch; the gradient shard written
    # after each reduction and read back before the second micro-batch adds to it
    assert off.during.h2d == 2 * m * 4 * S
    assert off.during.disk_read == 2 * m * 4 * S + (m - 1) * 4 * S
    assert (off.during.d2h, off.during.disk_write) == (m * 4 * S, m * 4 * S)
    # optimizer: master + moments read and written once, gradients read once; no separate param write
    assert off.after.disk_read == 12 * S + 4 * S
    assert off.after.disk_write == 12 * S
    assert off.after.h2d == 0 and off.host_optimizer_params == S


def test_io_per_step_with_the_update_in_backward_and_after_it() -> None:
    plan = _plan("fp32", "disk")
    m = 2
    inside = offload_bytes(plan, _units(plan), clips=False)
    assert inside.update == "in-backward"
    # the last reduction's gradients are stepped in memory, never written or read; the optimizer state
    # moves while backward runs
    assert inside.during.disk_read == 2 * m * 4 * S + (m - 1) * 4 * S + 12 * S
    assert inside.during.disk_write == (m - 1) * 4 * S + 12 * S
    assert inside.after.total == 0
    fp16 = _plan("fp16", "disk")  # the loss scaler needs every gradient before any update
    after = offload_bytes(fp16, _units(fp16), clips=False)
    assert after.update == "after"
    assert after.after.disk_read == 12 * S + 2 * 4 * S  # gradients read twice: norm and overflow, then update
    assert after.after.disk_write == 12 * S + 2 * S  # fp16 parameters have their own file
    pipeline = Plan(dp=1, pp=2, zero=1, microbatches=2, offload_optimizer="disk", offload_dir="/x")
    assert offload_bytes(pipeline, _units(pipeline), clips=False).update == "after"
    host_only = _plan("fp32", "cpu")
    assert offload_bytes(host_only, _units(host_only), clips=False).update == "after"


def test_io_per_step_bf16_params_write_and_zero1_optimizer_on_host() -> None:
    plan = _plan("bf16", "disk")
    off = offload_bytes(plan, _units(plan))
    assert off.after.disk_write == 12 * S + 2 * S  # bf16 parameters have their own file
    assert off.during.disk_read == 2 * 2 * 2 * S + 4 * S
    zero1 = Plan(dp=2, zero=1, precision="bf16", microbatches=2, offload_optimizer="cpu")
    off1 = offload_bytes(zero1, _units(zero1))
    # gradients follow the optimizer to the host once per step; new bf16 values back to the device shard
    assert off1.during.total == 0
    assert (off1.after.d2h, off1.after.h2d, off1.after.disk_read) == (4 * S, 2 * S, 0)
    assert off1.host == 16 * S  # master + moments 12S, gradient shard 4S; parameters stay on the device


def test_step_time_hides_io_behind_compute_and_the_host_step() -> None:
    cluster = Cluster.preset("h100", devices_per_node=1).replace(
        host_link=1e9,
        host_adam_rate=1e6,
        op_overhead=1e-5,
        disk=Disk(capacity=10**12, read_bandwidth=1e9, write_bandwidth=1e9),
    )
    plan = _plan("fp32", "disk")
    base = TimeBreakdown(compute=1e-3, tp_comm=0, bubble=0, pp_comm=0, dp_comm_exposed=0, optimizer=0.5)
    t = offload_time(base, offload_bytes(plan, _units(plan)), cluster=cluster)
    during = 28 * S / 1e9  # disk: 20S read + 8S write, slower than PCIe's 16S
    first = 4 * BIGGEST / 1e9  # the first layer's parameter shard, from disk then over PCIe
    first_step = 16 * BIGGEST / 1e9  # its master, moments and gradients, before the first update
    assert t.offload_io == pytest.approx(during - 1e-3 + first + first_step)  # the step's 32S I/O hides
    # all on the host, none left on the device: S params at 1e6/s, 12 ops on each of 36 tensors (embeddings,
    # final norm's 2, 16 per layer: 6 linears' weights and biases, 2 LayerNorms' weights and biases)
    host_step = S / 1e6 + 36 * 12 * 1e-5
    assert t.optimizer == pytest.approx(host_step)
    assert t.total == pytest.approx(1e-3 + host_step + during - 1e-3 + first + first_step)


def test_an_update_in_backward_hides_its_io_behind_the_host_step_too() -> None:
    cluster = Cluster.preset("h100", devices_per_node=1).replace(
        host_link=1e12,
        host_adam_rate=1e6,
        op_overhead=0.0,
        disk=Disk(capacity=10**12, read_bandwidth=1e9, write_bandwidth=1e9),
    )
    plan = _plan("fp32", "disk")
    base = TimeBreakdown(compute=1e-3, tp_comm=0, bubble=0, pp_comm=0, dp_comm_exposed=0, optimizer=0.5)
    offload = offload_bytes(plan, _units(plan), clips=False)
    t = offload_time(base, offload, cluster=cluster)
    host_step = S / 1e6
    io = (2 * 2 * 4 * S + 4 * S + 12 * S + 4 * S + 12 * S) / 1e9  # params, gradients, optimizer state
    assert io < host_step  # so all of it hides, but for the first unit's reads
    first = 4 * BIGGEST / 1e9 + 12 * BIGGEST / 1e9
    assert t.offload_io == pytest.approx(first)
    assert t.total == pytest.approx(1e-3 + host_step + first)


def _llama_24gib() -> tuple[ModelShape, Workload, Cluster, SearchSpace]:
    cluster = Cluster.preset("h100", devices_per_node=1).replace(device_memory=24 * GIB)
    space = SearchSpace(offload=("cpu", "disk"), offload_dir="/tmp")
    return ModelShape(get_preset("llama-7b")), Workload(8, 2048), cluster, space


def test_llama_7b_on_one_24gib_gpu_offloads_and_its_tiers_add_up() -> None:
    shape, workload, cluster, space = _llama_24gib()
    result = search(shape, workload, cluster=cluster, space=space)
    best = result.best
    assert best is not None and best.plan.offloads and best.offload is not None
    assert best.memory.total <= 24 * GIB
    assert best.memory.host > 80e9  # at least the optimizer: 12 bytes x 6.74B parameters
    on_device = Estimator(shape, workload, cluster=cluster).estimate(
        Plan(**{k: getattr(best.plan, k) for k in ("dp", "zero", "precision", "microbatches", "recompute")})
    )
    assert not on_device.fits
    # nothing is on disk: what left the device is what the host holds, plus, once ZeRO-3's fp32 master is
    # off the device, a bf16 parameter shard (2S, on either: each gather fetches half the bytes), which
    # ZeRO-3 on the device does without (it casts the master as it gathers)
    assert best.memory.disk == 0 and best.plan.precision == "bf16"
    extra = 2 * shape.num_parameters() / best.plan.dp if best.plan.zero == 3 else 0.0
    assert best.memory.model_states + best.memory.host == pytest.approx(on_device.memory.model_states + extra)
    assert all(e.plan.zero == 3 for e in result.estimates if e.plan.offload_params != "none")


def test_offload_is_not_proposed_where_a_plan_fits_on_the_device() -> None:
    result = search(
        ModelShape(get_preset("gpt2-124m")), Workload(64, 1024), cluster=Cluster.preset("h100"),
        space=SearchSpace(offload=("cpu", "disk"), offload_dir="/tmp"),
    )  # fmt: skip
    assert result.best is not None and not result.best.plan.offloads
    assert not any(e.plan.offloads for e in result.estimates)


def test_host_memory_limit_sends_state_to_disk_or_nowhere() -> None:
    shape, workload, cluster, space = _llama_24gib()
    small_host = cluster.replace(host_memory=64 * GIB)
    best = search(shape, workload, cluster=small_host, space=space).best
    assert best is not None and best.memory.disk > 0 and best.memory.host <= 64 * GIB
    no_disk = search(shape, workload, cluster=small_host.replace(disk=None), space=space.relax(offload=("cpu",)))
    assert no_disk.best is None


def test_plan_command_proposes_offload_for_llama_7b_on_24gib(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--model", "llama-7b", "--nodes", "1", "--gpus-per-node", "1", "--gpu-mem", "24GiB"]
    assert main([*argv, "--global-batch", "8", "--seq", "2048", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "host GiB" in out and "disk GiB" in out
    best = next(line for line in out.splitlines() if line.startswith("best: "))
    assert " off " in best and "o:cpu" in best and "GB over PCIe" in best


def test_evaluate_one_offload_plan(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    fields = f"zero=3,precision=fp32,offload_optimizer=disk,offload_gradients=disk,offload_params=disk,offload_dir={tmp_path}"
    code = main(["plan", "--model", "tiny", "--gpus-per-node", "2", "--global-batch", "4", "--seq", "64",
                 "--disk", "100GB,2GB/s,1GB/s", "--evaluate", fields])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "plan: dp2 tp1 pp1 z3 fp32 m1 off p:disk o:disk g:disk (fits)" in out
    assert "states: params disk, optimizer disk, grads disk" in out and "disk read" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--disk", "2TB,fast"], "e.g. --disk 2TB,6GB/s,4GB/s"),
        (["--disk", "lots"], "SIZE[,READ_BW[,WRITE_BW]]"),
        (["--host-mem", "big"], "e.g. --host-mem 512GiB"),
        (["--evaluate", "zero=three"], "--evaluate zero=three: expected a number"),
        (["--evaluate", "zeroo=3"], "write plan fields as key=value"),
        (["--evaluate", "zero=1,offload_params=cpu"], "needs plan.zero=3"),
    ],
)
def test_bad_options_get_one_line_with_an_example(argv: list[str], message: str, capsys) -> None:
    assert main(["plan", "--model", "tiny", "--gpus-per-node", "2", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_disk_and_host_parsing() -> None:
    assert parse_disk("2TB,6GB/s,4GB/s") == Disk(capacity=2 * 10**12, read_bandwidth=6e9, write_bandwidth=4e9)
    default = Disk(capacity=1, read_bandwidth=3e9, write_bandwidth=2e9)
    assert parse_disk("500GiB", default=default) == Disk(capacity=500 * GIB, read_bandwidth=3e9, write_bandwidth=2e9)
    assert parse_host_memory("512GiB") == 512 * GIB
    with pytest.raises(ValueError, match="--host-mem '0'"):
        parse_host_memory("0")
    assert parse_plan_fields("zero=3, sequence_parallel=true,offload_dir=/x") == {
        "zero": 3, "sequence_parallel": True, "offload_dir": "/x",
    }  # fmt: skip
