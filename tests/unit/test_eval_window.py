"""plait eval scores windows no longer than the sequence length a checkpoint was trained at: a model
trained at seq_len 8 with 16 positions is scored 8 tokens at a time (positions 8-15 never had a loss);
--max-length overrides, refused past the model's context."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from plait.checkpoint.io import save_checkpoint
from plait.config import load_config, model_config_for
from plait.data.shards import prepare_dataset
from plait.eval.runner import EvalRequest, prepare, run_eval, window
from plait.eval.window import scoring_window, trained_length
from plait.models.gpt import GPT
from tests.unit.test_eval_inputs import VOCAB, data_sets, write_eval_corpus


@pytest.fixture(scope="module")
def short(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `plait train`-style checkpoint trained at seq_len 8 of a model with 16 positions."""
    root = tmp_path_factory.mktemp("eval-window")
    write_eval_corpus(root / "corpus")
    config = load_config(None, [*data_sets(root), "data.seq_len=8", "model.max_seq_len=16"])
    data = prepare_dataset(f"{root}/corpus", vocab_size=VOCAB, cache_dir=f"{root}/cache", val_fraction=0.2)
    torch.manual_seed(0)
    model = GPT(model_config_for(config))
    path = root / "run" / "checkpoints" / "step-000010"
    trainer_state = {"step": 10, "tokenizer": data.load_tokenizer().to_str(), "loader": {}}
    save_checkpoint(path, model_state=model.state_dict(), trainer_state=trainer_state, config=config.to_dict())
    return path


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
        ({"data": {"seq_len": 128}}, {"finetune": {"data": {"seq_len": 64}}}, 64),  # fine-tuned from an import
        ({"data": {"seq_len": 128}, "model": {"pretrained": "hf-dir"}}, {"loader": {}}, None),  # HF positions
        ({"data": {"seq_len": 128}}, {"imported_from": {}}, None),  # an imported HF directory: its whole context
    ],
)
def test_trained_length_records(config: dict, trainer_state: dict, expected: int | None) -> None:
    assert trained_length(config, trainer_state) == expected


def test_window_never_past_the_context() -> None:
    assert scoring_window(label="m", context=256, trained=128, override=None) == 128
    assert scoring_window(label="m", context=64, trained=128, override=None) == 64
    assert scoring_window(label="m", context=256, trained=None, override=None) == 256
