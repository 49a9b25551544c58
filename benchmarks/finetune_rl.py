"""PPO and GRPO on the demo's model (issue 19) with the verifiable reward: mean reward per iteration.

Tasks: the stdlib's module-level functions whose docstrings carry doctests, from training documents (the
validation documents hold none at val_fraction 0.01), kept where the true body passes its own doctests in
the sandbox and the prompt (imports + signature + docstring) leaves room for the completion. The reward is
graded (plait.recipes.sandbox.graded_reward): 1.0 the doctests pass, 0.5 the function is defined and its
examples run without raising, 0.2 the completion parses, 0.0 otherwise; the completion is cut where the
function ends (the first unindented line).

1. PPO (plait.recipes.ppo, one process): actor and critic each a plait.boost engine, the rollout and old
   values from plain replicas refreshed once per iteration, a frozen reference, the sandboxed reward.
   Mean reward per iteration; first vs last 5 iterations.
2. GRPO (plait.recipes.grpo, one process, from the base again): parse and pass rates over every task
   (`--eval-samples` completions each) before and after `--grpo-iters` iterations.

    python benchmarks/finetune_rl.py                      # from the repository root; a few minutes on 2 busy cores
    python benchmarks/finetune_rl.py --ppo-iters 2 --grpo-iters 1 --tag smoke
    python benchmarks/finetune_rl.py --fixed-prompts --prompts 8 --samples 4 --lr 3e-4 --ppo-epochs 4 \
        --grpo-iters 0 --tag fixed-8x4-lr3e-4         # PPO only, the run whose reward rose (README)

3. --reward model (benchmarks/rl_reward_model.py): PPO against a reward model trained on the corpus's preference
   pairs instead of the sandbox; held-out reward and KL to the reference before/after, decoded samples.

    python benchmarks/finetune_rl.py --reward model --reward-steps 200 --prompts 8 --samples 4 --max-new 24 \
        --max-prompt-tokens 64 --lr 5e-5 --kl 0.05 --ppo-epochs 4 --threads 2

Writes benchmarks/results/finetune_rl.json (--reward model: finetune_rl-reward-model.json; --tag: -TAG suffix).
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import torch
from common import RESULTS_DIR, format_table, load_average, write_results
from rl_reward_model import learned_reward_run, ppo_settings, window

import plait
from plait.recipes.base import load_base
from plait.recipes.data.verifiable import VerifiableTask, corpus_tasks, verifiable_reward, verified
from plait.recipes.grpo import PolicyLoss, grpo_batch
from plait.recipes.ppo import (
    PPOModels,
    ValueModel,
    policy_loss_for,
    ppo_iteration,
    refresh,
    value_loss_for,
)
from plait.recipes.rollout import SamplingConfig, rollout
from plait.recipes.sandbox import SandboxLimits

BASE = "runs/gpt-10m-eval/checkpoints/step-000300"
LIMITS = SandboxLimits(cpu_s=2, wall_s=6.0)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default=BASE)
    parser.add_argument("--ppo-iters", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per iteration")
    parser.add_argument("--samples", type=int, default=2, help="PPO completions per prompt")
    parser.add_argument("--ppo-epochs", type=int, default=2)
    parser.add_argument(
        "--fixed-prompts", action="store_true", help="every PPO iteration on the same first --prompts tasks"
    )
    parser.add_argument("--max-new", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--kl", type=float, default=0.02)
    parser.add_argument("--grpo-iters", type=int, default=10)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--grpo-prompts", type=int, default=2)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument(
        "--max-prompt-tokens", type=int, default=80, help="keep tasks whose prompt is this short (0: all that fit)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument(
        "--reward", choices=("verifiable", "model"), default="verifiable",
        help="model: PPO against a reward model trained on the corpus's preference pairs (rl_reward_model.py)",
    )  # fmt: skip
    parser.add_argument("--reward-steps", type=int, default=60, help="--reward model: reward-model steps")
    parser.add_argument("--reward-lr", type=float, default=2e-4)
    parser.add_argument("--reward-pairs", type=int, default=8, help="preference pairs per reward-model step")
    parser.add_argument("--eval-prompts", type=int, default=16, help="--reward model: held-out prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="")
    return parser.parse_args()


def engine_for(model: torch.nn.Module, loss_fn: Any, *, lr: float) -> Any:
    optimizer = lambda params: torch.optim.AdamW(params, lr=lr, eps=1e-6, weight_decay=0.0)  # noqa: E731
    return plait.boost(model, optimizer=optimizer, loss_fn=loss_fn, plan=plait.Plan(), max_grad_norm=1.0)


def load_tasks(tokenizer: Any, *, context: int, max_new: int, max_prompt: int) -> list[VerifiableTask]:
    tasks = verified(corpus_tasks("stdlib", split="train"), limits=LIMITS)
    room = min(context - max_new, max_prompt or context)
    return [task for task in tasks if len(tokenizer.encode(task.prompt)) <= room]


def batch_tasks(tasks: list[VerifiableTask], iteration: int, count: int) -> list[VerifiableTask]:
    return [tasks[(iteration * count + k) % len(tasks)] for k in range(count)]


def rates(scores: torch.Tensor) -> dict[str, float]:
    return {
        "mean_reward": float(scores.mean()),
        "parse_rate": float((scores >= 0.2).float().mean()),
        "runs_rate": float((scores >= 0.5).float().mean()),
        "pass_rate": float((scores == 1.0).float().mean()),
    }


def run_ppo(args: argparse.Namespace, base: torch.nn.Module, tokenizer: Any, tasks: list) -> dict[str, Any]:
    settings = ppo_settings(args)
    torch.manual_seed(0)
    critic = ValueModel(copy.deepcopy(base))
    models = PPOModels(
        actor=engine_for(copy.deepcopy(base), policy_loss_for(settings), lr=args.lr),
        critic=engine_for(critic, value_loss_for(settings), lr=2 * args.lr),
        actor_replica=copy.deepcopy(base),
        critic_replica=copy.deepcopy(critic),
        reference=copy.deepcopy(base).eval().requires_grad_(False),
        reward_fn=lambda sampled: sampled,  # replaced per iteration (the reward knows its tasks)
    )
    iterations = []
    for i in range(args.ppo_iters):
        chosen = batch_tasks(tasks, 0 if args.fixed_prompts else i, args.prompts)
        models.reward_fn = verifiable_reward(chosen, tokenizer, samples=args.samples, limits=LIMITS)
        prompts = [tokenizer.encode(task.prompt) for task in chosen]
        start = time.perf_counter()
        stats = ppo_iteration(
            models, prompts, first_index=i * args.prompts * args.samples, settings=settings, eos_id=tokenizer.eot_id
        )
        record = {
            **rates(stats["scores"]),
            "policy_losses": stats["policy_losses"],
            "value_losses": stats["value_losses"],
        }
        iterations.append({**record, "wall_s": time.perf_counter() - start})
        print(
            f"ppo {i:2d}: reward {record['mean_reward']:.3f} parse {record['parse_rate']:.2f} ({iterations[-1]['wall_s']:.0f} s)",
            flush=True,
        )
    return {"settings": {k: str(v) for k, v in vars(settings).items()}, "iterations": iterations}


def evaluate(policy: torch.nn.Module, tokenizer: Any, tasks: list, *, samples: int, max_new: int) -> dict[str, float]:
    """Every task sampled ``samples`` times (fixed seeds, temperature 1): the graded reward's rates."""
    sampling = SamplingConfig(max_new_tokens=max_new, temperature=1.0, top_k=50, seed=12345)
    prompts = [tokenizer.encode(task.prompt) for task in tasks]
    scores = []
    for k, prompt in enumerate(prompts):
        sampled = rollout(
            policy, [prompt], num_samples=samples, first_index=k * samples, sampling=sampling, eos_id=tokenizer.eot_id
        )
        scores.append(verifiable_reward([tasks[k]], tokenizer, samples=samples, limits=LIMITS)(sampled))
    return rates(torch.cat(scores))


