"""MoEConfig: the shape and routing options of one Mixture-of-Experts layer."""

from __future__ import annotations

import math
from dataclasses import dataclass

SOFTMAX_ORDERS = ("before", "after")
ACTIVATIONS = ("gelu", "swiglu")


@dataclass(frozen=True)
class MoEConfig:
    """One MoE layer: ``num_experts`` expert MLPs of width ``d_ff``, ``top_k`` of them per token.

    Routing: ``softmax_order="before"`` takes a softmax over every expert, then the top
    ``top_k`` probabilities as weights (Switch, Mixtral, Qwen-MoE; ``normalize_topk``
    rescales the k weights to sum to 1, as Mixtral does); ``"after"`` takes the top
    ``top_k`` logits, then a softmax over those k.

    ``capacity_factor``: each expert takes at most
    ``ceil(capacity_factor * tokens * top_k / num_experts)`` token slots per routing
    group; later slots are dropped (their token passes on through the residual only).
    ``None`` drops nothing.

    The auxiliary losses are added to the training objective with these weights:
    ``aux_loss_weight`` * the Switch/GShard load-balancing loss, ``z_loss_weight`` * the
    router z-loss (ST-MoE).

    ``activation`` and ``bias`` follow the model's dense MLP (``"gelu"`` is tanh-GELU);
    expert weights are drawn as the dense MLP's are: normal(0, ``init_std``), the output
    projection normal(0, ``out_init_std``), zero biases.

    Example:
        >>> cfg = MoEConfig(d_model=64, d_ff=256, num_experts=4, top_k=2)
        >>> cfg.capacity(num_tokens=128) is None  # dropless
        True
    """

    d_model: int
    d_ff: int
    num_experts: int
    top_k: int = 1
    capacity_factor: float | None = None
    softmax_order: str = "before"
    normalize_topk: bool = False
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.0
    activation: str = "gelu"
    bias: bool = True
    init_std: float = 0.02
    out_init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts", "top_k"):
            _require_positive_int(name, getattr(self, name))
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k={self.top_k} exceeds num_experts={self.num_experts}; "
                f"choose top_k between 1 and {self.num_experts}"
            )
        if self.capacity_factor is not None and not _is_positive_number(self.capacity_factor):
            raise ValueError(
                f"capacity_factor={self.capacity_factor!r} must be a positive number (1.25 is Switch's), "
                "or None for no token dropping"
            )
        _require_choice("softmax_order", self.softmax_order, SOFTMAX_ORDERS)
        _require_choice("activation", self.activation, ACTIVATIONS)
        if self.normalize_topk and self.softmax_order == "after":
            raise ValueError(
                "normalize_topk=True has no effect with softmax_order='after' (the softmax over the top-k "
                "already sums to 1); set normalize_topk=False, or softmax_order='before'"
            )
        for name in ("aux_loss_weight", "z_loss_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name}={value!r} must be a number >= 0 (0 turns that loss off)")
        for name in ("init_std", "out_init_std"):
            if not _is_positive_number(getattr(self, name)):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}")

    def capacity(self, num_tokens: int) -> int | None:
        """Token slots each expert takes from a routing group of ``num_tokens`` tokens (None: no limit)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)


def _is_positive_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and value > 0


def _require_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _require_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        options = " or ".join(repr(c) for c in choices)
        raise ValueError(f"{name}={value!r} is not supported; use {options}")
