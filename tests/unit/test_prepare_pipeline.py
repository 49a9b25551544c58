"""plait data prepare end to end on a small dirty corpus: counts, dedup, scrubbing, resume, bad input, training."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from plait.cli import main
from plait.data.corpus import stdlib_files
from plait.data.prepare import PrepareConfig, prepare_corpus
from plait.data.prepare.dirty import SECRET_EMAIL, SECRET_KEY, DirtyPlan, write_dirty_corpus
from plait.data.prepare.ledger import WORK_DIR
from plait.data.prepare.rules import TokenizerRules
from plait.data.shards import prepare_dataset

pytestmark = pytest.mark.timeout(120)
OUTPUTS = (
    "tokenizer.json",
    "train.bin",
    "val.bin",
    "meta.json",
    "duplicates.tsv",
    "report.json",
    "report.md",
    "lengths.png",
)
CONFIG = PrepareConfig(
    workers=2, max_file_bytes=1 << 20, tokenizer=TokenizerRules(vocab_size=320, sample_bytes=200_000, val_fraction=0.05)
)


@pytest.fixture(scope="module")
def dirty(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("dirty")
    files = stdlib_files()[::40][:45]
    documents = [(f"{i:03d}_{p.name}", p.read_bytes().decode("utf-8", errors="replace")) for i, p in enumerate(files)]
    truth = write_dirty_corpus(documents, root, DirtyPlan(num_exact=4, num_near=8, huge_bytes=2 << 20, seed=1))
    return root / "corpus", truth


@pytest.fixture(scope="module")
def prepared(dirty, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prepared") / "out"
    return out, prepare_corpus([str(dirty[0])], out, config=CONFIG)


def _pairs(out: Path, kind: str) -> set[frozenset[str]]:
    rows = [line.split("\t") for line in (out / "duplicates.tsv").read_text().splitlines()[1:]]
    return {frozenset((row[1], row[2])) for row in rows if row[0] == kind}


def _error_line(stderr: str) -> str:
    """The one error line (progress lines come before it)."""
    errors = [line for line in stderr.splitlines() if line.startswith("plait data: error:")]
    assert len(errors) == 1 and stderr.endswith(errors[0] + "\n"), stderr
    return errors[0]


def test_report_counts_each_planted_kind(dirty, prepared):
    _, truth = dirty
    out, report = prepared
    assert sorted(os.listdir(out)) == sorted([*OUTPUTS, WORK_DIR])
    assert report["bad_files"]["by_reason"] == {"binary or undecodable": 3, "too large": 1}
    removed = {stage["stage"]: stage["docs_removed"] for stage in report["stages"]}
    assert removed["empty"] >= 3
    for kind in ("repeated_lines", "alnum_fraction", "license", "generated"):
        assert removed[kind] >= 1, kind
    assert removed["exact_dup"] >= 4 and report["duplicates"]["exact_removed"] == removed["exact_dup"]
    assert _pairs(out, "exact") >= {frozenset((d["copy"], d["original"])) for d in truth["exact"]}
    planted = {frozenset((d["copy"], d["original"])) for d in truth["near"]}
    found = _pairs(out, "near")
    with_copy = {pair for pair in found if any("/near/" in name for name in pair)}
    assert len(found & planted) >= 0.9 * len(planted)  # recall
    assert len(found & planted) >= 0.9 * len(with_copy)  # precision
    assert report["scrub"]["emails"] >= 1 and report["scrub"]["keys"] >= 2
    assert (out / "report.md").read_text().startswith("# plait data prepare")


def test_output_is_scrubbed_shards_train_reads(prepared):
    out, report = prepared
    data = prepare_dataset(str(out), vocab_size=320, cache_dir=out / "unused")
    assert data.num_train_tokens == report["output"]["train_tokens"] and data.vocab_size == 320
    tokens = np.fromfile(data.train_path, dtype=data.dtype)
    text = Tokenizer.from_file(str(data.tokenizer_path)).decode(tokens.tolist())
    assert SECRET_EMAIL not in text and SECRET_KEY not in text and "<KEY>" in text
    with pytest.raises(ValueError, match=r"set data\.vocab_size=320"):
        prepare_dataset(str(out), vocab_size=8192, cache_dir=out / "unused")


def test_rerun_skips_finished_files_and_gives_the_same_output(dirty, prepared, tmp_path):
    first, report = prepared
    out = tmp_path / "out"
    shutil.copytree(first / WORK_DIR, out / WORK_DIR)
    records = sorted((out / WORK_DIR).glob("*.json"))
    for record in records[::2]:
        record.unlink()  # as if the first run stopped half-way
    again = prepare_corpus([str(dirty[0])], out, config=dataclasses.replace(CONFIG, workers=1))
    assert again["run"]["files_resumed"] == len(records) - len(records[::2])
    for name in ("tokenizer.json", "train.bin", "val.bin", "duplicates.tsv"):
        assert (out / name).read_bytes() == (first / name).read_bytes(), name
    assert again["stages"] == report["stages"]


def test_unreadable_file_is_counted_not_fatal(dirty, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(dirty[0] / "orig", source)
    (source / "gone.py").symlink_to(tmp_path / "missing.py")  # listed, but cannot be read
    report = prepare_corpus([str(source)], tmp_path / "out", config=CONFIG)
    assert report["bad_files"]["files"] == [{"name": "src/gone.py", "reason": "unreadable (No such file or directory)"}]


def test_missing_source_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["data", "prepare", str(tmp_path / "nope"), "--out", str(out)]) == 2
    error = _error_line(capsys.readouterr().err)
    assert "source" in error and "does not exist" in error
    assert not out.exists()


def test_empty_after_filtering_names_the_filter_and_leaves_nothing(dirty, tmp_path, capsys):
    rules = tmp_path / "rules.toml"
    rules.write_text("[filters]\nmin_chars = 900000\n")
    out = tmp_path / "out"
    assert main(["data", "prepare", str(dirty[0] / "orig"), "--out", str(out), "--config", str(rules)]) == 2
    error = _error_line(capsys.readouterr().err)
    assert "min_chars removed the most" in error and "lower [filters] min_chars" in error
    assert not out.exists()
    out.mkdir()  # an existing directory keeps only what it had (and the ledger), no half-written output
    (out / "keep.txt").write_text("mine")
    assert main(["data", "prepare", str(dirty[0] / "orig"), "--out", str(out), "--config", str(rules)]) == 2
    assert sorted(os.listdir(out)) == [WORK_DIR, "keep.txt"]


def test_cli_prepares_and_plait_train_runs_on_it(dirty, tmp_path, capsys):
    out = tmp_path / "data"
    args = ["data", "prepare", str(dirty[0] / "orig"), "--out", str(out), "--vocab-size", "300", "--workers", "1"]
    assert main(args) == 0
    assert "train on it with --set data.corpus=" in capsys.readouterr().out
    assert json.loads((out / "meta.json").read_text())["vocab_size"] == 300
    run = tmp_path / "run"
    sets = [
        f"data.corpus={out}",
        "data.vocab_size=300",
        "train.steps=2",
        "train.global_batch=2",
        f"train.out_dir={run}",
    ]
    assert main(["train", *[arg for s in sets for arg in ("--set", s)]]) == 0
    assert (run / "metrics.csv").is_file()


def test_jsonl_and_parquet_sources_with_a_field(dirty, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [p.read_text(errors="replace") for p in sorted((dirty[0] / "orig").iterdir())[:12]]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts[:6]) + "not json\n")
    pq.write_table(pa.table({"body": texts[6:]}), tmp_path / "docs.parquet")
    config = dataclasses.replace(CONFIG, workers=1, batch_docs=4)
    report = prepare_corpus([str(jsonl), str(tmp_path / "docs.parquet")], tmp_path / "out", config=config, field="body")
    assert report["input"]["documents"] == 13  # the bad jsonl line is an empty document, counted
    assert {s["stage"]: s["docs_removed"] for s in report["stages"]}["empty"] == 1
    sources = [str(tmp_path / "docs.parquet"), str(dirty[0] / "orig")]
    missing = prepare_corpus(sources, tmp_path / "out2", config=config)
    assert missing["bad_files"]["files"][0]["reason"].startswith("no column 'text'")
