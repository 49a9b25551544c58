"""Pipeline p2p on 2 gloo ranks: round trips, one shape header per direction, and two-stage GPT parity."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from plait.losses import causal_lm
from plait.models import build
from plait.pipeline.p2p import StageLink
from plait.pipeline.partition import partition_layers
from plait.pipeline.stage import build_stage, release_unused
from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.timeout(120)

TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def _round_trips(rank: int, world_size: int, shapes: list[tuple[tuple[int, ...], torch.dtype]]) -> dict:
    """Rank 0 sends activations forward, rank 1 sends back 2 * activation as the gradient."""
    link = StageLink(None, 1) if rank == 0 else StageLink(0, None)
    received = []
    for phase, (shape, dtype) in enumerate(shapes):
        for step in range(3):
            if rank == 0:
                link.send_forward(torch.full(shape, 10.0 * phase + step, dtype=dtype))
                received.append(link.recv_backward())
            else:
                activation = link.recv_forward()
                assert activation.requires_grad == activation.is_floating_point()
                received.append(activation.detach().clone())
                link.send_backward(2 * activation.detach())
        link.reset_shapes()
    link.wait_sends()
    return {"headers": link.num_headers_sent, "received": received}


def test_round_trips_negotiate_shapes_once_per_direction() -> None:
    shapes = [((2, 5, 4), torch.float32), ((3, 7), torch.bfloat16), ((1, 2, 3, 4), torch.float64)]
    results = run_ranks(_round_trips, 2, shapes, timeout_s=60)
    assert results[0]["headers"] == results[1]["headers"] == len(shapes)
    for phase, (shape, dtype) in enumerate(shapes):
        for step in range(3):
            forward = results[1]["received"][3 * phase + step]
            backward = results[0]["received"][3 * phase + step]
            assert forward.shape == backward.shape == shape and forward.dtype == backward.dtype == dtype
            assert torch.equal(forward, torch.full(shape, 10.0 * phase + step, dtype=dtype))
            assert torch.equal(backward, 2 * forward)


def _changed_shape_without_reset(rank: int, world_size: int) -> str:
    link = StageLink(None, 1) if rank == 0 else StageLink(0, None)
    if rank == 1:
        link.recv_forward()
        return ""
    link.send_forward(torch.zeros(2, 3))
    link.wait_sends()
    try:
        link.send_forward(torch.zeros(4, 3))
    except ValueError as error:
        return str(error)
    return "no error"


def test_changed_shape_without_reset_is_a_clear_error() -> None:
    assert "reset_shapes" in run_ranks(_changed_shape_without_reset, 2, timeout_s=60)[0]


def _reference(ids: torch.Tensor) -> dict:
    torch.manual_seed(0)
    model = build("tiny", num_layers=4)
    loss_sum, num_tokens = causal_lm(model(ids), {"labels": ids})
    (loss_sum / num_tokens).backward()
    grads = {name: param.grad for name, param in model.named_parameters(remove_duplicate=False)}
    return {"loss": (loss_sum / num_tokens).detach(), "grads": grads}


def _two_stage_step(rank: int, world_size: int, ids: torch.Tensor) -> dict:
    torch.manual_seed(0)
    model = build("tiny", num_layers=4)
    ranges = partition_layers(model, pp=2, seq_len=ids.shape[1])
    stage = build_stage(model, stage_index=rank, num_stages=2, layer_ranges=ranges)
    release_unused(model, [stage])
    link = StageLink(None, 1) if rank == 0 else StageLink(0, None)
    result = {}
    for micro_ids in ids.chunk(2):  # two micro-batches accumulate, GPipe order
        if rank == 0:
            output = stage(micro_ids)
            link.send_forward(output)
            output.backward(link.recv_backward())
        else:
            hidden = link.recv_forward()
            loss_sum, _ = causal_lm(stage(hidden), {"labels": micro_ids})
            num_tokens = (ids.shape[1] - 1) * ids.shape[0]
            (loss_sum / num_tokens).backward()
            result["loss"] = result.get("loss", 0.0) + (loss_sum / num_tokens).detach()
            link.send_backward(hidden.grad)
    link.wait_sends()
    _sum_tied_grads(stage, rank)
    return result | {"grads": {name: param.grad for name, param in stage.named_parameters()}}


def _sum_tied_grads(stage: torch.nn.Module, rank: int) -> None:
    for first_name, last_name in stage.tied_pairs:
        dist.all_reduce(stage.get_parameter(first_name if rank == 0 else last_name).grad)


def test_two_stage_gpt_matches_one_process() -> None:
    ids = torch.randint(512, (4, 16), generator=torch.Generator().manual_seed(1))
    reference = _reference(ids)
    results = run_ranks(_two_stage_step, 2, ids, timeout_s=90)
    torch.testing.assert_close(results[1]["loss"], reference["loss"], **TOLERANCE)
    merged = results[0]["grads"] | results[1]["grads"]
    assert set(merged) == set(reference["grads"])
    assert not set(results[0]["grads"]) & set(results[1]["grads"])
    for name, grad in merged.items():
        torch.testing.assert_close(grad, reference["grads"][name], **TOLERANCE, msg=lambda m, name=name: f"{name}: {m}")
