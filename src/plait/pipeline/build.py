"""Split a model into this rank's pipeline chunks and set up what runs and syncs them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from plait.distributed.mesh import Mesh
from plait.distributed.placement import Placement, placement_of, set_placement
from plait.pipeline.partition import decoder_layout, partition_layers, ranges_from_split_points
from plait.pipeline.runtime import PipelineRunner, tied_groups
from plait.pipeline.stage import PipelineStage, build_stage_chunks, release_unused


@dataclass
class Pipeline:
    module: nn.Module  # this rank's chunks under the model's own parameter names
    runner: PipelineRunner
    tied_params: list[nn.Parameter]  # this rank's side of each tied pair (first-stage embedding, last-stage copy)
    tied_group: dist.ProcessGroup | None


def merge_modules(modules: list[nn.Module]) -> nn.Module:
    """One module whose tree is the union of `modules`' trees (shared submodules appear once)."""
    root = nn.Module()
    for module in modules:
        _merge_into(root, module)
    return root


def _merge_into(dst: nn.Module, src: nn.Module) -> None:
    for name, child in src.named_children():
        existing = dict(dst.named_children()).get(name)
        if existing is child:
            continue
        if type(child) is nn.Module:  # a plain container the stage grafted: merge, never share it
            if existing is None:
                existing = nn.Module()
                dst.add_module(name, existing)
            _merge_into(existing, child)
        else:
            dst.add_module(name, child)


def _mark_stage_params(chunks: list[PipelineStage], module: nn.Module) -> None:
    """Every parameter is held by one pipeline rank; the last stage's tied copy is a duplicate."""
    copies = {last: first for chunk in chunks for first, last in chunk.tied_pairs if chunk.spec.is_last}
    for name, param in module.named_parameters():
        base = placement_of(param) or Placement(name=name, global_shape=tuple(param.shape))
        set_placement(param, dataclasses.replace(base, stage_axes=("pp",), tied_to=copies.get(name, "")))


def _layer_ranges(model: nn.Module, mesh: Mesh) -> list[range]:
    plan = mesh.plan
    num_layers = len(model.get_submodule(decoder_layout(model).layers))
    if plan.pp_split:
        return ranges_from_split_points(plan.pp_split, num_layers=num_layers, num_stages=plan.pp * plan.pp_chunks)
    seq_len = getattr(getattr(model, "config", None), "max_seq_len", 1024)
    return partition_layers(model, pp=plan.pp, seq_len=seq_len, num_chunks=plan.pp_chunks)


def build_pipeline(model: nn.Module, *, mesh: Mesh, device: torch.device) -> Pipeline:
    """This rank's chunks (the rest of the model's weights released), its runner and tied-weight group."""
    plan = mesh.plan
    rank = mesh.rank("pp")
    chunks = build_stage_chunks(
        model, rank=rank, num_ranks=plan.pp, num_chunks=plan.pp_chunks, ranges=_layer_ranges(model, mesh)
    )
    release_unused(model, chunks)
    module = merge_modules(chunks)
    _mark_stage_params(chunks, module)
    pp_ranks = dist.get_process_group_ranks(mesh.group("pp"))
    runner = PipelineRunner(
        chunks,
        schedule_name=plan.pp_schedule,
        pp_ranks=pp_ranks,
        pp_rank=rank,
        device=device,
    )
    groups = tied_groups(mesh.device_mesh.mesh) if chunks[0].tied_pairs else []
    mine = [g for g in groups if g is not None and dist.get_rank() in dist.get_process_group_ranks(g)]
    tied = _tied_params(chunks, module)
    return Pipeline(module=module, runner=runner, tied_params=tied, tied_group=mine[0] if mine and tied else None)


def _tied_params(chunks: list[PipelineStage], module: nn.Module) -> list[nn.Parameter]:
    names = []
    for chunk in chunks:
        for first, last in chunk.tied_pairs:
            names.append(first if chunk.spec.is_first else last if chunk.spec.is_last else None)
    params = dict(module.named_parameters())
    return [params[name] for name in dict.fromkeys(n for n in names if n)]