def run_grpo(args: argparse.Namespace, base: torch.nn.Module, tokenizer: Any, tasks: list) -> dict[str, Any]:
    before = evaluate(base, tokenizer, tasks, samples=args.eval_samples, max_new=args.max_new)
    print(f"grpo before: {before}", flush=True)
    loss = PolicyLoss(clip=0.2, kl_coef=0.04)
    policy = engine_for(copy.deepcopy(base), loss, lr=args.lr)
    replica, reference = copy.deepcopy(base), copy.deepcopy(base).eval().requires_grad_(False)
    sampling = SamplingConfig(max_new_tokens=args.max_new, temperature=1.0, top_k=50, seed=2)
    iterations = []
    for i in range(args.grpo_iters):
        chosen = batch_tasks(tasks, i, args.grpo_prompts)
        reward_fn = verifiable_reward(chosen, tokenizer, samples=args.group, limits=LIMITS)
        prompts = [tokenizer.encode(task.prompt) for task in chosen]
        batch, rewards = grpo_batch(
            refresh(replica, policy), reference, prompts, group=args.group, first_index=i * len(prompts) * args.group,
            sampling=sampling, eos_id=tokenizer.eot_id, reward_fn=reward_fn,
        )  # fmt: skip
        step_loss = policy.train_step(batch).loss.item()
        iterations.append({**rates(rewards), "loss": step_loss})
        print(f"grpo {i:2d}: reward {iterations[-1]['mean_reward']:.3f} loss {step_loss:.4f}", flush=True)
    after = evaluate(refresh(replica, policy), tokenizer, tasks, samples=args.eval_samples, max_new=args.max_new)
    print(f"grpo after: {after}")
    return {"before": before, "after": after, "iterations": iterations}


