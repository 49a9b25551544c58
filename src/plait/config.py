"""Plan and training configuration: dataclasses that validate themselves.

A config is four sections (`model`, `data`, `plan`, `train`) that map one to
one onto TOML tables and onto `--set section.key=value` overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plait.config_types import checked_value, matches

if TYPE_CHECKING:
    from plait.models.gpt_config import GPTConfig

PRECISIONS = ("fp32", "bf16", "fp16", "auto")  # auto: bf16 where the hardware has it (plait.distributed.precision)
RECOMPUTE_MODES = ("none", "full", "selective")
COMPILE_MODES = ("off", "blocks", "full")  # plait.compile
AXES = ("pp", "dp", "cp", "tp")
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")
REDUCE_OPS = ("auto", "reduce_scatter", "all_reduce")
ZERO3_GATHER_MODES = ("auto", "microbatch", "step")
ZERO_SHARD_MODES = ("all", "node")
OFFLOAD_TIERS = ("none", "cpu", "disk", "auto")
OFFLOADED_STATES = ("optimizer", "gradients", "params")
NONFINITE_ACTIONS = ("stop", "skip")
LR_SCHEDULES = ("cosine", "poly", "lars")  # plait.optim.schedules.lr_schedule
OPTIMIZERS = ("adamw", "lamb", "lars")
TASKS = ("causal_lm", "masked_lm", "masked_lm_sop", "span_corruption", "image_classification")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class Plan:
    """How one training step is spread over the ranks.

    The product of dp, tp, pp and cp is the world size (dp=-1 infers it);
    ep groups experts over the dp x cp ranks. Example::

        plan = plait.Plan(dp=2, zero=0, microbatches=4)
    """

    dp: int = -1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    zero: int = 0
    # Hybrid sharding: ZeRO shards its states over groups of this many dp ranks ("node": the dp ranks of
    # one node) and replicates them across groups, whose link then carries only the shards' all-reduce.
    zero_shard: int | str = "all"
    precision: str = "fp32"
    microbatches: int = 1
    recompute: str = "none"
    recompute_ratio: float = 1.0
    recompute_modules: list[str] = field(default_factory=list)
    bucket_mb: float = 25.0
    reduce_op: str = "auto"
    sequence_parallel: bool = False
    pp_schedule: str = "1f1b"
    pp_chunks: int = 1
    pp_split: list[int] = field(default_factory=list)
    # ZeRO-3 with several micro-batches (a pipeline or accumulation): gather each unit around every
    # micro-batch's forward and backward ("microbatch", least memory), or once and keep it until the
    # step's gradients are reduced ("step", one all-gather per unit per step for the stage's full weights);
    # auto: "step" under a pipeline (unless parameters are offloaded), "microbatch" otherwise.
    zero3_gather: str = "auto"
    # Where each model state lives (see plait.zero.offload): none (on the device), cpu (host memory), disk
    # (files under offload_dir), or auto (placed by memory_budget, hottest first).
    offload_optimizer: str = "none"  # fp32 master shard, optimizer state, and the optimizer step
    offload_gradients: str = "none"  # the reduced gradient shard the optimizer reads
    offload_params: str = "none"  # ZeRO-3 parameter shards, fetched per unit before use
    offload_dir: str = ""
    memory_budget: str = ""  # e.g. "16GiB": model-state bytes a rank may hold in memory; alone it means auto
    # Operator fusion by torch.compile (plait.compile): "blocks" compiles each transformer block (one code
    # for all of them), "full" the whole model or each pipeline stage; "off" runs eager.
    compile: str = "off"

    def __post_init__(self) -> None:
        _require(
            self.dp == -1 or self.dp >= 1,
            f"plan.dp={self.dp}: use a positive degree or -1 to infer it from the world size",
        )
        for axis in ("tp", "pp", "cp", "ep"):
            value = getattr(self, axis)
            _require(value >= 1, f"plan.{axis}={value}: degrees are positive; use 1 to switch the axis off")
        _require(self.zero in (0, 1, 2, 3), f"plan.zero={self.zero}: ZeRO stages are 0, 1, 2 or 3")
        _require(
            self.precision in PRECISIONS, f"plan.precision={self.precision!r}: choose one of {', '.join(PRECISIONS)}"
        )
        _require(
            self.pp_schedule in PP_SCHEDULES,
            f"plan.pp_schedule={self.pp_schedule!r}: choose one of {', '.join(PP_SCHEDULES)}",
        )
        _require(
            self.pp_chunks >= 1,
            f"plan.pp_chunks={self.pp_chunks}: use 1, or 2+ virtual stages per rank with interleaved",
        )
        _require(self.microbatches >= 1, f"plan.microbatches={self.microbatches}: use 1 or more micro-batches per step")
        _require(
            self.recompute in RECOMPUTE_MODES,
            f"plan.recompute={self.recompute!r}: choose one of {', '.join(RECOMPUTE_MODES)}",
        )
        _require(
            0 < self.recompute_ratio <= 1,
            f"plan.recompute_ratio={self.recompute_ratio}: the fraction of layers to recompute lies in (0, 1]",
        )
        _require(
            self.reduce_op in REDUCE_OPS,
            f"plan.reduce_op={self.reduce_op!r}: choose one of {', '.join(REDUCE_OPS)} (auto: all-reduce on gloo, reduce-scatter on nccl)",
        )
        _require(
            self.bucket_mb > 0,
            f"plan.bucket_mb={self.bucket_mb}: gradient buckets need a positive size in MB (25 is typical)",
        )
        _require(
            self.zero3_gather in ZERO3_GATHER_MODES,
            f"plan.zero3_gather={self.zero3_gather!r}: choose one of {', '.join(ZERO3_GATHER_MODES)}",
        )
        _require(
            self.zero3_gather == "auto" or self.zero == 3,
            f"plan.zero3_gather={self.zero3_gather!r} applies to ZeRO-3 only (plan.zero={self.zero} keeps whole "
            "parameters): set plan.zero=3 or drop plan.zero3_gather",
        )
        _require(
            self.compile in COMPILE_MODES,
            f"plan.compile={self.compile!r}: choose one of {', '.join(COMPILE_MODES)} (off: eager; blocks: each "
            "transformer block; full: the whole model, or each pipeline stage)",
        )
        self._check_offload_fields()
        self._check_zero_shard()
        _require(
            not self.zero3_gathers_once_per_step or self.offload_tiers["params"] == "none",
            "plan.zero3_gather='step' keeps each stage's whole parameters gathered for the step, which offloading "
            "them is meant to avoid: set plan.offload_params='none' or plan.zero3_gather='microbatch'",
        )
        _require(
            not (self.zero3_gather == "microbatch" and self.pp > 1 and self.pp_schedule == "zb-h1"),
            "plan.zero3_gather='microbatch' with plan.pp_schedule='zb-h1': a unit must stay gathered from a "
            "micro-batch's input-gradient pass to its weight-gradient pass; set plan.zero3_gather='step' or use "
            "1f1b or interleaved",
        )

    def _check_zero_shard(self) -> None:
        shard = self.zero_shard
        _require(
            shard in ZERO_SHARD_MODES or (isinstance(shard, int) and not isinstance(shard, bool) and shard >= 1),
            f"plan.zero_shard={shard!r}: choose 'all' (every dp rank), 'node' (the dp ranks of one node) or a "
            "positive number of dp ranks that divides plan.dp",
        )
        _require(
            shard == "all" or self.zero > 0,
            f"plan.zero_shard={shard!r} shards ZeRO's states, but plan.zero=0 keeps them whole on every rank: "
            "set plan.zero to 1, 2 or 3, or drop plan.zero_shard",
        )
        _require(
            not isinstance(shard, int) or self.dp == -1 or self.dp % shard == 0,
            f"plan.zero_shard={shard} does not divide plan.dp={self.dp}: shards span groups of dp ranks; choose "
            f"a divisor of {self.dp} (e.g. the dp ranks of one node)",
        )

    def zero_shard_size(self, ranks_per_node: int) -> int:
        """The dp ranks one ZeRO shard group spans (a resolved plan): plan.dp unless hybrid sharding,
        times plan.cp (cp ranks hold the same weights; plait.distributed.mesh folds them into dp).

        The rank grid is pp x dp x cp x tp, so one node holds ranks_per_node / (cp*tp) neighbouring
        dp ranks of each dp group, or whole dp groups when it holds a multiple of dp*cp*tp ranks."""
        if self.zero_shard == "all":
            return self.dp * self.cp
        if isinstance(self.zero_shard, int):
            return self.zero_shard
        inner = self.cp * self.tp
        span = self.dp * inner
        if ranks_per_node % span == 0:
            return self.dp
        _require(
            span % ranks_per_node == 0 and ranks_per_node % inner == 0,
            f"plan.zero_shard='node' with {ranks_per_node} ranks per node: a node must hold whole tp x cp groups "
            f"({inner} ranks) and split the dp x cp x tp = {span} ranks of a pipeline stage evenly; launch a "
            f"divisor of {span} ranks per node, or give plan.zero_shard as a number of dp ranks",
        )
        return ranks_per_node // inner

    @property
    def zero3_gathers_once_per_step(self) -> bool:
        """Whether ZeRO-3 keeps a gathered unit for the rest of the step (see zero3_gather)."""
        if self.zero3_gather != "auto":
            return self.zero3_gather == "step"
        return self.zero == 3 and self.pp > 1 and self.offload_tiers["params"] == "none"

    def _check_offload_fields(self) -> None:
        for state in OFFLOADED_STATES:
            tier = getattr(self, f"offload_{state}")
            _require(
                tier in OFFLOAD_TIERS,
                f"plan.offload_{state}={tier!r}: choose one of {', '.join(OFFLOAD_TIERS)}",
            )
        if self.memory_budget:
            budget = self.memory_budget_bytes
            _require(budget > 0, f"plan.memory_budget={self.memory_budget!r}: give a positive size such as '16GiB'")
        auto = [s for s in OFFLOADED_STATES if getattr(self, f"offload_{s}") == "auto"]
        _require(
            not auto or bool(self.memory_budget),
            f"plan.offload_{auto[0] if auto else ''}='auto' places states by a byte budget: set plan.memory_budget, "
            "e.g. '16GiB'",
        )
        disk = [s for s, tier in self.offload_tiers.items() if tier in ("disk", "auto")]
        _require(
            not disk or bool(self.offload_dir),
            f"plan.offload_{disk[0] if disk else ''} may go to disk: set plan.offload_dir to a directory on a fast "
            "local disk (e.g. /mnt/nvme/plait-offload)",
        )

    @property
    def memory_budget_bytes(self) -> int | None:
        """plan.memory_budget in bytes (None when unset)."""
        if not self.memory_budget:
            return None
        from plait.sizes import parse_bytes

        try:
            return parse_bytes(self.memory_budget)
        except ValueError:
            raise ValueError(
                f"plan.memory_budget={self.memory_budget!r} is not a size; write it like '16GiB', '500MB' or a "
                "byte count"
            ) from None

    @property
    def offload_tiers(self) -> dict[str, str]:
        """Each state's tier; a memory budget alone means 'auto' for every state (parameters only under ZeRO-3)."""
        tiers = {state: getattr(self, f"offload_{state}") for state in OFFLOADED_STATES}
        if self.memory_budget and all(tier == "none" for tier in tiers.values()):
            tiers = dict.fromkeys(OFFLOADED_STATES, "auto") | ({} if self.zero == 3 else {"params": "none"})
        return tiers

    @property
    def offloads(self) -> bool:
        return any(tier != "none" for tier in self.offload_tiers.values())

    def check_available(self) -> None:
        """Reject the parts of the plan that plait does not build yet."""
        _require(
            self.pp_chunks == 1 or self.pp_schedule == "interleaved",
            f"plan.pp_chunks={self.pp_chunks} needs plan.pp_schedule='interleaved' (the only schedule with virtual stages)",
        )
        if self.pp > 1:
            self._check_pipeline_microbatches()
        if self.cp > 1:
            self._check_context_parallel_available()
        if self.ep > 1:
            self._check_expert_parallel_available()
        for other, used in (("plan.ep", self.ep > 1), ("offloaded states", self.offloads)):
            _require(
                self.zero_shard == "all" or not used,
                f"plan.zero_shard={self.zero_shard!r} with {other} is not available yet in plait; drop "
                "plan.zero_shard (shard over every dp rank)",
            )
        if self.offloads:
            self._check_offload_available()
        _require(
            self.compile != "full" or self.zero != 3,
            "plan.compile='full' with plan.zero=3 is not available yet in plait: ZeRO-3 gathers and releases each "
            "block's parameters in hooks around its forward, which break a whole-model graph into pieces; use "
            "plan.compile='blocks' (each block compiled between its gather and release)",
        )

    def _check_context_parallel_available(self) -> None:
        for other, used in (
            ("plan.ep", self.ep > 1),
            ("plan.zero_shard", self.zero_shard != "all"),
            ("offloaded states", self.offloads),
        ):
            _require(
                not used,
                f"plan.cp={self.cp} with {other} is not available yet in plait; drop {other} or set plan.cp=1",
            )

    def _check_expert_parallel_available(self) -> None:
        _require(
            self.dp == -1 or self.dp % self.ep == 0,
            f"plan.ep={self.ep} does not divide plan.dp={self.dp}: experts split over ep ranks carved from dp; "
            f"choose an ep that divides {self.dp}",
        )
        _require(
            not self.offloads,
            f"plan.ep={self.ep} with offloaded states is not available yet in plait; set the plan.offload_* "
            "fields to 'none' (and no plan.memory_budget)",
        )

    def _check_offload_available(self) -> None:
        tiers = self.offload_tiers
        _require(
            self.zero >= 1,
            "offload moves ZeRO's flat shards: set plan.zero=1 (optimizer, gradients) or plan.zero=3 (parameters too)",
        )
        _require(
            tiers["params"] == "none" or self.zero == 3,
            f"plan.offload_params={tiers['params']!r} needs plan.zero=3: under stage {self.zero} every rank keeps "
            "whole parameters for compute; set plan.zero=3",
        )
        _require(
            tiers["gradients"] == "none" or tiers["optimizer"] != "none",
            "plan.offload_gradients moves the gradient shard to where the optimizer steps, but the optimizer stays "
            "on the device; set plan.offload_optimizer too (or offload_gradients='none')",
        )

    def _check_pipeline_microbatches(self) -> None:
        m, p = self.microbatches, self.pp
        _require(
            self.pp_schedule == "gpipe" or m >= p,
            f"plan.microbatches={m} is fewer than plan.pp={p} stages, which the {self.pp_schedule} schedule needs; "
            f"raise plan.microbatches to at least {p}, or use plan.pp_schedule='gpipe'",
        )
        _require(
            self.pp_schedule != "interleaved" or (m % p == 0 and self.pp_chunks >= 2),
            f"the interleaved schedule needs plan.microbatches a multiple of plan.pp={p} (got {m}) and "
            f"plan.pp_chunks >= 2 (got {self.pp_chunks}); e.g. microbatches={max(p, m // p * p)}, pp_chunks=2",
        )

    def resolve(self, world_size: int) -> Plan:
        """The plan with dp inferred, checked against the world size."""
        others = self.tp * self.pp * self.cp
        dp = self.dp
        if dp == -1:
            _require(
                world_size % others == 0,
                f"world size {world_size} is not divisible by tp*pp*cp={others}; launch a multiple of {others} ranks or change the degrees",
            )
            dp = world_size // others
        _require(
            dp * others == world_size,
            f"plan dp*tp*pp*cp = {dp}*{self.tp}*{self.pp}*{self.cp} = {dp * others} but the world size is {world_size}; set plan.dp=-1 to infer dp, or launch {dp * others} ranks",
        )
        _require(
            dp % self.ep == 0,
            f"plan.ep={self.ep} does not divide dp={dp} (world size {world_size}): experts split over ep ranks "
            f"carved from dp; choose an ep that divides {dp}, or launch a multiple of {self.ep * others} ranks",
        )
        _require(
            not isinstance(self.zero_shard, int) or dp % self.zero_shard == 0,
            f"plan.zero_shard={self.zero_shard} does not divide dp={dp} (world size {world_size}): shards span "
            f"groups of dp ranks; choose a divisor of {dp} (e.g. the dp ranks of one node)",
        )
        return dataclasses.replace(self, dp=dp)


