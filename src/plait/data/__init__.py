"""Data: corpora, tokenizers, packed token shards and the sharded resumable loader.

Example::

    from plait.data import ShardedLoader, TokenDataset, prepare_dataset

    data = prepare_dataset("stdlib", vocab_size=8192, cache_dir=".cache/data")
    train = TokenDataset(data.train_path, dtype=data.dtype, seq_len=128)
    loader = ShardedLoader(train, global_batch=16, dp_rank=0, dp_size=1, seed=0)
    batch = loader.next_batch()  # {"input_ids": (16, 128), "labels": (16, 128)}
"""

from plait.data.corpus import corpus_fingerprint, iter_documents, stdlib_files
from plait.data.documents import document_positions
from plait.data.loader import ShardedLoader, TokenDataset, eval_batches, rank_batch_size
from plait.data.shards import PreparedData, prepare_dataset, token_dtype
from plait.data.tokenizer import EOT, EOT_ID, load_or_train_tokenizer, train_tokenizer

__all__ = [
    "EOT",
    "EOT_ID",
    "PreparedData",
    "ShardedLoader",
    "TokenDataset",
    "corpus_fingerprint",
    "document_positions",
    "eval_batches",
    "iter_documents",
    "load_or_train_tokenizer",
    "prepare_dataset",
    "rank_batch_size",
    "stdlib_files",
    "token_dtype",
    "train_tokenizer",
]
