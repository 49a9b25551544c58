"""Tiny random Hugging Face causal LMs, one per architecture family the registry knows.

Sizes are chosen so tp=2 divides every head count and width, pp=2 splits the layers,
and a case runs in a second on one core. Dropout is off everywhere (parity).
"""

from __future__ import annotations

from typing import Any

VOCAB = 96
HIDDEN = 32
LAYERS = 4

_LLAMA_LIKE = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": 64,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# family -> (config class name, model class name, config kwargs)
TINY: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _LLAMA_LIKE),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**_LLAMA_LIKE, "sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _LLAMA_LIKE),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_LLAMA_LIKE, "head_dim": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**_LLAMA_LIKE, "resid_pdrop": 0.0, "embd_pdrop": 0.0}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**_LLAMA_LIKE, "head_dim": 8}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {**_LLAMA_LIKE, "head_dim": 8, "sliding_window": 8, "final_logit_softcapping": 30.0},
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        {
            "vocab_size": VOCAB,
            "hidden_size": HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
        },
    ),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        {
            "vocab_size": VOCAB,
            "hidden_size": HIDDEN,
            "word_embed_proj_dim": HIDDEN,
            "ffn_dim": 64,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "layerdrop": 0.0,
            # OPT's ReLU leaves units whose gradient is float noise; Adam turns that noise into lr-sized steps
            # that differ with the micro-batch shapes (measured: 9e-5 under pp=2), as it would under torch DDP
            "activation_function": "gelu",
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    ),
    "falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        {
            "vocab_size": VOCAB,
            "hidden_size": HIDDEN,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": 4,
            "num_kv_heads": 2,
            "new_decoder_architecture": True,
            "multi_query": False,
            "max_position_embeddings": 64,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        {
            "vocab_size": VOCAB,
            "n_embd": HIDDEN,
            "n_layer": LAYERS,
            "n_head": 4,
            "n_positions": 64,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    ),
}

FAMILIES = tuple(TINY)

_MOE = {**_LLAMA_LIKE, "num_hidden_layers": 2, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02}
# Mixture-of-Experts families: 4 experts, top-2, dropless; output_router_logits adds HF's own aux loss to
# the HF loss only, which plait's loss functions never read (see plait.moe.hf).
TINY_MOE: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**_MOE, "num_local_experts": 4, "sliding_window": None}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        # layer 1 dense (mlp_only_layers); the sparse layer has a sigmoid-gated shared expert
        {
            **_MOE,
            "num_hidden_layers": 3,
            "num_experts": 4,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 48,
            "mlp_only_layers": [1],
            "norm_topk_prob": False,
        },
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {**_MOE, "num_experts": 4, "moe_intermediate_size": 32, "head_dim": 8, "norm_topk_prob": True},
    ),
}
MOE_FAMILIES = tuple(TINY_MOE)


def tiny_config(family: str, **overrides: Any) -> Any:
    import transformers

    config_class, _, kwargs = TINY[family] if family in TINY else TINY_MOE[family]
    return getattr(transformers, config_class)(**(kwargs | overrides))


def tiny_model(family: str, *, seed: int = 0, **overrides: Any) -> Any:
    """A tiny random causal LM of `family` in fp32, dropout off, eval-independent (train mode)."""
    import torch
    import transformers

    _, model_class, _ = TINY[family] if family in TINY else TINY_MOE[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(tiny_config(family, **overrides))
    return model.float()
