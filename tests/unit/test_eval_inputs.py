"""plait eval: bad input is refused in one line before anything is written; a small run reports;
the held-out functions come from documents the training shards never hold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from plait.checkpoint.io import save_checkpoint
from plait.cli import main
from plait.config import load_config, model_config_for
from plait.data.heldout import held_out, held_out_functions
from plait.data.shards import prepare_dataset
from plait.data.tokenizer import train_tokenizer
from plait.eval.runner import EvalRequest, prepare
from plait.models.gpt import GPT

VOCAB = 320
NUM_FILES = 30
MODULE = '''"""Module {i}."""


def scale_{i}(values, factor={i}):
    """Multiply each value by {i} and add its index."""
    total = []
    for index, value in enumerate(values):
        total.append(value * factor + index + {i})
    return total


def label_{i}(name):
    """Return the name tagged with module {i}."""
    prefix = "m{i}"
    return prefix + ":" + name.upper() * {k}
'''


def data_sets(root: Path) -> list[str]:
    return [
        f"data.corpus=['{root}/corpus']",
        f"data.cache_dir={root}/cache",
        f"data.vocab_size={VOCAB}",
        "data.seq_len=64",
        "data.val_fraction=0.2",
    ]


def write_eval_corpus(directory: Path) -> None:
    directory.mkdir(parents=True)
    for i in range(NUM_FILES):
        (directory / f"mod{i:02d}.py").write_text(MODULE.format(i=i, k=i % 3 + 1))


def save_eval_checkpoint(path: Path, root: Path, *, step: int, seed: int, tokenizer: str | None = None) -> None:
    """A checkpoint as `plait train` leaves it (its trainer state names the loader), random weights."""
    config = load_config(None, data_sets(root))
    data = prepare_dataset(f"{root}/corpus", vocab_size=VOCAB, cache_dir=f"{root}/cache", val_fraction=0.2)
    torch.manual_seed(seed)
    model = GPT(model_config_for(config))
    trainer_state = {"step": step, "tokenizer": tokenizer or data.load_tokenizer().to_str(), "loader": {}}
    save_checkpoint(path, model_state=model.state_dict(), trainer_state=trainer_state, config=config.to_dict())


def save_stale_split_checkpoint(root: Path) -> None:
    """A run whose data cache records another version of the held-out split."""
    stale = root / "stale"
    write_eval_corpus(stale / "corpus")
    save_eval_checkpoint(stale / "step-000010", stale, step=10, seed=0)
    (meta_path,) = (stale / "cache").glob("*/meta.json")
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "split": {**meta["split"], "version": 0}}))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    write_eval_corpus(root / "corpus")
    for step, seed in ((10, 0), (20, 1)):
        save_eval_checkpoint(root / "run" / "checkpoints" / f"step-{step:06d}", root, step=step, seed=seed)
    other = train_tokenizer(["something else entirely\n" * 20], vocab_size=VOCAB).to_str()
    save_eval_checkpoint(root / "other" / "step-000010", root, step=10, seed=0, tokenizer=other)
    save_stale_split_checkpoint(root)
    tasks = root / "mytasks"
    tasks.mkdir()
    (tasks / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: someone/some_dataset\noutput_type: loglikelihood\ntest_split: test\n"
        "doc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
    )
    return root


def small_task_manager(root: Path):
    from lm_eval.tasks import TaskManager

    from plait.eval.tasks import TASKS_DIR

    return TaskManager(include_path=[str(TASKS_DIR), str(root / "mytasks")], include_defaults=False)


def ckpt(root: Path, step: int = 10) -> str:
    return str(root / "run" / "checkpoints" / f"step-{step:06d}")


def files_under(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if "cache" not in path.relative_to(root).parts}


CLI_CASES = {
    "missing path": (["eval", "{root}/nope"], "{root}/nope does not exist; pass plait checkpoint directories"),
    "not a checkpoint": (["eval", "{root}/corpus"], "is neither a plait checkpoint"),
    "other tokenizer": (
        ["eval", "{ckpt}", "{root}/other/step-000010"],
        "other/step-000010: its tokenizer differs from the eval data's",
    ),
    "plan cp": (
        ["eval", "{ckpt}", "--plan", "cp=2"],
        "plait eval runs under dp, tp, pp, ep and ZeRO 0-3; cp=2 is not supported for evaluation: its forward needs",
    ),
    "ranks without plan": (["eval", "{ckpt}", "--nproc", "2"], "--nproc 2 without --plan"),
    "split version": (
        ["eval", "{root}/stale/step-000010"],
        "records held-out split version 0, this plait makes version 1",
    ),
    "empty tasks": (["eval", "{ckpt}", "--tasks", ","], "names no task"),
    "no threads": (["eval", "{ckpt}", "--threads", "0"], "--threads 0: give each rank at least 1 intra-op thread"),
    "max length past context": (
        ["eval", "{ckpt}", "--max-length", "65"],
        "--max-length 65: {root}/run/checkpoints/step-000010 has 64 positions; give at most 64",
    ),
    "max length 1": (["eval", "{ckpt}", "--max-length", "1"], "--max-length 1: score windows of at least 2 tokens"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_refuses_in_one_line(case: str, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv, message = CLI_CASES[case]
    argv = [item.format(root=root, ckpt=ckpt(root)) for item in argv]
    before = files_under(root)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("plait eval: error: "), err
    assert message.format(root=root) in err, err
    assert files_under(root) == before


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        (
            "perplexity,nosuch_task",
            "unknown task 'nosuch_task': plait's tasks are perplexity, next_token, code_completion",
        ),
        ("hub_task", "task 'hub_task' needs a download (dataset someone/some_dataset from the Hugging Face hub)"),
    ],
)
def test_tasks_refused_before_anything_is_written(tasks: str, message: str, root: Path, tmp_path: Path) -> None:
    request = EvalRequest(paths=[ckpt(root)], tasks=tasks, out_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")) as error:
        prepare(request, imported_dir=tmp_path, task_manager=small_task_manager(root))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_held_out_functions_are_never_in_the_training_shards(root: Path) -> None:
    data = prepare_dataset(f"{root}/corpus", vocab_size=VOCAB, cache_dir=f"{root}/cache", val_fraction=0.2)
    meta = json.loads((data.train_path.parent / "meta.json").read_text())
    part = held_out(f"{root}/corpus", val_fraction=0.2, threshold=meta["split"]["val_threshold"])
    assert part.split == meta["split"] and len(part.documents) == data.num_val_documents == 6
    functions = held_out_functions(part)
    assert len(functions) == 2 * len(part.documents)
    tokenizer = data.load_tokenizer()
    train_text, val_text = (
        tokenizer.decode(np.fromfile(path, dtype=data.dtype).tolist(), skip_special_tokens=False)
        for path in (data.train_path, data.val_path)
    )
    for function in functions:
        assert function.body.strip() in val_text and function.body.strip() not in train_text
        assert function.header.splitlines()[0] in val_text


def test_eval_writes_json_markdown_and_plot(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main(["eval", ckpt(root, 10), ckpt(root, 20), "--out", str(out), "--limit", "6", "--batch-size", "4"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [c["step"] for c in results["checkpoints"]] == [10, 20]
    first = results["checkpoints"][0]["results"]
    assert set(first) == {"plait_perplexity", "plait_next_token", "plait_code_choice", "plait_code_line"}
    assert first["plait_perplexity"]["byte_perplexity"] > 1.0
    assert 0.0 <= first["plait_code_choice"]["acc"] <= 1.0
    assert 0.0 <= first["plait_code_choice"]["acc_mutual_info_pool4"] <= 1.0  # the YAML's process_results ran
    assert results["checkpoints"][0]["results"] != results["checkpoints"][1]["results"]  # other weights
    assert "| plait_code_choice | acc |" in (out / "results.md").read_text()
    stderr = first["plait_code_choice"]["acc_mutual_info_stderr"]  # a mean's: sd / sqrt(n)
    assert (
        0.0 <= stderr < 1.0
        and f"{first['plait_code_choice']['acc_mutual_info']:.6g} ± {stderr:.2g}" in (out / "results.md").read_text()
    )
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"
