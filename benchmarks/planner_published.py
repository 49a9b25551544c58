"""Published training runs that state their plan and their speed: the rows the planner is checked against.

Committed before the planner's error on any of them was looked at, so that no row was chosen (or
left out) after seeing the model's error. Each row is the published run as stated, with the source,
the place in it (table, section, line) and the exact quoted numbers; whatever the source does not state
and the planner needs is listed under `assumed`, with the reason for the choice.

The plan is a plan string in `plait.Plan`'s own field names (dp, tp, pp, cp, zero, microbatches,
sequence_parallel, recompute, pp_schedule, pp_chunks, pp_split, precision); pp_split lists the layers
where pipeline stages 1, 2, ... start. `microbatches` is a count
per step per pipeline (global batch / dp / micro-batch size). `measured` is either the step time in
seconds (`step_s`) or TFLOP/s per GPU under the source's own FLOP count (`tflops`, with `flops` naming
the convention), from which benchmarks/planner_golden.py derives the step time.

Hardware: `cluster` names a planner preset; `inter_bandwidth` (bytes/s per GPU, one direction) replaces
the preset's inter-node link where the source states a different fabric.

Selection rules (fixed before any estimate was run):
- Korthikanti et al. 2022: every row of Table 5 (both columns) and the dp=8 run of Section 6.3.
- MT-NLG (Smith et al. 2022): the three throughput runs of Section 2.4.
- BLOOM-176B: the run's logged iteration at the end of the first epoch (its README).
- Llama 3 405B: every row of Table 4 (the cp=16 row too, evaluated once the planner models cp).
- MosaicML llm-foundry benchmark tables (ZeRO-3 only, FSDP FULL_SHARD): on A100-80GB every model
  from 7B up at sequence 2048 on 8 GPUs, and the 70B row on the most GPUs; on H100 (bf16) the 70B and
  13B rows on the most GPUs at sequence 2048.
"""

from __future__ import annotations

from typing import Any

KORTHIKANTI = (
    "Korthikanti et al. 2022, 'Reducing Activation Recomputation in Large Transformer Models', arXiv:2205.05198"
)
KORTHIKANTI_SETUP = (
    "Section 6: 'the tenor parallel size is set to 8. We use the interleaving schedule with three "
    "interleaving stages (m = 3) for the 175B and 530B models. For all the cases, sequence length is set to "
    "s = 2048 and vocabulary size is set to v = 51200 ... no data parallelism ... mixed precision on the "
    "Selene supercomputer ... 8 NVIDIA 80GB A100 GPUs ... eight NVIDIA Mellanox 200Gbps HDR Infiniband HCAs'"
)
KORTHIKANTI_T3 = "Table 3 (heads, hidden, layers, TP, PP, GPUs, global batch, micro batch)"
KORTHIKANTI_T5 = "Table 5, 'End-to-end iteration time', Iteration Time (seconds): Full Recompute | Present Work"
FULL_RECOMPUTE = "Full Recompute column: full activation recomputation without sequence parallelism (Section 6.3)"
PRESENT_WORK = "Present Work column: sequence parallelism + selective activation recomputation (Section 6.3)"

GPT3_STYLE = {"vocab_size": 51200, "max_seq_len": 2048}  # LayerNorm, GELU, learned positions, biases, tied


def _gpt(heads: int, hidden: int, layers: int, **extra: Any) -> dict[str, Any]:
    return GPT3_STYLE | {"num_heads": heads, "d_model": hidden, "num_layers": layers} | extra


def _korthikanti(key: str, model: dict, table3: str, plan: str, seconds: float, column: str, **row: Any) -> dict:
    return {
        "id": key, "source": KORTHIKANTI, "where": f"{KORTHIKANTI_T3}; {KORTHIKANTI_T5}",
        "quote": f"{table3}; {column}", "setup": KORTHIKANTI_SETUP, "model": model, "seq_len": 2048,
        "cluster": "a100-80gb", "plan": plan, "measured": {"step_s": seconds},
        "assumed": row.pop("assumed", []), **row,
    }  # fmt: skip


