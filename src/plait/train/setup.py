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
from torch import nn

from plait.checkpoint.hf_pretrained import Pretrained, inspect_pretrained, load_pretrained_model, tokenizer_files
from plait.config import Config, Plan, model_config_for
from plait.data.corpus import corpus_files
from plait.data.loader import ShardedLoader, TokenDataset, eval_batches
from plait.data.shards import PreparedData, prepare_dataset
from plait.distributed.launch import default_device_type
from plait.distributed.mesh import Mesh
from plait.distributed.precision import resolve_precision
from plait.distributed.topology import launched_ranks_per_node
from plait.models.factory import build
from plait.models.gpt import GPT, GPTConfig
from plait.train import metrics
from plait.train.text_tasks import (
    build_language_model,
    task_tokenizer,
    text_task,
    uses_language_preset,
    validate_language,
)
from plait.zero.factory import unit_numels
from plait.zero.offload.build import plan_offload


@dataclass(frozen=True)
class Validated:
    """A checked run: its plan and model (plait's GPT config, or a pretrained transformers directory)."""

    plan: Plan
    model_config: GPTConfig | None
    pretrained: Pretrained | None = None
    vision: Any = None  # image classification: the transformers config of the vision preset
    language: Any = None  # BERT / ALBERT / T5 presets: a plait.train.text_tasks.LanguageModel

    def num_parameters(self) -> int:
        if self.language is not None:
            return self.language.num_parameters
        if self.pretrained is not None:
            return self.pretrained.num_parameters()
        assert self.model_config is not None
        return self.model_config.num_parameters()

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (metrics.model_flops_per_token; embedding lookups are not matmuls)."""
        if self.language is not None:
            return self.language.flops_per_token(seq_len)
        if self.pretrained is None:
            assert self.model_config is not None
            return self.model_config.flops_per_token(seq_len)
        pretrained = self.pretrained
        return metrics.model_flops_per_token(
            num_params=pretrained.matmul_parameters(),
            num_layers=pretrained.num_layers,
            d_model=pretrained.hidden_size(),
            seq_len=seq_len,
        )


def launched_world_size() -> int:
    """The world size of the process group, or the one torchrun announced (1 for one plain process)."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


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


def validate(config: Config, *, world_size: int, ranks_per_node: int | None = None) -> Validated:
    """Check the whole config against the launch (`ranks_per_node`: default torchrun's
    LOCAL_WORLD_SIZE, else the whole world); raises ValueError with the fix."""
    plan = config.plan.resolve(world_size)
    plan.check_available()
    plan.zero_shard_size(ranks_per_node or launched_ranks_per_node(world_size))
    config.check_batching(plan.dp)
    if config.task.kind == "image_classification":
        from plait.train.image_tasks import validate_vision

        return Validated(plan=plan, model_config=None, vision=validate_vision(config, plan=plan))
    if uses_language_preset(config):  # BERT / ALBERT / T5 with their tasks
        language = validate_language(config, plan=plan)
        _check_corpus(config)
        return Validated(plan=plan, model_config=None, language=language)
    if config.model.pretrained is not None:
        pretrained = validate_pretrained(config, plan=plan)
        _check_corpus(config)
        return Validated(plan=plan, model_config=None, pretrained=pretrained)
    model_config = model_config_for(config)
    stages = plan.pp * plan.pp_chunks
    if stages > model_config.num_layers and not plan.pp_split:  # a split is checked below (layer-less ends)
        raise ValueError(
            f"plan.pp={plan.pp} x plan.pp_chunks={plan.pp_chunks} = {stages} stages but the model has "
            f"{model_config.num_layers} layers; use at most {model_config.num_layers} stages"
        )
    if plan.tp > 1:
        check_tensor_parallel(
            model_config, tp=plan.tp, seq_len=config.data.seq_len, sequence_parallel=plan.sequence_parallel
        )
    check_pp_split(plan, num_layers=model_config.num_layers)
    check_moe(model_config, plan=plan)
    if plan.recompute != "none" or plan.recompute_modules:
        check_recompute(model_config, plan=plan)
    if plan.offloads:
        check_offload(model_config, plan=plan, world_size=world_size)
    _check_corpus(config)
    return Validated(plan=plan, model_config=model_config)


