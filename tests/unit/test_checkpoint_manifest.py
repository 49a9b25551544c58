"""A damaged manifest.json is named, with the earlier checkpoint to use, as a damaged shard is."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import plait
from plait.checkpoint.io import load_checkpoint


def _engine() -> plait.Engine:
    torch.manual_seed(0)
    model = plait.models.build("tiny", vocab_size=64, max_seq_len=16)
    return plait.boost(model, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), loss_fn=plait.losses.causal_lm)


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda data: b"\xff\xfe" + data[2:], "it is not valid JSON"),  # the bytes a bad disk or copy leaves
        (lambda data: data[: len(data) // 2], "it is not valid JSON"),  # cut short
        (lambda data: b"[]", "it lacks the table of files"),  # JSON, but not a manifest
    ],
)
def test_a_damaged_manifest_names_the_file_and_an_earlier_checkpoint(tmp_path: Path, damage, why: str) -> None:
    engine = _engine()
    engine.save(tmp_path / "step-000100")
    engine.save(tmp_path / "step-000200")
    manifest = tmp_path / "step-000200" / "manifest.json"
    manifest.write_bytes(damage(manifest.read_bytes()))
    expected = rf"{re.escape(str(manifest))} is corrupt: {why}.*earlier checkpoint such as {re.escape(str(tmp_path / 'step-000100'))}"
    with pytest.raises(ValueError, match=expected):
        engine.load(tmp_path / "step-000200")  # what `plait train --resume` calls
    with pytest.raises(ValueError, match=expected):
        load_checkpoint(tmp_path / "step-000200")  # export, generate
    engine.load(tmp_path / "step-000100")  # the one the message names loads