M22, M175 = _gpt(64, 6144, 48), _gpt(96, 12288, 96)
M530, M1T = _gpt(128, 20480, 105), _gpt(160, 25600, 128)
T3_22 = "Table 3: 22B | 64 | 6144 | 48 | 8 | 1 | 8 | 4 | 4"
T3_175 = "Table 3: 175B (GPT-3) | 96 | 12288 | 96 | 8 | 8 | 64 | 64 | 1"
T3_530 = "Table 3: 530B (MT-NLG) | 128 | 20480 | 105 | 8 | 35 | 280 | 280 | 1"
T3_1T = "Table 3: 1T | 160 | 25600 | 128 | 8 | 64 | 512 | 512 | 1"
SP_SEL = "sequence_parallel=true recompute=selective"
FULL = "sequence_parallel=false recompute=full"
INTERLEAVED3 = "pp_schedule=interleaved pp_chunks=3"

KORTHIKANTI_ROWS = [
    _korthikanti("k22-full", M22, T3_22, f"dp=1 tp=8 pp=1 zero=0 microbatches=1 {FULL}", 1.42,
                 f"Table 5: 22B | 1.42 | 1.10 | 29.0% | 41.5% | 43.7%; {FULL_RECOMPUTE}", gpus=8, global_batch=4),
    _korthikanti("k22-sp", M22, T3_22, f"dp=1 tp=8 pp=1 zero=0 microbatches=1 {SP_SEL}", 1.10,
                 f"Table 5: 22B | 1.42 | 1.10; {PRESENT_WORK}", gpus=8, global_batch=4),
    _korthikanti("k175-full", M175, T3_175, f"dp=1 tp=8 pp=8 zero=0 microbatches=64 {INTERLEAVED3} {FULL}", 18.13,
                 f"Table 5: 175B | 18.13 | 13.75 | 31.8% | 51.4% | 52.8%; {FULL_RECOMPUTE}", gpus=64, global_batch=64),
    _korthikanti("k175-sp", M175, T3_175, f"dp=1 tp=8 pp=8 zero=0 microbatches=64 {INTERLEAVED3} {SP_SEL}", 13.75,
                 f"Table 5: 175B | 18.13 | 13.75; {PRESENT_WORK}", gpus=64, global_batch=64),
    _korthikanti("k530-full", M530, T3_530, f"dp=1 tp=8 pp=35 zero=0 microbatches=280 {INTERLEAVED3} {FULL}", 49.05,
                 f"Table 5: 530B | 49.05 | 37.83 | 29.7% | 56.0% | 57.0%; {FULL_RECOMPUTE}", gpus=280, global_batch=280),
    _korthikanti("k530-sp", M530, T3_530, f"dp=1 tp=8 pp=35 zero=0 microbatches=280 {INTERLEAVED3} {SP_SEL}", 37.83,
                 f"Table 5: 530B | 49.05 | 37.83; {PRESENT_WORK}", gpus=280, global_batch=280),
    _korthikanti("k1t-full", M1T, T3_1T, f"dp=1 tp=8 pp=64 zero=0 microbatches=512 pp_schedule=1f1b {FULL}", 94.42,
                 f"Table 5: 1T | 94.42 | 71.49 | 32.1% | 56.3% | 57.0%; {FULL_RECOMPUTE}", gpus=512, global_batch=512,
                 assumed=["plain 1F1B: Section 6 names the interleaved schedule for the 175B and 530B models only"]),
    _korthikanti("k1t-sp", M1T, T3_1T, f"dp=1 tp=8 pp=64 zero=0 microbatches=512 pp_schedule=1f1b {SP_SEL}", 71.49,
                 f"Table 5: 1T | 94.42 | 71.49; {PRESENT_WORK}", gpus=512, global_batch=512,
                 assumed=["plain 1F1B: Section 6 names the interleaved schedule for the 175B and 530B models only"]),
    _korthikanti("k530-dp8-sp", M530, T3_530, f"dp=8 tp=8 pp=35 zero=0 microbatches=280 {INTERLEAVED3} {SP_SEL}", 39.15,
                 "Section 6.3: 'if we scale the 530B model to 8-way data parallellism (2240 GPUs) while keeping batch "
                 "size per model instance constant - i.e., the batch size is also multiplied by the data parallel size - "
                 "the time per iteration increases slightly from 37.83 seconds to 39.15 seconds. This results in an MFU "
                 "drop from 56.0% to 54.2% ... we do not use any overlapping of gradient all-reduces with "
                 "back-propagation'; abstract: '530B ... on 2240 NVIDIA A100 GPUs ... MFU of 54.2%'",
                 gpus=2240, global_batch=2240, no_dp_overlap=True,
                 assumed=["zero=0: plain data-parallel all-reduce, as the section describes"]),
]  # fmt: skip