def check_moe(model_config: GPTConfig, *, plan: Plan) -> None:
    """Expert parallel needs MoE layers whose experts split evenly over the ep ranks; tp splits each
    expert's width; MoE layers route whole sequences, so no sequence parallel; no pipeline in plait train
    yet (all before launch)."""
    experts = model_config.moe_experts
    if plan.ep > 1 and not experts:
        raise ValueError(
            f"plan.ep={plan.ep} splits the experts of MoE layers, but the model has none (model.moe_experts=0); "
            "set plan.ep=1, or train an MoE preset (e.g. model.preset=switch-tiny)"
        )
    if experts % plan.ep:
        valid = [ep for ep in range(1, experts + 1) if experts % ep == 0 and plan.dp % ep == 0]
        raise ValueError(
            f"model.moe_experts={experts} does not split over plan.ep={plan.ep} ranks; use plan.ep in {valid} "
            f"(it divides the experts and dp={plan.dp}), or a multiple of {plan.ep} experts"
        )
    if not experts:
        return
    if plan.pp > 1:  # the engine runs MoE layers in pipeline stages; plait train does not yet
        raise ValueError(
            f"plan.pp={plan.pp} with a Mixture-of-Experts model (model.moe_experts={experts}) is not available "
            "yet in plait train; set plan.pp=1, or model.moe_experts=0 for the dense model"
        )
    if plan.tp == 1:
        return
    if plan.sequence_parallel:
        raise ValueError(
            "plan.sequence_parallel with a Mixture-of-Experts model is not available yet in plait: MoE layers "
            "route whole sequences; set plan.sequence_parallel=false (tp splits each expert without it)"
        )
    width = model_config.resolved_moe_d_ff
    if width % plan.tp:
        valid = [tp for tp in range(1, width + 1) if width % tp == 0 and model_config.num_heads % tp == 0]
        raise ValueError(
            f"model.moe_d_ff={width} (each expert's width, split over tp) is not divisible by plan.tp={plan.tp}; "
            f"use plan.tp in {valid}, or an expert width that plan.tp divides"
        )


def check_pp_split(plan: Plan, *, num_layers: int) -> None:
    """plan.pp_split lists the layers where stages 1, 2, ... start: pp * pp_chunks - 1 increasing indices
    (the first may be 0: a first stage with the embedding alone; the last num_layers: the head alone)."""
    if not plan.pp_split:
        return
    from plait.pipeline.partition import ranges_from_split_points

    stages = plan.pp * plan.pp_chunks
    try:
        ranges_from_split_points(plan.pp_split, num_layers=num_layers, num_stages=stages)
    except ValueError:
        example = [round(num_layers * (i + 1) / stages) for i in range(stages - 1)]
        raise ValueError(
            f"plan.pp_split={plan.pp_split}: give the {stages - 1} layer indices where pipeline stages 1.."
            f"{stages - 1} start, increasing, within 1..{num_layers - 1} (the model has {num_layers} layers, "
            f"plan.pp x plan.pp_chunks = {stages} stages; the first may be 0 and the last {num_layers}, leaving the "
            f"first stage the embedding alone and the last the head alone), e.g. plan.pp_split={example}, or [] to "
            "balance by cost"
        ) from None


def check_recompute(model_config: GPTConfig, *, plan: Plan) -> None:
    """Apply the plan's recomputation to the model built on the meta device (no memory), so a
    pattern in plan.recompute_modules that names no module fails before launch."""
    from plait.recompute import apply_recompute

    with torch.device("meta"):
        model = build(model_config)
    try:
        apply_recompute(model, mode=plan.recompute, ratio=plan.recompute_ratio, modules=plan.recompute_modules or None)
    except ValueError as error:
        raise ValueError(
            f"plan.recompute={plan.recompute!r}, plan.recompute_modules={plan.recompute_modules}: {error}"
        ) from None


