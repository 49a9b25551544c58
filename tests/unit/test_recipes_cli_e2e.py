"""`plait finetune` end to end on one process: a tiny base saved as `plait train` saves it (with its
tokenizer), then sft, dpo, grpo and ppo for a step or two each through `plait.cli.main`, each checked for
exit code 0, its summary line, its checkpoint and that `plait generate` reads that checkpoint."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from plait.checkpoint.io import save_checkpoint
from plait.cli import main
from plait.config import load_config, model_config_for
from plait.data.tokenizer import train_tokenizer
from plait.models.gpt import GPT
from plait.recipes.rl_run import module_bytes
from plait.train.generate import load_for_inference

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DOC = '''def add{i}(x):
    """Return x plus {i}.

    >>> add{i}(1)
    {j}
    """
    return x + {i}


def twice{i}(x):
    """Return {i} times x, twice.

    >>> twice{i}(2)
    {k}
    """
    y = x * {i}
    return y * 2
'''


def write_corpus(directory: Path, count: int) -> list[str]:
    directory.mkdir(parents=True)
    texts = [DOC.format(i=i, j=i + 1, k=4 * i) for i in range(count)]
    for i, text in enumerate(texts):
        (directory / f"doc{i:02d}.py").write_text(text)
    return texts


def save_base(path: Path, texts: list[str], *, trained_at: int | None = None) -> None:
    """A gpt-tiny checkpoint (64 positions) as `plait train` leaves it: weights, config and the tokenizer of
    ``texts``; ``trained_at``: its record of training at that data.seq_len (else none: the whole context)."""
    seq_len = f"data.seq_len={trained_at or 64}"
    config = load_config(CONFIGS / "gpt-tiny.toml", ["data.vocab_size=300", seq_len, "plan.dp=1"])
    torch.manual_seed(0)
    model = GPT(model_config_for(config))
    trainer_state = {"step": 10, "tokenizer": train_tokenizer(texts, vocab_size=300).to_str()}
    if trained_at is not None:
        trainer_state["loader"] = {}
    save_checkpoint(path, model_state=model.state_dict(), trainer_state=trainer_state, config=config.to_dict())


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("finetune")
    save_base(root / "base", write_corpus(root / "corpus", 10))
    return root


COMMON = [
    "data.val_fraction=0.3",
    "data.eval_examples=2",
    "train.steps=1",
    "train.global_batch=2",
    "train.log_every=1",
    "train.eval_every=1",
    "train.checkpoint_every=1",
    "plan.dp=1",
]
RECIPES = {
    "sft": ["data.seq_len=64"],
    "dpo": ["data.seq_len=64"],
    "grpo": ["grpo.group=2", "grpo.max_new_tokens=6", "train.global_batch=1", "data.max_examples=2"],
    "ppo": ["ppo.max_new_tokens=6", "ppo.ppo_epochs=1", "train.global_batch=1", "data.max_examples=2"],
    "reward": ["data.seq_len=64"],
}


def finetune(root: Path, kind: str, *extra: str, name: str = "") -> tuple[int, Path]:
    out = root / "runs" / (name or kind)
    sets = [*COMMON, *RECIPES[kind], f"base.path={root / 'base'}", f"data.corpus={root / 'corpus'}"]
    sets += [f"data.cache_dir={root / 'cache'}", *extra]
    sets.append(f"train.out_dir={out}")
    argv = ["finetune", str(CONFIGS / "finetune" / f"{kind}.toml")]
    return main(argv + [part for item in sets for part in ("--set", item)]), out


@pytest.mark.parametrize("kind", ["sft", "dpo", "grpo", "ppo"])
def test_plait_finetune_runs_and_generate_reads_its_checkpoint(
    kind: str, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = finetune(root, kind)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    log = (out / "finetune.log").read_text()
    assert "done: 1 steps | held-out loss" in log and f"checkpoints in {out}" in log, log[-2000:]
    if kind in ("grpo", "ppo"):  # a rollout was scored: the sandboxed doctest reward of step 1
        rows = list(csv.DictReader((out / "metrics.csv").open()))
        assert 0.0 <= float(rows[-1]["reward"]) <= 1.0, rows[-1]
    checkpoints = sorted((out / "checkpoints").glob("step-*"))
    assert [path.name for path in checkpoints] == ["step-000001"], checkpoints
    code = main(["generate", str(checkpoints[0]), "--prompt", "def add", "--max-new-tokens", "4", "--top-k", "5"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert captured.out.startswith("def add"), captured.out[-500:]


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_rl_recipes_refuse_a_jsonl_source_in_one_line(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = tmp_path / "prompts.jsonl"
    records.write_text('{"prompt": "def f(x):", "response": "    return x"}\n')
    sets = ["data.source=jsonl", f"data.path={records}", f"train.out_dir={tmp_path / 'out'}"]
    code = main(["finetune", str(CONFIGS / "finetune" / f"{kind}.toml")] + [p for s in sets for p in ("--set", s)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f'data.source="jsonl" is not read by recipe {kind!r}' in err and 'data.source="corpus"' in err, err
    assert not (tmp_path / "out").exists()


def test_ppo_reads_a_saved_reward_model_and_refuses_others_in_one_line(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, reward_out = finetune(root, "reward")
    assert code == 0, capsys.readouterr().err[-2000:]
    reward_path = reward_out / "checkpoints" / "step-000001"
    code, out = finetune(root, "ppo", "ppo.reward=model", f"ppo.reward_path={reward_path}", name="ppo-rm")
    assert code == 0, capsys.readouterr().err[-2000:]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    grades = (0.0, 0.2, 0.5, 1.0)  # the sandbox's: a mean of two of these would mean the model went unused
    sandbox_means = [(a + b) / 2 for a in grades for b in grades]
    reward = float(rows[-1]["reward"])
    assert rows[-1]["step"] == "1" and min(abs(reward - m) for m in sandbox_means) > 1e-6, rows[-1]
    save_base(root / "other-base", ["an unrelated tokenizer's text " * 20])
    refusals = {
        str(root / "nowhere"): "does not exist",
        str(root / "base"): "holds no reward head",  # a plait checkpoint, but a plain LM
    }
    capsys.readouterr()  # the runs' output
    for path, message in refusals.items():
        code, out = finetune(root, "ppo", "ppo.reward=model", f"ppo.reward_path={path}", name="refused")
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    code, _ = finetune(
        root, "ppo", "ppo.reward=model", f"ppo.reward_path={reward_path}", f"base.path={root / 'other-base'}",
        name="refused",
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "tokenizer differs from base.path's" in err, err
    assert not (root / "runs" / "refused").exists()


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_rl_refuses_prompts_past_the_base_trained_length_before_launch(
    kind: str, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The shortest prompt takes 26 tokens: + 6 new fits the base's 64 positions, not the 30 it was trained at."""
    save_base(root / "base-30", [DOC.format(i=i, j=i + 1, k=4 * i) for i in range(10)], trained_at=30)
    code, out = finetune(root, kind, f"base.path={root / 'base-30'}", name=f"{kind}-30")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "fits 30 tokens with max_new_tokens=6" in err and f"lower [{kind}].max_new_tokens to 4 or fewer" in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ppo.reward=model"], 'reward="model" reads reward_path'),
        (["ppo.reward_path=runs/reward/checkpoints/step-000001"], '"verifiable" takes none'),
    ],
)
def test_ppo_reward_settings_are_refused_in_one_line(overrides: list[str], message: str) -> None:
    from plait.recipes.config import load_finetune_config

    with pytest.raises(ValueError, match=message):
        load_finetune_config(CONFIGS / "finetune" / "ppo.toml", overrides)


