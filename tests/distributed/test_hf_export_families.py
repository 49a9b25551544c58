"""Every family of tests/hf_models: trained a step under a sharded plan on 2 ranks (tp=2 where plait's
tensor parallel has a plan for it, else ZeRO-3; a few families under both), saved with `engine.save`,
exported with `export_hf`, loaded by `AutoModelForCausalLM.from_pretrained`: the logits match the
plait model's within 1e-5 (tp=2 adds float rounding of the split matmuls)."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

import plait
from plait.checkpoint.hf_export import export_hf
from plait.checkpoint.hf_model_export import hf_record
from plait.tensor import gather_vocab_logits, is_vocab_sharded
from tests.distributed.harness import run_ranks
from tests.hf_models import FAMILIES, VOCAB, tiny_model

transformers = pytest.importorskip("transformers")

TP2 = {"dp": 1, "tp": 2}
ZERO3 = {"dp": 2, "zero": 3}
ALWAYS_TP = ("llama", "qwen2", "gpt2")  # families whose tp plan plait has had from the start
CASES = {family: "sharded" for family in FAMILIES}
CASES |= {f"{family}-zero3": "zero3" for family in ("qwen2", "gemma", "gpt2")}  # tied and untied under ZeRO-3


def sharded_plan(family: str) -> dict:
    """tp=2 where plait's tensor parallel has a plan for the family (OPT and Falcon have none yet), else ZeRO-3."""
    from plait.tensor.hf import check_tp

    with torch.device("meta"):
        model = tiny_model(family)
    try:
        check_tp(model, 2)
    except ValueError:
        return ZERO3
    return TP2


def plan_of(case: str) -> dict:
    family = case.removesuffix("-zero3")
    plan = ZERO3 if CASES[case] == "zero3" else sharded_plan(family)
    assert plan == TP2 or family not in ALWAYS_TP or CASES[case] == "zero3"
    return plan


def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))


def train_save_and_score(rank: int, world_size: int, family: str, plan: dict, path: str) -> torch.Tensor:
    model = tiny_model(family)
    engine = plait.boost(
        model,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
        loss_fn=plait.losses.causal_lm,
        plan=plait.Plan(**plan),
    )
    ids = input_ids()
    share = slice(engine.dp_rank * 2, engine.dp_rank * 2 + 4 // engine.dp_size)
    engine.train_step({"input_ids": ids[share], "labels": ids[share]})  # weights move off their init
    engine.save(path, extra=hf_record(model))
    engine.model.eval()
    with torch.no_grad():
        logits = engine.model(input_ids=ids).logits
    return gather_vocab_logits(logits) if is_vocab_sharded(logits) is not None else logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_of_a_sharded_checkpoint_loads_in_transformers(case: str, tmp_path: Path) -> None:
    family = case.removesuffix("-zero3")
    checkpoint = tmp_path / "step-000001"
    tiny_model(family)  # import the family's modeling code once, before the ranks fork
    results = run_ranks(train_save_and_score, 2, family, plan_of(case), str(checkpoint), timeout_s=60)
    assert export_hf(checkpoint, tmp_path / "hf") == transformers.AutoConfig.for_model(family).model_type
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert theirs.dtype == torch.float32
    with torch.no_grad():
        expected = theirs(input_ids=input_ids()).logits
    for logits in results:
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    tied = theirs.config.tie_word_embeddings
    stored = safetensors.torch.load_file(tmp_path / "hf" / "model.safetensors")
    assert ("lm_head.weight" not in stored) == tied  # a tied head is stored once, as its embedding
    head, embedding = theirs.get_output_embeddings().weight, theirs.get_input_embeddings().weight
    assert (head.data_ptr() == embedding.data_ptr()) == tied
