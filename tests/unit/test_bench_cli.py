"""`plait bench`: bad input says what is wrong in one line before anything runs; the report writes its files."""

from __future__ import annotations

import json
import os

import pytest
import torch

from plait.bench.read import read_gpu, read_moe, read_zero
from plait.bench.report import write_outputs
from plait.bench.runner import case_command, case_environment
from plait.bench.suites import SUITES, all_cases
from plait.cli import main

pytestmark = pytest.mark.timeout(60)


def _error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_unknown_suite_lists_the_valid_ones(capsys, tmp_path):
    err = _error_line(capsys, ["bench", "--suite", "nope", "--out", str(tmp_path / "out")])
    assert "unknown suite 'nope'" in err
    assert all(name in err for name in SUITES)
    assert not (tmp_path / "out").exists()


def test_unknown_case_lists_the_valid_ones(capsys, tmp_path):
    err = _error_line(capsys, ["bench", "--cases", "dp2-zero0-ddp", "bogus", "--out", str(tmp_path / "out")])
    assert "unknown case 'bogus'" in err
    assert all(name in err for name in all_cases())
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu(capsys, tmp_path):
    err = _error_line(capsys, ["bench", "--device", "cuda", "--out", str(tmp_path / "out")])
    assert "no CUDA GPU on this machine" in err


def test_unwritable_out(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = _error_line(capsys, ["bench", "--out", str(blocker / "sub")])
    assert "is not writable" in err and str(blocker / "sub") in err


def test_bad_repeats(capsys, tmp_path):
    err = _error_line(capsys, ["bench", "--repeats", "0", "--out", str(tmp_path / "out")])
    assert "--repeats must be at least 1" in err


def test_repeats_become_the_scripts_pairs(tmp_path):
    case = all_cases()["dp2-zero0-ddp"]
    command = case_command(case, benchmarks_dir=tmp_path, raw_json=tmp_path / "x.json", repeats=7)
    assert command[1] == str(tmp_path / "dp.py")
    assert command[-2:] == ["--pairs", "7"]
    assert "--out" in command


def _zero_payload() -> dict:
    rate = {"median": 100.0, "min": 90.0, "max": 110.0}
    states = {"total": 1000}
    return {
        "deepspeed": "not run: deepspeed is not installed",
        "speed": {
            "skipped": [],
            "stages": {
                "3": {
                    "peer": "fsdp2-reshard",
                    "tokens_per_s": {"plait": rate, "fsdp2-reshard": {"median": 80.0, "min": 70.0, "max": 85.0}},
                    "ratio_plait_over_peer": {"per_pair": [1.2, 1.3], "median": 1.25, "min": 1.2, "max": 1.3},
                    "step_s_median": {"plait": 0.1, "fsdp2-reshard": 0.12},
                    "model_state_bytes_rank0": {"plait": states, "fsdp2-reshard": states},
                    "plait_comm_bytes_per_step": 3000.0,
                }
            },
        },
    }


def test_report_writes_json_markdown_and_png(tmp_path):
    rows = read_zero(_zero_payload())
    assert [row["system"] for row in rows] == ["plait", "fsdp2-reshard", "deepspeed"]
    env = {
        "plait": "0",
        "torch": "t",
        "backend": "gloo",
        "cpu_model": "cpu",
        "cpu_count": 2,
        "gpu_model": None,
        "date": "d",
    }
    case = {"name": "dp2-zero3-fsdp2", "plan": "dp=2 zero=3"}
    record = {
        "suite": "quick",
        "device": "cpu",
        "environment": env,
        "peaks": {},
        "load_average_start": 1.0,
        "load_average_end": 2.0,
        "wall_s": 3.0,
        "cases": [{"case": case, "rows": rows}],
    }
    paths = write_outputs(record, tmp_path)
    table = paths["markdown"].read_text()
    assert "| dp2-zero3-fsdp2 | dp=2 zero=3 | fsdp2-reshard | 80 | 70-85 | 1.250 (1.200-1.300, 2 pairs) |" in table
    assert "deepspeed" in table
    assert json.loads(paths["json"].read_text())["cases"][0]["rows"][0]["comm_bytes_per_step_per_rank"] == 3000.0
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_gpu_case_reads_the_scripts_mfu():
    record = {"tokens_per_s": 50.0, "median_step_s": 0.5, "memory_bytes": {"cuda_max_allocated": 7}, "mfu": 0.4}
    (row,) = read_gpu({"llama-1b": record})
    assert row["mfu"] == 0.4 and row["tokens_per_s"]["median"] == 50.0 and row["peak_rss_bytes_per_rank"] == [7]


def test_moe_rows_carry_the_all_to_all_share_and_deepspeed_refusals():
    plait_row = {
        "system": "plait",
        "ep": 2,
        "tokens_per_s": 5.0,
        "tokens_per_s_runs": [4.0, 5.0, 6.0],
        "all_to_all_share": 0.1,
        "model_states_per_rank": 3,
        "peak_rss_per_rank": 9,
    }
    refused = {"system": "deepspeed", "ep": 2, "refused": "ImportError: No module named 'deepspeed'"}
    rows = read_moe({"rows": [plait_row, refused]})
    assert rows[0]["comm_share"] == 0.1 and rows[0]["tokens_per_s"] == {"median": 5.0, "min": 4.0, "max": 6.0}
    assert rows[1]["system"] == "deepspeed ep2" and rows[1]["tokens_per_s"] is None


def test_deepspeed_row_reads_what_the_zero_script_ran():
    payload = _zero_payload()
    payload["deepspeed"] = "ran in the speed phase (speed.stages.N.deepspeed)"
    ratio = {"per_pair": [4.0, 5.0], "median": 4.5, "min": 4.0, "max": 5.0}
    payload["speed"]["stages"]["3"]["deepspeed"] = {
        "tokens_per_s": {"plait": {"median": 90.0}, "deepspeed": {"median": 20.0, "min": 18.0, "max": 22.0}},
        "ratio_plait_over_deepspeed": ratio,
        "step_s_median": {"plait": 0.1, "deepspeed": 0.5},
    }
    ds = read_zero(payload)[2]
    assert ds["system"] == "deepspeed" and ds["status"] == "ran"
    assert ds["tokens_per_s"]["median"] == 20.0 and ds["ratio_plait_over_peer"] == ratio and ds["step_s"] == 0.5


def test_deepspeed_row_says_why_not_from_the_script_not_this_process():
    (ds,) = [row for row in read_zero(_zero_payload()) if row["system"] == "deepspeed"]
    assert ds["status"] == "not run: deepspeed is not installed"  # the script's words, whatever is importable here


def test_peer_path_goes_first_on_the_cases_pythonpath(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = case_environment([tmp_path])
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path.resolve()), "/elsewhere"]


def test_peer_path_that_is_not_a_directory(capsys, tmp_path):
    err = _error_line(capsys, ["bench", "--peer-path", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    assert "--peer-path" in err and "is not a directory" in err
    assert not (tmp_path / "out").exists()
