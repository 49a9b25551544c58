"""plait's MoE GPT exports as MixtralForCausalLM (transformers reproduces its logits) and imports back
exactly; an MoE model Mixtral cannot express is refused in one line; an HF MoE model's checkpoint
(its blocks swapped for plait MoELayers or not) exports as its own class."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import safetensors.torch
import torch

from plait.checkpoint.hf_export import HF_MODEL_FILE, export_hf, import_hf
from plait.checkpoint.hf_model_export import hf_record
from plait.checkpoint.io import load_checkpoint, save_checkpoint
from plait.cli import main
from plait.config import config_from_dict
from plait.models.gpt import GPT
from plait.models.hf_moe import use_plait_moe
from plait.moe import has_moe
from plait.train.setup import model_config_for
from tests.hf_models import VOCAB, tiny_model
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


@pytest.mark.parametrize("swapped", [False, True], ids=["hf-blocks", "plait-moe-layers"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_hf_moe_checkpoint_exports_as_its_own_class(family: str, swapped: bool, tmp_path: Path) -> None:
    """A checkpoint of an HF MoE model, trained as it is or with plait MoELayers swapped in, exports as itself."""
    hf = tiny_model(family)
    trained = copy.deepcopy(hf)
    if swapped:
        use_plait_moe(trained)
    with torch.no_grad():
        for param in trained.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    trainer_state = {"step": 1, **hf_record(trained)}
    save_checkpoint(tmp_path / "ckpt", model_state=trained.state_dict(), trainer_state=trainer_state, config={})
    assert export_hf(tmp_path / "ckpt", tmp_path / "hf") == family
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert not has_moe(theirs)
    ids = random_ids(VOCAB, seq=12)
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, trained.eval()(ids).logits, rtol=0, atol=1e-5)


def mixtral_native() -> torch.nn.Module:
    """A tiny Mixtral built and initialised by transformers, every weight moved off its init."""
    config = transformers.MixtralConfig(
        vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=48, num_local_experts=4, num_experts_per_tok=2,
        rope_theta=20000.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


@pytest.mark.parametrize("layout", ["save_pretrained", "plait-export"])
def test_import_of_a_transformers_mixtral_matches_its_logits(layout: str, tmp_path: Path) -> None:
    """Mixtral's per-expert files (save_pretrained), or transformers 5's stacked names (plait's export of an
    HF Mixtral checkpoint), import into plait's MoE GPT."""
    theirs = mixtral_native()
    if layout == "save_pretrained":
        theirs.save_pretrained(tmp_path / "hf")
    else:
        trainer_state = {"step": 1, **hf_record(theirs)}
        save_checkpoint(tmp_path / "ckpt", model_state=theirs.state_dict(), trainer_state=trainer_state, config={})
        export_hf(tmp_path / "ckpt", tmp_path / "hf")
    stacked = "model.layers.0.mlp.experts.gate_up_proj" in safetensors.torch.load_file(tmp_path / "hf" / HF_MODEL_FILE)
    assert stacked == (layout == "plait-export")
    assert import_hf(tmp_path / "hf", tmp_path / "imported") == "mixtral"
    state, _, raw_config = load_checkpoint(tmp_path / "imported")
    ours = GPT(model_config_for(config_from_dict(raw_config))).eval()
    ours.load_state_dict(state)
    ids = random_ids(320, seq=48)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=0, atol=1e-5)
