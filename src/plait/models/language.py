"""BERT, ALBERT and T5 from transformers' own classes (plait does not re-implement them), with named
sizes and the task each trains with. Dropout is off unless overridden, so runs are reproducible and
plans can be checked against one process. The vocabulary is the corpus tokenizer's plus the task's
special tokens, which follow it (plait.data.special_tokens).

    model = build_language("bert-tiny", vocab_size=8192, max_positions=128)  # a BertForMaskedLM
    language_task_kind("bert-tiny")  # "masked_lm"
"""

from __future__ import annotations

from typing import Any

from torch import nn

from plait.data.special_tokens import BertTokens, T5Tokens

_BERT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
_ALBERT = {**_BERT, "classifier_dropout_prob": 0.0}
_T5 = {"dropout_rate": 0.0, "feed_forward_proj": "gelu_new", "use_cache": False}  # training: no key/value cache
# name -> (family, config fields). Tiny ones: 2 heads and even widths (tp=2), 4 layers (pp=2).
LANGUAGE_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "bert-tiny": ("bert", {**_BERT, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2,
                           "intermediate_size": 64}),
    # BERT-base's shape: 85M in the layers, ~92M with an 8192-token vocabulary
    "bert-100m": ("bert", {**_BERT, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                           "intermediate_size": 3072}),
    "albert-tiny": ("albert", {**_ALBERT, "embedding_size": 16, "hidden_size": 32, "num_hidden_layers": 4,
                               "num_attention_heads": 2, "intermediate_size": 64}),
    # one shared layer of width 2816 (95M), called 12 times; factorised 128-wide embeddings
    "albert-100m": ("albert", {**_ALBERT, "embedding_size": 128, "hidden_size": 2816, "num_hidden_layers": 12,
                               "num_attention_heads": 22, "intermediate_size": 11264}),
    "t5-tiny": ("t5", {**_T5, "d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2,
                       "num_heads": 2}),
    # T5-base's width with 6 + 6 layers: ~105M with an 8192-token vocabulary
    "t5-100m": ("t5", {**_T5, "d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 6, "num_decoder_layers": 6,
                       "num_heads": 12}),
}  # fmt: skip
TASK_OF_FAMILY = {"bert": "masked_lm", "albert": "masked_lm_sop", "t5": "span_corruption"}


def language_preset_names() -> list[str]:
    return sorted(LANGUAGE_PRESETS)


def is_language_preset(name: str) -> bool:
    return name in LANGUAGE_PRESETS


def language_task_kind(name: str) -> str:
    """The task preset `name` trains with (task.kind)."""
    return TASK_OF_FAMILY[_family(name)]


def language_config(name: str, *, vocab_size: int, max_positions: int, **overrides: Any) -> Any:
    """The transformers config of preset `name` for a corpus vocabulary of `vocab_size` tokens."""
    family = _family(name)
    config_class = _classes()[family][0]
    unknown = sorted(key for key in overrides if not hasattr(config_class(), key))
    if unknown:
        raise ValueError(
            f"model.{', model.'.join(unknown)} {'is not a field' if len(unknown) == 1 else 'are not fields'} of "
            f"{config_class.__name__}; drop the override(s) or use the config's names (e.g. hidden_size)"
        )
    return config_class(**{**LANGUAGE_PRESETS[name][1], **_vocabulary(family, vocab_size, max_positions), **overrides})


def build_language(name: str, *, vocab_size: int, max_positions: int, **overrides: Any) -> nn.Module:
    """A freshly initialised BertForMaskedLM / AlbertForPreTraining / T5ForConditionalGeneration."""
    config = language_config(name, vocab_size=vocab_size, max_positions=max_positions, **overrides)
    return _classes()[_family(name)][1](config)


def _family(name: str) -> str:
    if name not in LANGUAGE_PRESETS:
        raise ValueError(f"unknown language preset {name!r}; choose one of {', '.join(language_preset_names())}")
    return LANGUAGE_PRESETS[name][0]


def _vocabulary(family: str, vocab_size: int, max_positions: int) -> dict[str, Any]:
    if family == "t5":  # relative position buckets: no table of positions
        tokens = T5Tokens(vocab_size)
        ids = {"pad_token_id": tokens.pad, "eos_token_id": tokens.eos, "decoder_start_token_id": tokens.pad}
        return {"vocab_size": tokens.model_vocab_size, **ids}
    bert = BertTokens(vocab_size)
    return {"vocab_size": bert.model_vocab_size, "max_position_embeddings": max_positions, "pad_token_id": bert.pad}


def _classes() -> dict[str, tuple[Any, Any]]:
    import transformers  # here: plait's own models do not need transformers

    return {
        "bert": (transformers.BertConfig, transformers.BertForMaskedLM),
        "albert": (transformers.AlbertConfig, transformers.AlbertForPreTraining),
        "t5": (transformers.T5Config, transformers.T5ForConditionalGeneration),
    }