MTNLG = "Smith et al. 2022, 'Using DeepSpeed and Megatron to Train Megatron-Turing NLG 530B', arXiv:2201.11990"
MTNLG_ROWS = [
    {
        "id": f"mtnlg-{nodes}n",
        "source": MTNLG,
        "where": "Section 2.4 (system performance) and Section 3.2 (model configuration)",
        "quote": (
            "'The number of layers, hidden dimensions, attention heads are 105, 20480, and 128, respectively. The "
            "sequence length is 2048 and global batch size is 1920. We used 8-way tensor and 35-way pipeline "
            "parallelism'; 'with global batch size 1920 on 280, 350, and 420 DGX A100 servers ... the latency per "
            "iteration observed is 60.1, 50.2, and 44.4 seconds respectively. These correspond to 126, 121, and 113 "
            f"TFLOP/s per GPU' (this row: {nodes} servers, {seconds} s); 'Each 530 billion parameter model replica "
            "spans 280 NVIDIA A100 GPUs, with 8-way tensor-slicing within a node and 35-way pipeline parallelism "
            "across nodes' (Section 2.2)"
        ),
        "setup": "Selene: DGX A100 nodes, 8 x A100 80GB, NVLink/NVSwitch, 8 x 200 Gb/s HDR InfiniBand per node",
        "model": {"vocab_size": 51200, "max_seq_len": 2048, "num_heads": 128, "d_model": 20480, "num_layers": 105},
        "seq_len": 2048,
        "cluster": "a100-80gb",
        "gpus": nodes * 8,
        "global_batch": 1920,
        "plan": f"dp={dp} tp=8 pp=35 zero=1 microbatches={1920 // dp} pp_schedule=1f1b recompute=full",
        "measured": {"step_s": seconds},
        "assumed": [
            "micro-batch size 1 (not stated; Megatron's and Korthikanti's 530B runs use 1)",
            "recompute=full (not stated; DeepSpeed activation checkpointing, as the same team's 530B baseline)",
            "zero=1: DeepSpeed's pipeline engine runs ZeRO stage 1 with pipeline parallelism",
            "plain 1F1B (DeepSpeed's pipeline schedule)",
            "vocabulary 50,272 padded to 51,200 as Megatron pads it for tp=8",
        ],
    }
    for nodes, dp, seconds in ((280, 8, 60.1), (350, 10, 50.2), (420, 12, 44.4))
]

