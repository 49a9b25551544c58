"""Checkpoint saves under failure: a rank killed mid-save, asynchronous saves, corruption, export."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import tempfile
import time
from pathlib import Path

import pytest
import torch

import plait
from plait.checkpoint.io import latest_checkpoint, list_checkpoints, load_checkpoint, verify_checkpoint
from plait.distributed.forked import _worker
from plait.models import build
from tests.distributed.harness import run_ranks
from tests.distributed.test_parity import SEQ, make_batches, optimizer, scheduler, shard_of


def make_engine_for(plan_kwargs: dict, *, preset: str = "tiny") -> plait.Engine:
    """`preset`: a plait preset, or "hf-gpt2" / "hf-llama" for a tiny Hugging Face model."""
    torch.manual_seed(0)
    model = _hf_model(preset) if preset.startswith("hf-") else build(preset, max_seq_len=SEQ)
    plan = plait.Plan(bucket_mb=0.01, **plan_kwargs)
    return plait.boost(model, optimizer=optimizer, loss_fn=plait.losses.causal_lm, plan=plan, lr_scheduler=scheduler)


def _hf_model(name: str) -> torch.nn.Module:
    import transformers

    if name == "hf-gpt2":
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=SEQ)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=256,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config)


def make_engine(world_size: int, *, preset: str = "tiny", zero: int = 2) -> plait.Engine:
    return make_engine_for({"dp": world_size, "zero": zero}, preset=preset)


def train(engine: plait.Engine, steps: range) -> list[float]:
    batches = make_batches(engine.model.config.vocab_size)
    return [engine.train_step(shard_of(batches[s], engine)).loss.item() for s in steps]


def save_then_die_mid_save(rank: int, world_size: int, directory: str) -> None:
    engine = make_engine(world_size, preset="gpt-10m")  # ~10M params: a save takes long enough to interrupt
    train(engine, range(1))
    engine.save(Path(directory) / "step-000001")
    train(engine, range(1, 2))
    engine.save(Path(directory) / "step-000002")  # the test kills rank 1 while it writes its shard
    time.sleep(60)  # not reached by rank 1 when the kill lands in time


def _wait_for(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.002)


@pytest.mark.parametrize("delay_s", [0.0, 0.01])
def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path: Path, delay_s: float) -> None:
    directory = tmp_path / "checkpoints"
    with tempfile.TemporaryDirectory(prefix="plait-ranks-") as workdir:
        ctx = mp.get_context("fork")
        args = (str(directory),)
        procs = [
            ctx.Process(target=_worker, args=(save_then_die_mid_save, r, 2, workdir, (1, True), args)) for r in range(2)
        ]
        for proc in procs:
            proc.start()
        try:
            _wait_for(directory / ".tmp-step-000002" / "shard-00001.safetensors", timeout_s=120)
            time.sleep(delay_s)
            os.kill(procs[1].pid, signal.SIGKILL)
            procs[1].join(10)
            time.sleep(1.0)
        finally:
            for proc in procs:
                proc.kill()
                proc.join(10)
    assert procs[1].exitcode == -signal.SIGKILL
    assert list_checkpoints(directory) == [directory / "step-000001"]  # the interrupted save never looks complete
    assert (directory / ".tmp-step-000002").is_dir()  # it was interrupted mid-write, not before or after
    manifest = verify_checkpoint(directory / "step-000001")
    assert manifest["step"] is not None and len(manifest["files"]) == 4  # two shards, trainer.pt, config.json
    weights, trainer_state, _ = load_checkpoint(directory / "step-000001")
    assert weights["embed.weight"].shape[0] == 8192 and trainer_state["scaler"] is not None


def save_async_while_training(rank: int, world_size: int, directory: str) -> dict:
    engine = make_engine(world_size)
    train(engine, range(3))
    engine.save(Path(directory) / "sync")
    engine.save(Path(directory) / "async", asynchronous=True)
    later = train(engine, range(3, 6))  # runs while the background thread writes
    engine.wait_for_save()
    return {"later": later, "whole": engine.model_state_dict()}


def test_an_asynchronous_save_holds_the_state_of_the_step_it_was_taken_at(tmp_path: Path) -> None:
    results = run_ranks(save_async_while_training, 2, str(tmp_path), timeout_s=120)
    sync, _, _ = load_checkpoint(tmp_path / "sync")
    background, _, _ = load_checkpoint(tmp_path / "async")
    for name, tensor in sync.items():
        assert torch.equal(background[name], tensor), name  # training went on; the snapshot did not move
    assert not torch.equal(results[0]["whole"]["embed.weight"], sync["embed.weight"])
    assert all(torch.isfinite(torch.tensor(r["later"])).all() for r in results)


def resume_and_save(rank: int, world_size: int, directory: str) -> list[float]:
    engine = make_engine(world_size, zero=3)
    engine.load(latest_checkpoint(Path(directory)))
    losses = train(engine, range(1, 3))
    engine.save(Path(directory) / "step-000003")
    return losses


def test_a_new_job_resumes_from_the_last_good_checkpoint_and_cleans_up(tmp_path: Path) -> None:
    """After a crash, the next save commits and removes the crashed save's hidden directory."""
    directory = tmp_path / "checkpoints"
    run_ranks(lambda r, w, d: make_engine(w).save(Path(d) / "step-000001"), 2, str(directory))
    (directory / ".tmp-step-000002").mkdir()
    (directory / ".tmp-step-000002" / "shard-00000.safetensors").write_bytes(b"half a file")
    losses = run_ranks(resume_and_save, 2, str(directory), timeout_s=120)[0]
    assert len(losses) == 2 and all(loss == loss for loss in losses)
    assert sorted(p.name for p in directory.iterdir()) == ["step-000001", "step-000003"]


def test_a_flipped_byte_in_one_ranks_shard_is_named(tmp_path: Path) -> None:
    run_ranks(lambda r, w, d: make_engine(w).save(Path(d) / "step-000001"), 2, str(tmp_path))
    shard = tmp_path / "step-000001" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard-00001\.safetensors is corrupt"):
        load_checkpoint(tmp_path / "step-000001")
