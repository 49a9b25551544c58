"""finetune_rl.py --reward model: PPO against a reward model learned from the corpus's preference pairs.

1. The reward model: a scalar head on the base (plait.recipes.reward.RewardModel), trained on the training
   documents' preference pairs (true body chosen, corrupted body rejected) with finetune_dpo.py's own
   trainer, data and held-out accuracy (110 pairs from validation documents).
2. Its scores are standardised once, before PPO, by the mean and standard deviation of its scores on the
   held-out pairs' chosen rows (a fixed affine map: a rise in one is a rise in the other; the KL
   coefficient then has a known scale against the reward).
3. PPO (plait.recipes.ppo, one process) for --ppo-iters iterations on documented functions of training
   documents (header = signature + docstring as the prompt, prompts of at most --max-prompt-tokens tokens,
   a seeded shuffle walked in order); actor, critic and reference from the same base; reward
   plait.recipes.ppo.reward_model_fn. The KL to the reference is measured on each rollout.
4. Held-out: prompts from validation documents' functions, --eval-samples completions each with fixed seeds,
   scored by the reward model, before (the base) and after (the actor); with the KL to the reference and a
   few decoded completions.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import random
import statistics
import time
from typing import Any

import torch
from finetune_dpo import eval_batches, fit_reward_model, optimizer

import plait
from plait.data.heldout import held_out, held_out_functions, training_functions
from plait.losses import logits_of
from plait.recipes.data.preferences import corpus_pairs
from plait.recipes.ppo import (
    PPOModels,
    PPOSettings,
    ValueModel,
    policy_loss_for,
    ppo_iteration,
    refresh,
    reward_model_fn,
    value_loss_for,
)
from plait.recipes.preference_run import PreferenceData
from plait.recipes.reward import RewardModel
from plait.recipes.rollout import Rollout, SamplingConfig, rollout

SEQ_LEN = 128  # finetune_dpo.py's: a pair's prompt keeps its last 64 tokens


def train_reward_model(args: argparse.Namespace, base: torch.nn.Module, tokenizer: Any) -> tuple[RewardModel, dict]:
    part = held_out("stdlib", val_fraction=0.01)
    train_pairs = corpus_pairs(split="train", per_function=1, seed=args.seed, part=part)
    held_pairs = corpus_pairs(split="heldout", per_function=3, seed=args.seed, part=part)
    kinds = [pair.kind for pair in held_pairs]
    held = eval_batches(held_pairs, tokenizer, seq_len=SEQ_LEN)
    data = PreferenceData(train_pairs, held_pairs, tokenizer, seq_len=SEQ_LEN, seed=args.seed)
    model, fitted = fit_reward_model(
        copy.deepcopy(base),
        data,
        held,
        kinds,
        steps=args.reward_steps,
        lr=args.reward_lr,
        pairs=args.reward_pairs,
        seed=args.seed,
    )
    before, after, trained = fitted["before"], fitted["after"], fitted["train"]
    chosen = torch.cat([model.score(b["input_ids"][0::2], b["attention_mask"][0::2]) for b in held])
    norm = {"mean": float(chosen.mean()), "std": float(chosen.std())}
    summary = {"pairs": {"train": len(train_pairs), "heldout": len(held_pairs)}, "before": before}
    return model, {**summary, "after": after, "train": trained, "normalisation": norm}


def prompts_of(functions: list, tokenizer: Any, *, max_tokens: int) -> list[tuple[str, list[int]]]:
    encoded = [(f.name, tokenizer.encode(f.header)) for f in functions]
    return [(name, ids) for name, ids in encoded if 0 < len(ids) <= max_tokens]


class LearnedReward:
    """The reward model's standardised score of each rollout row; records raw scores and the KL of ``policy``
    (the model that sampled the rollout: PPO's actor replica, or the policy being evaluated) to the reference."""

    def __init__(self, model: RewardModel, *, policy: torch.nn.Module, reference: torch.nn.Module, norm: dict,
                 eos_id: int) -> None:  # fmt: skip
        self.score, self.policy, self.reference, self.norm = reward_model_fn(model), policy, reference, norm
        self.eos_id = eos_id
        self.last: dict[str, torch.Tensor] = {}

    def __call__(self, sampled: Rollout) -> torch.Tensor:
        # Scored at the last token before the end token: the pairs it learned from never end with one.
        unended = sampled.attention_mask * (sampled.input_ids != self.eos_id)
        raw = self.score(dataclasses.replace(sampled, attention_mask=unended))
        kl = sequence_kl(sampled, self.policy, self.reference)
        self.last = {"raw": raw, "kl": kl, "tokens": sampled.completion_mask.sum(dim=1)}
        return (raw - self.norm["mean"]) / self.norm["std"]


@torch.no_grad()
def sequence_kl(sampled: Rollout, policy: torch.nn.Module, reference: torch.nn.Module) -> torch.Tensor:
    """Per row: the sum over its completion tokens of KL(policy || reference) between the two next-token
    distributions (temperature 1, whole vocabulary) at that prefix; exact per token, never negative (a sampled
    log-ratio is not, under top-k sampling)."""
    mask = sampled.completion_mask[:, 1:]  # the distribution at position t predicts token t + 1
    logs = [_next_token_logps(m, sampled) for m in (policy, reference)]
    per_token = (logs[0].exp() * (logs[0] - logs[1])).sum(dim=-1)  # (rows, seq - 1)
    return (per_token * mask).sum(dim=1)


def _next_token_logps(model: torch.nn.Module, sampled: Rollout) -> torch.Tensor:
    was_training = model.training
    logits = logits_of(model.eval()(sampled.input_ids, sampled.attention_mask))[:, :-1]
    model.train(was_training)
    return torch.log_softmax(logits.float(), dim=-1)


def completions(sampled: Rollout, tokenizer: Any) -> list[str]:
    mask = sampled.completion_mask.bool()
    return [tokenizer.decode(row[keep].tolist()) for row, keep in zip(sampled.input_ids, mask, strict=True)]


def evaluate(
    policy: torch.nn.Module, reward: LearnedReward, *, prompts: list, tokenizer: Any, samples: int, max_new: int
) -> dict:
    """Every held-out prompt sampled ``samples`` times (fixed seeds): standardised reward, KL, a few completions."""
    sampling = SamplingConfig(max_new_tokens=max_new, temperature=1.0, top_k=50, seed=12345)
    scores, raws, kls, lengths, shown = [], [], [], [], []
    for k, (name, ids) in enumerate(prompts):
        sampled = rollout(
            policy, [ids], num_samples=samples, first_index=k * samples, sampling=sampling, eos_id=tokenizer.eot_id
        )
        scores.append(reward(sampled))
        raws.append(reward.last["raw"])
        kls.append(reward.last["kl"])
        lengths.append(reward.last["tokens"])
        if k < 3:
            texts = completions(sampled, tokenizer)[:2]
            shown.append({"function": name, "completions": texts, "reward": scores[-1][:2].tolist()})
    scores, kls = torch.cat(scores), torch.cat(kls)
    per_prompt = scores.view(len(prompts), samples).mean(dim=1)
    return {
        "mean_reward": float(scores.mean()),
        "reward_stderr_over_prompts": float(per_prompt.std() / len(prompts) ** 0.5),
        "mean_raw_score": float(torch.cat(raws).mean()),
        "kl_to_reference": float(kls.mean()),
        "mean_completion_tokens": float(torch.cat(lengths).mean()),
        "samples": shown,
    }


def ppo_settings(args: argparse.Namespace) -> PPOSettings:
    """PPO's settings from the command line (both reward paths): seeded sampling at temperature 1, top-k 50."""
    return PPOSettings(
        sampling=SamplingConfig(max_new_tokens=args.max_new, temperature=1.0, top_k=50, seed=1),
        samples_per_prompt=args.samples,
        kl_coef=args.kl,
        ppo_epochs=args.ppo_epochs,
    )


def run_ppo(
    args: argparse.Namespace,
    base: torch.nn.Module,
    *,
    reward_model: RewardModel,
    norm: dict,
    prompts: list,
    tokenizer: Any,
) -> tuple[dict, torch.nn.Module]:
    settings = ppo_settings(args)
    torch.manual_seed(0)
    critic = ValueModel(copy.deepcopy(base))
    reference, replica = copy.deepcopy(base).eval().requires_grad_(False), copy.deepcopy(base)
    reward = LearnedReward(reward_model, policy=replica, reference=reference, norm=norm, eos_id=tokenizer.eot_id)
    models = PPOModels(
        actor=_engine(copy.deepcopy(base), policy_loss_for(settings), lr=args.lr),
        critic=_engine(critic, value_loss_for(settings), lr=2 * args.lr),
        actor_replica=replica,  # refreshed before each rollout: the reward's KL reads the sampler
        critic_replica=copy.deepcopy(critic),
        reference=reference,
        reward_fn=reward,
    )
    iterations = []
    for i in range(args.ppo_iters):
        chosen = [prompts[(i * args.prompts + k) % len(prompts)][1] for k in range(args.prompts)]
        start = time.perf_counter()
        stats = ppo_iteration(
            models, chosen, first_index=i * args.prompts * args.samples, settings=settings, eos_id=tokenizer.eot_id
        )
        record = {
            "mean_reward": float(stats["scores"].mean()),
            "mean_raw_score": float(reward.last["raw"].mean()),
            "kl_to_reference": float(reward.last["kl"].mean()),
            "mean_completion_tokens": float(reward.last["tokens"].mean()),
            "policy_losses": stats["policy_losses"],
            "value_losses": stats["value_losses"],
            "wall_s": time.perf_counter() - start,
        }
        iterations.append(record)
        print(
            f"ppo {i:2d}: reward {record['mean_reward']:+.3f} kl {record['kl_to_reference']:.3f} "
            f"({record['wall_s']:.0f} s)",
            flush=True,
        )
    actor = refresh(models.actor_replica, models.actor)
    return {"settings": {k: str(v) for k, v in vars(settings).items()}, "iterations": iterations}, actor


def _engine(model: torch.nn.Module, loss_fn: Any, *, lr: float) -> Any:
    return plait.boost(model, optimizer=optimizer(lr), loss_fn=loss_fn, plan=plait.Plan(), max_grad_norm=1.0)


def window(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "stdev": statistics.stdev(values) if len(values) > 1 else 0.0}


def learned_reward_run(args: argparse.Namespace, base: torch.nn.Module, tokenizer: Any) -> tuple[dict, list]:
    """The whole --reward model run: (payload part, table rows); payload["phase_wall_s"] times each phase."""
    phases, mark = {}, time.perf_counter()
    reward_model, reward_summary = train_reward_model(args, base, tokenizer)
    phases["reward_model"], mark = time.perf_counter() - mark, time.perf_counter()
    part = held_out("stdlib", val_fraction=0.01)
    train_prompts = prompts_of(training_functions(part), tokenizer, max_tokens=args.max_prompt_tokens)
    random.Random(args.seed).shuffle(train_prompts)
    held_prompts = prompts_of(held_out_functions(part), tokenizer, max_tokens=args.max_prompt_tokens)
    held_prompts = held_prompts[: args.eval_prompts]
    print(f"{len(train_prompts)} training prompts, {len(held_prompts)} held-out prompts", flush=True)
    reference = copy.deepcopy(base).eval().requires_grad_(False)
    norm = reward_summary["normalisation"]
    scorer = LearnedReward(reward_model, policy=base, reference=reference, norm=norm, eos_id=tokenizer.eot_id)
    eval_kwargs = {
        "prompts": held_prompts,
        "tokenizer": tokenizer,
        "samples": args.eval_samples,
        "max_new": args.max_new,
    }
    before = evaluate(base, scorer, **eval_kwargs)
    print(f"held-out before: {before['mean_reward']:+.3f}", flush=True)
    phases["heldout_before"], mark = time.perf_counter() - mark, time.perf_counter()
    ppo, actor = run_ppo(args, base, reward_model=reward_model, norm=norm, prompts=train_prompts, tokenizer=tokenizer)
    phases["ppo"], mark = time.perf_counter() - mark, time.perf_counter()
    scorer.policy = actor
    after = evaluate(actor, scorer, **eval_kwargs)
    phases["heldout_after"] = time.perf_counter() - mark
    print(f"held-out after: {after['mean_reward']:+.3f} (kl {after['kl_to_reference']:.3f})", flush=True)
    rewards = [it["mean_reward"] for it in ppo["iterations"]]
    head, tail = window(rewards[:5]), window(rewards[-5:])
    ppo.update(first5=head, last5=tail, final_kl=ppo["iterations"][-1]["kl_to_reference"])
    acc = reward_summary["after"]["all"]
    rows = [
        ["reward model held-out pair accuracy", f"{acc['accuracy']:.3f} ± {acc['accuracy_stderr']:.3f}", ""],
        ["PPO, first 5 iterations", f"{head['mean']:+.3f} ± {head['stdev']:.3f}", ""],
        ["PPO, last 5 iterations", f"{tail['mean']:+.3f} ± {tail['stdev']:.3f}", f"{ppo['final_kl']:.3f}"],
        *[[f"held-out {len(held_prompts)} x {args.eval_samples}, {when}", f"{r['mean_reward']:+.3f} ± "
           f"{r['reward_stderr_over_prompts']:.3f}", f"{r['kl_to_reference']:.3f}"]
          for when, r in (("base", before), ("after PPO", after))],
    ]  # fmt: skip
    prompts = {"train": len(train_prompts), "heldout": [name for name, _ in held_prompts]}
    payload = {
        "reward_model": reward_summary,
        "prompts": prompts,
        "ppo": ppo,
        "heldout": {"before": before, "after": after},
        "phase_wall_s": phases,
    }
    return payload, rows
