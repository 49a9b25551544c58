"""[plan]: how one training step is spread over the ranks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from plait.config.choices import (
    COMPILE_MODES,
    OFFLOADED_STATES,
    PP_SCHEDULES,
    PRECISIONS,
    RECOMPUTE_MODES,
    REDUCE_OPS,
    ZERO3_GATHER_MODES,
    require,
)
from plait.config.plan_checks import (
    check_context_parallel_available,
    check_expert_parallel_available,
    check_offload_available,
    check_offload_fields,
    check_pipeline_microbatches,
    check_zero_shard,
)


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
        require(
            self.dp == -1 or self.dp >= 1,
            f"plan.dp={self.dp}: use a positive degree or -1 to infer it from the world size",
        )
        for axis in ("tp", "pp", "cp", "ep"):
            value = getattr(self, axis)
            require(value >= 1, f"plan.{axis}={value}: degrees are positive; use 1 to switch the axis off")
        require(self.zero in (0, 1, 2, 3), f"plan.zero={self.zero}: ZeRO stages are 0, 1, 2 or 3")
        require(
            self.precision in PRECISIONS, f"plan.precision={self.precision!r}: choose one of {', '.join(PRECISIONS)}"
        )
        require(
            self.pp_schedule in PP_SCHEDULES,
            f"plan.pp_schedule={self.pp_schedule!r}: choose one of {', '.join(PP_SCHEDULES)}",
        )
        require(
            self.pp_chunks >= 1,
            f"plan.pp_chunks={self.pp_chunks}: use 1, or 2+ virtual stages per rank with interleaved",
        )
        require(self.microbatches >= 1, f"plan.microbatches={self.microbatches}: use 1 or more micro-batches per step")
        require(
            self.recompute in RECOMPUTE_MODES,
            f"plan.recompute={self.recompute!r}: choose one of {', '.join(RECOMPUTE_MODES)}",
        )
        require(
            0 < self.recompute_ratio <= 1,
            f"plan.recompute_ratio={self.recompute_ratio}: the fraction of layers to recompute lies in (0, 1]",
        )
        require(
            self.reduce_op in REDUCE_OPS,
            f"plan.reduce_op={self.reduce_op!r}: choose one of {', '.join(REDUCE_OPS)} (auto: all-reduce on gloo, reduce-scatter on nccl)",
        )
        require(
            self.bucket_mb > 0,
            f"plan.bucket_mb={self.bucket_mb}: gradient buckets need a positive size in MB (25 is typical)",
        )
        require(
            self.zero3_gather in ZERO3_GATHER_MODES,
            f"plan.zero3_gather={self.zero3_gather!r}: choose one of {', '.join(ZERO3_GATHER_MODES)}",
        )
        require(
            self.zero3_gather == "auto" or self.zero == 3,
            f"plan.zero3_gather={self.zero3_gather!r} applies to ZeRO-3 only (plan.zero={self.zero} keeps whole "
            "parameters): set plan.zero=3 or drop plan.zero3_gather",
        )
        require(
            self.compile in COMPILE_MODES,
            f"plan.compile={self.compile!r}: choose one of {', '.join(COMPILE_MODES)} (off: eager; blocks: each "
            "transformer block; full: the whole model, or each pipeline stage)",
        )
        check_offload_fields(self)
        check_zero_shard(self)
        require(
            not self.zero3_gathers_once_per_step or self.offload_tiers["params"] == "none",
            "plan.zero3_gather='step' keeps each stage's whole parameters gathered for the step, which offloading "
            "them is meant to avoid: set plan.offload_params='none' or plan.zero3_gather='microbatch'",
        )
        require(
            not (self.zero3_gather == "microbatch" and self.pp > 1 and self.pp_schedule == "zb-h1"),
            "plan.zero3_gather='microbatch' with plan.pp_schedule='zb-h1': a unit must stay gathered from a "
            "micro-batch's input-gradient pass to its weight-gradient pass; set plan.zero3_gather='step' or use "
            "1f1b or interleaved",
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
        require(
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
        require(
            self.pp_chunks == 1 or self.pp_schedule == "interleaved",
            f"plan.pp_chunks={self.pp_chunks} needs plan.pp_schedule='interleaved' (the only schedule with virtual stages)",
        )
        if self.pp > 1:
            check_pipeline_microbatches(self)
        if self.cp > 1:
            check_context_parallel_available(self)
        if self.ep > 1:
            check_expert_parallel_available(self)
        for other, used in (("plan.ep", self.ep > 1), ("offloaded states", self.offloads)):
            require(
                self.zero_shard == "all" or not used,
                f"plan.zero_shard={self.zero_shard!r} with {other} is not available yet in plait; drop "
                "plan.zero_shard (shard over every dp rank)",
            )
        if self.offloads:
            check_offload_available(self)
        require(
            self.compile != "full" or self.zero != 3,
            "plan.compile='full' with plan.zero=3 is not available yet in plait: ZeRO-3 gathers and releases each "
            "block's parameters in hooks around its forward, which break a whole-model graph into pieces; use "
            "plan.compile='blocks' (each block compiled between its gather and release)",
        )

    def resolve(self, world_size: int) -> Plan:
        """The plan with dp inferred, checked against the world size."""
        others = self.tp * self.pp * self.cp
        dp = self.dp
        if dp == -1:
            require(
                world_size % others == 0,
                f"world size {world_size} is not divisible by tp*pp*cp={others}; launch a multiple of {others} ranks or change the degrees",
            )
            dp = world_size // others
        require(
            dp * others == world_size,
            f"plan dp*tp*pp*cp = {dp}*{self.tp}*{self.pp}*{self.cp} = {dp * others} but the world size is {world_size}; set plan.dp=-1 to infer dp, or launch {dp * others} ranks",
        )
        require(
            dp % self.ep == 0,
            f"plan.ep={self.ep} does not divide dp={dp} (world size {world_size}): experts split over ep ranks "
            f"carved from dp; choose an ep that divides {dp}, or launch a multiple of {self.ep * others} ranks",
        )
        require(
            not isinstance(self.zero_shard, int) or dp % self.zero_shard == 0,
            f"plan.zero_shard={self.zero_shard} does not divide dp={dp} (world size {world_size}): shards span "
            f"groups of dp ranks; choose a divisor of {dp} (e.g. the dp ranks of one node)",
        )
        return dataclasses.replace(self, dp=dp)
