"""The seam between routing and the experts: moving token slots to the experts that take them.

Routing decides, for every kept token slot, its expert (slots sorted by expert, see
``Assignment``); a dispatch moves those slots to wherever their experts live and
brings the experts' outputs back in the same order. ``LocalDispatch`` is the identity:
every expert is on this rank. Expert parallel plugs in here with a dispatch whose
``dispatch`` sends each expert's contiguous run of slots to the rank holding it
(``all_to_all_single`` with uneven splits, after exchanging ``tokens_per_expert``),
regroups what arrives by local expert, and whose ``combine`` undoes both steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class Dispatched:
    """What this rank's experts compute on, and what ``combine`` needs to send results back."""

    tokens: torch.Tensor  # (S_local, d_model), sorted by local expert
    tokens_per_local_expert: list[int]  # one count per local expert, on the host (they size the slices)
    state: Any = None  # the exchange's bookkeeping (split sizes, a permutation); None when local


class Dispatch(Protocol):
    """Exchange of token slots between routing and the experts (see the module docstring)."""

    def dispatch(self, tokens: torch.Tensor, tokens_per_expert: torch.Tensor) -> Dispatched:
        """``tokens`` (S, d) sorted by global expert, ``tokens_per_expert`` (E,): this rank's experts' share."""
        ...

    def combine(self, expert_output: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        """The experts' outputs (S_local, d) back to this rank's slots, in the order ``dispatch`` received."""
        ...


class LocalDispatch:
    """Every expert lives on this rank: nothing moves."""

    def dispatch(self, tokens: torch.Tensor, tokens_per_expert: torch.Tensor) -> Dispatched:
        return Dispatched(tokens=tokens, tokens_per_local_expert=tokens_per_expert.tolist())

    def combine(self, expert_output: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        return expert_output
