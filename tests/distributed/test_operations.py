"""Operations: a dead rank, a hang, SIGINT, an elastic restart and non-finite steps, each explained in one
line (multi-process tier: real `plait train` launches of configs/gpt-tiny.toml through torchrun)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import plait
from plait.config import load_config
from plait.losses import causal_lm
from plait.models import build
from plait.train.loop import run_training
from plait.update import NonFiniteError
from tests.distributed.harness import run_ranks

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "gpt-tiny.toml"
STEPS = 20


@pytest.fixture(scope="module")
def data_sets(small_corpus: list[str], tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """--set overrides every launch shares: a small corpus and tokenizer, cached once for the module."""
    cache = tmp_path_factory.mktemp("cache")
    corpus = "[" + ",".join(f'"{path}"' for path in small_corpus) + "]"
    sets = {"data.corpus": corpus, "data.vocab_size": "512", "data.val_fraction": "0.1", "data.cache_dir": f'"{cache}"'}
    sets |= {"train.steps": str(STEPS), "train.eval_every": "1000", "train.log_every": "1000"}
    return [item for key, value in sets.items() for item in ("--set", f"{key}={value}")]


def train_command(out_dir: Path, data_sets: list[str], *extra: str, nproc: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "plait.cli",
        "train",
        str(CONFIG),
        "--nproc",
        str(nproc),
        *data_sets,
        "--set",
        f'train.out_dir="{out_dir}"',
        *extra,
    ]


def start(command: list[str], log: Path) -> subprocess.Popen:
    """The launcher in its own session (so a failed test can end the whole job), output in `log`."""
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)


@pytest.fixture
def jobs() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for job in started:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


def losses(out_dir: Path) -> dict[int, str]:
    """Step -> loss as metrics.csv wrote it (the text: equal text is equal bits of the printed repr)."""
    path = out_dir / "metrics.csv"
    if not path.is_file():
        return {}
    with path.open() as file:
        return {int(row["step"]): row["loss"] for row in csv.DictReader(file) if row.get("loss")}


def wait_for_step(out_dir: Path, step: int, job: subprocess.Popen, *, timeout_s: float = 120) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = max(losses(out_dir), default=0)
        if done >= step:
            return done
        assert job.poll() is None, f"the job ended (exit {job.returncode}) before step {step}"
        time.sleep(0.01)
    raise TimeoutError(f"no step {step} in {out_dir / 'metrics.csv'} after {timeout_s} s")


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the launcher's children (torchrun's agent runs in the launcher)."""
    found = {}
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    for pid in map(int, children):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = [item for item in environ if item.startswith(b"RANK=")]
        if rank:
            found[int(rank[0][5:])] = pid
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_exit(job: subprocess.Popen, pids: list[int], *, timeout_s: float) -> float:
    """Seconds until every pid in `pids` is gone and the launcher has exited."""
    start_time = time.monotonic()
    while any(alive(pid) for pid in pids) or job.poll() is None:
        assert time.monotonic() - start_time < timeout_s, f"still running {timeout_s} s later"
        time.sleep(0.05)
    return time.monotonic() - start_time


def train_forked(rank: int, world_size: int, overrides: list[str]) -> None:
    run_training(load_config(str(CONFIG), overrides))


def run_in_forks(out_dir: Path, data_sets: list[str], *sets: str) -> dict[int, str]:
    """The losses of configs/gpt-tiny.toml with these --set pairs on 2 ranks forked from this process: the
    launched runs' loop on the same config (equal bits), without a launcher and three imports of torch."""
    overrides = [*data_sets[1::2], *sets[1::2], f'train.out_dir="{out_dir}"']
    run_ranks(train_forked, 2, overrides, timeout_s=180)
    return losses(out_dir)


