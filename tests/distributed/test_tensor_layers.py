"""Tensor-parallel layers reproduce their dense module: outputs, input grads and weight-grad slices."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from plait.distributed.placement import Placement, placement_of
from plait.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelHead,
    allreduce_partial_grads,
    gather_vocab_logits,
    mark_sequence_parallel,
)
from tests.distributed.harness import run_ranks

TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
BATCH, SEQ, HIDDEN = 2, 8, 16
CASES = [(2, False), (2, True), (4, False), (4, True)]


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert_close(actual, expected, **TOLERANCE, msg=lambda message: f"{what}: {message}")


def _run(
    module: nn.Module, x: torch.Tensor, grad_out_of: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward, then backward with the upstream gradient grad_out_of(output); returns (output, input grad)."""
    x = x.clone().requires_grad_(x.is_floating_point())
    out = module(x)
    out.backward(grad_out_of(out))
    return out.detach(), x.grad


def _dense(module: nn.Module, x: torch.Tensor, *, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dense module's output, upstream gradient and input gradient."""
    torch.manual_seed(seed)
    grads = {}

    def draw(out: torch.Tensor) -> torch.Tensor:
        grads["out"] = torch.randn_like(out)
        return grads["out"]

    out, x_grad = _run(module, x, draw)
    return out, grads["out"], x_grad


def _own_columns(segments: list[int], rank: int, size: int) -> torch.Tensor:
    """Indices of this rank's features: its contiguous slice of every segment, in order."""
    pieces, offset = [], 0
    for segment in segments:
        width = segment // size
        pieces.append(torch.arange(offset + rank * width, offset + (rank + 1) * width))
        offset += segment
    return torch.cat(pieces)


def _seq_chunk(t: torch.Tensor, rank: int, size: int, sp: bool) -> torch.Tensor:
    return t.chunk(size, dim=1)[rank] if sp else t


def _check_column(dense: nn.Module, parallel: ColumnParallelLinear, *, segments: list[int], out_dim: int) -> None:
    rank, size, sp = dist.get_rank(), dist.get_world_size(), parallel.sequence_parallel
    x = torch.randn(BATCH, SEQ, parallel.in_features)
    out, grad_out, x_grad = _dense(dense, x, seed=1)
    cols = _own_columns(segments, rank, size)
    local_out = out if parallel.gather_output else out[..., cols]
    local_grad = grad_out if parallel.gather_output else grad_out[..., cols]
    got, got_x_grad = _run(parallel, _seq_chunk(x, rank, size, sp), lambda _: local_grad)
    _close(got, local_out, "column output")
    _close(got_x_grad, _seq_chunk(x_grad, rank, size, sp), "column input grad")
    _close(parallel.weight.grad, dense.weight.grad.index_select(out_dim, cols), "column weight grad")
    _close(parallel.bias.grad, dense.bias.grad[cols], "column bias grad")
    assert placement_of(parallel.weight).dim_shards == (("tp", out_dim),)
    assert placement_of(parallel.bias).global_shape == tuple(dense.bias.shape)


def _check_row(dense: nn.Module, parallel: RowParallelLinear, *, in_dim: int) -> None:
    rank, size, sp = dist.get_rank(), dist.get_world_size(), parallel.sequence_parallel
    x = torch.randn(BATCH, SEQ, parallel.in_features * size)
    out, grad_out, x_grad = _dense(dense, x, seed=2)
    cols = torch.arange(rank * parallel.in_features, (rank + 1) * parallel.in_features)
    got, got_x_grad = _run(parallel, x[..., cols], lambda _: _seq_chunk(grad_out, rank, size, sp))
    _close(got, _seq_chunk(out, rank, size, sp), "row output")
    _close(got_x_grad, x_grad[..., cols], "row input grad")
    _close(parallel.weight.grad, dense.weight.grad.index_select(in_dim, cols), "row weight grad")
    allreduce_partial_grads(parallel.parameters(), group=dist.group.WORLD)
    _close(parallel.bias.grad, dense.bias.grad, "row bias grad (after the partial-grad sum)")
    bias_record = placement_of(parallel.bias)
    assert (bias_record.partial_grad_axes if bias_record else ()) == (("tp",) if sp else ())


def _check_sp_norm() -> None:
    rank, size = dist.get_rank(), dist.get_world_size()
    dense = nn.LayerNorm(HIDDEN)
    with torch.no_grad():
        dense.weight.uniform_(0.5, 1.5)
        dense.bias.uniform_(-0.5, 0.5)
    norm = copy.deepcopy(dense)
    mark_sequence_parallel(norm, name_prefix="blocks.0.norm1")
    x = torch.randn(BATCH, SEQ, HIDDEN)
    out, grad_out, x_grad = _dense(dense, x, seed=3)
    got, got_x_grad = _run(norm, _seq_chunk(x, rank, size, True), lambda _: _seq_chunk(grad_out, rank, size, True))
    _close(got, _seq_chunk(out, rank, size, True), "sp norm output")
    _close(got_x_grad, _seq_chunk(x_grad, rank, size, True), "sp norm input grad")
    allreduce_partial_grads(norm.parameters(), group=dist.group.WORLD)
    _close(norm.weight.grad, dense.weight.grad, "sp norm weight grad (summed over tp)")
    _close(norm.bias.grad, dense.bias.grad, "sp norm bias grad (summed over tp)")
    assert placement_of(norm.weight) == Placement("blocks.0.norm1.weight", (HIDDEN,), partial_grad_axes=("tp",))


def _linear_layers(rank: int, world_size: int, sp: bool) -> None:
    group = dist.group.WORLD
    torch.manual_seed(0)
    up = nn.Linear(HIDDEN, 24)
    _check_column(
        up, ColumnParallelLinear.from_dense(up, group=group, name="up", sequence_parallel=sp), segments=[24], out_dim=0
    )
    assert placement_of(ColumnParallelLinear.from_dense(up, group=group, name="mlp.up").weight).name == "mlp.up.weight"
    qkv = nn.Linear(32, 128)  # GQA-like: q 64, k 32, v 32
    fused = ColumnParallelLinear.from_dense(qkv, group=group, name="qkv", sequence_parallel=sp, partition=[64, 32, 32])
    assert fused.local_partition == (64 // world_size, 32 // world_size, 32 // world_size)
    _check_column(qkv, fused, segments=[64, 32, 32], out_dim=0)
    qkv.zero_grad()
    gathered = ColumnParallelLinear.from_dense(
        qkv, group=group, name="qkv", sequence_parallel=sp, gather_output=True, partition=[64, 32, 32]
    )
    _check_column(qkv, gathered, segments=[64, 32, 32], out_dim=0)
    down = nn.Linear(24, HIDDEN)
    _check_row(down, RowParallelLinear.from_dense(down, group=group, name="down", sequence_parallel=sp), in_dim=1)
    if sp:
        _check_sp_norm()
        row = RowParallelLinear.from_dense(down, group=group, name="down", sequence_parallel=True)
        with pytest.raises(ValueError, match="not divisible by"):
            row(torch.randn(BATCH, 7, 24 // world_size))  # seq 7 cannot be split over tp


def _conv1d_layers(rank: int, world_size: int, sp: bool) -> None:
    from transformers.pytorch_utils import Conv1D

    group = dist.group.WORLD
    torch.manual_seed(0)
    c_attn, c_proj = Conv1D(3 * HIDDEN, HIDDEN), Conv1D(HIDDEN, HIDDEN)
    with torch.no_grad():  # Conv1D starts with zero bias; make the bias check meaningful
        c_attn.bias.normal_()
        c_proj.bias.normal_()
    column = ColumnParallelLinear.from_dense(
        c_attn, group=group, name="h.0.attn.c_attn", sequence_parallel=sp, partition=[HIDDEN] * 3
    )
    _check_column(c_attn, column, segments=[HIDDEN] * 3, out_dim=1)
    assert placement_of(column.weight).global_shape == (HIDDEN, 3 * HIDDEN)
    row = RowParallelLinear.from_dense(c_proj, group=group, name="h.0.attn.c_proj", sequence_parallel=sp)
    _check_row(c_proj, row, in_dim=0)


@pytest.mark.parametrize(("world_size", "sp"), CASES)
def test_linear_layers_match_dense(world_size: int, sp: bool) -> None:
    run_ranks(_linear_layers, world_size, sp, timeout_s=60)


@pytest.mark.parametrize(("world_size", "sp"), [(2, True), (4, False)])
def test_conv1d_layers_match_dense(world_size: int, sp: bool) -> None:
    pytest.importorskip("transformers.pytorch_utils")
    run_ranks(_conv1d_layers, world_size, sp, timeout_s=60)


VOCAB = 37  # not a multiple of 2 or 4: the last shard is padded


def _vocab_rows(rank: int, size: int) -> slice:
    per_rank = -(-VOCAB // size)
    return slice(rank * per_rank, min((rank + 1) * per_rank, VOCAB))


def _every_id() -> torch.Tensor:
    """(5, 8) ids that use every row of the vocabulary, so every shard is looked up."""
    return (torch.randperm(40) % VOCAB).view(5, 8)


def _check_embedding(sp: bool) -> None:
    rank, size, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    dense = nn.Embedding(VOCAB, HIDDEN, padding_idx=1)
    parallel = VocabParallelEmbedding.from_dense(dense, group=group, name="embed", sequence_parallel=sp)
    ids = _every_id()
    out, grad_out, _ = _dense(dense, ids, seed=4)
    got, _ = _run(parallel, ids, lambda _: _seq_chunk(grad_out, rank, size, sp))
    _close(got, _seq_chunk(out, rank, size, sp), "embedding output")
    rows = _vocab_rows(rank, size)
    num_valid = rows.stop - rows.start
    _close(parallel.weight.grad[:num_valid], dense.weight.grad[rows], "embedding weight grad")
    assert not parallel.weight.grad[num_valid:].any(), "padding rows got a gradient"
    assert placement_of(parallel.weight) == Placement("embed.weight", (VOCAB, HIDDEN), dim_shards=(("tp", 0),))


def _check_head(sp: bool) -> None:
    rank, size, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    dense = nn.Linear(HIDDEN, VOCAB)
    parallel = VocabParallelHead.from_dense(dense, group=group, name="lm_head", sequence_parallel=sp)
    x = torch.randn(BATCH, SEQ, HIDDEN)
    out, grad_out, x_grad = _dense(dense, x, seed=5)
    rows = _vocab_rows(rank, size)
    logits = parallel(_seq_chunk(x, rank, size, sp))
    shard = logits.vocab_shard
    assert (shard.start, shard.full_size, shard.group) == (rows.start, VOCAB, group)
    _close(logits, out[..., rows], "head local logits")
    _close(gather_vocab_logits(logits), out, "head gathered logits")
    x_local = _seq_chunk(x, rank, size, sp).clone().requires_grad_()
    parallel(x_local).backward(grad_out[..., rows])
    _close(x_local.grad, _seq_chunk(x_grad, rank, size, sp), "head input grad")
    num_valid = rows.stop - rows.start
    _close(parallel.weight.grad[:num_valid], dense.weight.grad[rows], "head weight grad")
    _close(parallel.bias.grad[:num_valid], dense.bias.grad[rows], "head bias grad")


class _TiedDense(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.linear(self.embed(ids), self.embed.weight)


def _check_tied_head(sp: bool) -> None:
    rank, size, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    dense = _TiedDense()
    embed = VocabParallelEmbedding.from_dense(dense.embed, group=group, name="embed", sequence_parallel=sp)
    head = VocabParallelHead.tied_to(embed, sequence_parallel=sp)
    assert head.weight is embed.weight
    assert len(list(nn.ModuleList([embed, head]).parameters())) == 1
    ids = _every_id()
    out, grad_out, _ = _dense(dense, ids, seed=6)
    rows = _vocab_rows(rank, size)
    got, _ = _run(nn.Sequential(embed, head), ids, lambda _: grad_out[..., rows])
    _close(got, out[..., rows], "tied head logits")
    num_valid = rows.stop - rows.start
    _close(embed.weight.grad[:num_valid], dense.embed.weight.grad[rows], "tied weight grad (embedding + head)")


def _vocab_layers(rank: int, world_size: int, sp: bool) -> None:
    torch.manual_seed(0)
    _check_embedding(sp)
    _check_head(sp)
    _check_tied_head(sp)


@pytest.mark.parametrize(("world_size", "sp"), CASES)
def test_vocab_layers_match_dense(world_size: int, sp: bool) -> None:
    run_ranks(_vocab_layers, world_size, sp, timeout_s=60)


def _count_entries(rank: int, world_size: int, num_layers: int, sp: bool) -> dict[str, int]:
    """Collectives that enter the tp region in one forward and backward of tiny-llama (swiglu: q, k, v
    share one entry and gate, up another)."""
    import plait.tensor.comm as comm
    from plait.models import build
    from plait.tensor.apply import apply_tensor_parallel

    torch.manual_seed(0)
    model = build("tiny-llama", num_layers=num_layers, max_seq_len=SEQ)
    apply_tensor_parallel(model, model.tp_plan(), group=dist.group.WORLD, sequence_parallel=sp)
    calls = {"gather_sequence": 0, "copy_to_tp": 0}
    originals = {name: getattr(comm, name) for name in calls}

    def counting(name: str) -> Callable[..., torch.Tensor]:
        def wrapped(*args: object, **kwargs: object) -> torch.Tensor:
            calls[name] += 1
            return originals[name](*args, **kwargs)

        return wrapped

    for name in calls:
        setattr(comm, name, counting(name))
    try:
        ids = torch.randint(0, 64, (BATCH, SEQ))
        model(ids).float().pow(2).mean().backward()
    finally:
        for name, original in originals.items():
            setattr(comm, name, original)
    return calls


@pytest.mark.parametrize("sp", [False, True])
def test_layers_fed_one_tensor_enter_the_tp_region_once(sp: bool) -> None:
    two, four = (run_ranks(_count_entries, 2, layers, sp)[0] for layers in (2, 4))
    entered = "gather_sequence" if sp else "copy_to_tp"
    assert four[entered] - two[entered] == 2 * 2  # per layer: one for q, k, v and one for gate, up (was 5)