@dataclass
class ModelConfig:
    """A named preset plus field overrides (see `plait.models.preset_names()`), or a pretrained model.

    ``pretrained`` names a local transformers directory (config.json, safetensors weights,
    tokenizer files): `plait train` then continues training that causal LM, and the data is
    tokenized with the directory's tokenizer (``data.vocab_size`` is not used)::

        [model]
        pretrained = "checkpoints/qwen2-0.5b"
    """

    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None

    def __post_init__(self) -> None:
        if self.pretrained is None:
            return
        _require(
            isinstance(self.pretrained, str) and self.pretrained.strip() != "",
            f"model.pretrained={self.pretrained!r}: give the path of a local transformers directory, "
            'e.g. pretrained = "models/qwen2-0.5b"',
        )
        _require(
            not self.overrides,
            f"model.{', model.'.join(sorted(self.overrides))} change fields of plait's presets, but with "
            f"model.pretrained the directory's config.json defines the model; drop the override(s) "
            "(or edit config.json)",
        )


@dataclass
class DataConfig:
    corpus: str | list[str] = "stdlib"
    seq_len: int = 64  # the default model (preset "tiny") has 64 positions
    vocab_size: int = 8192
    val_fraction: float = 0.01
    cache_dir: str = ".cache/plait"
    document_mask: bool = False  # packed rows: each document attends only to itself, positions restart per document

    def __post_init__(self) -> None:
        _require(self.seq_len >= 2, f"data.seq_len={self.seq_len}: a causal LM needs at least 2 tokens per sample")
        _require(
            256 < self.vocab_size <= 2**32,
            f"data.vocab_size={self.vocab_size}: a byte-level BPE needs more than 256 tokens (8192 is a good default)",
        )
        _require(
            0 <= self.val_fraction < 0.5,
            f"data.val_fraction={self.val_fraction}: use a fraction in [0, 0.5), e.g. 0.01 (0: no validation split)",
        )
        if isinstance(self.corpus, list):
            _require(len(self.corpus) > 0, "data.corpus is an empty list; give 'stdlib' or paths to .txt/.jsonl files")
        _require(
            self.corpus != "" and self.cache_dir != "",
            "data.corpus and data.cache_dir cannot be empty; e.g. corpus = 'stdlib', cache_dir = '.cache/plait'",
        )


