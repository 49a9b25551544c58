"""Everything a run checks and builds before its first step.

`validate` runs before any process group exists, so bad input fails every
rank at once with one clear message and no collective is ever entered.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from plait.config import Config, Plan
from plait.data.corpus import corpus_files
from plait.data.loader import ShardedLoader, TokenDataset, eval_batches
from plait.data.shards import PreparedData, prepare_dataset
from plait.distributed.mesh import Mesh
from plait.models.factory import resolve_config
from plait.models.gpt import GPTConfig


@dataclass(frozen=True)
class Validated:
    plan: Plan
    model_config: GPTConfig


def launched_world_size() -> int:
    """The world size of the process group, or the one torchrun announced (1 for one plain process)."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def model_config_for(config: Config) -> GPTConfig:
    overrides: dict[str, Any] = {"vocab_size": config.data.vocab_size, **config.model.overrides}
    model_config = resolve_config(config.model.preset, **overrides)
    if model_config.vocab_size < config.data.vocab_size:
        raise ValueError(
            f"model.vocab_size={model_config.vocab_size} is smaller than data.vocab_size={config.data.vocab_size}; "
            "drop the model override or raise it"
        )
    if config.data.seq_len > model_config.max_seq_len:
        raise ValueError(
            f"data.seq_len={config.data.seq_len} is longer than the model's max_seq_len={model_config.max_seq_len}; "
            f"lower data.seq_len or --set model.max_seq_len={config.data.seq_len}"
        )
    return model_config


def check_tensor_parallel(model_config: GPTConfig, *, tp: int, seq_len: int, sequence_parallel: bool) -> None:
    """Every size tp splits must divide by it; say which does not and which tp values would work."""
    sizes = {
        "model.num_heads": model_config.num_heads,
        "model.num_kv_heads": model_config.resolved_num_kv_heads,
        "model.d_ff": model_config.resolved_d_ff,
    }
    if sequence_parallel:
        sizes["data.seq_len (sequence parallel)"] = seq_len
    for what, size in sizes.items():
        if size % tp:
            valid = [t for t in range(1, size + 1) if size % t == 0 and all(v % t == 0 for v in sizes.values())]
            raise ValueError(f"{what}={size} is not divisible by plan.tp={tp}; use plan.tp in {valid}")


def validate(config: Config, *, world_size: int) -> Validated:
    """Check the whole config against the launch; raises ValueError with the fix."""
    plan = config.plan.resolve(world_size)
    plan.check_available()
    config.check_batching(plan.dp)
    model_config = model_config_for(config)
    stages = plan.pp * plan.pp_chunks
    if stages > model_config.num_layers:
        raise ValueError(
            f"plan.pp={plan.pp} x plan.pp_chunks={plan.pp_chunks} = {stages} stages but the model has "
            f"{model_config.num_layers} layers; use at most {model_config.num_layers} stages"
        )
    if plan.tp > 1:
        check_tensor_parallel(
            model_config, tp=plan.tp, seq_len=config.data.seq_len, sequence_parallel=plan.sequence_parallel
        )
    if config.data.corpus != "stdlib":
        corpus_files(config.data.corpus)  # raises for missing paths before any rank waits on another
    return Validated(plan=plan, model_config=model_config)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_data_once(config: Config, *, log: Any) -> PreparedData:
    """Rank 0 tokenizes (or reads the cache) first; the others then read its cache."""
    is_first = not dist.is_initialized() or dist.get_rank() == 0
    data = None
    if is_first:
        data = prepare_dataset(
            config.data.corpus,
            vocab_size=config.data.vocab_size,
            cache_dir=config.data.cache_dir,
            val_fraction=config.data.val_fraction,
            progress=log.info,
        )
    if dist.is_initialized():
        dist.barrier()
    if data is None:
        data = prepare_dataset(
            config.data.corpus,
            vocab_size=config.data.vocab_size,
            cache_dir=config.data.cache_dir,
            val_fraction=config.data.val_fraction,
        )
    return data


@dataclass
class DataSources:
    loader: ShardedLoader
    val_batches: list[dict[str, torch.Tensor]]
    prepared: PreparedData


def build_data(config: Config, *, mesh: Mesh, log: Any) -> DataSources:
    prepared = prepare_data_once(config, log=log)
    seq_len = config.data.seq_len
    train = TokenDataset(prepared.train_path, dtype=prepared.dtype, seq_len=seq_len)
    val = TokenDataset(prepared.val_path, dtype=prepared.dtype, seq_len=seq_len)
    dp_rank, dp_size = mesh.rank("dp"), mesh.size("dp")
    loader = ShardedLoader(
        train, global_batch=config.train.global_batch, dp_rank=dp_rank, dp_size=dp_size, seed=config.train.seed
    )
    val_batches = eval_batches(
        val,
        batch_size=config.train.global_batch,
        num_batches=config.train.eval_batches,
        dp_rank=dp_rank,
        dp_size=dp_size,
    )
    return DataSources(loader=loader, val_batches=val_batches, prepared=prepared)
