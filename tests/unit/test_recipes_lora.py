"""LoRA through peft: the trainable fraction, refusals, the merged export and the adapter-only save."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import plait
from plait.checkpoint.hf_export import export_hf
from plait.checkpoint.io import save_checkpoint
from plait.checkpoint.lora_merge import merge_lora
from plait.config import Config, DataConfig, ModelConfig
from plait.data.tokenizer import train_tokenizer
from plait.recipes.cli import preflight
from plait.recipes.config import finetune_config_from_dict
from plait.recipes.lora import LoraSettings, add_lora, lora_record, save_adapter, trainable_fraction
from plait.recipes.quantize import Int8Linear
from plait.tensor.apply import Context, Style
from plait.tensor.lora import shard_lora_layer
from plait.train.generate import load_for_inference
from plait.train.setup import model_config_for

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def randomise_adapters(model: torch.nn.Module, seed: int = 5) -> None:
    """peft starts lora_B at zero (the adapter a no-op); a random B makes the adapter matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def test_rank8_on_q_and_v_of_the_demo_model_trains_under_one_percent() -> None:
    model = add_lora(plait.models.build("gpt-10m"), LoraSettings(rank=8, target_modules=("q_proj", "v_proj")))
    trainable, total = trainable_fraction(model)
    config = model.config
    assert trainable == config.num_layers * 2 * 8 * (config.d_model + config.d_model)
    assert trainable / total <= 0.01
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert all(".lora_" not in name for name in frozen) and "embed.weight" in frozen


def test_default_targets_are_the_projections_the_model_has() -> None:
    model = add_lora(plait.models.build("tiny"), LoraSettings(rank=2))
    wrapped = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}


def test_targets_that_match_nothing_are_refused_naming_them_and_real_names() -> None:
    with pytest.raises(ValueError, match=r"\['c_attn'\] match no linear layer of GPT.*blocks\.0\.attn\.q_proj"):
        add_lora(plait.models.build("tiny"), LoraSettings(target_modules=("q_proj", "c_attn")))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "lora.rank=0"),
        ({"alpha": 0.0}, "lora.alpha"),
        ({"dropout": 1.0}, "lora.dropout"),
        ({"target_modules": ()}, "lora.target_modules"),
        ({"quantize": "nf4"}, "lora.quantize='nf4'"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoraSettings(**kwargs)


def test_a_quantized_base_is_refused_under_tp() -> None:
    model = add_lora(plait.models.build("tiny"), LoraSettings(rank=2, quantize="int8"))
    layer = model.blocks[0].attn.q_proj
    ctx = Context(group=None, tp=2, sequence_parallel=False)
    with pytest.raises(ValueError, match=r"low-bit form .* set plan\.tp=1"):
        shard_lora_layer(layer, "blocks.0.attn.q_proj", style=Style("colwise"), ctx=ctx, build=lambda *a: a[0])


def test_lora_dropout_is_refused_under_tp() -> None:
    model = add_lora(plait.models.build("tiny"), LoraSettings(rank=2, dropout=0.1))
    ctx = Context(group=None, tp=2, sequence_parallel=False)
    with pytest.raises(ValueError, match=r"LoRA dropout under plan\.tp > 1 .* set lora\.dropout=0"):
        shard_lora_layer(model.blocks[0].attn.q_proj, "q", style=Style("colwise"), ctx=ctx, build=lambda *a: a[0])


def test_int8_base_is_close_to_fp32_and_a_quarter_of_the_bytes() -> None:
    linear = torch.nn.Linear(64, 32)
    quantized = Int8Linear(linear)
    x = torch.randn(4, 64)
    assert quantized.weight.dtype == torch.int8
    assert quantized.weight.element_size() * 4 == linear.weight.element_size()
    torch.testing.assert_close(quantized(x), linear(x), rtol=0, atol=0.02)


DOWN = {"tiny": "transformer.h.0.mlp.c_proj", "tiny-llama": "model.layers.0.mlp.down_proj"}


def lora_checkpoint(path: Path, preset: str, settings: LoraSettings) -> torch.nn.Module:
    config = Config(model=ModelConfig(preset=preset), data=DataConfig(vocab_size=512, seq_len=32))
    torch.manual_seed(0)
    model = add_lora(plait.models.build(model_config_for(config)), settings).eval()
    randomise_adapters(model)
    tokenizer = train_tokenizer(["def f(x):\n    return x + 1\n"] * 8, vocab_size=300).to_str()
    trainer_state = {"step": 1, "tokenizer": tokenizer, **lora_record(settings, model)}
    save_checkpoint(path, model_state=model.state_dict(), trainer_state=trainer_state, config=config.to_dict())
    return model


@pytest.mark.parametrize(("preset", "quantize"), [("tiny", None), ("tiny-llama", None), ("tiny-llama", "int8")])
def test_merged_export_and_plait_inference_give_the_adapted_logits(
    preset: str, quantize: str | None, tmp_path: Path
) -> None:
    targets = ["q_proj", "v_proj", "down_proj"] if quantize else None  # int8: layers without adapters too
    settings = LoraSettings(rank=4, alpha=8.0, target_modules=targets, quantize=quantize)
    model = lora_checkpoint(tmp_path / "ckpt", preset, settings)
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(512, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids), rtol=0, atol=1e-5)
        base = model.blocks[0].mlp.down_proj.base_layer
        base_weight = base.dequantized() if quantize else base.weight
        inference, _ = load_for_inference(tmp_path / "ckpt")  # plait generate/eval read it merged
        torch.testing.assert_close(inference(ids), model(ids), rtol=0, atol=1e-5)
        merged = theirs.get_submodule(DOWN[preset]).weight
        merged = merged.T if merged.shape != base_weight.shape else merged  # GPT-2's Conv1D is (in, out)
        assert (merged - base_weight).abs().max() > 1e-3  # the adapter is in the export


