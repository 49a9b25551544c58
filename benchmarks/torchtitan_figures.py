"""torchtitan's published per-GPU training throughput, scaled to another model by FLOPs per token.

Equal FLOP/s per GPU means tokens/s_B = tokens/s_A x flops_per_token_A / flops_per_token_B, with both
counted by plait's formula (GPTConfig.flops_per_token: 6N + 12 L d s, N without the embedding lookups).
"""

from __future__ import annotations

from typing import Any

from plait.models.gpt_config import GPTConfig

# torchtitan's benchmarks/llama3_h100_202412_torchtitan.md (also docs/performance.md), Table 1: Llama 3.1 8B,
# 1D FSDP on 8 H100 SXM (96 GB HBM2e, 500 W), local batch 2 x seq 8192 (torchtitan's llama3_8b.toml),
# selective activation checkpointing, bf16; TPS/GPU read at step 90. torch of 2024-12-23.
TORCHTITAN = {
    "source": "github.com/pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md, Table 1",
    "setup": "Llama 3.1 8B, FSDP over 8 H100 SXM 96GB HBM2e at 500 W, local batch 2, seq 8192, selective AC",
    "tokens_per_s_per_gpu": {"eager": 5762, "compiled": 6667},
    "memory_gib": {"eager": 82.4, "compiled": 77.0},
    "caveats": "torchtitan runs FSDP over 8 GPUs (communication) and recomputes part of each layer (selective AC, "
    "not counted); an H100 SXM at 500 W with HBM2e against one H200 here (the same tensor cores, faster memory)",
}
LLAMA31_8B = GPTConfig(
    vocab_size=128256, max_seq_len=8192, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
    d_ff=14336, rope_theta=500000.0, norm="rmsnorm", activation="swiglu", position="rope", bias=False,
    tied_embeddings=False,
)  # fmt: skip


def torchtitan_comparison(llama_1b: dict[str, Any] | None) -> dict[str, Any]:
    """torchtitan's 8B tokens/s per GPU scaled to the 1B: equal FLOP/s per GPU means
    tokens/s_1B = tokens/s_8B x flops_per_token_8B(seq 8192) / flops_per_token_1B(its seq)."""
    flops_8b = LLAMA31_8B.flops_per_token(8192)
    out: dict[str, Any] = dict(TORCHTITAN) | {"flops_per_token_8b_seq8192": flops_8b}
    out["flop_per_s_per_gpu"] = {k: v * flops_8b for k, v in TORCHTITAN["tokens_per_s_per_gpu"].items()}
    if llama_1b is not None:
        scale = flops_8b / llama_1b["flops_per_token"]
        out["conversion"] = f"x {scale:.3f} = flops_per_token 8B (seq 8192) / 1B (seq {llama_1b['seq_len']})"
        equivalent = {k: v * scale for k, v in TORCHTITAN["tokens_per_s_per_gpu"].items()}
        out["equivalent_1b_tokens_per_s"] = equivalent
        out["plait_over_torchtitan_compiled"] = llama_1b["tokens_per_s"] / equivalent["compiled"]
    return out