def main() -> None:
    args = parse_args()
    load_before, start, phases = load_average(), time.perf_counter(), {}
    base, tokenizer = load_base(args.base)
    torch.set_num_threads(args.threads)
    if args.reward == "model":
        return main_learned_reward(args, base, tokenizer, start=start, load_before=load_before)
    tasks = load_tasks(
        tokenizer, context=base.config.max_seq_len, max_new=args.max_new, max_prompt=args.max_prompt_tokens
    )
    phases["tasks"] = time.perf_counter() - start
    print(f"{len(tasks)} verifiable tasks fit the context", flush=True)
    ppo = run_ppo(args, base, tokenizer, tasks)
    phases["ppo"] = time.perf_counter() - start - sum(phases.values())
    grpo = run_grpo(args, base, tokenizer, tasks) if args.grpo_iters else None
    phases["grpo"] = time.perf_counter() - start - sum(phases.values())
    rewards = [it["mean_reward"] for it in ppo["iterations"]]
    head, tail = window(rewards[:5]), window(rewards[-5:])
    ppo.update(first5=head, last5=tail)
    headers = ["run", "mean reward", "parse rate", "pass rate"]
    rows = [
        ["PPO, first 5 iterations", f"{head['mean']:.3f} ± {head['stdev']:.3f}", "", ""],
        ["PPO, last 5 iterations", f"{tail['mean']:.3f} ± {tail['stdev']:.3f}", "", ""],
        *[[f"GRPO {when}, {len(tasks)} tasks x {args.eval_samples}", f"{grpo[when]['mean_reward']:.3f}",
           f"{grpo[when]['parse_rate']:.3f}", f"{grpo[when]['pass_rate']:.3f}"] for when in ("before", "after") if grpo],
    ]  # fmt: skip
    payload = {
        "tasks": {"verified_fitting": len(tasks), "names": [task.name for task in tasks]},
        "reward": "graded: 1.0 doctests pass, 0.5 defined and examples run without raising, 0.2 parses, 0 otherwise",
        "ppo": ppo,
        "grpo": grpo,
    }
    report(args, "finetune_rl", payload, table=(headers, rows), start=start, load_before=load_before, phases=phases)


def main_learned_reward(args: argparse.Namespace, base: Any, tokenizer: Any, *, start: float, load_before: Any) -> None:
    payload, rows = learned_reward_run(args, base, tokenizer)
    headers = ["learned reward (standardised)", "mean ± spread", "KL to reference"]
    report(
        args, "finetune_rl-reward-model", payload, table=(headers, rows), start=start, load_before=load_before,
        phases=payload["phase_wall_s"],
    )  # fmt: skip


def report(
    args: argparse.Namespace,
    name: str,
    payload: dict[str, Any],
    *,
    table: tuple[list[str], list[list[str]]],
    start: float,
    load_before: Any,
    phases: dict[str, float],
) -> None:
    """Print the table; write RESULTS_DIR/NAME[-TAG].json with the environment, load, settings and table."""
    headers, rows = table
    print()
    print(format_table(headers, rows))
    payload = {"settings": vars(args), **payload, "table": {"headers": headers, "rows": rows}}
    write_results(
        RESULTS_DIR / f"{name}.json", payload, tag=args.tag, load_before=load_before, started=start, phases=phases
    )


if __name__ == "__main__":
    main()
