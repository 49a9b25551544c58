"""The registry's entries: Hugging Face families by model_type, plait's own GPT, and the families no
plan can split (see plait.models.architectures)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from plait.models.architecture_spec import Architecture

_LLAMA_STYLES = MappingProxyType(
    {
        "self_attn.q_proj": "colwise",
        "self_attn.k_proj": "colwise",
        "self_attn.v_proj": "colwise",
        "self_attn.o_proj": "rowwise",
        "mlp.gate_proj": "colwise",
        "mlp.up_proj": "colwise",
        "mlp.down_proj": "rowwise",
    }
)

# Tensor-parallel styles when a config carries no base_model_tp_plan; names as in Hugging Face's plans.
_QWEN3_STYLES = MappingProxyType(
    {
        **_LLAMA_STYLES,
        "self_attn.q_norm": "replicated_with_grad_allreduce",  # per-head norms: each rank sees its own heads
        "self_attn.k_norm": "replicated_with_grad_allreduce",
    }
)
_PHI3_STYLES = MappingProxyType(
    {
        "self_attn.qkv_proj": "colwise",  # fused [q; k; v], split segment by segment
        "self_attn.o_proj": "rowwise",
        "mlp.gate_up_proj": "colwise",  # fused [gate; up]
        "mlp.down_proj": "rowwise",
    }
)


# Mixture-of-Experts families: tensor parallel splits attention only; the experts stay whole on every tp rank.
_ATTENTION_STYLES = MappingProxyType({k: v for k, v in _LLAMA_STYLES.items() if k.startswith("self_attn.")})
_QWEN3_ATTENTION_STYLES = MappingProxyType({k: v for k, v in _QWEN3_STYLES.items() if k.startswith("self_attn.")})


def _llama_like(
    name: str, tp_styles: Mapping[str, str] = _LLAMA_STYLES, *, moe_block: str | None = None
) -> Architecture:
    return Architecture(
        name,
        layers="layers",
        embed="embed_tokens",
        norm="norm",
        rotary="rotary_emb",
        attention="self_attn",
        tp_styles=tp_styles,
        moe_block=moe_block,
    )


_ENTRIES = (
    Architecture(
        "plait",
        layers="blocks",
        embed="embed",
        norm="norm_f",
        positions="pos_embed",
        after_embed=("drop",),
        attention="attn",
    ),
    *(_llama_like(name) for name in ("llama", "mistral", "qwen2", "gemma")),
    _llama_like("qwen3", _QWEN3_STYLES),
    _llama_like("phi3", _PHI3_STYLES),
    _llama_like("mixtral", _ATTENTION_STYLES, moe_block="mlp"),
    _llama_like("qwen2_moe", _ATTENTION_STYLES, moe_block="mlp"),
    _llama_like("qwen3_moe", _QWEN3_ATTENTION_STYLES, moe_block="mlp"),
    Architecture(
        "gemma2",
        layers="layers",
        embed="embed_tokens",
        norm="norm",
        rotary="rotary_emb",
        logit_softcap="final_logit_softcapping",
        attention="self_attn",
        tp_styles=_LLAMA_STYLES,
    ),
    Architecture(
        "gpt_neox",
        layers="layers",
        embed="embed_in",
        after_embed=("emb_dropout",),
        norm="final_layer_norm",
        rotary="rotary_emb",
        attention="attention",
        tp_styles=MappingProxyType(
            {
                "attention.query_key_value": "colwise",  # per-head [q k v] interleaved: a plain split keeps heads whole
                "attention.dense": "rowwise",
                "mlp.dense_h_to_4h": "colwise",
                "mlp.dense_4h_to_h": "rowwise",
            }
        ),
    ),
    Architecture(
        "opt",
        layers="decoder.layers",
        embed="decoder.embed_tokens",
        before_positions=("decoder.project_in",),
        positions="decoder.embed_positions",
        positions_from_mask=True,
        norm="decoder.final_layer_norm",
        after_norm=("decoder.project_out",),
        attention="self_attn",
        tp_styles=MappingProxyType(
            {
                "self_attn.q_proj": "colwise",
                "self_attn.k_proj": "colwise",
                "self_attn.v_proj": "colwise",
                "self_attn.out_proj": "rowwise",
                "fc1": "colwise",
                "fc2": "rowwise",
            }
        ),
    ),
    Architecture(
        "falcon",
        layers="h",
        embed="word_embeddings",
        norm="ln_f",
        rotary="rotary_emb",
        layer_kwargs=MappingProxyType({"alibi": None}),
        pp_refusals=MappingProxyType(
            {
                "alibi": "Falcon with alibi=True folds its position bias into the attention mask inside the model's "
                "forward, which a pipeline stage cannot call piecewise; use a rotary Falcon (alibi=False) or pp=1"
            }
        ),
        attention="self_attention",
        tp_styles=MappingProxyType(
            {
                "self_attention.query_key_value": "colwise",
                "self_attention.dense": "rowwise",
                "mlp.dense_h_to_4h": "colwise",
                "mlp.dense_4h_to_h": "rowwise",
            }
        ),
    ),
    Architecture(
        "gpt2",
        layers="h",
        embed="wte",
        positions="wpe",
        after_embed=("drop",),
        norm="ln_f",
        attention="attn",
        tp_styles=MappingProxyType(
            {"attn.c_attn": "fused_qkv", "attn.c_proj": "rowwise", "mlp.c_fc": "colwise", "mlp.c_proj": "rowwise"}
        ),
    ),
    Architecture(
        "bert",
        layers="encoder.layer",
        embed="embeddings",
        norm=None,
        head="cls",
        causal=False,
        attention="attention.self",
        tp_styles=MappingProxyType(
            {
                "attention.self.query": "colwise",
                "attention.self.key": "colwise",
                "attention.self.value": "colwise",
                "attention.output.dense": "rowwise",
                "intermediate.dense": "colwise",
                "output.dense": "rowwise",
            }
        ),
    ),
)

_VIT_ENTRY = Architecture(
    "vit",
    layers="layers",
    embed="embeddings",  # patches (a convolution), the class token and learned positions, from pixel_values
    norm="layernorm",
    head="classifier",
    causal=False,
    inputs="pixel_values",
    head_on_first_token=True,
    attention="attention",
    tp_styles=MappingProxyType(
        {
            "attention.q_proj": "colwise",
            "attention.k_proj": "colwise",
            "attention.v_proj": "colwise",
            "attention.o_proj": "rowwise",
            "mlp.fc1": "colwise",
            "mlp.fc2": "rowwise",
        }
    ),
)

_ALBERT_ENTRY = Architecture(
    "albert",
    layers="encoder.albert_layer_groups",  # one group of shared layers, called num_hidden_layers times
    embed="embeddings",
    norm=None,
    head="predictions",
    causal=False,
    attention="attention",
    tp_styles=MappingProxyType(
        {
            "attention.query": "colwise",
            "attention.key": "colwise",
            "attention.value": "colwise",
            "attention.dense": "rowwise",
            "ffn": "colwise",
            "ffn_output": "rowwise",
        }
    ),
    pp_refusals=MappingProxyType(  # keyed by model_type: every ALBERT config has it
        {
            "model_type": "ALBERT calls one shared group of layers num_hidden_layers times, so its layers cannot be "
            "placed on different stages (each stage would need the same weights); train ALBERT under dp, ZeRO 1-3 "
            "and tp (plan.pp=1), or use BERT for a pipeline"
        }
    ),
)

ARCHITECTURES: Mapping[str, Architecture] = MappingProxyType(
    {entry.name: entry for entry in (*_ENTRIES, _VIT_ENTRY, _ALBERT_ENTRY)}
)


# model_type -> why neither pipeline nor tensor parallel can split the family (dp and ZeRO 1-3 can)
UNSPLITTABLE: Mapping[str, str] = MappingProxyType(
    {
        "swin": "Swin's stages change the token grid (patch merging halves each side, doubling the width) and its "
        "blocks take the grid's dimensions, so plait's pipeline cannot pass one (batch, tokens, width) activation "
        "between stages; and each block's relative-position bias table holds every head, which plait's tensor "
        "parallel does not slice. Train Swin under dp and ZeRO 1-3 (plan.tp=1, plan.pp=1), or use ViT",
        "t5": "T5 is an encoder-decoder: the decoder's every layer reads the encoder's output (cross-attention), "
        "which plait's pipeline cannot pass along one (batch, seq, width) activation; and each stack's relative "
        "position bias holds every head, which plait's tensor parallel does not slice. Train T5 under dp, ZeRO "
        "1-3 and recomputation (plan.tp=1, plan.pp=1)",
    }
)