def test_adapters_save_alone_in_peft_format_and_load_back(tmp_path: Path) -> None:
    settings = LoraSettings(rank=4)
    model = add_lora(plait.models.build("tiny"), settings)
    randomise_adapters(model)
    save_adapter(model.state_dict(), settings, tmp_path / "adapter")
    assert peft.LoraConfig.from_pretrained(str(tmp_path / "adapter")).r == 4
    fresh = add_lora(plait.models.build("tiny"), settings)
    loaded = peft.utils.load_peft_weights(str(tmp_path / "adapter"))
    peft.set_peft_model_state_dict(fresh, loaded)
    for name, value in model.state_dict().items():
        if ".lora_" in name:
            torch.testing.assert_close(fresh.state_dict()[name], value, rtol=0, atol=0)


def test_transformers_gpt2_conv1d_layers_merge_in_their_layout() -> None:
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    settings = LoraSettings(rank=2, target_modules=["c_attn", "c_proj"])  # c_proj (32, 32): square, layout unseen
    model = add_lora(model, settings)
    randomise_adapters(model)
    merged = merge_lora(model.state_dict(), lora_record(settings, model)["lora"])
    plain = transformers.GPT2LMHeadModel(config).eval()
    plain.load_state_dict(merged)
    ids = torch.randint(64, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("lora", "plan", "message"),
    [
        ({"target_modules": ["c_attn"]}, {}, r"\['c_attn'\] match no linear layer of GPT"),
        ({"quantize": "int8"}, {"tp": 2}, r"an int8 base cannot be split over tp; set plan\.tp=1"),
        ({"dropout": 0.1}, {"tp": 2}, r"lora\.dropout=0\.1 with plan\.tp=2: .* set lora\.dropout=0"),
    ],
)
def test_bad_lora_input_is_refused_before_launch(lora: dict, plan: dict, message: str, tmp_path: Path) -> None:
    lora_checkpoint(tmp_path / "base", "tiny", LoraSettings(rank=2))
    raw = {"base": {"path": str(tmp_path / "base")}, "recipe": {"kind": "lora"}, "lora": lora, "plan": plan}
    config = finetune_config_from_dict(raw | {"train": {"global_batch": 2}})
    with pytest.raises(ValueError, match=message):
        preflight(config, world_size=2)
