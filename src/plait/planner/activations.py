"""Bytes of activations a layer keeps for backward, per micro-batch, in two accountings.

``plait``: what plait's GPT saves (counted from its forward, checked against
live-tensor measurements). Per layer, n = b*s tokens, h hidden, f MLP width,
e bytes per element, t tensor-parallel ranks:

- residual stream: the layer input and the sum after attention, 2nh
  (sequence-sharded, /t, under sequence parallel);
- norm outputs: 2nh (nh for the parallel block), whole under tp; under
  sequence parallel 2nh/t: the column layers fed one norm (q, k, v; gate,
  up) keep its sequence chunk and all-gather it again in backward, as
  Megatron does (`working`: that one gathered copy while their backward runs);
- attention: q and the output of fused attention, 2nh/t, K and V at the kv
  heads' width, 2nh*r/t (r = kv heads / heads: SDPA groups the query heads
  itself, no repeated copy; except fp32 on a GPU, where plait repeats K/V for
  the memory-efficient kernel and this undercounts by 2nh(1-r)/t), plus its
  fp32 log-sum-exp, 4*b*a*s/t bytes (no s x s scores are ever stored);
  rotary positions add their cos and sin tables, s * head_dim elements;
- MLP: 2nf/t for GELU (its input and output), 3nf/t for SwiGLU (gate, up and
  their product: silu(gate) is re-run in backward);
- norm statistics in fp32 for LayerNorm (mean and rstd); RMSNorm keeps only
  its input (the residual stream) and re-runs itself in backward.
- an MoE layer's MLP instead: n*k*c token slots (top_k k, capacity factor
  c, 1 when dropless: the most slots the experts of one rank can take under
  expert parallel) each keep the expert MLP's activations (2f/t or 4f/t
  elements: tp splits each expert's width), the gathered input and the
  expert output (2h, whole); the router keeps its fp32 logits and probabilities (2*n*E*4 bytes);
  shared experts keep a dense MLP's.

Context parallel (cp ranks) cuts every sequence over the cp group: each rank holds s/cp tokens of
it, so every term above is taken at s/cp, the head's too. Ring attention keeps the same per token
(q and its fp32 output and lse), but K and V with the model's kv heads (the whole-sequence path
repeats them to every query head for SDPA). Its backward holds, while it runs, fp32 blocks of
s/cp tokens that travel the ring (`ring_working_bytes`).

``megatron``: Korthikanti et al. 2022's count for Megatron's layer (16-bit,
dropout masks, materialised attention scores; grouped kv heads and the MLP's
width and kind as in `_megatron_full`): sbh(34 + 5as/h) without
parallelism, sbh(10 + 24/t + 5as/(ht)) with tp, (sbh/t)(34 + 5as/h) with
tp + sp; selective recomputation drops the 5as^2b term; full recomputation
keeps only the layer input, 2sbh (/t with sp).
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.planner.shape import ModelShape

PROFILES = ("plait", "megatron")
FP32 = 4


@dataclass(frozen=True)
class LayerActivations:
    """Bytes one layer holds for one micro-batch: `saved` between its forward and backward,
    `working` extra while its backward runs (recomputed activations and gradients in flight)."""

    saved: float
    working: float


def _moe_mlp(shape: ModelShape, *, n: int, e: int, tp: int) -> float:
    c = shape.config
    per_mlp = 4 if c.activation == "swiglu" else 2
    slots = n * c.moe_top_k * (c.moe_capacity_factor or 1.0)
    experts = slots * (per_mlp * c.resolved_moe_d_ff / tp + 2 * c.d_model) * e
    router = 2 * n * c.moe_experts * FP32
    dense_per_mlp = 3 if c.activation == "swiglu" else 2  # shared experts are the model's MLP (`_plait_full`)
    shared = dense_per_mlp * n * c.moe_shared_experts * c.resolved_moe_d_ff * e
    return experts + router + shared


def _plait_full(shape: ModelShape, *, b: int, s: int, e: int, tp: int, sp: bool, moe: bool = False) -> float:
    c = shape.config
    n, h, f = b * s, c.d_model, c.resolved_d_ff
    residual = 2 * n * h * e / (tp if sp else 1)
    num_norms = 1 if c.parallel_block else 2
    norms = num_norms * n * h * e / (tp if sp else 1)  # under sp the column layers keep the sequence chunk
    kv_width = c.resolved_num_kv_heads * c.head_dim  # SDPA (enable_gqa) and the ring take K/V unrepeated
    attention = (2 * h + 2 * kv_width) * n * e / tp + FP32 * b * c.num_heads * s / tp
    mlp = _moe_mlp(shape, n=n, e=e, tp=tp) if moe else (3 if c.activation == "swiglu" else 2) * n * f * e / tp
    stats_per_token = 2 * FP32 if c.norm == "layernorm" else 0  # RMSNorm keeps its input alone (the residual)
    stats = num_norms * n * stats_per_token / (tp if sp else 1)
    rope = s * c.head_dim * e if c.position == "rope" else 0.0  # its cos and sin tables, made per layer
    return residual + norms + attention + mlp + stats + rope


def _megatron_full(shape: ModelShape, *, b: int, s: int, tp: int, sp: bool, selective: bool) -> float:
    """Korthikanti's terms per sbh, generalised to grouped kv heads (ratio r = kv heads / heads: K and V
    take 2r each) and to the MLP's width f and kind (GELU keeps its input and fc2's, 4f/h; SwiGLU its two
    inputs and fc2's, 6f/h). Outside the tp split: the QKV and fc1 inputs, two dropout masks and the norms'
    inputs, 10; split: Q and the projection input 4, K and V 4r, the MLP. GPT-3's layer (r = 1, f = 4h,
    GELU) gives the paper's 10 + 24/t, 34 with sequence parallel."""
    c = shape.config
    h, a = shape.hidden, c.num_heads
    sbh = s * b * h
    r = c.resolved_num_kv_heads / a
    split = 4 + 4 * r + (6 if c.activation == "swiglu" else 4) * c.resolved_d_ff / h
    scores = 0.0 if selective else 5 * a * s / h
    if sp or tp == 1:
        return sbh / tp * (10 + split + scores)
    return sbh * (10 + split / tp + scores / tp)


