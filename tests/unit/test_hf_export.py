"""Hugging Face export/import: transformers reproduces plait's logits, and weights round-trip exactly."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from plait.checkpoint.hf_config import hf_family
from plait.checkpoint.hf_export import export_hf, import_hf
from plait.checkpoint.io import load_checkpoint, save_checkpoint
from plait.cli import main
from plait.config import Config, DataConfig, ModelConfig, config_from_dict
from plait.data.tokenizer import train_tokenizer
from plait.models.gpt import GPT, GPTConfig
from plait.models.presets import get_preset
from plait.train.setup import model_config_for

transformers = pytest.importorskip("transformers")

# (preset, model overrides, expected family): tied and untied, GQA/MQA, custom widths and eps.
CASES = {
    "gpt2-tied": ("tiny", {}, "gpt2"),
    "gpt2-untied": ("tiny", {"tied_embeddings": False, "d_ff": 96, "norm_eps": 1e-6}, "gpt2"),
    "llama-gqa-untied": ("tiny-llama", {}, "llama"),
    "llama-tied-mha": ("tiny-llama", {"tied_embeddings": True, "num_kv_heads": None, "rope_theta": 5e5}, "llama"),
    "llama-mqa-bias": ("tiny-llama", {"num_kv_heads": 1, "bias": True, "d_ff": 96, "norm_eps": 1e-6}, "llama"),
}
DATA = DataConfig(vocab_size=512, seq_len=64)


def tokenizer_json() -> str:
    return train_tokenizer(["def f(x):\n    return x + 1\n"] * 8, vocab_size=300).to_str()


def save_plait_checkpoint(path: Path, preset: str, overrides: dict[str, object]) -> GPT:
    """A trained-looking plait checkpoint: every weight (norms and biases too) perturbed off its init."""
    config = Config(model=ModelConfig(preset=preset, overrides=overrides), data=DATA)
    torch.manual_seed(0)
    model = GPT(model_config_for(config)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    trainer_state = {"step": 3, "tokenizer": tokenizer_json()}
    save_checkpoint(path, model_state=model.state_dict(), trainer_state=trainer_state, config=config.to_dict())
    return model


def resolved(config: GPTConfig) -> GPTConfig:
    """``config`` with its derived fields written out, as an import writes them."""
    return dataclasses.replace(config, d_ff=config.resolved_d_ff, num_kv_heads=config.resolved_num_kv_heads)


def random_ids(vocab_size: int, *, seq: int = 64) -> torch.Tensor:
    return torch.randint(vocab_size, (2, seq), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[GPT, Path, str]:
    preset, overrides, family = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = save_plait_checkpoint(root / "step-000003", preset, overrides)
    assert export_hf(root / "step-000003", root / "hf") == family
    return model, root / "hf", family


def test_transformers_reproduces_plait_logits(exported: tuple[GPT, Path, str]) -> None:
    model, hf_dir, family = exported
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(theirs).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[family]
    assert theirs.dtype == torch.float32
    tied = model.config.tied_embeddings
    assert ("lm_head.weight" in safetensors.torch.load_file(hf_dir / "model.safetensors")) != tied
    assert (theirs.lm_head.weight.data_ptr() == theirs.get_input_embeddings().weight.data_ptr()) == tied
    ids = random_ids(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids), rtol=0, atol=1e-5)


def test_import_round_trips_weights_exactly(exported: tuple[GPT, Path, str], tmp_path: Path) -> None:
    model, hf_dir, family = exported
    assert import_hf(hf_dir, tmp_path / "imported") == family
    state, trainer_state, raw_config = load_checkpoint(tmp_path / "imported")
    config = model_config_for(config_from_dict(raw_config))
    assert resolved(config) == resolved(model.config)
    original = model.state_dict()
    assert set(state) == set(original)
    for name, tensor in original.items():
        assert torch.equal(state[name], tensor), name
    if model.config.tied_embeddings:
        assert state["lm_head.weight"] is state["embed.weight"]
    assert trainer_state["step"] == 0 and trainer_state["tokenizer"] == tokenizer_json()


def test_exported_tokenizer_loads_in_transformers(exported: tuple[GPT, Path, str]) -> None:
    _, hf_dir, _ = exported
    from tokenizers import Tokenizer

    text = "def f(x):\n    return x ."
    expected = Tokenizer.from_str(tokenizer_json()).encode(text).ids
    for tokenizer in (
        transformers.AutoTokenizer.from_pretrained(hf_dir),
        transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json")),
    ):
        assert tokenizer(text).input_ids == expected
    auto = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert auto.eos_token_id == 0 and auto.decode(expected) == text
    assert json.loads((hf_dir / "config.json").read_text())["eos_token_id"] == 0


def test_generate_samples_from_an_imported_checkpoint(
    exported: tuple[GPT, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, hf_dir, _ = exported
    assert main(["import", str(hf_dir), str(tmp_path / "ckpt")]) == 0
    assert main(["generate", str(tmp_path / "ckpt"), "--prompt", "def", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("def")


def hf_native_model(family: str) -> torch.nn.Module:
    """A tiny model built and initialised by transformers itself, with non-zero biases and norms."""
    if family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=320, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=48, rope_theta=20000.0, tie_word_embeddings=True,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=320, n_positions=48, n_embd=32, n_layer=2, n_head=4)
        model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def save_gpt2_like_openai(model: torch.nn.Module, directory: Path) -> None:
    """OpenAI's GPT-2 files: GPT2Model names (no ``transformer.``), no head, causal-mask buffers."""
    model.save_pretrained(directory)
    tensors = safetensors.torch.load_file(directory / "model.safetensors")
    tensors = {name.removeprefix("transformer."): t for name, t in tensors.items() if name != "lm_head.weight"}
    tensors["h.0.attn.bias"] = torch.ones(1, 1, 48, 48).tril()
    safetensors.torch.save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("layout", ["llama-sharded", "gpt2", "gpt2-openai-names"])
