"""Memory-mapped token samples and the data-parallel, resumable loader.

The loader walks one global order of samples, the same for every plan: epoch
``e`` is a permutation seeded by ``(seed, e)``, and a global offset counts the
samples consumed so far. Step ``s`` takes samples ``[s * global_batch,
(s + 1) * global_batch)`` of that order and each data-parallel rank reads its
contiguous slice, so the global batch, and a checkpoint's resume point, do not
depend on how many ranks share it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plait.data.documents import document_positions

Batch = dict[str, torch.Tensor]
# (rows (n, seq_len), their global positions (n,)) -> the model's batch: a task's (plait.tasks.text)
BatchMaker = Callable[[torch.Tensor, np.ndarray], Batch]


class TokenDataset:
    """Non-overlapping ``seq_len``-token windows of a packed token file.

    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "tokens.bin")
    >>> np.arange(10, dtype=np.uint16).tofile(path)
    >>> data = TokenDataset(path, dtype=np.uint16, seq_len=4)
    >>> len(data), data[1].tolist()
    (2, [4, 5, 6, 7])
    """

    def __init__(self, path: str | os.PathLike, *, dtype: np.dtype | type, seq_len: int) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.seq_len = seq_len
        self.num_tokens = _count_tokens(self.path, self.dtype)
        if seq_len < 1 or self.num_tokens < seq_len:
            raise ValueError(
                f"{self.path} holds {self.num_tokens} tokens, too few for one sample of "
                f"seq_len={seq_len}; use a seq_len between 1 and {self.num_tokens} or more data"
            )
        num_samples = self.num_tokens // seq_len
        tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(num_samples * seq_len,))
        self._samples = tokens.reshape(num_samples, seq_len)  # (num_samples, seq_len)

    def __len__(self) -> int:
        return self._samples.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        return torch.from_numpy(self._samples[index].astype(np.int64))

    def gather(self, indices: np.ndarray) -> torch.Tensor:
        """The samples at ``indices`` as one int64 tensor of shape (len(indices), seq_len)."""
        return torch.from_numpy(self._samples[indices].astype(np.int64))


class ShardedLoader:
    """This data-parallel rank's share of each step's global batch, forever.

    Every call to :meth:`next_batch` returns ``global_batch // dp_size``
    sequences as ``{"input_ids", "labels"}`` (labels equal input_ids,
    unshifted: the loss shifts them), plus ``position_ids`` per document when
    ``eot_id`` is given. Epochs follow one another seamlessly.

    Example::

        loader = ShardedLoader(train, global_batch=16, dp_rank=rank, dp_size=2, seed=0)
        batch = loader.next_batch()          # input_ids: (8, seq_len)
        state = loader.state_dict()          # resumable under any dp_size
    """

    def __init__(
        self,
        dataset: TokenDataset,
        *,
        global_batch: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool = True,
        eot_id: int | None = None,
        batch_maker: BatchMaker | None = None,
    ) -> None:
        self.per_rank = rank_batch_size(global_batch, dp_rank=dp_rank, dp_size=dp_size)
        self.dataset = dataset
        self.global_batch = global_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.eot_id = eot_id  # given: batches carry per-document position_ids (plait.data.documents)
        self.batch_maker = batch_maker  # given: it makes each batch (a task's inputs and labels) from the rows
        self.offset = 0
        self._cached_epoch = -1
        self._cached_order = np.empty(0, dtype=np.int64)

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    @property
    def epoch(self) -> int:
        """The epoch of the next sample to be read."""
        return self.offset // self.num_samples

    def next_batch(self) -> Batch:
        """This rank's slice of the next global batch; advances the global offset."""
        start = self.offset + self.dp_rank * self.per_rank
        input_ids = self.dataset.gather(self.global_indices(start, self.per_rank))
        self.offset += self.global_batch
        if self.batch_maker is not None:
            return self.batch_maker(input_ids, np.arange(start, start + self.per_rank))
        return make_batch(input_ids, eot_id=self.eot_id)

    def __iter__(self) -> ShardedLoader:
        return self

    def __next__(self) -> Batch:
        return self.next_batch()

    def global_indices(self, start: int, count: int) -> np.ndarray:
        """Sample indices at global positions ``[start, start + count)``, across epochs."""
        pieces = []
        while count > 0:
            epoch, position = divmod(start, self.num_samples)
            piece = self.epoch_order(epoch)[position : position + count]
            pieces.append(piece)
            start += len(piece)
            count -= len(piece)
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The order in which epoch ``epoch`` visits the samples."""
        if epoch != self._cached_epoch:
            if self.shuffle:
                generator = np.random.default_rng([self.seed, epoch])
                self._cached_order = generator.permutation(self.num_samples)
            else:
                self._cached_order = np.arange(self.num_samples)
            self._cached_epoch = epoch
        return self._cached_order

    def state_dict(self) -> dict[str, int]:
        """Where the global order stands; the same on every rank."""
        return {
            "offset": self.offset,
            "seed": self.seed,
            "global_batch": self.global_batch,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved global offset, with the saved seed.

        The next batch holds the samples an uninterrupted run would have read,
        whatever this loader's ``dp_size``. A different ``global_batch`` is
        allowed (the offset counts samples, not steps); a different dataset is not.
        """
        if state["num_samples"] != self.num_samples:
            raise ValueError(
                f"the dataset changed: the loader state was saved with {state['num_samples']} "
                f"samples, this dataset has {self.num_samples} (another corpus, vocab_size or "
                "seq_len?); resume with the same data, or start the loader afresh"
            )
        self.offset = int(state["offset"])
        if int(state["seed"]) != self.seed:
            self.seed = int(state["seed"])
            self._cached_epoch = -1