BLOOM_ROWS = [
    {
        "id": "bloom-176b",
        "source": "BigScience tr11-176B-ml training README (bigscience-workshop/bigscience, "
        "train/tr11-176B-ml/README.md); BLOOM paper arXiv:2211.05100 Section 3.4",
        "where": "README sections 'Architecture', 'Replica setup', 'Deepspeed config', 'Important checkpoints'",
        "quote": (
            "'NHIDDEN=14336 NLAYERS=70 NHEADS=112'; 'SEQ_LEN=2048'; 'TP=4 PP=12 DP=8 MBS=2'; "
            "'GLOBAL_BATCH_SIZE=2048'; 'Vocabulary size is 250,680 tokens' (embedding 250880*14336); "
            "'The new BF16_Optimizer implements its own ZeRO Stage 1'; '--deepspeed-activation-checkpointing'; "
            "'pp rank 0: [embed | 5 transformer blocks] pp rank 1: [6 transformer blocks] ... pp rank 11: "
            "[5 transformer blocks | embed]'; 'iteration 85376/ 115311 ... elapsed time per iteration (s): "
            "104.70 ... global batch size: 2048 ... TFLOPs: 149.77'; hardware: '384 gpus (48 nodes) ... 8 GPUs "
            "per node Using NVLink 4 inter-gpu connects, 4 OmniPath links' (A100 80GB)"
        ),
        "setup": "Jean Zay: 48 nodes x 8 A100 80GB, 4 x 100 Gb/s Omni-Path per node",
        "model": {
            "vocab_size": 250880,
            "max_seq_len": 2048,
            "num_heads": 112,
            "d_model": 14336,
            "num_layers": 70,
            "position": "rope",
        },
        "seq_len": 2048,
        "cluster": "a100-80gb",
        "inter_bandwidth": 4 * 100e9 / 8 / 8,
        "gpus": 384,
        "global_batch": 2048,
        "plan": "dp=8 tp=4 pp=12 zero=1 microbatches=128 pp_schedule=1f1b recompute=full "
        "pp_split=5,11,17,23,29,35,41,47,53,59,65",
        "measured": {"step_s": 104.70},
        "assumed": [
            "position='rope' stands for ALiBi: neither has position parameters",
            "inter-node link 4 x 100 Gb/s per node = 6.25 GB/s per GPU (stated fabric), not the preset's 25 GB/s",
            "plain 1F1B (DeepSpeed's pipeline schedule)",
        ],
    }
]

