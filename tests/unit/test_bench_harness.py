"""write_results: the common keys of a benchmark's result file, its tagged name, the script's own keys kept."""

from __future__ import annotations

import json
import time
from pathlib import Path

from plait.bench.harness import write_results

COMMON = {"environment", "load_average_before", "load_average_after"}


def _write(tmp_path: Path, tag: str | None) -> Path:
    payload = {"args": {"steps": 3}, "rows": [{"loss": 1.5}], "note": "kept"}
    return write_results(
        tmp_path / "generate_kv.json",
        payload,
        tag=tag,
        load_before=0.25,
        started=time.perf_counter(),
        phases={"a": 1.0},
    )


def test_untagged_path_and_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, None)
    assert path == tmp_path / "generate_kv.json"
    written = json.loads(path.read_text())
    assert set(written) == COMMON | {"args", "rows", "note"}
    assert written["load_average_before"] == 0.25
    assert written["args"] == {"steps": 3} and written["rows"] == [{"loss": 1.5}] and written["note"] == "kept"
    assert {"plait", "torch", "date", "argv"} <= set(written["environment"])


def test_tag_goes_before_the_suffix(tmp_path: Path) -> None:
    path = _write(tmp_path, "smoke")
    assert path == tmp_path / "generate_kv-smoke.json"
    assert path.exists() and not (tmp_path / "generate_kv.json").exists()
    assert _write(tmp_path, "").name == "generate_kv.json"


def test_prints_wall_time_by_phase(tmp_path: Path, capsys) -> None:
    path = _write(tmp_path, None)
    out = capsys.readouterr().out
    assert "(phases: a 1 s)" in out and f"wrote {path}" in out