def rank_batch_size(global_batch: int, *, dp_rank: int, dp_size: int) -> int:
    """Sequences per rank, checking that ``dp_size`` ranks split ``global_batch`` evenly."""
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, dp_size) with dp_size >= 1, got dp_rank={dp_rank}, dp_size={dp_size}")
    if global_batch < 1 or global_batch % dp_size != 0:
        lower = global_batch // dp_size * dp_size
        nearest = [n for n in (lower, lower + dp_size) if n > 0]
        raise ValueError(
            f"global_batch={global_batch} does not split evenly over dp_size={dp_size} "
            f"ranks; use a multiple of {dp_size}, such as {' or '.join(map(str, nearest))}"
        )
    return global_batch // dp_size


def eval_batches(
    dataset: TokenDataset,
    *,
    batch_size: int,
    num_batches: int,
    dp_rank: int,
    dp_size: int,
    eot_id: int | None = None,
    batch_maker: BatchMaker | None = None,
) -> list[Batch]:
    """This rank's share of a fixed validation set: the first ``num_batches`` batches.

    The same samples every time, so validation losses compare across steps.
    ``batch_size`` is global (all ranks together). When the dataset is smaller,
    fewer batches come back (as many whole ones as it holds).
    """
    per_rank = rank_batch_size(batch_size, dp_rank=dp_rank, dp_size=dp_size)
    if num_batches < 1:
        raise ValueError(f"num_batches must be at least 1, got {num_batches}")
    num_batches = min(num_batches, len(dataset) // batch_size)
    if num_batches < 1:
        raise ValueError(
            f"the validation set has {len(dataset)} samples, fewer than one eval batch of "
            f"{batch_size}; lower the eval batch size or seq_len, or raise val_fraction"
        )
    batches = []
    for step in range(num_batches):
        start = step * batch_size + dp_rank * per_rank
        positions = np.arange(start, start + per_rank)
        input_ids = dataset.gather(positions)
        batches.append(batch_maker(input_ids, positions) if batch_maker else make_batch(input_ids, eot_id=eot_id))
    return batches


def make_batch(input_ids: torch.Tensor, *, eot_id: int | None) -> Batch:
    """``input_ids`` and ``labels`` (the same tokens: the loss shifts them), plus ``position_ids``
    restarting at each document when ``eot_id`` is given (documents attend only within themselves)."""
    batch = {"input_ids": input_ids, "labels": input_ids.clone()}
    if eot_id is not None:
        batch["position_ids"] = document_positions(input_ids, eot_id=eot_id)
    return batch


def _count_tokens(path: Path, dtype: np.dtype) -> int:
    if not path.is_file():
        raise ValueError(f"token file {path} does not exist; create it with prepare_dataset()")
    num_bytes = path.stat().st_size
    if num_bytes % dtype.itemsize != 0:
        raise ValueError(
            f"{path} is {num_bytes} bytes, not a whole number of {dtype.name} tokens; "
            "pass the dtype it was written with (PreparedData.dtype)"
        )
    return num_bytes // dtype.itemsize
