"""Packed documents under context parallel: each cp rank's logits of a packed row equal those of
its documents run alone, one at a time, in one process."""

from __future__ import annotations

import torch

import plait
from plait.context.apply import apply_context_parallel
from plait.data import document_positions
from plait.distributed.mesh import Mesh
from plait.models import build
from tests.distributed.harness import run_ranks

EOT = 0
LENGTHS = (7, 12, 5)  # three documents in one row of 24 tokens: boundaries fall inside cp chunks


def packed_row() -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    documents = [torch.randint(3, 200, (1, n), generator=gen) for n in LENGTHS]
    for document in documents[:-1]:
        document[0, -1] = EOT
    return torch.cat(documents, dim=1), documents


def logits_alone() -> torch.Tensor:
    torch.manual_seed(0)
    model = build("tiny-llama").eval()
    _, documents = packed_row()
    with torch.no_grad():
        return torch.cat([model(document) for document in documents], dim=1)


def rank_logits(rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = build("tiny-llama").eval()
    context = apply_context_parallel(model, mesh=Mesh(plait.Plan(cp=world_size)))
    packed, _ = packed_row()
    batch = {"input_ids": packed, "labels": packed, "position_ids": document_positions(packed, eot_id=EOT)}
    shard = context.shard(batch)
    with torch.no_grad():
        logits = model(shard["input_ids"], position_ids=shard["position_ids"])
    return logits, shard["input_ids"]


def test_a_packed_row_under_cp2_computes_each_document_as_if_alone() -> None:
    alone = logits_alone()
    packed, _ = packed_row()
    results = run_ranks(rank_logits, 2)
    seen = torch.zeros(packed.shape[1], dtype=torch.bool)
    for rank, (logits, input_ids) in enumerate(results):
        chunk = packed.shape[1] // 4
        index = torch.cat(
            [torch.arange(rank * chunk, (rank + 1) * chunk), torch.arange((3 - rank) * chunk, (4 - rank) * chunk)]
        )
        assert torch.equal(input_ids, packed[:, index])  # the load-balanced layout: chunks r and 2cp-1-r
        torch.testing.assert_close(logits, alone[:, index], rtol=1e-5, atol=1e-6)
        seen[index] = True
    assert seen.all()