def check_offload(model_config: GPTConfig, *, plan: Plan, world_size: int) -> None:
    """The offload placement and its disk, from the model's units built on the meta device (no memory):
    a budget below the working set, or an offload_dir that cannot hold the files, fails before launch.
    Tensor-parallel slices are counted as 1/tp of each unit (norms and biases are replicated, a rounding)."""
    with torch.device("meta"):
        model = build(model_config)
    precision = resolve_precision(plan.precision, device_type=default_device_type()).precision  # as Mesh will
    param_bytes = 4 if precision == "fp32" else 2
    numels = [-(-numel // plan.tp) for numel in unit_numels(model)]
    plan_offload(numels, plan=plan, num_shards=plan.dp, param_bytes=param_bytes, ranks_per_node=world_size)


def _check_corpus(config: Config) -> None:
    if config.data.corpus != "stdlib":
        corpus_files(config.data.corpus)  # raises for missing paths before any rank waits on another


def validate_pretrained(config: Config, *, plan: Plan) -> Pretrained:
    """The pretrained directory checked, then the plan and data against its model."""
    pretrained = inspect_pretrained(config.model.pretrained or "")
    longest = pretrained.max_positions
    if longest is not None and config.data.seq_len > longest:
        raise ValueError(
            f"data.seq_len={config.data.seq_len} is longer than {pretrained.label}'s {longest} positions; "
            f"lower data.seq_len to at most {longest}"
        )
    check_pp_split(plan, num_layers=pretrained.num_layers)
    stages = plan.pp * plan.pp_chunks
    if stages > pretrained.num_layers and not plan.pp_split:
        raise ValueError(
            f"plan.pp={plan.pp} x plan.pp_chunks={plan.pp_chunks} = {stages} stages but {pretrained.label} has "
            f"{pretrained.num_layers} layers; use at most {pretrained.num_layers} stages"
        )
    if plan.pp > 1:
        from plait.pipeline.partition import decoder_layout

        decoder_layout(pretrained.meta_model)  # refuses what a pipeline stage cannot run (Falcon's alibi)
    if plan.tp > 1:
        _check_pretrained_tp(pretrained, plan=plan, seq_len=config.data.seq_len)
    return pretrained


def _check_pretrained_tp(pretrained: Pretrained, *, plan: Plan, seq_len: int) -> None:
    from plait.tensor.hf import check_tp

    check_tp(pretrained.meta_model, plan.tp)
    if plan.sequence_parallel and seq_len % plan.tp:
        raise ValueError(
            f"data.seq_len={seq_len} does not divide by plan.tp={plan.tp}: sequence parallel splits every "
            f"sequence over the tp ranks; use a seq_len that is a multiple of {plan.tp}"
        )


def build_model(validated: Validated, *, mesh: Mesh, device: torch.device) -> nn.Module:
    """The run's model. plait's GPT under ZeRO-3 is built on the meta device and materialised shard by
    shard (same weights, seeded); a pretrained model is loaded, tp ranks reading only their slices."""
    if validated.language is not None:
        return build_language_model(validated.language, device=device)
    if validated.pretrained is not None:
        return load_pretrained_model(
            validated.pretrained,
            tp_group=mesh.group("tp"),
            device=device,
            sequence_parallel=validated.plan.sequence_parallel,
        )
    assert validated.model_config is not None
    with torch.device("meta" if validated.plan.zero == 3 else device):
        return GPT(validated.model_config)


def checkpoint_extra(validated: Validated) -> dict[str, Any]:
    """What a pretrained run's checkpoints keep besides the weights: the transformers config and
    tokenizer files, so that `plait export` and `plait generate` need nothing else."""
    if validated.pretrained is None:
        return {}
    pretrained = validated.pretrained
    return {"hf": {"config": pretrained.config.to_dict(), "tokenizer_files": tokenizer_files(pretrained.path)}}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_data(config: Config, *, pretrained: Pretrained | None = None, log: Any = None) -> PreparedData:
    """The run's token shards (cached): with a pretrained model, tokenized by its own tokenizer."""
    return prepare_dataset(
        config.data.corpus,
        vocab_size=config.data.vocab_size,
        cache_dir=config.data.cache_dir,
        val_fraction=config.data.val_fraction,
        progress=log.info if log is not None else None,
        tokenizer=pretrained.tokenizer if pretrained is not None else None,
    )


def prepare_data_once(config: Config, *, log: Any, pretrained: Pretrained | None = None) -> PreparedData:
    """Rank 0 tokenizes (or reads the cache) first; the others then read its cache."""
    is_first = not dist.is_initialized() or dist.get_rank() == 0
    data = prepare_data(config, pretrained=pretrained, log=log) if is_first else None
    if dist.is_initialized():
        dist.barrier()
    return data if data is not None else prepare_data(config, pretrained=pretrained)


@dataclass
class DataSources:
    loader: ShardedLoader
    val_batches: list[dict[str, torch.Tensor]]
    prepared: PreparedData


def build_data(config: Config, *, mesh: Mesh, log: Any, pretrained: Pretrained | None = None) -> DataSources:
    prepared = prepare_data_once(config, log=log, pretrained=pretrained)
    eot_id = prepared.eot_id if config.data.document_mask else None
    tokenizer = prepared.load_tokenizer()
    task = text_task(config, eot_id=eot_id, tokenizer=tokenizer)  # what each row becomes: next-token, masked-LM, spans
    task_tokenizer(tokenizer, task)  # its special tokens fit after the corpus vocabulary
    batch_maker = None if task.kind == "causal_lm" else task.make_batch
    seq_len = task.sample_tokens(config.data.seq_len)
    train = TokenDataset(prepared.train_path, dtype=prepared.dtype, seq_len=seq_len)
    dp_rank, dp_size = mesh.rank("data"), mesh.size("data")  # cp peers share a shard
    loader = ShardedLoader(
        train,
        global_batch=config.train.global_batch,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=config.train.seed,
        eot_id=eot_id,
        batch_maker=batch_maker,
    )
    if prepared.skipped_files:
        shown = ", ".join(prepared.skipped_files[:3]) + (" ..." if len(prepared.skipped_files) > 3 else "")
        log.warning(f"skipped {len(prepared.skipped_files)} corpus file(s) that are not text: {shown}")
    if config.data.val_fraction == 0:  # no validation split: no validation loss
        return DataSources(loader=loader, val_batches=[], prepared=prepared)
    val_batches = eval_batches(
        TokenDataset(prepared.val_path, dtype=prepared.dtype, seq_len=seq_len),
        batch_size=config.train.global_batch,
        num_batches=config.train.eval_batches,
        dp_rank=dp_rank,
        dp_size=dp_size,
        eot_id=eot_id,
        batch_maker=batch_maker,
    )
    return DataSources(loader=loader, val_batches=val_batches, prepared=prepared)
