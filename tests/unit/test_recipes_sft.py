"""SFT's data: prompt masking, packing (per-pair attention), templates, jsonl readers, corpus pairs, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

import plait
from plait.data.heldout import held_out, held_out_functions, training_functions
from plait.models import build
from plait.recipes.base import BaseTokenizer
from plait.recipes.config import FinetuneDataConfig, load_finetune_config
from plait.recipes.data.instructions import IGNORE, Example, Tokens, Turn, collate, pack, render, resolve_template
from plait.recipes.data.readers import read_examples
from tests.distributed.test_recipes_sft_parity import tiny_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eot>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def with_chat_template(tokenizer: BaseTokenizer) -> BaseTokenizer:
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, eos_token="<eot>")
    hf.chat_template = CHAT_TEMPLATE
    return BaseTokenizer(backend=tokenizer.backend, eot_id=tokenizer.eot_id, hf=hf)


def test_plain_template_masks_the_prompt_and_trains_the_response_and_its_end() -> None:
    tokenizer = tiny_tokenizer()
    tokens = render(Example.pair("sum of the list", "return sum"), tokenizer, template="plain")
    prompt = tokenizer.encode("### Instruction:\nsum of the list\n\n### Response:\n")
    response = [*tokenizer.encode("return sum"), tokenizer.eot_id]
    assert tokens.ids == prompt + response
    assert tokens.labels == [IGNORE] * len(prompt) + response


def test_chat_template_masks_every_turn_but_the_assistants() -> None:
    tokenizer = with_chat_template(tiny_tokenizer())
    example = Example((Turn("system", "be brief"), Turn("user", "alpha"), Turn("assistant", "beta")))
    tokens = render(example, tokenizer, template=resolve_template("auto", tokenizer))
    text = "<|system|>be brief<eot><|user|>alpha<eot><|assistant|>beta<eot>"
    assert tokenizer.decode(tokens.ids) == text
    trained = [i for i, label in zip(tokens.ids, tokens.labels, strict=True) if label != IGNORE]
    assert tokenizer.decode(trained) == "beta<eot>"


def test_chat_template_asked_of_a_tokenizer_without_one_is_one_line() -> None:
    assert resolve_template("auto", tiny_tokenizer()) == "plain"
    with pytest.raises(ValueError, match=r"no chat template; set data\.template"):
        resolve_template("chat", tiny_tokenizer())


def test_pack_fills_rows_in_order_truncates_and_drops_untrainable() -> None:
    a, b, c = Tokens([1, 2, 3], [IGNORE, 2, 3]), Tokens([4, 5], [IGNORE, 5]), Tokens([6] * 9, [IGNORE] * 7 + [6, 6])
    rows = pack([a, b, c], seq_len=6, pack=True)
    assert rows == [[a, b]]  # c, cut to 6 tokens, keeps no response token
    assert pack([a, b], seq_len=6, pack=False) == [[a], [b]]
    batch = collate(rows, seq_len=8, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3, IGNORE, 5, IGNORE, IGNORE, IGNORE]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    unpacked = collate([[a]], seq_len=5, pad_id=0, positions=False)
    assert unpacked["attention_mask"].tolist() == [[1, 1, 1, 0, 0]] and "position_ids" not in unpacked


def test_packed_pairs_score_as_if_each_were_alone() -> None:
    torch.manual_seed(0)
    model = build("tiny").eval()
    a, b = Tokens([5, 6, 7, 8], [IGNORE, IGNORE, 7, 8]), Tokens([9, 10, 11], [IGNORE, 10, 11])
    packed = plait.losses.causal_lm(
        model(**collate([[a, b]], seq_len=7, pad_id=0)), collate([[a, b]], seq_len=7, pad_id=0)
    )
    alone = [collate([[t]], seq_len=7, pad_id=0) for t in (a, b)]
    sums = [plait.losses.causal_lm(model(**batch), batch) for batch in alone]
    torch.testing.assert_close(packed[0], sums[0][0] + sums[1][0], rtol=1e-5, atol=1e-6)
    assert packed[1] == 4  # response tokens only: 7, 8 and 10, 11


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_alpaca_and_sharegpt_readers(tmp_path: Path) -> None:
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "add", "input": "1, 2", "output": "3"}])
    examples = read_examples(FinetuneDataConfig(source="jsonl", path=str(alpaca)))
    assert examples == [Example.pair("add\n\n1, 2", "3")]
    turns = [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    sharegpt = write_jsonl(tmp_path / "s.jsonl", [{"conversations": turns}])
    examples = read_examples(FinetuneDataConfig(source="jsonl", path=str(sharegpt), format="sharegpt"))
    assert [t.role for t in examples[0].turns] == ["system", "user", "assistant"]


def test_records_lacking_the_configured_fields_are_counted_and_the_first_named(tmp_path: Path) -> None:
    good = {"prompt": "p", "completion": "c"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, {"prompt": "p"}, good, {"completion": "c"}])
    data = FinetuneDataConfig(source="jsonl", path=str(path), instruction_field="prompt", output_field="completion")
    with pytest.raises(
        ValueError, match=r"2 of 4 records lack the alpaca fields \(first at line 2: no text under 'completion'\)"
    ):
        read_examples(data)
    (tmp_path / "broken.jsonl").write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2 is not JSON"):
        read_examples(FinetuneDataConfig(source="jsonl", path=str(tmp_path / "broken.jsonl")))


def test_corpus_pairs_train_on_training_documents_and_hold_out_validation_ones(tmp_path: Path) -> None:
    for index in range(6):
        body = f"    return x + {index}\n"
        (tmp_path / f"m{index}.py").write_text(f'def f{index}(x):\n    """Add {index}."""\n{body}')
    part = held_out([str(p) for p in sorted(tmp_path.glob("*.py"))], val_fraction=0.34)
    trained, held = training_functions(part), held_out_functions(part)
    assert len(held) == 2 and len(trained) == 4
    assert not {f.body for f in trained} & {f.body for f in held}
    assert trained[0].header.startswith("def f") and trained[0].body.startswith("    return x + ")


def test_finetune_config_reads_toml_with_overrides_and_refuses_bad_values(tmp_path: Path) -> None:
    path = tmp_path / "sft.toml"
    path.write_text('[recipe]\nkind = "sft"\n[plan]\ndp = 2\nzero = 3\n[train]\nsteps = 5\n')
    config = load_finetune_config(path, ["train.lr=1e-5", "data.pack=false"])
    assert (config.plan.dp, config.plan.zero, config.train.steps, config.train.lr, config.data.pack) == (
        2,
        3,
        5,
        1e-5,
        False,
    )
    with pytest.raises(ValueError, match=r"recipe\.kind='sfx' is not a recipe"):
        load_finetune_config(path, ["recipe.kind=sfx"])
    with pytest.raises(ValueError, match=r"data\.path='nope\.jsonl' is not a file"):
        load_finetune_config(path, ["data.source=jsonl", "data.path=nope.jsonl"])
    with pytest.raises(ValueError, match="unknown config section"):
        (tmp_path / "x.toml").write_text("[sft2]\na = 1\n")
        load_finetune_config(tmp_path / "x.toml")


def test_plait_finetune_refuses_a_missing_base_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from plait.cli import main

    code = main(["finetune", "configs/finetune/sft.toml", "--set", f"base.path={tmp_path / 'none'}"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err and not (tmp_path / "none").exists()


def test_batches_are_cut_after_their_longest_row() -> None:
    from plait.recipes.sft import SFTData

    short, longer = Tokens([1, 2, 3], [IGNORE, 2, 3]), Tokens(list(range(1, 21)), [IGNORE, *range(2, 21)])
    data = SFTData(train_rows=[[short], [longer]], eval_rows=[], seq_len=64, pad_id=0, positions=True)
    widths = {data.train_batch(0, rank, 2, global_batch=2)["input_ids"].shape[1] for rank in (0, 1)}
    assert widths == {16, 32}  # 3 and 20 tokens, rounded up to 16 columns; never seq_len's 64
