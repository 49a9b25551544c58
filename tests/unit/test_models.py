"""plait.models: shapes, parameter counts, conventions against Hugging Face, errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from plait.models import GPT, GPTConfig, build, get_preset, preset_names
from plait.models.layers import RMSNorm

LLAMA = {
    "norm": "rmsnorm",
    "activation": "swiglu",
    "position": "rope",
    "bias": False,
    "tied_embeddings": False,
}
OPTION_MIXES = {
    "gpt2": {},
    "llama": LLAMA,
    "gqa": {**LLAMA, "num_kv_heads": 2},
    "mqa": {**LLAMA, "num_kv_heads": 1},
    "parallel": {"parallel_block": True},
    "parallel-llama-tied": {**LLAMA, "parallel_block": True, "tied_embeddings": True},
    "untied-no-bias": {"tied_embeddings": False, "bias": False},
    "layernorm-rope-d_ff": {"position": "rope", "d_ff": 96, "num_kv_heads": 2},
}
SMALL_PRESETS = ["tiny", "tiny-llama", "gpt-10m", "llama-10m", "bench-dp"]


def tiny_config(**overrides: object) -> GPTConfig:
    return dataclasses.replace(get_preset("tiny"), **overrides)


def random_ids(config: GPTConfig, *, batch: int = 2, seq: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(config.vocab_size, (batch, seq), generator=generator)


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("mix", OPTION_MIXES)
def test_forward_shape_and_param_count(mix: str) -> None:
    config = tiny_config(**OPTION_MIXES[mix])
    model = GPT(config)
    logits = model(random_ids(config, seq=config.max_seq_len))
    assert logits.shape == (2, config.max_seq_len, config.vocab_size)
    assert torch.isfinite(logits).all()
    assert num_params(model) == config.num_parameters()


def test_module_names_are_the_plan_contract() -> None:
    names = dict(GPT(tiny_config(**LLAMA)).named_modules())
    for name in ("embed", "blocks.1.norm1", "blocks.0.attn.q_proj", "blocks.0.attn.k_proj",
                 "blocks.0.attn.v_proj", "blocks.0.attn.o_proj", "blocks.0.norm2",
                 "blocks.0.mlp.gate_proj", "blocks.0.mlp.up_proj", "blocks.0.mlp.down_proj",
                 "norm_f", "lm_head"):  # fmt: skip
        assert name in names, name
    assert "pos_embed" not in names
    gpt2 = dict(GPT(tiny_config(parallel_block=True)).named_modules())
    assert "pos_embed" in gpt2 and "blocks.0.norm2" not in gpt2
    assert "blocks.0.mlp.gate_proj" not in gpt2


def test_tied_head_shares_the_embedding() -> None:
    model = GPT(tiny_config())
    assert model.lm_head.weight is model.embed.weight
    untied = GPT(tiny_config(tied_embeddings=False))
    assert untied.lm_head.weight is not untied.embed.weight


@pytest.mark.parametrize("name", SMALL_PRESETS)
def test_preset_param_count_matches_module(name: str) -> None:
    assert num_params(build(name)) == get_preset(name).num_parameters()


def test_large_preset_counts_analytic() -> None:
    assert get_preset("gpt2-124m").num_parameters() == 124_439_808
    assert get_preset("llama-1b").num_parameters() == 1_235_814_400
    assert get_preset("llama-7b").num_parameters() == 6_738_415_616
    assert get_preset("llama-7b").resolved_d_ff == 11008


def test_flops_per_token_formula() -> None:
    config = get_preset("tiny")
    matmul_params = config.num_parameters() - config.max_seq_len * config.d_model
    expected = 6 * matmul_params + 12 * 2 * 64 * 32
    assert config.flops_per_token(32) == expected
    untied = tiny_config(tied_embeddings=False)
    assert untied.flops_per_token(32) == expected  # the head costs the same tied or not


def test_swiglu_default_width() -> None:
    assert tiny_config(activation="swiglu").resolved_d_ff == 192  # int(8*64/3)=170 -> 192
    assert tiny_config().resolved_d_ff == 256
    assert dataclasses.replace(get_preset("tiny"), d_model=128).resolved_d_ff == 512


@pytest.mark.parametrize("mix", ["gpt2", "gqa", "parallel"])
def test_causal(mix: str) -> None:
    config = tiny_config(**OPTION_MIXES[mix])
    model = GPT(config).eval()
    ids = random_ids(config)
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % config.vocab_size
    before, after = model(ids), model(changed)
    torch.testing.assert_close(before[:, :10], after[:, :10], rtol=0, atol=0)
    assert not torch.allclose(before[:, 10:], after[:, 10:])


@pytest.mark.parametrize("mix", ["gpt2", "llama"])
def test_explicit_positions_match_default(mix: str) -> None:
    config = tiny_config(**OPTION_MIXES[mix])
    model = GPT(config).eval()
    ids = random_ids(config)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    torch.testing.assert_close(model(ids, position_ids=positions), model(ids))


def test_attention_reads_local_head_counts() -> None:
    """Sharding heads as tensor parallelism will: two halves sum to the whole."""
    config = tiny_config(**LLAMA, num_kv_heads=2)
    attn = GPT(config).blocks[0].attn
    x = torch.randn(2, 8, config.d_model)
    full = attn(x)
    halves = []
    for rank in range(2):
        shard = GPT(config).blocks[0].attn
        q_rows, kv_rows = slice_rows(rank, config.d_model), slice_rows(rank, 2 * config.head_dim)
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            source = getattr(attn, name).weight[rows]
            getattr(shard, name).weight = torch.nn.Parameter(source.clone())
        shard.o_proj.weight = torch.nn.Parameter(attn.o_proj.weight[:, q_rows].clone())
        shard.num_heads, shard.num_kv_heads = 2, 1
        halves.append(shard(x))
    torch.testing.assert_close(halves[0] + halves[1], full)


def slice_rows(rank: int, total: int) -> slice:
    return slice(rank * total // 2, (rank + 1) * total // 2)


def test_dropout_only_in_training() -> None:
    config = tiny_config(dropout=0.5)
    model = GPT(config)
    ids = random_ids(config)
    assert not torch.equal(model(ids), model(ids))
    model.eval()
    assert torch.equal(model(ids), model(ids))


def test_same_seed_same_weights() -> None:
    torch.manual_seed(0)
    first = GPT(get_preset("tiny-llama")).state_dict()
    torch.manual_seed(0)
    second = GPT(get_preset("tiny-llama")).state_dict()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_meta_build_then_init_matches_plain_build(name: str) -> None:
    torch.manual_seed(3)
    plain = build(name)
    torch.manual_seed(3)
    with torch.device("meta"):
        lazy = build(name)
    lazy.to_empty(device="cpu")
    lazy.init_weights()
    assert num_params(lazy) == num_params(plain)
    lazy_state = lazy.state_dict()
    for key, expected in plain.state_dict().items():
        assert torch.equal(expected, lazy_state[key]), key
    assert lazy.lm_head.weight is lazy.embed.weight or not lazy.config.tied_embeddings


def test_init_statistics() -> None:
    torch.manual_seed(0)
    model = build("gpt-10m")
    std, num_layers = model.config.init_std, model.config.num_layers
    assert model.embed.weight.std().item() == pytest.approx(std, rel=0.02)
    out_std = model.blocks[0].mlp.down_proj.weight.std().item()
    assert out_std == pytest.approx(std / (2 * num_layers) ** 0.5, rel=0.05)
    assert torch.equal(model.blocks[0].attn.q_proj.bias, torch.zeros(model.config.d_model))
    assert torch.equal(model.norm_f.weight, torch.ones(model.config.d_model))


def test_build_overrides() -> None:
    model = build("tiny", vocab_size=1000, max_seq_len=128)
    assert model.config.vocab_size == 1000 and model.pos_embed.num_embeddings == 128
    assert build(get_preset("tiny"), num_layers=3).config.num_layers == 3
    with pytest.raises(ValueError, match="valid fields: vocab_size"):
        build("tiny", hidden_size=32)
    with pytest.raises(TypeError, match="preset name or a GPTConfig"):
        build(42)


def test_preset_names_and_unknown_preset() -> None:
    assert preset_names()[:2] == ["tiny", "tiny-llama"]
    with pytest.raises(ValueError, match=r"did you mean 'gpt2-124m'.*valid presets: tiny"):
        get_preset("gpt2-124")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_heads": 5}, r"num_heads=5 does not divide d_model=64.*1, 2, 4, 8, 16, 32, 64"),
        ({"num_kv_heads": 3}, r"num_kv_heads=3 does not divide num_heads=4.*1, 2, 4"),
        ({"d_model": 36, "num_heads": 12, "position": "rope"}, "needs an even head_dim"),
        ({"norm": "batchnorm"}, "'layernorm' or 'rmsnorm'"),
        ({"activation": "relu"}, "'gelu' or 'swiglu'"),
        ({"position": "alibi"}, "'learned' or 'rope'"),
        ({"dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)"),
        ({"d_model": 0}, "d_model must be a positive int"),
        ({"num_layers": 2.0}, "num_layers must be a positive int"),
        ({"norm_eps": 0.0}, "norm_eps must be a positive number"),
    ],
)
def test_bad_config_raises(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_too_long_input_raises() -> None:
    model = build("tiny")
    with pytest.raises(ValueError, match="65 tokens but the model's max_seq_len is 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must be \(batch, seq\)"):
        model(torch.zeros(8, dtype=torch.long))


def test_rmsnorm_matches_llama_in_bf16() -> None:
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ours, theirs = RMSNorm(64, eps=1e-5), LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_(1.0, 0.1)
        theirs.weight.copy_(ours.weight)
    ours, theirs = ours.bfloat16(), theirs.bfloat16()
    x = torch.randn(4, 64).bfloat16()
    assert torch.equal(ours(x), theirs(x))


def test_llama_option_matches_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = build("tiny-llama", init_std=0.2).eval()  # large weights: a sharper test
    config = ours.config
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model,
        intermediate_size=config.resolved_d_ff, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta, tie_word_embeddings=False, attention_bias=False,
        mlp_bias=False, hidden_act="silu",
    )  # fmt: skip
    theirs = transformers.LlamaForCausalLM(hf_config).eval()
    copy_weights(theirs, llama_name_map(ours))
    ids = random_ids(config, seq=config.max_seq_len)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=0, atol=1e-5)


def llama_name_map(model: GPT) -> dict[str, torch.Tensor]:
    mapped = {
        "model.embed_tokens.weight": model.embed.weight,
        "model.norm.weight": model.norm_f.weight,
        "lm_head.weight": model.lm_head.weight,
    }
    for i, block in enumerate(model.blocks):
        prefix = f"model.layers.{i}"
        mapped[f"{prefix}.input_layernorm.weight"] = block.norm1.weight
        mapped[f"{prefix}.post_attention_layernorm.weight"] = block.norm2.weight
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            mapped[f"{prefix}.self_attn.{name}.weight"] = getattr(block.attn, name).weight
        for name in ("gate_proj", "up_proj", "down_proj"):
            mapped[f"{prefix}.mlp.{name}.weight"] = getattr(block.mlp, name).weight
    return mapped


def test_gpt2_option_matches_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = build("tiny", init_std=0.2).eval()  # large weights: a sharper test
    config = ours.config
    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.max_seq_len, n_embd=config.d_model,
        n_layer=config.num_layers, n_head=config.num_heads, n_inner=config.resolved_d_ff,
        activation_function="gelu_new", layer_norm_epsilon=config.norm_eps,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
    )  # fmt: skip
    theirs = transformers.GPT2LMHeadModel(hf_config).eval()
    copy_weights(theirs, gpt2_name_map(ours))
    assert theirs.lm_head.weight.data_ptr() == theirs.transformer.wte.weight.data_ptr()
    ids = random_ids(config, seq=config.max_seq_len)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=0, atol=1e-5)


def gpt2_name_map(model: GPT) -> dict[str, torch.Tensor]:
    """GPT-2's Conv1D stores (in, out): our Linear weights transposed, q/k/v fused."""
    mapped = {
        "transformer.wte.weight": model.embed.weight,
        "transformer.wpe.weight": model.pos_embed.weight,
        "transformer.ln_f.weight": model.norm_f.weight,
        "transformer.ln_f.bias": model.norm_f.bias,
    }
    for i, block in enumerate(model.blocks):
        prefix, attn, mlp = f"transformer.h.{i}", block.attn, block.mlp
        for ours, theirs in ((block.norm1, "ln_1"), (block.norm2, "ln_2")):
            mapped[f"{prefix}.{theirs}.weight"] = ours.weight
            mapped[f"{prefix}.{theirs}.bias"] = ours.bias
        qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
        mapped[f"{prefix}.attn.c_attn.weight"] = torch.cat([p.weight for p in qkv]).T
        mapped[f"{prefix}.attn.c_attn.bias"] = torch.cat([p.bias for p in qkv])
        for ours, theirs in ((attn.o_proj, "attn.c_proj"), (mlp.up_proj, "mlp.c_fc"),
                             (mlp.down_proj, "mlp.c_proj")):  # fmt: skip
            mapped[f"{prefix}.{theirs}.weight"] = ours.weight.T
            mapped[f"{prefix}.{theirs}.bias"] = ours.bias
    return mapped


def copy_weights(hf_model: torch.nn.Module, mapped: dict[str, torch.Tensor]) -> None:
    """Copy every parameter of ``hf_model`` from ``mapped``; each must be covered once."""
    hf_params = dict(hf_model.named_parameters())
    assert set(hf_params) == set(mapped)
    with torch.no_grad():
        for name, param in hf_params.items():
            param.copy_(mapped[name])