def test_grpo_refuses_a_learned_reward() -> None:
    from plait.recipes.config import load_finetune_config

    with pytest.raises(ValueError, match='GRPO scores with the doctest reward; set reward="verifiable"'):
        load_finetune_config(CONFIGS / "finetune" / "grpo.toml", ["grpo.reward=model"])


def last_row(root: Path, kind: str, *extra: str, name: str = "") -> dict[str, str]:
    """The last metrics row of run ``name`` (made here unless an earlier test of this module made it)."""
    out = root / "runs" / (name or kind)
    if not (out / "metrics.csv").exists():
        code, _ = finetune(root, kind, *extra, name=name)
        assert code == 0
    return list(csv.DictReader((out / "metrics.csv").open()))[-1]


def test_rl_logs_rollout_tokens_per_s_and_the_state_of_every_model_it_holds(root: Path) -> None:
    model = load_for_inference(root / "base")[0]
    base = module_bytes([model])  # one plain copy of the base's weights
    head = model.config.d_model * 4 + 4  # a scalar head's weight and bias, fp32
    sft, grpo, ppo = (last_row(root, kind) for kind in ("sft", "grpo", "ppo"))
    for row in (grpo, ppo):  # a rollout's real tokens over the whole step's time
        tokens = float(row["tokens_per_s"]) * float(row["step_s"])
        assert tokens > 0 and abs(tokens - round(tokens)) < 1e-3, row
    # GRPO: the actor's engine (as sft's at dp=1, same model and Adam) + the sampling replica + the reference
    assert float(grpo["state_bytes"]) == float(sft["state_bytes"]) + 2 * base
    # PPO: GRPO's + the critic's engine (sft's + the head's weights, grads, two Adam moments and two fp32
    # Adam step counters) + the critic's replica (the base and its head)
    critic_engine = float(sft["state_bytes"]) + 4 * head + 2 * 4
    assert float(ppo["state_bytes"]) == float(grpo["state_bytes"]) + critic_engine + base + head
