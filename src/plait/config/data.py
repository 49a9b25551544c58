"""[data]: the corpus, its tokenizer and how rows are cut from it."""

from __future__ import annotations

from dataclasses import dataclass

from plait.config.choices import require


@dataclass
class DataConfig:
    corpus: str | list[str] = "stdlib"
    seq_len: int = 64  # the default model (preset "tiny") has 64 positions
    vocab_size: int = 8192
    val_fraction: float = 0.01
    cache_dir: str = ".cache/plait"
    document_mask: bool = False  # packed rows: each document attends only to itself, positions restart per document

    def __post_init__(self) -> None:
        require(self.seq_len >= 2, f"data.seq_len={self.seq_len}: a causal LM needs at least 2 tokens per sample")
        require(
            256 < self.vocab_size <= 2**32,
            f"data.vocab_size={self.vocab_size}: a byte-level BPE needs more than 256 tokens (8192 is a good default)",
        )
        require(
            0 <= self.val_fraction < 0.5,
            f"data.val_fraction={self.val_fraction}: use a fraction in [0, 0.5), e.g. 0.01 (0: no validation split)",
        )
        if isinstance(self.corpus, list):
            require(len(self.corpus) > 0, "data.corpus is an empty list; give 'stdlib' or paths to .txt/.jsonl files")
        require(
            self.corpus != "" and self.cache_dir != "",
            "data.corpus and data.cache_dir cannot be empty; e.g. corpus = 'stdlib', cache_dir = '.cache/plait'",
        )