@dataclass
class TaskConfig:
    """What a run trains for. ``causal_lm`` (the default): next-token prediction on [data]'s corpus.
    ``image_classification``: a ViT or Swin preset ([model] preset vit-* / swin-*) on scikit-learn's
    8x8 digits upsampled to image_size, with a random shift and rotation per sample::

        [task]
        kind = "image_classification"
        image_size = 32

    On the corpus (plait.tasks): ``masked_lm`` (BERT presets: mask_prob of each sample, 80/10/10),
    ``masked_lm_sop`` (ALBERT: plus sentence-order prediction), ``span_corruption`` (T5: noise_density,
    mean_span).
    """

    kind: str = "causal_lm"
    image_size: int = 32  # image_classification: the digits are upsampled to image_size x image_size
    max_shift: float = 3.0  # augmentation: pixels of random shift either way (0: none)
    max_degrees: float = 10.0  # augmentation: degrees of random rotation either way (0: none)
    mask_prob: float = 0.15  # masked_lm(_sop): the fraction of each sample's tokens predicted
    whole_word: bool = False  # masked_lm: predict whole words (tokens joined by word characters) up to mask_prob
    noise_density: float = 0.15  # span_corruption: the fraction of tokens in noise spans
    mean_span: float = 3.0  # span_corruption: the mean noise span length

    def __post_init__(self) -> None:
        _require(self.kind in TASKS, f"task.kind={self.kind!r}: choose one of {', '.join(TASKS)}")
        _require(self.image_size >= 8, f"task.image_size={self.image_size}: the digits are 8x8; use 8 or more")
        _require(
            self.max_shift >= 0 and self.max_degrees >= 0,
            f"task.max_shift={self.max_shift}, task.max_degrees={self.max_degrees}: use non-negative values "
            "(0 switches that augmentation off)",
        )
        _require(
            0 < self.mask_prob < 1 and 0 < self.noise_density < 1 and self.mean_span >= 1,
            f"task.mask_prob={self.mask_prob}, task.noise_density={self.noise_density}, task.mean_span="
            f"{self.mean_span}: use fractions in (0, 1) and a mean span >= 1 (BERT and T5: 0.15, 0.15, 3)",
        )
        _require(
            not self.whole_word or self.kind == "masked_lm",
            f"task.whole_word masks whole words for task.kind='masked_lm' (BERT), not {self.kind!r}; drop it",
        )

    @property
    def uses_corpus(self) -> bool:
        """Whether the task reads [data]'s text corpus (image classification has its own images)."""
        return self.kind != "image_classification"


