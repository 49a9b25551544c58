"""Named model sizes: ``get_preset("gpt2-124m")``, ``preset_names()``.

Parameter counts (``GPTConfig.num_parameters()``, tied embeddings counted once):

    tiny         136,960        tiny-llama   164,160
    gpt-10m      10,426,176     llama-10m    10,096,896
    bench-dp     29,479,936     gpt2-124m    124,439,808
    llama-1b     1,235,814,400  llama-7b     6,738,415,616
    gpt-4b       4,104,259,584

Mixture of Experts (total / active per token, ``num_active_parameters()``):

    switch-tiny   336,000 / 137,472         mixtral-tiny  385,856 / 238,400
    moe-100m      102,801,920 / 36,741,632
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from plait.models.gpt_config import GPTConfig

# Llama's departures from the GPT-2 defaults of GPTConfig.
_LLAMA_OPTIONS = {
    "norm": "rmsnorm",
    "activation": "swiglu",
    "position": "rope",
    "bias": False,
    "tied_embeddings": False,
}


def _tiny() -> GPTConfig:
    return GPTConfig(vocab_size=512, max_seq_len=64, d_model=64, num_layers=2, num_heads=4)


def _tiny_llama() -> GPTConfig:
    return GPTConfig(
        vocab_size=512, max_seq_len=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
        **_LLAMA_OPTIONS,
    )  # fmt: skip


def _gpt_10m() -> GPTConfig:
    # 8 layers and 4 heads divide evenly for pp and tp up to 4 (and pp 8); head_dim 72.
    return GPTConfig(vocab_size=8192, max_seq_len=256, d_model=288, num_layers=8, num_heads=4)


def _llama_10m() -> GPTConfig:
    return GPTConfig(
        vocab_size=8192, max_seq_len=256, d_model=256, num_layers=8, num_heads=4, num_kv_heads=2,
        **_LLAMA_OPTIONS,
    )  # fmt: skip


def _bench_dp() -> GPTConfig:
    return GPTConfig(vocab_size=8192, max_seq_len=128, d_model=512, num_layers=8, num_heads=8)


def _gpt2_124m() -> GPTConfig:
    return GPTConfig(vocab_size=50257, max_seq_len=1024, d_model=768, num_layers=12, num_heads=12)


def _llama_1b() -> GPTConfig:
    # Llama 3.2 1B's shape, trained from scratch: its "llama3" RoPE frequency scaling is
    # not implemented (imported Llama 3.2 weights would drift from its logits), and the
    # context stays at the 8192 tokens of its original pretraining.
    options = {**_LLAMA_OPTIONS, "tied_embeddings": True}
    return GPTConfig(
        vocab_size=128256, max_seq_len=8192, d_model=2048, num_layers=16, num_heads=32,
        num_kv_heads=8, d_ff=8192, rope_theta=500000.0, **options,
    )  # fmt: skip


def _llama_7b() -> GPTConfig:
    # Llama 2 7B.
    return GPTConfig(
        vocab_size=32000, max_seq_len=4096, d_model=4096, num_layers=32, num_heads=32,
        d_ff=11008, **_LLAMA_OPTIONS,
    )  # fmt: skip


def _gpt_4b() -> GPTConfig:
    # The offload benchmark's model: 4.1B parameters, 66 GB of fp32 AdamW state (benchmarks/offload.py).
    return GPTConfig(vocab_size=8192, max_seq_len=256, d_model=3072, num_layers=36, num_heads=24)


def _switch_tiny() -> GPTConfig:
    # Switch Transformer's routing on the tiny shape: top-1, softmax before the choice,
    # capacity factor 1.25, tanh-GELU experts as wide as tiny's MLP (the same FLOPs per token).
    return GPTConfig(
        vocab_size=512, max_seq_len=64, d_model=64, num_layers=2, num_heads=4,
        moe_experts=4, moe_top_k=1, moe_capacity_factor=1.25, moe_aux_loss_weight=0.01,
    )  # fmt: skip


def _mixtral_tiny() -> GPTConfig:
    # Mixtral's routing on tiny-llama's shape: top-2 of softmax renormalised, dropless, SwiGLU experts.
    return GPTConfig(
        vocab_size=512, max_seq_len=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
        moe_experts=4, moe_top_k=2, moe_normalize_topk=True, moe_aux_loss_weight=0.02, **_LLAMA_OPTIONS,
    )  # fmt: skip


def _moe_100m() -> GPTConfig:
    # 8 SwiGLU experts per layer, top-2, dropless: ~100M parameters, ~37M active per token.
    return GPTConfig(
        vocab_size=8192, max_seq_len=256, d_model=512, num_layers=8, num_heads=8, num_kv_heads=4,
        moe_experts=8, moe_top_k=2, moe_d_ff=896, moe_normalize_topk=True, moe_aux_loss_weight=0.01,
        moe_z_loss_weight=0.001, **_LLAMA_OPTIONS,
    )  # fmt: skip


def _factories() -> dict[str, Callable[[], GPTConfig]]:
    return {
        "tiny": _tiny,
        "tiny-llama": _tiny_llama,
        "gpt-10m": _gpt_10m,
        "llama-10m": _llama_10m,
        "bench-dp": _bench_dp,
        "gpt2-124m": _gpt2_124m,
        "llama-1b": _llama_1b,
        "gpt-4b": _gpt_4b,
        "llama-7b": _llama_7b,
        "switch-tiny": _switch_tiny,
        "mixtral-tiny": _mixtral_tiny,
        "moe-100m": _moe_100m,
    }


def preset_names() -> list[str]:
    """Names accepted by :func:`get_preset`, smallest models first."""
    return list(_factories())


def get_preset(name: str) -> GPTConfig:
    """The GPTConfig named ``name``; ValueError with the valid names if there is none.

    Example:
        >>> get_preset("gpt2-124m").d_model
        768
    """
    factories = _factories()
    if name not in factories:
        close = difflib.get_close_matches(str(name), factories, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown model preset {name!r}; {hint}valid presets: {', '.join(factories)}")
    return factories[name]()
