"""Byte-level BPE tokenizers, trained on a corpus with HF ``tokenizers`` and cached; or a model's own."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from plait.data.corpus import Corpus, corpus_fingerprint, iter_documents

EOT = "<|endoftext|>"
EOT_ID = 0
TOKENIZER_FILE = "tokenizer.json"
# 256 byte symbols plus the end-of-text token.
MIN_VOCAB_SIZE = 257

# mkstemp makes owner-only files; cached data is meant to be shared like any output.
_FILE_MODE = 0o644

Progress = Callable[[str], None]


@dataclass(frozen=True)
class GivenTokenizer:
    """A tokenizer that comes with a model (a pretrained directory's), used instead of training one.

    ``json`` is its ``tokenizers`` serialisation; ``eot_id`` the token that ends each packed
    document (the model's end-of-sequence token); ``vocab_size`` counts added tokens too.
    """

    json: str
    eot_id: int
    vocab_size: int

    @property
    def fingerprint(self) -> str:
        """A content hash: the token shards it produced are cached under it."""
        digest = hashlib.blake2b(self.json.encode(), digest_size=8)
        digest.update(self.eot_id.to_bytes(8, "little"))
        return digest.hexdigest()

    def load(self) -> Tokenizer:
        return Tokenizer.from_str(self.json)


def train_tokenizer(documents: Iterable[str], *, vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer with ``EOT`` as token 0.

    Every byte is in the initial alphabet, so any text encodes and
    ``tokenizer.decode(tokenizer.encode(text).ids) == text``.

    >>> tok = train_tokenizer(["def f(x):\\n    return x\\n"] * 10, vocab_size=300)
    >>> tok.token_to_id(EOT)
    0
    """
    check_vocab_size(vocab_size)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    assert tokenizer.token_to_id(EOT) == EOT_ID, "special tokens come first in BPE training"
    return tokenizer


def add_special_tokens(tokenizer: Tokenizer, names: Sequence[str]) -> list[int]:
    """Add a task's special tokens (plait.data.special_tokens) after the vocabulary; returns their ids.

    They must land at ids vocab_size, vocab_size + 1, ... (where tasks and models put them), so the
    tokenizer must hold exactly the vocabulary it was trained for.

    >>> tok = train_tokenizer(["def f(x):\\n    return x\\n"] * 10, vocab_size=300)
    >>> first = tok.get_vocab_size()
    >>> add_special_tokens(tok, ["[CLS]", "[SEP]"]) == [first, first + 1]
    True
    """
    first = tokenizer.get_vocab_size()
    tokenizer.add_special_tokens(list(names))
    ids = [tokenizer.token_to_id(name) for name in names]
    if ids != list(range(first, first + len(names))):
        raise ValueError(
            f"special tokens {list(names)[:4]} landed at ids {ids[:4]}, not after the {first}-token vocabulary; "
            "the tokenizer already knows some of them: use a tokenizer trained by plait (train_tokenizer)"
        )
    return ids


def load_or_train_tokenizer(
    corpus: Corpus,
    *,
    vocab_size: int,
    cache_dir: str | os.PathLike,
    progress: Progress | None = None,
) -> Tokenizer:
    """Load the corpus's tokenizer from ``cache_dir``, training and saving it if absent.

    The cache lives in ``cache_dir/<corpus fingerprint>-v<vocab_size>/tokenizer.json``,
    so editing the corpus or changing the vocabulary trains a fresh one.
    """
    check_vocab_size(vocab_size)
    directory = dataset_dir(cache_dir, fingerprint=corpus_fingerprint(corpus), vocab_size=vocab_size)
    path = tokenizer_at(directory / TOKENIZER_FILE, corpus, vocab_size=vocab_size, progress=progress)
    return Tokenizer.from_file(str(path))


def tokenizer_at(path: Path, corpus: Corpus, *, vocab_size: int, progress: Progress | None = None) -> Path:
    """Make sure a tokenizer trained on ``corpus`` is saved at ``path``; return it."""
    if path.is_file():
        return path
    if progress is not None:
        progress(f"training a {vocab_size}-token BPE tokenizer on {_short(corpus)}")
    tokenizer = train_tokenizer(iter_documents(corpus), vocab_size=vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        tokenizer.save(str(temporary))
    return path


def dataset_dir(cache_dir: str | os.PathLike, *, fingerprint: str, vocab_size: int) -> Path:
    """The cache directory for one corpus and vocabulary size."""
    return Path(cache_dir) / f"{fingerprint}-v{vocab_size}"


def check_vocab_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be an integer >= {MIN_VOCAB_SIZE} (256 bytes + {EOT}), got {vocab_size!r}; try 8192"
        )


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` on success.

    Readers never see a half-written file, and concurrent writers (several
    ranks preparing the same data) each finish with a complete file.
    """
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, _FILE_MODE)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _short(corpus: Corpus) -> str:
    text = str(corpus) if isinstance(corpus, str | os.PathLike) else str([str(p) for p in corpus])
    return text if len(text) <= 60 else text[:57] + "..."
