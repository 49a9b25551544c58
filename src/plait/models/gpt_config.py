"""GPTConfig: the shape and options of one decoder-only model (GPT-2 and Llama/PaLM)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "swiglu")
POSITIONS = ("learned", "rope")
MOE_SOFTMAX_ORDERS = ("before", "after")

# Llama's SwiGLU width rule rounds up to a multiple of this. Llama's reference code used
# 256 at 7B scale; 64 keeps small models close to the 4*d_model GELU MLP they replace.
SWIGLU_MULTIPLE_OF = 64


@dataclass(frozen=True)
class GPTConfig:
    """Shape and options of a decoder-only transformer.

    The defaults are GPT-2's (LayerNorm, tanh-GELU MLP, learned positions, biases, tied
    embeddings). Llama uses ``norm="rmsnorm", activation="swiglu", position="rope",
    bias=False, tied_embeddings=False`` and optionally ``num_kv_heads < num_heads`` (GQA;
    1 is MQA). ``parallel_block=True`` feeds attention and MLP the same normed input
    (PaLM, GPT-J).

    ``num_kv_heads=None`` and ``d_ff=None`` mean "derive from the other fields" and stay
    ``None`` in the config, so ``dataclasses.replace(cfg, d_model=...)`` re-derives them;
    read the derived values from ``resolved_num_kv_heads`` and ``resolved_d_ff``.
    ``d_ff=None`` is ``4 * d_model`` for GELU and, for SwiGLU, Llama's rule
    ``int(2 * 4 * d_model / 3)`` rounded up to a multiple of 64.

    ``activation="gelu"`` is GPT-2's tanh approximation (``gelu_new`` in Hugging Face).

    Mixture of Experts (``plait.moe``): ``moe_experts > 0`` replaces the MLP of every
    ``moe_every``-th layer (layers ``moe_every - 1, 2 * moe_every - 1, ...``; 1: all) by
    ``moe_experts`` expert MLPs of width ``moe_d_ff`` (default: the dense MLP's), each token
    routed to ``moe_top_k`` of them. ``moe_capacity_factor=None`` drops no token;
    ``moe_softmax_order``, ``moe_normalize_topk``, ``moe_aux_loss_weight`` and
    ``moe_z_loss_weight`` are ``plait.moe.MoEConfig``'s options. ``moe_shared_experts``
    adds that many always-on experts to every MoE layer, as one dense MLP
    ``moe_shared_experts * moe_d_ff`` wide (Qwen2-MoE, DeepSeek-MoE).

    Example:
        >>> cfg = GPTConfig(vocab_size=512, max_seq_len=64, d_model=64, num_layers=2,
        ...                 num_heads=4)
        >>> cfg.num_parameters()
        136960
    """

    vocab_size: int
    max_seq_len: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
    d_ff: int | None = None
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    activation: str = "gelu"
    position: str = "learned"
    rope_theta: float = 10000.0
    bias: bool = True
    tied_embeddings: bool = True
    parallel_block: bool = False
    dropout: float = 0.0
    init_std: float = 0.02
    moe_experts: int = 0
    moe_every: int = 1
    moe_top_k: int = 2
    moe_capacity_factor: float | None = None
    moe_softmax_order: str = "before"
    moe_normalize_topk: bool = False
    moe_aux_loss_weight: float = 0.01
    moe_z_loss_weight: float = 0.0
    moe_shared_experts: int = 0
    moe_d_ff: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_seq_len", "d_model", "num_layers", "num_heads"):
            _require_positive_int(name, getattr(self, name))
        for name in ("num_kv_heads", "d_ff"):
            if getattr(self, name) is not None:
                _require_positive_int(name, getattr(self, name))
        _require_choice("norm", self.norm, NORMS)
        _require_choice("activation", self.activation, ACTIVATIONS)
        _require_choice("position", self.position, POSITIONS)
        for name in ("norm_eps", "rope_theta", "init_std"):
            _require_positive_float(name, getattr(self, name))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1); use 0.0 to disable")
        self._check_heads()
        self._check_moe()

    def _check_moe(self) -> None:
        for name in ("moe_experts", "moe_shared_experts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not self.moe_experts:
            return
        for name in ("moe_every", "moe_top_k"):
            _require_positive_int(name, getattr(self, name))
        if self.moe_d_ff is not None:
            _require_positive_int("moe_d_ff", self.moe_d_ff)
        if self.moe_every > self.num_layers:
            raise ValueError(
                f"moe_every={self.moe_every} exceeds num_layers={self.num_layers}, so no layer would be MoE; "
                f"use moe_every in 1..{self.num_layers}, or moe_experts=0 for a dense model"
            )
        if self.moe_top_k > self.moe_experts:
            raise ValueError(
                f"moe_top_k={self.moe_top_k} exceeds moe_experts={self.moe_experts}; "
                f"route each token to 1..{self.moe_experts} experts"
            )
        if self.moe_capacity_factor is not None:
            _require_positive_float("moe_capacity_factor (None for no token dropping)", self.moe_capacity_factor)
        _require_choice("moe_softmax_order", self.moe_softmax_order, MOE_SOFTMAX_ORDERS)
        for name in ("moe_aux_loss_weight", "moe_z_loss_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name}={value!r} must be a number >= 0 (0 turns that loss off)")
        if self.moe_normalize_topk and self.moe_softmax_order == "after":
            raise ValueError(
                "moe_normalize_topk=True has no effect with moe_softmax_order='after' (its weights already "
                "sum to 1); set moe_normalize_topk=False, or moe_softmax_order='before'"
            )

    def _check_heads(self) -> None:
        if self.d_model % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} does not divide d_model={self.d_model}; "
                f"choose a head count that divides it: {_divisors(self.d_model)}"
            )
        if self.num_heads % self.resolved_num_kv_heads:
            raise ValueError(
                f"num_kv_heads={self.num_kv_heads} does not divide num_heads={self.num_heads} "
                "(each key/value head serves an equal group of query heads); choose one of "
                f"{_divisors(self.num_heads)}, or None for one kv head per query head"
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(
                f"position='rope' needs an even head_dim, but d_model/num_heads = "
                f"{self.d_model}/{self.num_heads} = {self.head_dim}; change num_heads or d_model"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``d_model // num_heads``."""
        return self.d_model // self.num_heads

    @property
    def resolved_num_kv_heads(self) -> int:
        """``num_kv_heads``, or ``num_heads`` when it is None (plain multi-head attention)."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def resolved_d_ff(self) -> int:
        """``d_ff``, or the default MLP width for the activation when it is None."""
        if self.d_ff is not None:
            return self.d_ff
        if self.activation == "swiglu":
            width = int(2 * 4 * self.d_model / 3)
            return SWIGLU_MULTIPLE_OF * math.ceil(width / SWIGLU_MULTIPLE_OF)
        return 4 * self.d_model

    @property
    def resolved_moe_d_ff(self) -> int:
        """Width of one expert MLP: ``moe_d_ff``, or the dense MLP's width when it is None."""
        return self.moe_d_ff if self.moe_d_ff is not None else self.resolved_d_ff

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer ``index`` (from 0) has an MoE MLP: every ``moe_every``-th layer, counting from 1."""
        return self.moe_experts > 0 and (index + 1) % self.moe_every == 0

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))

    def num_parameters(self) -> int:
        """Parameter count of ``GPT(self)``, computed without building it.

        Tied embeddings count once. Equals ``sum(p.numel() for p in model.parameters())``.
        """
        embeddings = self.vocab_size * self.d_model
        if self.position == "learned":
            embeddings += self.max_seq_len * self.d_model
        head = 0 if self.tied_embeddings else self.vocab_size * self.d_model
        blocks = sum(self._block_parameters(moe=self.is_moe_layer(i)) for i in range(self.num_layers))
        return embeddings + blocks + self._norm_parameters() + head

    def num_active_parameters(self) -> int:
        """Parameters one token computes with: ``num_parameters()`` less the experts it is not routed
        to (``moe_experts - moe_top_k`` per MoE layer). Equal to ``num_parameters()`` for a dense model."""
        idle = (self.moe_experts - self.moe_top_k) * self._mlp_parameters(self.resolved_moe_d_ff)
        return self.num_parameters() - self.num_moe_layers * idle

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs (forward + backward) per token at sequence length ``seq_len``.

        ``6 * N + 12 * num_layers * d_model * seq_len``, as in the PaLM paper (appendix B)
        and nanoGPT: each parameter that takes part in a matmul costs 2 FLOPs per token
        forward and 4 backward; attention's two score matmuls (QK^T and AV) add
        ``2 * 2 * d_model * seq_len`` forward per layer, tripled for the backward,
        counted over the full (not causally halved) score matrix. N is every parameter
        except the embedding lookups (token and position tables), plus the output head
        even when it shares the token table, since its matmul is real work. With MoE, N
        counts the active parameters (``num_active_parameters``: the router, ``moe_top_k``
        experts and the shared experts per MoE layer).
        """
        _require_positive_int("seq_len", seq_len)
        matmul_params = self.num_active_parameters() - self.vocab_size * self.d_model
        if self.position == "learned":
            matmul_params -= self.max_seq_len * self.d_model
        if self.tied_embeddings:
            matmul_params += self.vocab_size * self.d_model
        attention = 12 * self.num_layers * self.d_model * seq_len
        return 6 * matmul_params + attention

    def _norm_parameters(self) -> int:
        with_bias = self.norm == "layernorm" and self.bias
        return self.d_model * (2 if with_bias else 1)

    def _block_parameters(self, *, moe: bool = False) -> int:
        d, kv_width = self.d_model, self.resolved_num_kv_heads * self.head_dim
        attn = 2 * d * d + 2 * d * kv_width + (2 * d + 2 * kv_width if self.bias else 0)
        mlp = self._moe_parameters() if moe else self._mlp_parameters(self.resolved_d_ff)
        num_norms = 1 if self.parallel_block else 2
        return attn + mlp + num_norms * self._norm_parameters()

    def _mlp_parameters(self, d_ff: int) -> int:
        d, num_in = self.d_model, (2 if self.activation == "swiglu" else 1)
        return (num_in + 1) * d * d_ff + (num_in * d_ff + d if self.bias else 0)

    def _moe_parameters(self) -> int:
        """Router, experts and the shared experts' MLP of one MoE layer."""
        d_ff = self.resolved_moe_d_ff
        shared = self._mlp_parameters(self.moe_shared_experts * d_ff) if self.moe_shared_experts else 0
        return self.d_model * self.moe_experts + self.moe_experts * self._mlp_parameters(d_ff) + shared


def config_field_names() -> tuple[str, ...]:
    """Names of every GPTConfig field, in declaration order."""
    return tuple(field.name for field in dataclasses.fields(GPTConfig))


def _divisors(n: int) -> str:
    return ", ".join(str(k) for k in range(1, n + 1) if n % k == 0)


def _require_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _require_positive_float(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _require_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        options = " or ".join(repr(c) for c in choices)
        raise ValueError(f"{name}={value!r} is not supported; use {options}")
