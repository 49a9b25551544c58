"""Special tokens of the seed family's tasks, placed after a corpus tokenizer's vocabulary.

The corpus is tokenized once, without them (the token shards and their cache stay as they are); a
task inserts them into its samples, and the model's vocabulary is the corpus's plus these. Ids are
a function of the corpus vocabulary size alone, so the model can be built before the data is read.

    bert = BertTokens(8192)   # [PAD] 8192, [CLS] 8193, [SEP] 8194, [MASK] 8195; model vocabulary 8196
    t5 = T5Tokens(8192)       # <pad> 8192, </s> 8193, <extra_id_0> 8194, ...; model vocabulary 8294
"""

from __future__ import annotations

from dataclasses import dataclass

BERT_SPECIALS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]")
NUM_SENTINELS = 100  # as T5's vocabulary
T5_SPECIALS = ("<pad>", "</s>", *(f"<extra_id_{i}>" for i in range(NUM_SENTINELS)))


@dataclass(frozen=True)
class BertTokens:
    """Ids of BERT's (and ALBERT's) special tokens after a corpus vocabulary of `vocab_size` tokens."""

    vocab_size: int
    names = BERT_SPECIALS

    @property
    def pad(self) -> int:
        return self.vocab_size

    @property
    def cls(self) -> int:
        return self.vocab_size + 1

    @property
    def sep(self) -> int:
        return self.vocab_size + 2

    @property
    def mask(self) -> int:
        return self.vocab_size + 3

    @property
    def model_vocab_size(self) -> int:
        return self.vocab_size + len(self.names)


@dataclass(frozen=True)
class T5Tokens:
    """Ids of T5's special tokens (<pad>, </s>, sentinels) after a corpus vocabulary of `vocab_size` tokens."""

    vocab_size: int
    names = T5_SPECIALS

    @property
    def pad(self) -> int:
        return self.vocab_size

    @property
    def eos(self) -> int:
        return self.vocab_size + 1

    def sentinel(self, index: int) -> int:
        return self.vocab_size + 2 + index

    @property
    def model_vocab_size(self) -> int:
        return self.vocab_size + len(self.names)
