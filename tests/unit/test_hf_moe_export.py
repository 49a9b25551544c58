"""plait's MoE GPT exports as MixtralForCausalLM (transformers reproduces its logits) and imports back
exactly; an MoE model Mixtral cannot express is refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from plait.checkpoint.hf_export import import_hf
from plait.checkpoint.io import load_checkpoint
from plait.cli import main
from tests.unit.test_hf_export import cli_error, random_ids, save_plait_checkpoint

transformers = pytest.importorskip("transformers")

CASES = {
    "mixtral-tiny": {},  # top-2 renormalised, SwiGLU, RMSNorm, rotary, GQA, dropless
    # top-1 with a softmax over the top-k logits (weight 1, as Mixtral's renormalised top-1), narrower experts, tied
    "top1-after-tied": {
        "moe_top_k": 1,
        "moe_softmax_order": "after",
        "moe_normalize_topk": False,
        "moe_d_ff": 48,
        "tied_embeddings": True,
    },
}


@pytest.mark.parametrize("case", list(CASES))
def test_moe_gpt_exports_to_mixtral_with_the_same_logits_and_imports_back(case: str, tmp_path: Path) -> None:
    model = save_plait_checkpoint(tmp_path / "step-000003", "mixtral-tiny", CASES[case])
    assert main(["export", str(tmp_path / "step-000003"), "--to", "hf", str(tmp_path / "hf")]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == "MixtralForCausalLM"
    names = safetensors.torch.load_file(tmp_path / "hf" / "model.safetensors")
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names  # Mixtral's checkpoint layout
    ids = random_ids(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids), rtol=0, atol=1e-5)
    assert import_hf(tmp_path / "hf", tmp_path / "back") == "mixtral"
    state, _, _ = load_checkpoint(tmp_path / "back")
    original = model.state_dict()
    assert set(state) == set(original)
    assert all(torch.equal(state[name], tensor) for name, tensor in original.items())


def test_a_switch_style_model_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_plait_checkpoint(tmp_path / "step-000003", "switch-tiny", {})
    err = cli_error(["export", str(tmp_path / "step-000003"), "--to", "hf", str(tmp_path / "hf")], capsys)
    assert "MixtralForCausalLM, which cannot express" in err
    assert "activation='gelu' (Mixtral's experts are SwiGLU)" in err
    assert "moe_capacity_factor=1.25 (Mixtral drops no token)" in err
    assert not (tmp_path / "hf").exists()


def test_unnormalised_top_k_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_plait_checkpoint(tmp_path / "step-000003", "mixtral-tiny", {"moe_normalize_topk": False})
    err = cli_error(["export", str(tmp_path / "step-000003"), "--to", "hf", str(tmp_path / "hf")], capsys)
    assert "moe_normalize_topk=False (Mixtral renormalises the top-k weights to sum to 1)" in err
