"""plait eval scores windows no longer than the sequence length a checkpoint was trained at: a model
trained at seq_len 8 with 16 positions is scored 8 tokens at a time (positions 8-15 never had a loss);
--max-length overrides, refused past the model's context. plait generate samples in the same window.
The trained length is the longest of every stage (a fine-tune of a fine-tune), None (the whole context)
for positions a Hugging Face model trained, also after `plait train --resume` or a fine-tune."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from plait.checkpoint.io import read_trainer_state, save_checkpoint
from plait.checkpoint.lengths import BASE_LENGTH, checkpoint_lineage, inference_window, trained_length
from plait.cli import main
from plait.config import load_config, model_config_for
from plait.data.shards import prepare_dataset
from plait.eval.runner import EvalRequest, prepare, run_eval, window
from plait.models.gpt import GPT
from plait.recipes.base import checkpoint_record
from plait.train.generate import generate_text, load_for_inference, sample
from tests.unit.test_eval_inputs import VOCAB, data_sets, write_eval_corpus

SHORT = ["data.seq_len=8", "model.max_seq_len=16"]


def save_short(path: Path, root: Path, **trainer_state: object) -> Path:
    """A checkpoint of a model with 16 positions, config data.seq_len 8, ``trainer_state`` entries."""
    config = load_config(None, [*data_sets(root), *SHORT])
    data = prepare_dataset(f"{root}/corpus", vocab_size=VOCAB, cache_dir=f"{root}/cache", val_fraction=0.2)
    torch.manual_seed(0)
    model = GPT(model_config_for(config))
    trainer_state = {"step": 10, "tokenizer": data.load_tokenizer().to_str(), **trainer_state}
    save_checkpoint(path, model_state=model.state_dict(), trainer_state=trainer_state, config=config.to_dict())
    return path


@pytest.fixture(scope="module")
def short(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `plait train`-style checkpoint trained at seq_len 8 of a model with 16 positions."""
    root = tmp_path_factory.mktemp("eval-window")
    write_eval_corpus(root / "corpus")
    return save_short(root / "run" / "checkpoints" / "step-000010", root, loader={})


def test_checkpoint_trained_at_8_of_16_gets_an_8_token_window(short: Path, tmp_path: Path) -> None:
    (checkpoint,) = prepare(EvalRequest(paths=[str(short)]), imported_dir=tmp_path).checkpoints
    assert (checkpoint.context, checkpoint.trained_length) == (16, 8)
    assert window(checkpoint, override=None) == 8
    assert window(checkpoint, override=16) == 16 and window(checkpoint, override=4) == 4
    with pytest.raises(ValueError, match=r"^--max-length 17: .*step-000010 has 16 positions; give at most 16"):
        prepare(EvalRequest(paths=[str(short)], max_length=17), imported_dir=tmp_path)


def test_scores_use_the_trained_window(short: Path, tmp_path: Path) -> None:
    def run(max_length: int | None) -> dict:
        request = EvalRequest(
            paths=[str(short)], tasks="perplexity", out_dir=str(tmp_path / f"out-{max_length}"), limit=2,
            max_length=max_length,
        )  # fmt: skip
        return run_eval(request)["checkpoints"][0]

    default, eight, sixteen = run(None), run(8), run(16)
    assert (default["max_length"], eight["max_length"], sixteen["max_length"]) == (8, 8, 16)
    perplexity = [row["results"]["plait_perplexity"]["byte_perplexity"] for row in (default, eight, sixteen)]
    assert perplexity[0] == perplexity[1]
    assert not math.isclose(perplexity[0], perplexity[2], rel_tol=1e-3)  # the held-out documents span many windows


@pytest.mark.parametrize(
    ("config", "trainer_state", "expected"),
    [
        ({"data": {"seq_len": 128}}, {"loader": {}}, 128),  # plait train
        ({"data": {"seq_len": 128}}, {"loader": {}, "finetune": {"data": {"seq_len": 256}}}, 256),  # a fine-tune
        ({"data": {"seq_len": 128}}, {"finetune": {"data": {"seq_len": 64}}}, 64),  # base recorded no length
        ({"data": {"seq_len": 128}}, {"loader": {}, BASE_LENGTH: 256, "finetune": {"data": {"seq_len": 64}}}, 256),
        ({"data": {"seq_len": 128}}, {"loader": {}, BASE_LENGTH: None}, None),  # trained further from HF positions
        ({"data": {"seq_len": 128}}, {"loader": {}, "imported_from": {}}, None),
        ({"data": {"seq_len": 128}, "model": {"pretrained": "hf-dir"}}, {"loader": {}}, None),  # HF positions
        ({"data": {"seq_len": 128}}, {"imported_from": {}}, None),  # an imported HF directory: its whole context
    ],
)
def test_trained_length_records(config: dict, trainer_state: dict, expected: int | None) -> None:
    assert trained_length(config, trainer_state) == expected


