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


def tiny_config(family: str) -> Any:
    import transformers

    config_class, _, kwargs = TINY[family]
    return getattr(transformers, config_class)(**kwargs)


def tiny_model(family: str, *, seed: int = 0) -> Any:
    """A tiny random causal LM of `family` in fp32, dropout off, eval-independent (train mode)."""
    import torch
    import transformers

    _, model_class, _ = TINY[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(tiny_config(family))
    return model.float()
