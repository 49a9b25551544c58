"""Checks before launch that read the disk: the run's out_dir, the checkpoint it resumes, its data.

`plait train` runs them once, in the launcher (or the single process of a one-rank run), before
any rank starts: a used out_dir, a corrupt checkpoint or a corpus too small for the batch is
refused in one line, instead of on every rank under torchrun's failure summary. Only the token
cache is written here (the ranks then read it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from plait.checkpoint.io import list_checkpoints, verify_checkpoint
from plait.config import Config

if TYPE_CHECKING:
    from plait.checkpoint.hf_pretrained import Pretrained

AUTO = "auto"
METRICS_FILE = "metrics.csv"
CHECKPOINTS_DIR = "checkpoints"


def check_out_dir_writable(out_dir: Path) -> None:
    """The nearest existing ancestor of `out_dir` must be a directory this user can write."""
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(
            f"train.out_dir={out_dir}: {existing} is a file, so no directory can be made under it; "
            "choose another out_dir"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"train.out_dir={out_dir}: {existing} is not writable by this user; choose another out_dir")


def earlier_run(out_dir: Path) -> str | None:
    """What shows that `out_dir` holds a run (its metrics.csv or a checkpoint), or None."""
    if (out_dir / METRICS_FILE).exists():
        return METRICS_FILE
    checkpoints = out_dir / CHECKPOINTS_DIR
    found = sorted(checkpoints.glob("step-*")) if checkpoints.is_dir() else []
    return f"{CHECKPOINTS_DIR}/{found[-1].name}" if found else None


def check_out_dir_unused(out_dir: Path, *, resume: str | None) -> None:
    """A new run never writes into another run's out_dir (its metrics.csv would be replaced and
    checkpoint pruning would delete the new run's checkpoints, which look older)."""
    evidence = earlier_run(out_dir)
    if evidence is None or resume == AUTO:
        return
    if resume is None:
        raise ValueError(
            f"train.out_dir={out_dir} already holds a run ({evidence}); continue it with --resume auto "
            f"(its newest checkpoint) or --resume {out_dir / CHECKPOINTS_DIR}/step-N, or pass another "
            "--set train.out_dir=..."
        )
    if (out_dir / CHECKPOINTS_DIR).resolve() != Path(resume).resolve().parent:
        raise ValueError(
            f"train.out_dir={out_dir} holds another run ({evidence}) and --resume {resume} is not one of its "
            f"checkpoints; resume into the checkpoint's own out_dir, or pass an unused --set train.out_dir=..."
        )


def newest_verified_checkpoint(out_dir: Path) -> tuple[Path | None, str]:
    """`--resume auto`: the newest checkpoint under `out_dir/checkpoints` whose manifest and file
    checksums verify, and a line for the log; (None, line) when there is none (a fresh start).
    ValueError when checkpoints exist but none verifies (starting afresh would mix two runs)."""
    directory = out_dir / CHECKPOINTS_DIR
    found = list_checkpoints(directory)
    if not found:
        return None, f"--resume auto: no checkpoint under {directory}; starting afresh at step 0"
    skipped = []
    for path in reversed(found):
        try:
            verify_checkpoint(path)
        except (ValueError, OSError) as error:
            skipped.append(f"{path.name} ({str(error).split(';')[0]})")
            continue
        note = f" (skipped {', '.join(skipped)})" if skipped else ""
        return path, f"--resume auto: continuing from {path}, the newest checkpoint that verifies{note}"
    raise ValueError(
        f"--resume auto: none of the {len(found)} checkpoints under {directory} verifies ({skipped[0]}); "
        "move them away to start afresh, or --resume a copy that is whole"
    )


def resolve_resume(resume: str | None, *, out_dir: Path) -> tuple[Path | None, str]:
    """The checkpoint a run continues from (verified) and a line for the log ('' when none)."""
    if resume is None:
        return None, ""
    if resume == AUTO:
        return newest_verified_checkpoint(out_dir)
    path = Path(resume)
    if not path.is_dir():
        raise ValueError(
            f"--resume {resume}: no such checkpoint directory; pick one under <out_dir>/checkpoints, or --resume auto"
        )
    verify_checkpoint(path)  # a missing manifest, or a truncated or corrupt file, names the file
    return path, ""


def check_data(config: Config, *, pretrained: Pretrained | None = None) -> None:
    """Tokenize (or read the cache) and check the corpus holds a training sample and, unless
    data.val_fraction=0, a whole eval batch of train.global_batch sequences."""
    from plait.train.setup import prepare_data  # torch and the tokenizers load only when needed

    if not config.task.uses_corpus:  # image classification: images from a package, nothing to tokenize
        return
    data, train = config.data, config.train
    prepared = prepare_data(config, pretrained=pretrained)
    num_train = prepared.num_train_tokens // data.seq_len
    if num_train < 1:
        raise ValueError(
            f"data.corpus holds {prepared.num_train_tokens} training tokens, fewer than one sample of "
            f"data.seq_len={data.seq_len}; lower data.seq_len to at most {prepared.num_train_tokens} or add text"
        )
    num_val = prepared.num_val_tokens // data.seq_len
    if data.val_fraction > 0 and num_val < train.global_batch:
        raise ValueError(
            f"the validation split ({prepared.num_val_documents} of the corpus's documents, data.val_fraction="
            f"{data.val_fraction}) holds {num_val} samples of data.seq_len={data.seq_len}, fewer than one eval "
            f"batch of train.global_batch={train.global_batch}; raise data.val_fraction, lower train.global_batch "
            "or data.seq_len, add documents, or set data.val_fraction=0 (no validation loss)"
        )
