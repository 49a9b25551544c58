"""GPTConfig <-> Hugging Face ``config.json`` for ``GPT2LMHeadModel``, ``LlamaForCausalLM`` and
``MixtralForCausalLM`` (plait's MoE GPT).

Plain dicts both ways, so exporting needs no ``transformers``. Each family fixes some
options of plait's GPT; :func:`hf_family` says which family a config fits, or raises
naming the options that none can express.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from plait.models.gpt_config import GPTConfig

GPT2 = "gpt2"
LLAMA = "llama"
MIXTRAL = "mixtral"
ARCHITECTURES = {GPT2: "GPT2LMHeadModel", LLAMA: "LlamaForCausalLM", MIXTRAL: "MixtralForCausalLM"}

# (GPTConfig field, the value the Hugging Face class hard-codes, why).
_GPT2_NEEDS = (
    ("position", "learned", "GPT-2 learns position embeddings"),
    ("norm", "layernorm", "GPT-2 uses LayerNorm"),
    ("activation", "gelu", "GPT-2's MLP is tanh-GELU"),
    ("bias", True, "every GPT-2 layer has biases"),
    ("parallel_block", False, "GPT-2 runs attention, then the MLP on its output"),
)
_LLAMA_NEEDS = (
    ("position", "rope", "Llama uses rotary positions"),
    ("norm", "rmsnorm", "Llama uses RMSNorm"),
    ("activation", "swiglu", "Llama's MLP is SwiGLU"),
    ("parallel_block", False, "Llama runs attention, then the MLP on its output"),
)
_MIXTRAL_NEEDS = (
    ("position", "rope", "Mixtral uses rotary positions"),
    ("norm", "rmsnorm", "Mixtral uses RMSNorm"),
    ("activation", "swiglu", "Mixtral's experts are SwiGLU"),
    ("parallel_block", False, "Mixtral runs attention, then the experts on its output"),
    ("bias", False, "Mixtral has no biases"),
    ("moe_every", 1, "every Mixtral layer is MoE"),
    ("moe_capacity_factor", None, "Mixtral drops no token"),
    ("moe_shared_experts", 0, "Mixtral has no shared experts"),
)
# GELU variants that are the tanh approximation plait's MLP computes.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


def _conflicts(config: GPTConfig, needs: tuple[tuple[str, object, str], ...]) -> dict[str, str]:
    """``{field: why}`` for each field of ``config`` that the family fixes to another value."""
    return {name: why for name, value, why in needs if getattr(config, name) != value}


def _gpt2_conflicts(config: GPTConfig) -> dict[str, str]:
    found = _conflicts(config, _GPT2_NEEDS)
    if config.resolved_num_kv_heads != config.num_heads:
        found["num_kv_heads"] = "GPT-2's fused c_attn has one key/value head per query head"
    return found


def _describe(config: GPTConfig, conflicts: dict[str, str]) -> str:
    return "; ".join(f"{name}={getattr(config, name)!r} ({why})" for name, why in conflicts.items())


def hf_family(config: GPTConfig) -> str:
    """``"gpt2"`` or ``"llama"``: the Hugging Face class that computes exactly what ``config`` does.

    Raises ValueError naming the options neither class can express.
    """
    if config.moe_experts:
        return _mixtral_family(config)
    gpt2 = _gpt2_conflicts(config)
    if not gpt2:
        return GPT2
    llama = _conflicts(config, _LLAMA_NEEDS)
    if not llama:
        return LLAMA
    in_both = {name: f"{gpt2[name]}; {llama[name]}" for name in gpt2 if name in llama}
    if in_both:
        raise ValueError(
            f"cannot export to Hugging Face: {_describe(config, in_both)}: neither GPT2LMHeadModel nor "
            "LlamaForCausalLM can express this, so the model has no Hugging Face class to load into"
        )
    raise ValueError(
        "cannot export to Hugging Face: this model mixes the GPT-2 and Llama families, so neither "
        f"GPT2LMHeadModel nor LlamaForCausalLM computes it. As GPT-2 it has {_describe(config, gpt2)}. "
        f"As Llama it has {_describe(config, llama)}. Export needs one family's options throughout: "
        "GPT-2's (preset 'tiny') or Llama's (preset 'tiny-llama')"
    )


def _mixtral_family(config: GPTConfig) -> str:
    """``"mixtral"`` when MixtralForCausalLM computes the MoE ``config``; ValueError naming what it cannot."""
    conflicts = _conflicts(config, _MIXTRAL_NEEDS)
    if config.moe_softmax_order == "before" and not config.moe_normalize_topk:
        # softmax_order="after" (softmax over the top-k logits) equals the renormalised top-k of the softmax
        conflicts["moe_normalize_topk"] = "Mixtral renormalises the top-k weights to sum to 1"
    if conflicts:
        raise ValueError(
            f"cannot export to Hugging Face: an MoE model exports as MixtralForCausalLM, which cannot express "
            f"{_describe(config, conflicts)}"
        )
    return MIXTRAL


def hf_config_dict(config: GPTConfig, *, family: str, dtype: str, eos_token_id: int | None) -> dict[str, Any]:
    """The ``config.json`` of the Hugging Face model that ``family`` names, sized as ``config``."""
    common = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": config.vocab_size,
        "initializer_range": config.init_std,
        "tie_word_embeddings": config.tied_embeddings,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        # transformers 5 reads "dtype"; 4.x reads "torch_dtype".
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    fields = {GPT2: _gpt2_fields, LLAMA: _llama_fields, MIXTRAL: _mixtral_fields}
    return common | fields[family](config)


def _gpt2_fields(config: GPTConfig) -> dict[str, Any]:
    return {
        "n_positions": config.max_seq_len,
        "n_embd": config.d_model,
        "n_layer": config.num_layers,
        "n_head": config.num_heads,
        "n_inner": config.resolved_d_ff,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.norm_eps,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
    }


def _llama_fields(config: GPTConfig) -> dict[str, Any]:
    return {
        "hidden_size": config.d_model,
        "intermediate_size": config.resolved_d_ff,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.resolved_num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        # transformers 5 reads rope_parameters; 4.x reads rope_theta.
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": config.bias,
        "mlp_bias": config.bias,
        "attention_dropout": config.dropout,
        "pretraining_tp": 1,
    }


def _mixtral_fields(config: GPTConfig) -> dict[str, Any]:
    fields = _llama_fields(config)
    for key in ("attention_bias", "mlp_bias", "pretraining_tp"):
        del fields[key]
    aux = config.moe_aux_loss_weight
    return fields | {
        "intermediate_size": config.resolved_moe_d_ff,
        "num_local_experts": config.moe_experts,
        "num_experts_per_tok": config.moe_top_k,
        "router_jitter_noise": 0.0,
        "sliding_window": None,
        # HF adds coef x one loss pooled over layers; plait adds its weight x each layer's (plait.moe.hf)
        "output_router_logits": aux > 0,
        "router_aux_loss_coef": aux * config.num_layers,
    }


def gpt_config_from_hf(hf: dict[str, Any]) -> tuple[str, GPTConfig]:
    """(family, GPTConfig) for a Hugging Face GPT-2, Llama or Mixtral ``config.json``; ValueError otherwise."""
    model_type = hf.get("model_type")
    if model_type == GPT2:
        return GPT2, _from_gpt2(hf)
    if model_type == LLAMA:
        return LLAMA, _from_llama(hf)
    if model_type == MIXTRAL:
        return MIXTRAL, _from_mixtral(hf)
    raise ValueError(
        f"config.json has model_type={model_type!r}; plait import converts 'llama' (LlamaForCausalLM), "
        "'mixtral' (MixtralForCausalLM) and 'gpt2' (GPT2LMHeadModel) checkpoints into plait's GPT; to continue "
        "training another family as it is, "
        'set [model] pretrained = "DIR" in the plait train config'
    )


def _required(hf: dict[str, Any], key: str) -> Any:
    if key not in hf:
        raise ValueError(f"config.json has no {key!r}; write the model with transformers' save_pretrained")
    return hf[key]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"cannot import: {message}")


def _from_gpt2(hf: dict[str, Any]) -> GPTConfig:
    activation = hf.get("activation_function", "gelu_new")
    _require(activation in _TANH_GELUS, f"activation_function={activation!r}; plait's GELU is the tanh approximation")
    _require(hf.get("scale_attn_weights", True), "scale_attn_weights=false; plait scales scores by 1/sqrt(head_dim)")
    for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        _require(not hf.get(key, False), f"{key}=true is not implemented in plait's GPT")
    d_model = hf.get("n_embd", 768)  # absent keys take GPT2Config's defaults, as transformers would
    return GPTConfig(
        vocab_size=hf.get("vocab_size", 50257),
        max_seq_len=hf.get("n_positions", 1024),
        d_model=d_model,
        num_layers=hf.get("n_layer", 12),
        num_heads=hf.get("n_head", 12),
        d_ff=hf.get("n_inner") or 4 * d_model,
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        tied_embeddings=hf.get("tie_word_embeddings", True),
        dropout=float(hf.get("resid_pdrop", 0.1)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def _from_llama(hf: dict[str, Any]) -> GPTConfig:
    activation = hf.get("hidden_act", "silu")
    _require(activation == "silu", f"hidden_act={activation!r}; plait's SwiGLU gates with silu")
    attention_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    _require(
        attention_bias == mlp_bias,
        f"attention_bias={attention_bias} but mlp_bias={mlp_bias}; plait's bias option covers both",
    )
    d_model, num_heads = _required(hf, "hidden_size"), _required(hf, "num_attention_heads")
    head_dim = hf.get("head_dim") or d_model // num_heads
    _require(head_dim * num_heads == d_model, f"head_dim={head_dim} is not hidden_size/num_attention_heads")
    return GPTConfig(
        vocab_size=_required(hf, "vocab_size"),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        d_model=d_model,
        num_layers=_required(hf, "num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        d_ff=_required(hf, "intermediate_size"),
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        activation="swiglu",
        position="rope",
        rope_theta=_rope_theta(hf),
        bias=attention_bias,
        tied_embeddings=hf.get("tie_word_embeddings", False),
        dropout=float(hf.get("attention_dropout", 0.0)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def _from_mixtral(hf: dict[str, Any]) -> GPTConfig:
    _require(not hf.get("router_jitter_noise"), "router_jitter_noise is set; plait's router adds no noise")
    _require(not hf.get("sliding_window"), "sliding_window is set; plait's attention is full causal")
    dense = _from_llama({**hf, "attention_bias": False, "mlp_bias": False})
    num_layers, coef = dense.num_layers, float(hf.get("router_aux_loss_coef", 0.001))
    return dataclasses.replace(
        dense,
        moe_experts=hf.get("num_local_experts", 8),
        moe_top_k=hf.get("num_experts_per_tok", 2),
        moe_normalize_topk=True,
        moe_d_ff=dense.d_ff,
        moe_aux_loss_weight=coef / num_layers if hf.get("output_router_logits", False) else 0.0,
    )


def _rope_theta(hf: dict[str, Any]) -> float:
    """RoPE's base, from transformers 5's rope_parameters or 4.x's rope_theta/rope_scaling."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    _require(
        rope_type == "default",
        f"RoPE type {rope_type!r} (frequency scaling) is not implemented in plait; only plain RoPE imports",
    )
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