@dataclass
class TrainConfig:
    steps: int = 200
    global_batch: int = 16
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int = 20
    optimizer: str = "adamw"  # adamw | lamb | lars (plait.optim's factories: vectors undecayed, unadapted)
    momentum: float = 0.9  # lars
    vector_lr_ratio: float = 1.0  # lars: biases and norm weights (not adapted) step at lr x this
    schedule: str = "cosine"  # after warmup: cosine | poly (linear decay, LAMB/BERT) | lars (power-2 decay)
    weight_decay: float = 0.1
    beta2: float = 0.95
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 0
    out_dir: str = "runs/default"
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    async_checkpoints: bool = False  # write checkpoints from a background thread while training goes on
    threads: int = 1
    # Operations (plait.train.operations): how a run fails, stops and restarts.
    collective_timeout_s: float = 600.0  # the process group's timeout: a collective waiting longer raises
    hang_timeout_s: float = 300.0  # no step for this long: every rank's stack into out_dir/hang-*/, exit; 0: off
    save_on_signal: bool = True  # SIGINT/SIGTERM: finish the step, save a checkpoint, exit together
    checkpoint_every_s: float = 0.0  # also save when this many seconds passed since the last save; 0: off
    on_nonfinite: str = "stop"  # a nan/inf loss or gradient norm (fp32/bf16): stop (exit 3) or skip the step
    # causal LM: cross entropy from the final hidden states, this many tokens' logits at a time
    # (plait.losses.ChunkedCausalLM); 0: the whole batch's logits, as the model returns them
    loss_chunk: int = 0

    def __post_init__(self) -> None:
        self._check_operations()
        _require(self.steps >= 1, f"train.steps={self.steps}: train for at least one step")
        _require(self.global_batch >= 1, f"train.global_batch={self.global_batch}: use at least one sequence per step")
        _require(self.lr > 0, f"train.lr={self.lr}: the learning rate must be positive, e.g. 3e-4")
        _require(
            0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio={self.min_lr_ratio}: use a fraction of lr between 0 and 1"
        )
        _require(self.warmup >= 0, f"train.warmup={self.warmup}: warmup steps cannot be negative")
        _require(
            self.optimizer in OPTIMIZERS, f"train.optimizer={self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}"
        )
        _require(0 <= self.momentum < 1, f"train.momentum={self.momentum}: LARS's momentum lies in [0, 1), e.g. 0.9")
        _require(
            self.vector_lr_ratio > 0,
            f"train.vector_lr_ratio={self.vector_lr_ratio}: LARS's lr for biases and norm weights is lr x this; use a "
            "positive ratio, e.g. 1 (timm's) or LARS's trust coefficient 0.001",
        )
        _require(
            self.schedule in LR_SCHEDULES,
            f"train.schedule={self.schedule!r}: choose one of {', '.join(LR_SCHEDULES)} (each decays to "
            "train.min_lr_ratio * lr after train.warmup steps)",
        )
        _require(self.weight_decay >= 0, f"train.weight_decay={self.weight_decay}: weight decay cannot be negative")
        _require(self.eps > 0, f"train.eps={self.eps}: Adam's eps must be positive, e.g. 1e-8")
        _require(0 <= self.beta2 < 1, f"train.beta2={self.beta2}: Adam's beta2 lies in [0, 1), e.g. 0.95")
        _require(self.seed >= 0, f"train.seed={self.seed}: use a non-negative seed, e.g. 0")
        _require(self.out_dir.strip() != "", "train.out_dir is empty; name a directory for the run, e.g. runs/my-run")
        _require(
            self.max_grad_norm >= 0,
            f"train.max_grad_norm={self.max_grad_norm}: use a positive norm, or 0 to switch clipping off",
        )
        _require(
            self.loss_chunk >= 0,
            f"train.loss_chunk={self.loss_chunk}: give tokens per loss chunk, e.g. 4096, or 0 for whole logits",
        )
        for name in ("log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints", "threads"):
            value = getattr(self, name)
            _require(value >= 1, f"train.{name}={value}: use 1 or more")

    def _check_operations(self) -> None:
        _require(
            self.collective_timeout_s > 0,
            f"train.collective_timeout_s={self.collective_timeout_s}: give the collectives' timeout in seconds, "
            "e.g. 600",
        )
        _require(
            self.hang_timeout_s >= 0,
            f"train.hang_timeout_s={self.hang_timeout_s}: use seconds without a step before the stacks are "
            "dumped, e.g. 300, or 0 to switch the watchdog off",
        )
        _require(
            self.hang_timeout_s < self.collective_timeout_s,
            f"train.hang_timeout_s={self.hang_timeout_s} is not below train.collective_timeout_s="
            f"{self.collective_timeout_s}: a hung collective would time out before the watchdog explains it; "
            "lower hang_timeout_s or raise collective_timeout_s",
        )
        _require(
            self.checkpoint_every_s >= 0,
            f"train.checkpoint_every_s={self.checkpoint_every_s}: use seconds between saves, or 0 to save by "
            "step count only",
        )
        _require(
            self.on_nonfinite in NONFINITE_ACTIONS,
            f"train.on_nonfinite={self.on_nonfinite!r}: choose one of {', '.join(NONFINITE_ACTIONS)}",
        )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    plan: Plan = field(default_factory=Plan)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    def __post_init__(self) -> None:
        _require(
            self.task.uses_corpus or self.model.pretrained is None,
            f"task.kind={self.task.kind!r} trains a vision preset from scratch; drop model.pretrained and set "
            "model.preset (e.g. 'vit-small')",
        )
        _require(
            not (self.data.document_mask and self.model.pretrained is not None),
            "data.document_mask works with plait's models (their attention reads documents from position_ids); "
            "a transformers model attends across documents whatever its positions: set data.document_mask=false",
        )
        _require(
            self.train.loss_chunk == 0 or self.task.kind == "causal_lm",
            f"train.loss_chunk={self.train.loss_chunk} chunks the causal LM loss; task.kind={self.task.kind!r} has "
            "a loss of its own: set train.loss_chunk=0",
        )

    def check_batching(self, dp: int) -> None:
        """The global batch must split over dp ranks and then into micro-batches."""
        gb, mb = self.train.global_batch, self.plan.microbatches
        _require(gb % dp == 0, f"train.global_batch={gb} does not split over dp={dp} ranks; use a multiple of {dp}")
        per_rank = gb // dp
        _require(
            per_rank % mb == 0,
            f"each rank gets {per_rank} sequences, which plan.microbatches={mb} does not divide; use a global_batch that is a multiple of {dp * mb}",
        )
        cp, seq_len = self.plan.cp, self.data.seq_len
        _require(
            cp == 1 or seq_len % (2 * cp) == 0,
            f"data.seq_len={seq_len} does not split into 2 * plan.cp = {2 * cp} equal chunks (each cp rank holds one "
            f"from the front and one from the back of every row); use a multiple of {2 * cp}",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def model_config_for(config: Config) -> GPTConfig:
    """plait's GPT config of a preset run (the [model] preset and overrides, checked against [data]);
    ValueError for a pretrained one (its config.json defines it)."""
    from plait.models.factory import resolve_config  # here, not at the top: models imports torch

    if config.model.pretrained is not None:
        raise ValueError(
            f"model.pretrained={config.model.pretrained} is a transformers model, not one of plait's GPT presets; "
            "this command works on presets only (plait train, export and generate take pretrained models)"
        )
    overrides: dict[str, Any] = {"vocab_size": config.data.vocab_size, **config.model.overrides}
    model_config = resolve_config(config.model.preset, **overrides)
    if model_config.vocab_size < config.data.vocab_size:
        raise ValueError(
            f"model.vocab_size={model_config.vocab_size} is smaller than data.vocab_size={config.data.vocab_size}; "
            "drop the model override or raise it"
        )
    if config.data.seq_len > model_config.max_seq_len:
        raise ValueError(
            f"data.seq_len={config.data.seq_len} is longer than the model's max_seq_len={model_config.max_seq_len}; "
            f"lower data.seq_len or --set model.max_seq_len={config.data.seq_len}"
        )
    return model_config


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "plan": Plan,
    "train": TrainConfig,
    "task": TaskConfig,
}