LLAMA3 = "Llama Team, AI @ Meta 2024, 'The Llama 3 Herd of Models', arXiv:2407.21783"
LLAMA3_MODEL = {
    "vocab_size": 128256, "max_seq_len": 8192, "num_heads": 128, "num_kv_heads": 8, "d_model": 16384,
    "num_layers": 126, "d_ff": 53248, "norm": "rmsnorm", "activation": "swiglu", "position": "rope", "bias": False,
    "tied_embeddings": False,
}  # fmt: skip
LLAMA3_QUOTE = (
    "Table 4, 'Scaling configurations and MFU for each stage of Llama 3 405B pre-training', columns GPUs | TP | "
    "CP | PP | DP | Seq. Len. | Batch size/DP | Tokens/Batch | TFLOPs/GPU | BF16 MFU: '{row}'; Section 3.3.2: "
    "'Our use of FSDP for Llama 3 shards optimizer states and gradients, but for model shards we do not reshard "
    "after forward computation'; Table 3: 405B layers 126, model dimension 16,384, FFN dimension 53,248, attention "
    "heads 128, key/value heads 8, vocabulary 128,000 (128,256 in the released config); Section 3.3.1: H100 80GB, "
    "'400 Gbps interconnects between GPUs'"
)
LLAMA3_ASSUMED = [
    "micro-batch size 1 (not stated), so microbatches = batch size/DP",
    "recompute=none (the paper names no activation recomputation for pre-training)",
    "zero=2: optimizer states and gradients sharded, parameters kept after forward",
    "interleaved 1F1B, V = pp_chunks = 8, in the source's layout (Section 3.3.2: 'we reduce one Transformer layer "
    "each from the first and the last stages ... the first model chunk on the first stage has only the embedding ... "
    "we use an interleaved schedule (Narayanan et al., 2021) with V pipeline stages on one pipeline rank. Overall "
    "pipeline bubble ratio is (PP-1)/(V*M)'): V is not stated; whole-layer chunks of one size, with a first chunk "
    "holding only the embedding and a last only the final norm and head, need 16 V - 2 to divide 126 layers, which of "
    "the interleaved V (2 and up) only V = 8 gives: one layer per chunk, pp_split=0,1,...,126 (virtual stage v on "
    "rank v mod 16), so the first and last ranks hold 7 layers and the others 8",
    "inter-node link 400 Gb/s per GPU = 50 GB/s (stated fabric), not the preset's 25 GB/s",
    "TFLOP/s per GPU converted with PaLM's model FLOPs (6N + 12 L d s per token), the MFU convention Meta cites",
    "sequence_parallel=true (not stated; Megatron-style tp=8 with sequence parallelism is assumed)",
]
LLAMA3_SPLIT = "pp_split=" + ",".join(str(i) for i in range(127))  # stage 0: the embedding; 127: the head
LLAMA3_ROWS = [
    {
        "id": key,
        "source": LLAMA3,
        "where": "Table 4; Sections 3.3.1, 3.3.2; Table 3",
        "quote": LLAMA3_QUOTE.format(row=row),
        "setup": "Meta RoCE cluster, H100 80GB (700 W), 8 GPUs per server",
        "model": LLAMA3_MODEL | {"max_seq_len": seq},
        "seq_len": seq,
        "cluster": "h100",
        "inter_bandwidth": 400e9 / 8,
        "gpus": gpus,
        "global_batch": dp * per_dp,
        "plan": f"dp={dp} tp=8 pp=16 cp={cp} zero=2 microbatches={per_dp} "
        f"pp_schedule=interleaved pp_chunks=8 recompute=none sequence_parallel=true {LLAMA3_SPLIT}",
        "measured": {"tflops": tflops, "flops": "palm"},
        "assumed": LLAMA3_ASSUMED,
    }
    for key, gpus, cp, dp, seq, per_dp, tflops, row in (
        ("llama3-405b-8k", 8192, 1, 64, 8192, 32, 430, "8,192 | 8 | 1 | 16 | 64 | 8,192 | 32 | 16M | 430 | 43%"),
        ("llama3-405b-16k", 16384, 1, 128, 8192, 16, 400, "16,384 | 8 | 1 | 16 | 128 | 8,192 | 16 | 16M | 400 | 41%"),
        (
            "llama3-405b-cp16",
            16384,
            16,
            8,
            131072,
            16,
            380,
            "16,384 | 8 | 16 | 16 | 8 | 131,072 | 16 | 16M | 380 | 38%",
        ),
    )
]

FOUNDRY = (
    "MosaicML llm-foundry, scripts/train/benchmarking/README.md ('MPT Training Benchmarks'), model shapes from "
    "scripts/train/yamls/pretrain/mpt-*.yaml"
)
FOUNDRY_COLUMNS = (
    "Model | SeqLen (T) | # GPUs | GPU | MFU | HFU | Model TFLOP | MicroBatchSize | GradAccum | GlobalBatchSize | "
    "Throughput (S/s) | Throughput (T/s) | Throughput (T/s/GPU) | GlobalBatchSize (T) | Precision | MP Mode | "
    "Sharding Strategy | Activation Checkpointing | Activation CPUOffload | NumParams"
)
# MPT: no biases, LayerNorm, GELU 4x, ALiBi (no position parameters), tied embeddings, vocabulary 50368.
MPT = {"vocab_size": 50368, "max_seq_len": 2048, "bias": False, "position": "rope"}
MPT_SHAPES = {
    "7b": MPT | {"d_model": 4096, "num_heads": 32, "num_layers": 32},
    "13b": MPT | {"d_model": 5120, "num_heads": 40, "num_layers": 40},
    "30b": MPT | {"d_model": 7168, "num_heads": 56, "num_layers": 48},
    "70b": MPT | {"d_model": 8192, "num_heads": 64, "num_layers": 80},
}