@pytest.fixture(scope="module")
def reference(data_sets: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[int, str]:
    """The uninterrupted run's losses, steps 1-20."""
    found = run_in_forks(tmp_path_factory.mktemp("reference") / "run", data_sets)
    assert sorted(found) == list(range(1, STEPS + 1))
    return found


@pytest.mark.timeout(150)
def test_a_killed_rank_stops_the_others_with_one_line_naming_it(
    tmp_path: Path, data_sets: list[str], jobs: list, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "run"
    job = start(train_command(out_dir, data_sets, "--set", "train.steps=100000"), tmp_path / "out.txt")
    jobs.append(job)
    wait_for_step(out_dir, 3, job)
    from plait.cli import main

    assert main(["debug", "stacks", str(out_dir)]) == 0  # the command's own entry, in this process
    asked = capsys.readouterr()
    assert "rank 1: step" in asked.out, asked.out + asked.err
    assert len(list(out_dir.glob("stacks-*/rank-*.txt"))) == 2  # the running job answered and trains on
    pids = rank_pids(job.pid)
    os.kill(pids[1], signal.SIGKILL)
    seconds = wait_exit(job, list(pids.values()), timeout_s=90)
    output = (tmp_path / "out.txt").read_text()
    print(f"others exited {seconds:.1f} s after the kill -9 of rank 1")
    assert seconds < 60
    assert job.returncode == 3
    lines = [line for line in output.splitlines() if "rank 1" in line and "died" in line]
    assert len(lines) == 1, output[-3000:]
    assert "its last completed step: " in lines[0]
    assert "ChildFailedError" not in output and "Traceback" not in output, output[-3000:]


HANG_SCRIPT = """
import sys, time
import torch.distributed as dist
from plait.config import load_config
from plait.engine import Engine
from plait.train.loop import run_training

original = Engine.forward_backward

def forward_backward(self, micro_batch, *, sync=True):
    if dist.get_rank() == 1 and self.steps_done == 2:  # step 3: rank 1 stops before its gradient all-reduce
        time.sleep(600)
    return original(self, micro_batch, sync=sync)

Engine.forward_backward = forward_backward  # fault injection in this test script only
run_training(load_config(sys.argv[1], sys.argv[3::2]))  # argv: CONFIG --set A --set B ...
"""


@pytest.mark.timeout(150)
def test_a_hang_writes_every_ranks_stack_naming_the_collective(
    tmp_path: Path, data_sets: list[str], jobs: list
) -> None:
    out_dir = tmp_path / "run"
    script = tmp_path / "hang.py"
    script.write_text(HANG_SCRIPT)
    hang_timeout_s = 4  # far above a step (~0.05 s here, at load 27 too): no false alarm before the hang
    sets = [*data_sets, "--set", f'train.out_dir="{out_dir}"', "--set", f"train.hang_timeout_s={hang_timeout_s}"]
    command = [sys.executable, "-m", "plait.cli", "run", "--nproc-per-node=2", str(script), str(CONFIG), *sets]
    job = start(command, tmp_path / "out.txt")
    jobs.append(job)
    wait_for_step(out_dir, 2, job)
    started = time.monotonic()
    deadline = started + hang_timeout_s + 30
    while time.monotonic() < deadline and len(list(out_dir.glob("hang-*/rank-*.txt"))) < 2:
        time.sleep(0.1)
    files = sorted(out_dir.glob("hang-*/rank-*.txt"))
    print(f"stack files {time.monotonic() - started:.1f} s after step 2 (hang_timeout_s={hang_timeout_s})")
    assert [f.name for f in files] == ["rank-0.txt", "rank-1.txt"], (tmp_path / "out.txt").read_text()[-3000:]
    for file in files:
        header = file.read_text().split("\n\n", 1)[0]
        assert "all_reduce over dp" in header, header
    assert "sleep" in files[1].read_text() and "finish" in files[0].read_text()  # where each one's stack is
    seconds = wait_exit(job, [], timeout_s=max(1.0, deadline - time.monotonic()))
    print(f"job exited {time.monotonic() - started:.1f} s after step 2")
    assert job.returncode != 0
    summary = next(out_dir.glob("hang-*/summary.txt")).read_text()
    assert "rank(s) 0 wait in collective" in summary and "rank(s) 1 have not arrived" in summary, summary
    output = (tmp_path / "out.txt").read_text()
    assert "hang: no step progress" in output and seconds >= 0


@pytest.mark.timeout(200)
def test_sigint_saves_the_last_step_which_resumes_bit_identically(
    tmp_path: Path, data_sets: list[str], reference: dict[int, str], jobs: list
) -> None:
    out_dir = tmp_path / "run"
    command = train_command(out_dir, data_sets, "--set", "train.checkpoint_every=1000")
    job = start(command, tmp_path / "out.txt")
    jobs.append(job)
    wait_for_step(out_dir, 5, job)
    pids = rank_pids(job.pid)
    job.send_signal(signal.SIGINT)
    seconds = wait_exit(job, list(pids.values()), timeout_s=60)
    print(f"every rank exited {seconds:.1f} s after SIGINT")
    output = (tmp_path / "out.txt").read_text()
    assert job.returncode == 128 + signal.SIGINT, output[-3000:]
    last = max(losses(out_dir))
    checkpoints = sorted(p.name for p in (out_dir / "checkpoints").iterdir())
    assert checkpoints == [f"step-{last:06d}"], (checkpoints, last)
    assert last < STEPS and f"stopped by SIGINT after step {last}" in output
    resume = train_command(out_dir, data_sets, "--resume", str(out_dir / "checkpoints" / checkpoints[0]))
    done = subprocess.run(resume, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(out_dir) == reference


@pytest.mark.timeout(200)
def test_an_elastic_restart_after_a_kill_continues_bit_identically(
    tmp_path: Path, data_sets: list[str], reference: dict[int, str], jobs: list
) -> None:
    out_dir = tmp_path / "run"
    command = train_command(out_dir, data_sets, "--set", "train.checkpoint_every=5", "--max-restarts", "2")
    job = start(command, tmp_path / "out.txt")
    jobs.append(job)
    wait_for_step(out_dir, 7, job)
    pids = rank_pids(job.pid)
    os.kill(pids[1], signal.SIGKILL)
    killed_after = max(losses(out_dir))
    started = time.monotonic()
    assert job.wait(timeout=150) == 0, (tmp_path / "out.txt").read_text()[-3000:]
    print(
        f"rank 1 killed after step {killed_after}; the restarted run finished {time.monotonic() - started:.1f} s later"
    )
    found = losses(out_dir)
    assert sorted(found) == list(range(1, STEPS + 1))
    assert {s: found[s] for s in range(6, STEPS + 1)} == {s: reference[s] for s in range(6, STEPS + 1)}
    log = (out_dir / "train.log").read_text()
    assert "--resume auto" in log or "resum" in log


ELASTIC_SETS = (
    "--set",
    "train.global_batch=128",
    "--set",
    "data.val_fraction=0",
    "--set",
    "train.checkpoint_every=5",
)  # steps long enough to kill in


# torchrun's defaults wait 15 s for the lost node's keep-alive to expire, then 30 s for late joiners; the
# last call still leaves the second launcher 5 s to join the first round (the test checks it did: dp=2).
RDZV_CONF = "last_call_timeout=5,keep_alive_interval=1,keep_alive_max_attempt=3"


def elastic_node(out_dir: Path, data_sets: list[str], *, node_rank: int, endpoint: str, log: Path) -> subprocess.Popen:
    """One node of a 1:2 elastic job: a launcher with one rank, dp following the world."""
    flags = ["--nnodes", "1:2", "--node-rank", str(node_rank), "--rdzv-endpoint", endpoint, "--max-restarts", "2"]
    flags += ["--rdzv-conf", RDZV_CONF]
    command = train_command(out_dir, data_sets, *ELASTIC_SETS, "--set", "plan.dp=-1", *flags, nproc=1)
    return start(command, log)


@pytest.mark.timeout(300)
def test_an_elastic_job_that_loses_a_node_continues_on_the_rest_resharded(
    tmp_path: Path, data_sets: list[str], jobs: list
) -> None:
    """Two one-rank nodes (--nnodes 1:2) train dp=2; node 1 is lost after step 7 (its launcher and rank
    SIGKILLed); node 0 restarts alone from the step-5 checkpoint, resharded to dp=1, and finishes."""
    from tests.distributed.test_readme_example import free_port

    out_dir, endpoint = tmp_path / "run", f"127.0.0.1:{free_port()}"
    first = elastic_node(out_dir, data_sets, node_rank=0, endpoint=endpoint, log=tmp_path / "node0.txt")
    jobs.append(first)
    second = elastic_node(out_dir, data_sets, node_rank=1, endpoint=endpoint, log=tmp_path / "node1.txt")
    jobs.append(second)
    wait_for_step(out_dir, 7, first, timeout_s=180)
    for pid in [*rank_pids(second.pid).values(), second.pid]:  # the whole node: its rank, then its agent
        os.kill(pid, signal.SIGKILL)
    lost_after, started = max(losses(out_dir)), time.monotonic()
    assert lost_after < STEPS, "the run ended before node 1 was lost"
    reference = run_in_forks(tmp_path / "whole", data_sets, *ELASTIC_SETS)  # while node 0 waits to restart
    assert first.wait(timeout=240) == 0, (tmp_path / "node0.txt").read_text()[-3000:]
    print(f"node 1 lost after step {lost_after}; node 0 finished alone {time.monotonic() - started:.1f} s later")
    found = losses(out_dir)
    assert sorted(found) == list(range(1, STEPS + 1))
    assert {s: found[s] for s in range(1, 6)} == {s: reference[s] for s in range(1, 6)}  # two nodes: dp=2, as one
    for step in range(6, STEPS + 1):  # one node, dp=1: the same global batch, summed in another order
        assert float(found[step]) == pytest.approx(float(reference[step]), rel=1e-5, abs=0), step
    assert "dp 2->1" in (out_dir / "train.log").read_text()


@pytest.mark.timeout(120)
def test_a_nonfinite_step_stops_the_run_with_exit_3_and_one_line(tmp_path: Path, data_sets: list[str]) -> None:
    out_dir = tmp_path / "run"
    command = train_command(out_dir, data_sets, "--set", "train.lr=1e30", "--set", "train.warmup=0")
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=100)
    print(f"exit {done.returncode} after {time.monotonic() - started:.1f} s")
    assert done.returncode == 3, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if "non-finite" in line]
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("plait train: step ") and "first parameter affected:" in lines[0]
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr


# Non-finite steps in one process: stop names the step, micro-batch and parameter; skip leaves the weights.

SEQ = 16


def poisoned_loss(bad_step: int, counter: list[int]):
    """causal_lm, but every micro-batch's loss on step `bad_step` is nan (counted by forward calls)."""

    def loss_fn(outputs, batch):
        counter[0] += 1
        loss_sum, count = causal_lm(outputs, batch)
        return (loss_sum * float("nan"), count) if (counter[0] + 1) // 2 == bad_step else (loss_sum, count)

    return loss_fn


def tiny_engine(on_nonfinite: str, loss_fn, **plan: object) -> plait.Engine:
    torch.manual_seed(0)
    model = build("tiny", max_seq_len=SEQ)
    return plait.boost(
        model,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        loss_fn=loss_fn,
        plan=plait.Plan(dp=1, microbatches=2, **plan),  # type: ignore[arg-type]
        max_grad_norm=None,
        on_nonfinite=on_nonfinite,
    )


def batch(seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 256, (4, SEQ), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.timeout(60)
def test_on_nonfinite_stop_names_step_micro_batch_and_parameter() -> None:
    engine = tiny_engine("stop", poisoned_loss(2, [0]))
    engine.train_step(batch(0))
    with pytest.raises(NonFiniteError) as raised:
        engine.train_step(batch(1))
    text = str(raised.value)
    assert text.startswith("step 2: non-finite loss (nan)") and "micro-batch 0 on rank 0" in text
    assert "first parameter affected: " in text and "none" not in text.split("affected: ")[1]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("offload", [False, True], ids=["memory", "disk-offload"])
def test_on_nonfinite_skip_leaves_the_weights_and_trains_on(offload: bool, tmp_path: Path) -> None:
    plan = {"zero": 1, "offload_optimizer": "disk", "offload_dir": str(tmp_path)} if offload else {}
    engine = tiny_engine("skip", poisoned_loss(2, [0]), **plan)
    if offload:  # without skipping, this plan updates each unit inside backward
        assert engine.update.offload is not None and engine.update.offload.pages_optimizer
    engine.train_step(batch(0))
    before = {name: value.clone() for name, value in engine.model_state_dict().items()}
    result = engine.train_step(batch(1))
    assert result.skipped
    after = engine.model_state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert engine.update._in_backward is None  # nothing updates inside backward when a step may be skipped
    result = engine.train_step(batch(2))
    assert not result.skipped and torch.isfinite(result.loss)


def test_debug_stacks_without_a_running_job_says_so(tmp_path: Path) -> None:
    from plait.cli import main

    assert main(["debug", "stacks", str(tmp_path)]) == 2  # "plait debug: error: no running job in ..."


def test_checkpoint_every_s_asks_for_a_save_once_the_time_has_passed(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from plait.config import Config, TrainConfig
    from plait.train.operations import Operations

    train = TrainConfig(out_dir=str(tmp_path), checkpoint_every_s=0.2, hang_timeout_s=0)
    operations = Operations(Config(train=train), comm=SimpleNamespace(entered=None), device=torch.device("cpu"))
    assert not operations.after_step(1, saved=False).save
    time.sleep(0.25)
    assert operations.after_step(2, saved=False).save
    operations.saved()
    assert not operations.after_step(3, saved=False).save
