"""`[model] pretrained = "DIR"`: bad directories fail `plait train` with one line before any process
group; the config section; the pretrained tokenizer's shards are cached apart from plait's own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

from plait.cli import main
from plait.config import ModelConfig, load_config
from tests.pretrained_dirs import (
    MODEL_VOCAB,
    TOKENIZER_VOCAB,
    minilm_dir,
    save_tiny_pretrained,
    save_unknown_family,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory, small_corpus: list[str]) -> dict[str, Path]:
    """One good tiny Qwen2 directory and one broken copy per failure."""
    root = tmp_path_factory.mktemp("pretrained")
    corpus = small_corpus[:8]
    good = save_tiny_pretrained(root / "qwen2", corpus)
    out = {"good": good, "missing": root / "nope", "empty": root / "empty"}
    out["empty"].mkdir()
    out["no weights"] = root / "no-weights"
    out["no weights"].mkdir()
    shutil.copy(good / "config.json", out["no weights"] / "config.json")
    out["no tokenizer"] = root / "no-tokenizer"
    shutil.copytree(good, out["no tokenizer"], ignore=shutil.ignore_patterns("tokenizer*"))
    out["small embedding"] = save_tiny_pretrained(root / "small-embedding", corpus, vocab_size=TOKENIZER_VOCAB - 20)
    out["unknown family"] = save_unknown_family(root / "phi", corpus)
    return out


def train_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code = main(["train", "--set", "data.seq_len=32", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("plait train: error: ")
    assert not dist.is_initialized()
    return err


def test_minilm_is_refused_as_not_a_causal_lm(capsys: pytest.CaptureFixture[str]) -> None:
    err = train_error(capsys, "--set", f"model.pretrained={minilm_dir()}")
    for part in ("BertModel", "feature extraction", "not a causal LM", "AutoModelForCausalLM"):
        assert part in err, err


BAD = {
    "missing": ((), "does not exist; point it at a local transformers model directory"),
    "empty": ((), "has no config.json"),
    "no weights": ((), "has no weights: no model.safetensors"),
    "no tokenizer": ((), "has no tokenizer (none of tokenizer.json"),
    "small embedding": ((), f"its tokenizer has {TOKENIZER_VOCAB} tokens but the model's embedding has 280 rows"),
    "unknown family": ((), "plait's architecture registry has no entry 'phi'"),
}
PLAN_AND_DATA = {
    "tp": (("plan.tp=3", "plan.dp=1"), "tp=3 does not divide attention heads (num_attention_heads)=4"),
    "sequence parallel": (
        ("plan.tp=2", "plan.dp=1", "plan.sequence_parallel=true", "data.seq_len=31"),
        "data.seq_len=31 does not divide by plan.tp=2",
    ),
    "seq_len": (("data.seq_len=65",), "data.seq_len=65 is longer than"),
    "stages": (("plan.pp=8", "plan.dp=1", "plan.microbatches=8"), "8 stages but"),
    "overrides": (("model.d_model=64",), "model.d_model change fields of plait's presets"),
    "preset too": (("model.preset=tiny-llama",), "both name a model; keep one"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_directory_fails_fast_with_the_fix(case: str, dirs: dict, capsys: pytest.CaptureFixture[str]) -> None:
    sets, message = BAD[case]
    err = train_error(capsys, "--set", f"model.pretrained={dirs[case]}", *sets)
    assert message in err, err
    if case == "no tokenizer":
        assert f"{MODEL_VOCAB}-row embedding" in err


@pytest.mark.parametrize("case", sorted(PLAN_AND_DATA))
def test_plan_and_data_are_checked_against_the_model(case: str, dirs: dict, capsys: pytest.CaptureFixture[str]) -> None:
    sets, message = PLAN_AND_DATA[case]
    args = [item for value in sets for item in ("--set", value)]
    err = train_error(capsys, "--set", f"model.pretrained={dirs['good']}", *args)
    assert message in err, err


def test_config_section_from_toml_and_set(tmp_path: Path, dirs: dict) -> None:
    path = tmp_path / "run.toml"
    path.write_text(f'[model]\npretrained = "{dirs["good"]}"\n[data]\nseq_len = 32\n')
    assert load_config(path).model == ModelConfig(pretrained=str(dirs["good"]))
    assert load_config(None, [f"model.pretrained={dirs['good']}"]).model.pretrained == str(dirs["good"])
    with pytest.raises(ValueError, match="give the path"):
        ModelConfig(pretrained="")


def test_pretrained_tokenizer_shards_are_cached_apart(tmp_path: Path, dirs: dict, small_corpus: list[str]) -> None:
    """Same corpus: plait's BPE and the model's tokenizer write different caches, each ending documents
    with its own end-of-text id, and a second call reads the cache."""
    from plait.checkpoint.hf_pretrained import inspect_pretrained
    from plait.train.setup import prepare_data

    config = load_config(None, ["data.vocab_size=300", f"data.cache_dir='{tmp_path}'", "data.val_fraction=0.2"])
    config.data.corpus = small_corpus[:4]
    pretrained = inspect_pretrained(dirs["good"])
    own, theirs = prepare_data(config), prepare_data(config, pretrained=pretrained)
    assert own.train_path.parent != theirs.train_path.parent
    assert theirs.vocab_size == TOKENIZER_VOCAB and theirs.eot_id == pretrained.tokenizer.eot_id
    assert theirs.load_tokenizer().to_str() == pretrained.tokenizer.json
    tokens = np.fromfile(theirs.train_path, dtype=theirs.dtype)
    assert int((tokens == theirs.eot_id).sum()) == theirs.num_train_documents
    mtime = theirs.train_path.stat().st_mtime_ns
    assert prepare_data(config, pretrained=pretrained) == theirs
    assert theirs.train_path.stat().st_mtime_ns == mtime
    meta = json.loads((theirs.train_path.parent / "meta.json").read_text())
    assert meta["eot_id"] == pretrained.tokenizer.eot_id
