"""An exponential moving average of the weights an engine trains, kept where the optimizer keeps them.

The average follows the tensors the optimizer steps: the model's parameters under plain data
parallel, this rank's pieces of the fp32 master shards under ZeRO 1-3. So each rank holds the average
of its own shard only (1/dp of the model under ZeRO), and the update is a local lerp with no
communication. `state_dict()` gathers the whole averaged weights (every rank must call it): it swaps
the averages into the optimizer's tensors, lets the engine publish them into the model (ZeRO 1-2
re-gather, ZeRO-3 gathers on use) and reads `engine.model_state_dict()`, then swaps the trained
weights back the same way.

    ema = EMA(engine, decay=0.999)
    for batch in loader:
        engine.train_step(batch)
        ema.update()
    weights = ema.state_dict()  # whole model, on every rank
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from plait.engine import Engine


def ema_decay(step: int, *, decay: float, warmup: int) -> float:
    """The decay at update `step` (0-based): (1 + step) / (warmup + step) while that is smaller, so the
    first updates follow the weights closely instead of averaging in the random initialisation."""
    if warmup <= 0:
        return decay
    return min(decay, (1.0 + step) / (warmup + step))


class EMA:
    """The average of every tensor `engine.optimizer` steps; `update()` after each optimizer step."""

    def __init__(self, engine: Engine, *, decay: float = 0.999, warmup: int = 10) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay={decay}: use a value in [0, 1), e.g. 0.999 (0 copies the latest weights)")
        if warmup < 0:
            raise ValueError(f"EMA warmup={warmup}: use 0 (no warm-up) or a positive number of updates")
        on_disk = [state for state, tier in engine.plan.offload_tiers.items() if tier in ("disk", "auto")]
        if on_disk:
            raise ValueError(
                f"an EMA of the weights with plan.offload_{on_disk[0]}={engine.plan.offload_tiers[on_disk[0]]!r} is "
                "not available: the master shard is paged from disk; offload to 'cpu' or 'none'"
            )
        self.engine = engine
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.params = [param for group in engine.optimizer.param_groups for param in group["params"]]
        self.averages = [param.detach().clone() for param in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Move each average towards the weights the optimizer just stepped."""
        weight = 1.0 - ema_decay(self.num_updates, decay=self.decay, warmup=self.warmup)
        for average, param in zip(self.averages, self.params, strict=True):
            average.lerp_(param.detach(), weight)
        self.num_updates += 1

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The engine's model holds the averaged weights inside the block (call on every rank)."""
        trained = [param.detach().clone() for param in self.params]
        self._publish(self.averages)
        try:
            yield
        finally:
            self._publish(trained)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole averaged weights by the model's names (every rank must call it: ZeRO gathers)."""
        with self.applied():
            return self.engine.model_state_dict()

    def local_state(self) -> list[torch.Tensor]:
        """This rank's averages (its shard pieces under ZeRO), in the optimizer's order."""
        return self.averages

    @torch.no_grad()
    def _publish(self, values: list[torch.Tensor]) -> None:
        for param, value in zip(self.params, values, strict=True):
            param.copy_(value)
        self.engine.data_parallel.after_step()  # ZeRO: masters into the parameter shards, gathered again