def _closest(word: str, options: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(text: str, kind: Any) -> Any:
    """Parse a --set value: TOML syntax first; bare words, and anything a string field gets, as strings."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    if not matches(value, kind) and matches(text, kind):
        return text  # --set train.out_dir=2024 names a directory "2024"
    return value


_LIST_EXAMPLES = {"pp_split": [4], "recompute_modules": ["attn"]}  # their defaults, [], show no element type


def _example(cls: type, key: str) -> Any:
    spec = {f.name: f for f in dataclasses.fields(cls)}[key]
    if spec.default_factory is dataclasses.MISSING:
        return spec.default
    return _LIST_EXAMPLES.get(key, spec.default_factory())


def _table(name: str, values: Any) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise ValueError(f"[{name}] must be a table of settings (got {values!r}); write [{name}] on its own line")
    return dict(values)


def build_section(name: str, values: dict[str, Any], *, sections: typing.Mapping[str, type] = SECTIONS) -> Any:
    """One TOML table as its dataclass, every key checked against the field's type (see plait.config_types)."""
    cls = sections[name]
    if cls is ModelConfig:
        return _model_section(values)
    types = _field_types(cls)
    for key in values:
        if key not in types:
            raise ValueError(f"unknown key {name}.{key}{_closest(key, types)}; valid keys: {', '.join(types)}")
    checked = {
        key: checked_value(f"{name}.{key}", value, types[key], example=_example(cls, key))
        for key, value in values.items()
    }
    return cls(**checked)


def _model_section(values: dict[str, Any]) -> ModelConfig:
    """[model]: `preset` and `pretrained` by name; every other key overrides a preset field."""
    for key in ("preset", "pretrained"):
        if key in values:
            kind = _field_types(ModelConfig)[key]
            checked_value(f"model.{key}", values[key], kind, example=_example(ModelConfig, key) or "models/qwen2-0.5b")
    pretrained = values.get("pretrained")
    if pretrained is not None and values.get("preset") not in (None, ModelConfig.preset):
        raise ValueError(
            f"model.preset={values['preset']!r} and model.pretrained={pretrained!r} both name a model; keep one"
        )
    preset = values.get("preset", ModelConfig.preset)
    overrides = {k: v for k, v in values.items() if k not in ("preset", "overrides", "pretrained")}
    overrides.update(values.get("overrides", {}))
    return ModelConfig(preset=preset, overrides=overrides, pretrained=pretrained)


def _section_of(key: str) -> str | None:
    return next((name for name, cls in SECTIONS.items() if key in _field_types(cls)), None)


def config_from_dict(raw: dict[str, Any]) -> Config:
    for name in raw:
        if name not in SECTIONS and _section_of(name) is not None:
            raise ValueError(f"{name} is outside any section; put it under [{_section_of(name)}]")
        if name not in SECTIONS:
            raise ValueError(f"unknown config section [{name}]{_closest(name, SECTIONS)}; valid: {', '.join(SECTIONS)}")
    return Config(**{name: build_section(name, raw.get(name, {})) for name in SECTIONS})


def apply_overrides(
    raw: dict[str, Any], overrides: typing.Sequence[str], *, sections: typing.Mapping[str, type] = SECTIONS
) -> dict[str, Any]:
    """Apply `section.key=value` strings to a raw config dict (a new dict); `sections` names the tables."""
    merged = {name: _table(name, raw.get(name, {})) for name in sections} | {
        k: v for k, v in raw.items() if k not in sections
    }
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"--set {item!r}: write it as section.key=value, e.g. --set plan.dp=2")
        path, text = item.split("=", 1)
        section, key = path.split(".", 1)
        if section not in sections:
            raise ValueError(
                f"--set {item!r}: unknown section {section!r}{_closest(section, sections)}; valid: {', '.join(sections)}"
            )
        types = _field_types(sections[section])
        if sections[section] is not ModelConfig and key not in types:
            raise ValueError(
                f"--set {item!r}: unknown key {path}{_closest(key, types)}; valid keys: {', '.join(types)}"
            )
        merged[section][key] = _coerce(text, types.get(key, Any))
    return merged


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a TOML config (or start from defaults) and apply --set overrides."""
    raw = read_toml(path) if path is not None else {}
    return config_from_dict(apply_overrides(raw, overrides))


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML config file as a dict, or one ValueError line saying what is wrong with the file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config file {path} is a directory; pass a TOML file, such as configs/gpt-tiny.toml")
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist; pass a TOML file such as configs/gpt-tiny.toml")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"config file {path} is not valid TOML: {err}; fix it (see configs/gpt-tiny.toml)") from None
    return raw
