"""Export of Hugging Face models' checkpoints (HF names) for every family, saved by one process:
transformers loads the directory with the same logits; a checkpoint without its config says how to
give one; the tokenizer travels along."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from plait.checkpoint.hf_export import export_hf
from plait.checkpoint.hf_model_export import hf_record
from plait.checkpoint.io import save_checkpoint
from plait.cli import main
from tests.hf_models import FAMILIES, VOCAB, tiny_model

transformers = pytest.importorskip("transformers")


def perturbed(family: str) -> torch.nn.Module:
    """A tiny model with every weight moved off its init (norms and biases too)."""
    model = tiny_model(family).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def save(path: Path, model: torch.nn.Module, **extra: object) -> Path:
    save_checkpoint(path, model_state=model.state_dict(), trainer_state={"step": 1, **extra}, config={})
    return path


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exports_and_reloads_with_the_same_logits(family: str, tmp_path: Path) -> None:
    model = perturbed(family)
    checkpoint = save(tmp_path / "step-000001", model, **hf_record(model))
    assert export_hf(checkpoint, tmp_path / "hf") == model.config.model_type
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs) is type(model) and theirs.dtype == torch.float32
    torch.testing.assert_close(logits(theirs), logits(model), rtol=0, atol=1e-5)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [type(model).__name__] and config["dtype"] == "float32"


def test_a_checkpoint_without_its_config_names_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = perturbed("qwen2")
    checkpoint = save(tmp_path / "step-000001", model)  # engine.save without hf_record writes no config
    model.config.save_pretrained(tmp_path / "source")
    assert main(["export", str(checkpoint), "--to", "hf", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "not its config" in err and "--config" in err and len(err.strip().splitlines()) == 1
    assert (
        main(["export", str(checkpoint), "--to", "hf", str(tmp_path / "b"), "--config", str(tmp_path / "source")]) == 0
    )
    assert "Qwen2ForCausalLM" in capsys.readouterr().out
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b").eval()
    torch.testing.assert_close(logits(theirs), logits(model), rtol=0, atol=1e-5)


def test_a_config_that_does_not_fit_the_weights_is_refused(tmp_path: Path) -> None:
    model = perturbed("qwen2")
    checkpoint = save(tmp_path / "step-000001", model)
    wider = model.config.to_dict() | {"hidden_size": 64}
    with pytest.raises(ValueError, match=r"has shape .* but the config implies"):
        export_hf(checkpoint, tmp_path / "hf", hf_config=wider)
    with pytest.raises(ValueError, match=r"do not fit LlamaForCausalLM: missing none, unexpected .*q_proj\.bias"):
        export_hf(checkpoint, tmp_path / "hf", hf_config=tiny_model("llama").config.to_dict())
    assert not (tmp_path / "hf").exists()


def test_the_tokenizer_is_exported_with_the_model(tmp_path: Path, small_corpus: list[str]) -> None:
    from tests.pretrained_dirs import save_tokenizer

    tokenizer = save_tokenizer(tmp_path / "tokenizer", small_corpus[:4])
    model = perturbed("llama")
    checkpoint = save(tmp_path / "step-000001", model, **hf_record(model, tokenizer=tmp_path / "tokenizer"))
    export_hf(checkpoint, tmp_path / "hf")
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "def f(x):\n    return x + 1\n"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.eos_token == tokenizer.eos_token
