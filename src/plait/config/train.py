"""[train]: steps, optimizer, schedule, logging, checkpoints and operations."""

from __future__ import annotations

from dataclasses import dataclass

from plait.config.choices import LR_SCHEDULES, NONFINITE_ACTIONS, OPTIMIZERS, require


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
        require(self.steps >= 1, f"train.steps={self.steps}: train for at least one step")
        require(self.global_batch >= 1, f"train.global_batch={self.global_batch}: use at least one sequence per step")
        require(self.lr > 0, f"train.lr={self.lr}: the learning rate must be positive, e.g. 3e-4")
        require(
            0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio={self.min_lr_ratio}: use a fraction of lr between 0 and 1"
        )
        require(self.warmup >= 0, f"train.warmup={self.warmup}: warmup steps cannot be negative")
        require(
            self.optimizer in OPTIMIZERS, f"train.optimizer={self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}"
        )
        require(0 <= self.momentum < 1, f"train.momentum={self.momentum}: LARS's momentum lies in [0, 1), e.g. 0.9")
        require(
            self.vector_lr_ratio > 0,
            f"train.vector_lr_ratio={self.vector_lr_ratio}: LARS's lr for biases and norm weights is lr x this; use a "
            "positive ratio, e.g. 1 (timm's) or LARS's trust coefficient 0.001",
        )
        require(
            self.schedule in LR_SCHEDULES,
            f"train.schedule={self.schedule!r}: choose one of {', '.join(LR_SCHEDULES)} (each decays to "
            "train.min_lr_ratio * lr after train.warmup steps)",
        )
        require(self.weight_decay >= 0, f"train.weight_decay={self.weight_decay}: weight decay cannot be negative")
        require(self.eps > 0, f"train.eps={self.eps}: Adam's eps must be positive, e.g. 1e-8")
        require(0 <= self.beta2 < 1, f"train.beta2={self.beta2}: Adam's beta2 lies in [0, 1), e.g. 0.95")
        require(self.seed >= 0, f"train.seed={self.seed}: use a non-negative seed, e.g. 0")
        require(self.out_dir.strip() != "", "train.out_dir is empty; name a directory for the run, e.g. runs/my-run")
        require(
            self.max_grad_norm >= 0,
            f"train.max_grad_norm={self.max_grad_norm}: use a positive norm, or 0 to switch clipping off",
        )
        require(
            self.loss_chunk >= 0,
            f"train.loss_chunk={self.loss_chunk}: give tokens per loss chunk, e.g. 4096, or 0 for whole logits",
        )
        for name in ("log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints", "threads"):
            value = getattr(self, name)
            require(value >= 1, f"train.{name}={value}: use 1 or more")

    def _check_operations(self) -> None:
        require(
            self.collective_timeout_s > 0,
            f"train.collective_timeout_s={self.collective_timeout_s}: give the collectives' timeout in seconds, "
            "e.g. 600",
        )
        require(
            self.hang_timeout_s >= 0,
            f"train.hang_timeout_s={self.hang_timeout_s}: use seconds without a step before the stacks are "
            "dumped, e.g. 300, or 0 to switch the watchdog off",
        )
        require(
            self.hang_timeout_s < self.collective_timeout_s,
            f"train.hang_timeout_s={self.hang_timeout_s} is not below train.collective_timeout_s="
            f"{self.collective_timeout_s}: a hung collective would time out before the watchdog explains it; "
            "lower hang_timeout_s or raise collective_timeout_s",
        )
        require(
            self.checkpoint_every_s >= 0,
            f"train.checkpoint_every_s={self.checkpoint_every_s}: use seconds between saves, or 0 to save by "
            "step count only",
        )
        require(
            self.on_nonfinite in NONFINITE_ACTIONS,
            f"train.on_nonfinite={self.on_nonfinite!r}: choose one of {', '.join(NONFINITE_ACTIONS)}",
        )