def layer_activations(
    shape: ModelShape,
    *,
    micro_batch: int,
    seq_len: int,
    element_bytes: int,
    tp: int = 1,
    sp: bool = False,
    recompute: str = "none",
    profile: str = "plait",
    moe: bool = False,
    cp: int = 1,
) -> LayerActivations:
    """Activation bytes of one layer for one micro-batch of `micro_batch` sequences.

    `recompute`: "none", "full" (keep the layer input only) or "selective"
    (megatron: drop the attention scores; plait's selective recomputation is
    full recomputation of a fraction of the layers, see `memory.py`). `moe`:
    an MoE layer (plait's profile; the megatron profile counts a dense layer). `cp`: context-parallel
    ranks (each holds seq_len / cp tokens of every sequence).
    """
    if profile not in PROFILES:
        raise ValueError(f"activation profile {profile!r}: choose one of {', '.join(PROFILES)}")
    b, s = micro_batch, seq_len // cp
    input_bytes = b * s * shape.hidden * element_bytes / (tp if sp else 1)
    if profile == "megatron":
        full = _megatron_full(shape, b=b, s=s, tp=tp, sp=sp, selective=recompute == "selective")
        saved = 2 * b * s * shape.hidden / (tp if sp else 1) if recompute == "full" else full
        return LayerActivations(saved=saved, working=full if recompute == "full" else 0.0)
    full = _plait_full(shape, b=b, s=s, e=element_bytes, tp=tp, sp=sp, moe=moe)
    if recompute == "full":
        return LayerActivations(saved=input_bytes, working=full)
    return LayerActivations(saved=full, working=0.0)


# Bytes per local logit that plait's vocab-parallel cross entropy holds at its peak in backward
# (its fp32 working copies), measured with live-tensor counting at tp=2, vocab 4096 and 8192.
VOCAB_PARALLEL_LOSS_BYTES = 5.5


def head_working_bytes(
    shape: ModelShape,
    *,
    micro_batch: int,
    seq_len: int,
    element_bytes: int,
    tp: int,
    logits_kept: bool = True,
    cp: int = 1,
) -> float:
    """Bytes the LM head and the loss hold at their peak, in backward (plait's profile).

    Without tp the fp32 cross entropy holds its log-softmax output, that
    output's gradient and the input gradient at once (3 * n*V * 4); with tp,
    the vocab-parallel loss holds `VOCAB_PARALLEL_LOSS_BYTES` per local logit.
    The logits themselves (n*V/t*e) stay alive through backward where the
    engine keeps the model's output (`logits_kept`), not in a pipeline stage.
    Measured without tp: 4.0 n*V*4 bytes in fp32, as counted.
    """
    n = micro_batch * seq_len // cp
    loss = 3 * FP32 if tp == 1 else VOCAB_PARALLEL_LOSS_BYTES
    return n * shape.vocab_rows(tp) * (loss + (element_bytes if logits_kept else 0))


def ring_working_bytes(shape: ModelShape, *, micro_batch: int, seq_len: int, tp: int, cp: int) -> float:
    """Bytes ring attention's backward holds while it runs, for one layer (0 without cp).

    All fp32, per rank's s/cp tokens: stack(K, V) of the block held, of the one arriving, this step's
    dK/dV share, the share arriving and the one being sent (each 2 * kv width), and dq with one
    block's piece of it (2 * the query width).
    """
    if cp == 1:
        return 0.0
    c = shape.config
    n = micro_batch * seq_len // cp
    kv_width = c.resolved_num_kv_heads * c.head_dim / tp
    return FP32 * n * (5 * 2 * kv_width + 2 * c.d_model / tp)
