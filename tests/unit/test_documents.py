"""Packed documents: per-document positions from the loader, attention that stays inside a document."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plait.data import ShardedLoader, TokenDataset, document_positions, eval_batches
from plait.models import build
from plait.models.layers import document_causal_mask

EOT = 0


@pytest.mark.parametrize(
    ("row", "positions"),
    [
        ([5, 9, 0, 7, 0, 3], [0, 1, 2, 0, 1, 0]),
        ([0, 0, 4, 4], [0, 0, 0, 1]),  # a row starting mid-document counts from 0; an empty document
        ([4, 4, 4, 0], [0, 1, 2, 3]),  # the end-of-text token belongs to the document it ends
        ([4, 4, 4, 4], [0, 1, 2, 3]),
    ],
)
def test_positions_restart_after_each_end_of_text(row: list[int], positions: list[int]) -> None:
    assert document_positions(torch.tensor([row]), eot_id=EOT).tolist() == [positions]


def test_the_mask_is_causal_inside_each_document_and_closed_across() -> None:
    positions = document_positions(torch.tensor([[3, 0, 5, 6, 0, 7], [3, 4, 5, 6, 7, 8]]), eot_id=EOT)
    mask = document_causal_mask(positions)[:, 0]
    assert mask.shape == (2, 6, 6)
    assert torch.equal(mask[1], torch.ones(6, 6, dtype=torch.bool).tril())  # one document: plain causal
    for i in range(6):
        for j in range(6):
            same_document = (i < 2) == (j < 2) and (i < 5) == (j < 5)
            assert mask[0, i, j].item() == (j <= i and same_document), (i, j)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])  # learned positions, and rotary + GQA
def test_a_packed_row_computes_each_document_as_if_alone(preset: str) -> None:
    torch.manual_seed(0)
    model = build(preset).eval()
    first, second = torch.randint(3, 200, (1, 7)), torch.randint(3, 200, (1, 9))
    first[0, -1] = EOT
    packed = torch.cat([first, second], dim=1)
    with torch.no_grad():
        together = model(packed, position_ids=document_positions(packed, eot_id=EOT))
        alone = torch.cat([model(first), model(second)], dim=1)
        unmasked = model(packed)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(unmasked[:, 7:], alone[:, 7:], atol=1e-3)  # without the mask, they leak


def test_gradients_flow_only_within_a_document() -> None:
    torch.manual_seed(0)
    model = build("tiny-llama")
    packed = torch.randint(3, 200, (1, 12))
    packed[0, 5] = EOT
    embeddings = model.embed(packed).detach().requires_grad_(True)
    positions = document_positions(packed, eot_id=EOT)
    hidden = embeddings
    for block in model.blocks:
        hidden = block(hidden, position_ids=positions)
    hidden[0, 6:].sum().backward()  # the second document's outputs
    assert embeddings.grad[0, :6].abs().max() == 0 and embeddings.grad[0, 6:].abs().max() > 0


def test_the_loader_adds_document_positions_only_when_asked(tmp_path) -> None:
    path = tmp_path / "tokens.bin"
    tokens = np.array([5, 6, EOT, 7, 8, 9, EOT, 4] * 8, dtype=np.uint16)
    tokens.tofile(path)
    dataset = TokenDataset(path, dtype=np.uint16, seq_len=8)
    plain = ShardedLoader(dataset, global_batch=4, dp_rank=0, dp_size=2, seed=0).next_batch()
    assert set(plain) == {"input_ids", "labels"}
    batch = ShardedLoader(dataset, global_batch=4, dp_rank=0, dp_size=2, seed=0, eot_id=EOT).next_batch()
    assert torch.equal(batch["input_ids"], plain["input_ids"])
    assert torch.equal(batch["position_ids"], document_positions(batch["input_ids"], eot_id=EOT))
    (held_out,) = eval_batches(dataset, batch_size=4, num_batches=1, dp_rank=1, dp_size=2, eot_id=EOT)
    assert held_out["position_ids"].tolist()[0] == [0, 1, 2, 0, 1, 2, 3, 0]


def test_document_mask_is_refused_for_a_transformers_model(tmp_path) -> None:
    from plait.config import load_config

    assert load_config(None, ["data.document_mask=true"]).data.document_mask
    with pytest.raises(ValueError, match=r"data\.document_mask works with plait's models"):
        load_config(None, ["data.document_mask=true", f'model.pretrained="{tmp_path}"'])


def test_verify_hands_its_run_every_section_of_the_config() -> None:
    """`plait verify` re-launches `plait train` with --set arguments; data and model overrides
    given on its command line must reach that run (they once did not: the plan trained on the default corpus)."""
    from plait.cli.verify import sets_for
    from plait.config import load_config

    config = load_config(
        None,
        [
            'data.corpus=["a.py", "b.py"]',
            "data.vocab_size=512",
            "data.document_mask=true",
            "model.preset='tiny-llama'",
            "model.num_layers=3",
            "plan.zero=3",
            "train.lr=0.002",
        ],
    )
    sets = sets_for(config)
    assert load_config(None, sets[1::2]) == config
