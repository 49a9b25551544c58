"""Precision policies: which dtype parameters, gradient reductions and master weights use."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import torch

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NAMED_PARAM_DTYPES = MappingProxyType({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16})


@dataclass(frozen=True)
class PrecisionPolicy:
    """The dtypes of one training run.

    - ``param_dtype``: parameters are stored and computed in it (forward and backward).
    - ``reduce_dtype``: gradients are communicated (summed across ranks) in it.
    - ``master_dtype``: the optimizer's copy of the weights; always fp32, because
      adding lr-sized updates to bf16/fp16 weights rounds most of them away.

    The named policies reduce in fp32 even for bf16/fp16: a bf16 sum over many
    ranks loses bits at every partial sum (8-bit mantissa), and fp16 sums can
    overflow. That doubles the gradient bytes on the wire; to trade accuracy
    for bandwidth pass ``reduce_dtype=torch.bfloat16``.

    Example::

        policy = PrecisionPolicy.from_name("bf16")
        cheap = PrecisionPolicy.from_name("bf16", reduce_dtype=torch.bfloat16)
    """

    param_dtype: torch.dtype
    reduce_dtype: torch.dtype
    master_dtype: torch.dtype = torch.float32
    name: str = "custom"

    def __post_init__(self) -> None:
        for field in ("param_dtype", "reduce_dtype"):
            dtype = getattr(self, field)
            if dtype not in _FLOAT_DTYPES:
                raise ValueError(f"PrecisionPolicy.{field}={dtype}: use one of {_dtype_names()}")
        if self.master_dtype != torch.float32:
            raise ValueError(
                f"PrecisionPolicy.master_dtype={self.master_dtype}: the optimizer's master copy must be "
                "torch.float32 (low-precision master weights swallow small updates)"
            )

    @classmethod
    def from_name(cls, name: str, *, reduce_dtype: torch.dtype | None = None) -> PrecisionPolicy:
        """The policy for ``"fp32"``, ``"bf16"`` or ``"fp16"``; ``reduce_dtype`` overrides fp32 reduction."""
        param_dtype = _NAMED_PARAM_DTYPES.get(name)
        if param_dtype is None:
            raise ValueError(f"unknown precision {name!r}: choose one of {', '.join(_NAMED_PARAM_DTYPES)}")
        return cls(
            param_dtype=param_dtype,
            reduce_dtype=torch.float32 if reduce_dtype is None else reduce_dtype,
            master_dtype=torch.float32,
            name=name,
        )

    @property
    def needs_master_copy(self) -> bool:
        """True when the optimizer must step an fp32 copy instead of the parameters themselves."""
        return self.param_dtype != self.master_dtype

    @property
    def uses_loss_scaling(self) -> bool:
        """True for fp16, whose narrow exponent range underflows small gradients without a loss scale."""
        return self.param_dtype == torch.float16


def _dtype_names() -> str:
    return ", ".join(str(dtype) for dtype in _FLOAT_DTYPES)