def test_import_of_a_transformers_checkpoint_matches_its_logits(layout: str, tmp_path: Path) -> None:
    family = layout.split("-")[0]
    torch.manual_seed(0)
    theirs = hf_native_model(family)
    if layout == "gpt2-openai-names":
        save_gpt2_like_openai(theirs, tmp_path / "hf")
    else:
        theirs.save_pretrained(tmp_path / "hf", max_shard_size="40KB" if layout == "llama-sharded" else "1GB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() == (layout == "llama-sharded")
    assert import_hf(tmp_path / "hf", tmp_path / "ckpt") == family
    state, trainer_state, raw_config = load_checkpoint(tmp_path / "ckpt")
    assert trainer_state["tokenizer"] is None
    ours = GPT(model_config_for(config_from_dict(raw_config))).eval()
    ours.load_state_dict(state)
    ids = random_ids(320, seq=48)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"position": "rope"}, "position='rope' (GPT-2 learns position embeddings)"),
        ({"bias": False}, "bias=False (every GPT-2 layer has biases)"),
        ({"num_kv_heads": 2}, "num_kv_heads=2"),
        ({"norm": "rmsnorm", "activation": "swiglu"}, "position='learned' (Llama uses rotary positions)"),
    ],
)
def test_options_neither_class_expresses_are_refused(overrides: dict[str, object], named: str) -> None:
    with pytest.raises(ValueError, match="mixes the GPT-2 and Llama families") as info:
        hf_family(dataclasses.replace(get_preset("tiny"), **overrides))
    assert named in str(info.value)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_parallel_block_is_named_as_what_neither_class_expresses(preset: str) -> None:
    config = dataclasses.replace(get_preset(preset), parallel_block=True)
    with pytest.raises(ValueError, match=r"parallel_block=True \(.*\): neither GPT2LMHeadModel nor Llama"):
        hf_family(config)


def cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"plait {argv[0]}: error: ")
    return err


def test_cli_error_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parallel = tmp_path / "step-000003"
    save_plait_checkpoint(parallel, "tiny", {"parallel_block": True})
    assert "parallel_block=True" in cli_error(["export", str(parallel), "--to", "hf", str(tmp_path / "out")], capsys)
    assert not (tmp_path / "out").exists()
    assert "not a plait checkpoint" in cli_error(["export", str(tmp_path / "nope"), "--to", "hf", "x"], capsys)
    assert "not an empty directory" in cli_error(["export", str(parallel), "--to", "hf", str(tmp_path)], capsys)
    assert "not a directory" in cli_error(["import", str(tmp_path / "nope"), str(tmp_path / "c")], capsys)
    assert "has no config.json" in cli_error(["import", str(parallel / ".."), str(tmp_path / "c")], capsys)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert "model_type='bert'" in cli_error(["import", str(bert), str(tmp_path / "c")], capsys)
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    sizes = {"vocab_size": 320, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    llama3 = {"model_type": "llama", "intermediate_size": 80, "rope_parameters": rope, **sizes}
    (scaled / "config.json").write_text(json.dumps(llama3))
    assert "RoPE type 'llama3'" in cli_error(["import", str(scaled), str(tmp_path / "c")], capsys)


def test_cli_export_then_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = save_plait_checkpoint(tmp_path / "step-000003", "tiny-llama", {})
    assert main(["export", str(tmp_path / "step-000003"), "--to", "hf", str(tmp_path / "hf")]) == 0
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    state, _, _ = load_checkpoint(tmp_path / "back")
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())


def test_hf_config_records_sizes(tmp_path: Path) -> None:
    save_plait_checkpoint(tmp_path / "step-000003", "tiny-llama", {"rope_theta": 5e5, "norm_eps": 1e-6})
    export_hf(tmp_path / "step-000003", tmp_path / "hf")
    hf = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    expected: GPTConfig = dataclasses.replace(get_preset("tiny-llama"), vocab_size=512)
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads) == (64, 2, 4)
    assert (hf.num_key_value_heads, hf.intermediate_size) == (2, expected.resolved_d_ff)
    assert (hf.vocab_size, hf.max_position_embeddings, hf.rms_norm_eps) == (512, 64, 1e-6)
    assert hf.rope_parameters["rope_theta"] == 5e5 and hf.tie_word_embeddings is False
    assert hf.hidden_act == "silu" and hf.attention_bias is False and hf.mlp_bias is False