def test_window_never_past_the_context() -> None:
    assert inference_window(label="m", context=256, trained=128, override=None) == 128
    assert inference_window(label="m", context=64, trained=128, override=None) == 64
    assert inference_window(label="m", context=256, trained=None, override=None) == 256


def test_generate_refuses_past_the_trained_window_and_takes_max_length(short: Path) -> None:
    _, tokenizer = load_for_inference(short)
    num_prompt = len(tokenizer.encode("def ").ids)
    kwargs = {"prompt": "def ", "temperature": 0.0, "top_k": 5, "seed": 0}
    assert generate_text(short, max_new_tokens=8 - num_prompt, **kwargs).startswith("def")
    with pytest.raises(ValueError, match=rf"^--max-new-tokens {9 - num_prompt}: .* window of 8 tokens .*--max-new"):
        generate_text(short, max_new_tokens=9 - num_prompt, **kwargs)
    assert generate_text(short, max_new_tokens=16 - num_prompt, max_length=16, **kwargs).startswith("def")
    with pytest.raises(ValueError, match=r"^--max-length 17: .*step-000010 has 16 positions; give at most 16"):
        generate_text(short, max_new_tokens=1, max_length=17, **kwargs)


def test_generate_cli_refuses_in_one_line(short: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(short), "--max-new-tokens", "12"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "window of 8 tokens" in err, err


def test_sample_slides_a_window_of_the_given_length(short: Path) -> None:
    model, _ = load_for_inference(short)
    prompt, window = [5, 6, 7], 8
    ids = torch.tensor([prompt])
    with torch.no_grad():  # greedy, each token from one forward over the last `window` tokens
        for _ in range(10):
            ids = torch.cat([ids, model(ids[:, -window:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    for cache in (True, False):
        assert (
            sample(model, prompt, max_new_tokens=10, temperature=0.0, window=window, kv_cache=cache) == ids[0].tolist()
        )


def test_a_fine_tune_of_a_fine_tune_keeps_the_longest_length(short: Path, tmp_path: Path) -> None:
    def fine_tune(base: Path, seq_len: int) -> Path:
        config, extra = checkpoint_record(base)
        path = tmp_path / f"ft-{seq_len}"
        state = {**extra, "step": 1, "finetune": {"data": {"seq_len": seq_len}}}
        save_checkpoint(path, model_state=load_for_inference(base)[0].state_dict(), trainer_state=state, config=config)
        return path

    def length(path: Path) -> int | None:
        return trained_length(json.loads((path / "config.json").read_text()), read_trainer_state(path))

    first = fine_tune(short, 12)
    assert length(first) == 12 and length(fine_tune(first, 6)) == 12  # was 8: the first fine-tune's 12 dropped
    assert length(fine_tune(fine_tune(first, 14), 4)) == 14


def test_hf_positions_keep_the_whole_context_when_trained_further(short: Path, tmp_path: Path) -> None:
    root = short.parents[2]
    imported = save_short(tmp_path / "imported", root, step=0, imported_from={"format": "huggingface"})
    assert checkpoint_lineage(imported) == {BASE_LENGTH: None}
    config, extra = checkpoint_record(imported)  # fine-tuned at 8 from an import: its whole context still
    assert trained_length(config, {**extra, "finetune": {"data": {"seq_len": 8}}}) is None
    sets = [*data_sets(root), *SHORT, "train.steps=1", "train.global_batch=2", f"train.out_dir={tmp_path / 'run'}"]
    assert main(["train", "--resume", str(imported), *[arg for s in sets for arg in ("--set", s)]]) == 0
    (trained,) = (tmp_path / "run" / "checkpoints").glob("step-*")
    assert trained_length(json.loads((trained / "config.json").read_text()), read_trainer_state(trained)) is None
