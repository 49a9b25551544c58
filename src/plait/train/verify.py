"""`plait verify`: a plan's per-step losses against one plain process on the same seed and data."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from plait.config import Config, model_config_for
from plait.data.loader import ShardedLoader, TokenDataset
from plait.data.shards import prepare_dataset
from plait.distributed.launch import default_device_type
from plait.distributed.precision import resolve_precision
from plait.models.gpt import GPT
from plait.moe import set_routing_groups
from plait.optim import lr_schedule
from plait.train.optimizers import optimizer_from_config
from plait.train.reference import train_reference
from plait.train.setup import seed_everything
from plait.train.text_tasks import language_model_for, text_task, uses_language_preset

TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 1e-2}


@dataclass
class Comparison:
    plan_losses: list[float]
    reference_losses: list[float]
    tolerance: float

    @property
    def relative_diffs(self) -> list[float]:
        return [abs(p - r) / max(abs(r), 1e-12) for p, r in zip(self.plan_losses, self.reference_losses, strict=True)]

    @property
    def passed(self) -> bool:
        return all(math.isfinite(d) and d <= self.tolerance for d in self.relative_diffs)

    def table(self) -> str:
        lines = [f"{'step':>5} {'plan loss':>12} {'one process':>12} {'rel diff':>10}"]
        rows = zip(self.plan_losses, self.reference_losses, self.relative_diffs, strict=True)
        for step, (p, r, d) in enumerate(rows, 1):
            lines.append(f"{step:>5} {p:>12.6f} {r:>12.6f} {d:>10.2e}{'' if d <= self.tolerance else '  <- over'}")
        worst = max(self.relative_diffs)
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(f"{verdict}: worst relative difference {worst:.2e}, tolerance {self.tolerance:.0e}")
        return "\n".join(lines)


def reference_losses(config: Config, *, num_routing_groups: int = 1) -> list[float]:
    """Train one plain process on the config's global batches (dp=1, no micro-batches).

    ``num_routing_groups``: the plan's dp x micro-batches, so MoE layers route each rank's
    micro-batch as a group of its own, as the plan does (capacity and aux losses are per group).
    """
    data = prepare_dataset(
        config.data.corpus,
        vocab_size=config.data.vocab_size,
        cache_dir=config.data.cache_dir,
        val_fraction=config.data.val_fraction,
    )
    eot_id = data.eot_id if config.data.document_mask else None
    task = text_task(config, eot_id=eot_id, tokenizer=data.load_tokenizer())  # causal LM, or BERT's / ALBERT's / T5's
    train_set = TokenDataset(data.train_path, dtype=data.dtype, seq_len=task.sample_tokens(config.data.seq_len))
    loader = ShardedLoader(
        train_set,
        global_batch=config.train.global_batch,
        dp_rank=0,
        dp_size=1,
        seed=config.train.seed,
        eot_id=eot_id,
        batch_maker=None if task.kind == "causal_lm" else task.make_batch,
    )
    seed_everything(config.train.seed)
    model = language_model_for(config) if uses_language_preset(config) else GPT(model_config_for(config))
    set_routing_groups(model, num_routing_groups)
    train = config.train
    return train_reference(
        model,
        (loader.next_batch() for _ in range(train.steps)),
        optimizer=optimizer_from_config(train),
        loss_fn=task.loss_fn,
        lr_scheduler=lambda opt: lr_schedule(
            opt, name=train.schedule, warmup=train.warmup, total=train.steps, min_ratio=train.min_lr_ratio
        ),
        max_grad_norm=train.max_grad_norm,
    )


def verification_config(config: Config, out_dir: str) -> Config:
    """The config the plan runs under for verification: no eval or checkpoints between steps."""
    huge = 10**9
    train = dataclasses.replace(config.train, out_dir=out_dir, eval_every=huge, checkpoint_every=huge, log_every=huge)
    return dataclasses.replace(config, train=train)


def compare(plan_losses: list[float], config: Config, *, num_routing_groups: int = 1) -> Comparison:
    return Comparison(
        plan_losses=plan_losses,
        reference_losses=reference_losses(config, num_routing_groups=num_routing_groups),
        tolerance=TOLERANCE[resolve_precision(config.plan.precision, device_type=default_device_type()).precision],
    )