def _foundry(key: str, size: str, gpu: str, gpus: int, mbs: int, accum: int, ckpt: bool, tokens_s: int, row: str):
    table = {"a100-80gb": "A100 80GB with 1600 Gbps node-node interconnect (RoCE)", "h100": "H100 80GB BF16"}[gpu]
    return {
        "id": key, "source": FOUNDRY, "where": f"table '{table}'",
        "quote": f"columns: {FOUNDRY_COLUMNS}; row: '{row}'",
        "setup": "MosaicML platform, 8 GPUs per node; FSDP FULL_SHARD (ZeRO-3), flash attention (triton)",
        "model": MPT_SHAPES[size], "seq_len": 2048, "cluster": gpu, "gpus": gpus, "global_batch": gpus * mbs * accum,
        "plan": f"dp={gpus} tp=1 pp=1 zero=3 microbatches={accum} recompute={'full' if ckpt else 'none'}",
        "measured": {"step_s": gpus * mbs * accum * 2048 / tokens_s},
        "assumed": [
            "step time = GlobalBatchSize (T) / Throughput (T/s)",
            "position='rope' stands for ALiBi: neither has position parameters",
            "the H100 table states no interconnect: the preset's 25 GB/s per GPU",
        ],
    }  # fmt: skip


FOUNDRY_ROWS = [
    _foundry("mpt-7b-a100-8", "7b", "a100-80gb", 8, 6, 2, False, 37130,
             "7b | 2048 | 8 | a100_80gb | 64.23 | 64.23 | 2.003836E+14 | 6 | 2 | 96 | 18 | 37130 | 4641 | 196608 | "
             "amp_bf16 | DEFAULT | FULL_SHARD | False | False | 6658859008"),
    _foundry("mpt-13b-a100-8", "13b", "a100-80gb", 8, 2, 3, False, 18097,
             "13b | 2048 | 8 | a100_80gb | 59.57 | 59.57 | 1.858556E+14 | 2 | 3 | 48 | 8 | 18097 | 2262 | 98304 | "
             "amp_bf16 | DEFAULT | FULL_SHARD | False | False | 12853954560"),
    _foundry("mpt-30b-a100-8", "30b", "a100-80gb", 8, 3, 21, True, 7330,
             "30b | 2048 | 8 | a100_80gb | 55.3 | 73.74 | 1.725420E+14 | 3 | 21 | 504 | 3 | 7330 | 916 | 1032192 | "
             "amp_bf16 | DEFAULT | FULL_SHARD | True | False | 29975214080"),
    _foundry("mpt-70b-a100-64", "70b", "a100-80gb", 64, 8, 4, True, 26274,
             "70b | 2048 | 64 | a100_80gb | 53.33 | 71.1 | 1.663896E+16 | 8 | 4 | 2048 | 12 | 26274 | 410 | 4194304 | "
             "bf16 | PURE | FULL_SHARD | True | False | 64862437376"),
    _foundry("mpt-70b-h100-64", "70b", "h100", 64, 8, 4, True, 66523,
             "70b | 2048 | 64 | h100_80gb | 42.57 | 56.76 | 4.212583E+14 | 8 | 4 | 2048 | 32 | 66523 | 1039 | 4194304 | "
             "amp_bf16 | DEFAULT | FULL_SHARD | True | False | 64862437376"),
    _foundry("mpt-13b-h100-64", "13b", "h100", 64, 2, 1, False, 307209,
             "13b | 2048 | 64 | h100_80gb | 39.86 | 39.86 | 3.943653E+14 | 2 | 1 | 128 | 150 | 307209 | 4800 | 262144 | "
             "amp_bf16 | DEFAULT | FULL_SHARD | False | False | 12853954560"),
]  # fmt: skip

# Every run trained in 16-bit mixed precision (bf16 or fp16: the same speed and bytes on these GPUs).
ROWS: list[dict[str, Any]] = [
    row | {"plan": row["plan"] + " precision=bf16"}
    for row in KORTHIKANTI_ROWS + MTNLG_ROWS + BLOOM_ROWS + LLAMA3_ROWS + FOUNDRY_ROWS
]
