"""Pipeline partitioning and stages: optimal balanced splits, costs, names, and stage-chain parity."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import transformers
from torch import nn

from plait.models import build
from plait.pipeline.partition import (
    balanced_split,
    layer_costs,
    partition_layers,
    ranges_from_split_points,
)
from plait.pipeline.stage import build_stage, build_stage_chunks, release_unused

pytestmark = pytest.mark.timeout(60)

EXACT = {"rtol": 1e-6, "atol": 1e-6}


def brute_force_best(costs: list[float], num_stages: int) -> float:
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(costs)), num_stages - 1):
        bounds = [0, *cuts, len(costs)]
        best = min(best, max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds)))
    return best


def assert_partition(ranges: list[range], num_units: int, num_stages: int) -> None:
    assert len(ranges) == num_stages
    assert all(len(stage) > 0 for stage in ranges)
    assert [index for stage in ranges for index in stage] == list(range(num_units))


def test_balanced_split_is_optimal_against_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(150):
        num_units = rng.randint(1, 8)
        num_stages = rng.randint(1, num_units)
        costs = [rng.choice([0.0, rng.random(), float(rng.randint(1, 5))]) for _ in range(num_units)]
        ranges = balanced_split(costs, num_stages)
        assert_partition(ranges, num_units, num_stages)
        worst = max(sum(costs[i] for i in stage) for stage in ranges)
        assert worst == pytest.approx(brute_force_best(costs, num_stages), rel=1e-12, abs=1e-12)


def test_uneven_split_keeps_every_layer() -> None:
    assert balanced_split([1, 1, 1, 1, 1], 2) == [range(0, 2), range(2, 5)]
    assert balanced_split([1, 1, 1, 1, 1], 5) == [range(i, i + 1) for i in range(5)]
    assert balanced_split([5, 1, 1, 1], 2) == [range(0, 1), range(1, 4)]
    assert_partition(balanced_split([1.0] * 7, 3), 7, 3)


@pytest.mark.parametrize(("costs", "num_stages"), [([1, 2], 3), ([1, 2], 0), ([1, -1], 1), ([float("nan")], 1)])
def test_balanced_split_rejects_bad_arguments(costs: list[float], num_stages: int) -> None:
    with pytest.raises(ValueError):
        balanced_split(costs, num_stages)


def test_costs_count_the_lm_head() -> None:
    model = build("tiny", num_layers=4, vocab_size=8192)
    costs = layer_costs(model, seq_len=64)
    assert [cost.name for cost in costs] == ["embeddings", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]
    d_model, vocab = 64, 8192
    assert costs[0].flops_per_token == 0 and costs[0].num_params == vocab * d_model + 64 * d_model
    assert costs[-1].flops_per_token >= 2 * d_model * vocab
    block_params = sum(param.numel() for param in model.blocks[0].parameters())
    assert costs[1].flops_per_token == 2 * block_params + 4 * 64 * d_model
    # The head costs about ten layers: the last stage takes fewer layers.
    ranges = partition_layers(model, pp=2, seq_len=64)
    assert len(ranges[1]) < len(ranges[0])
    assert_partition(ranges, 4, 2)


def test_split_points_override() -> None:
    model = build("tiny", num_layers=4)
    assert partition_layers(model, pp=2, seq_len=16, split_points=[1]) == [range(0, 1), range(1, 4)]
    assert ranges_from_split_points([1, 3], num_layers=4, num_stages=3) == [range(0, 1), range(1, 3), range(3, 4)]


@pytest.mark.parametrize(
    ("points", "num_stages", "message"),
    [
        ([0, 0], 3, "stage 1 empty"),
        ([4, 4], 3, "stage 1 empty"),
        ([0, 0, 4], 4, "stage 1 empty"),
        ([-1], 2, "stage 0 empty"),
        ([5], 2, "stage 1 empty"),
        ([2, 2], 3, "stage 1 empty"),
        ([3, 1], 3, "stage 1 empty"),
        ([1, 2], 2, "gives 3 stages but 2"),
        ([1.5], 2, "must be ints"),
    ],
)
def test_bad_split_points_are_clear_errors(points: list, num_stages: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ranges_from_split_points(points, num_layers=4, num_stages=num_stages)


def test_too_many_stages_is_a_clear_error() -> None:
    model = build("tiny", num_layers=4)
    with pytest.raises(ValueError, match=r"4 layers.*pp <= 4"):
        partition_layers(model, pp=5, seq_len=16)
    with pytest.raises(ValueError, match=r"num_chunks <= 2"):
        partition_layers(model, pp=2, num_chunks=3, seq_len=16)
    assert_partition(partition_layers(model, pp=2, num_chunks=2, seq_len=16), 4, 4)


def test_an_explicit_split_may_leave_the_first_stage_the_embedding_and_the_last_the_head() -> None:
    assert ranges_from_split_points([0], num_layers=4, num_stages=2) == [range(0, 0), range(0, 4)]
    assert ranges_from_split_points([4], num_layers=4, num_stages=2) == [range(0, 4), range(4, 4)]
    model = build("tiny", num_layers=4)
    ranges = partition_layers(model, pp=2, num_chunks=3, seq_len=16, split_points=[0, 1, 2, 3, 4])
    assert ranges == [range(0, 0), *(range(i, i + 1) for i in range(4)), range(4, 4)]


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_layerless_end_chunks_chain_to_the_model(preset: str) -> None:
    """An embedding-only first chunk and a norm + head-only last chunk compute what the model computes."""
    torch.manual_seed(0)
    model = build(preset, num_layers=2).eval()
    ranges = ranges_from_split_points([0, 1, 2], num_layers=2, num_stages=4)
    chunks = build_stage_chunks(model, rank=0, num_ranks=1, num_chunks=4, ranges=ranges)
    first, last = all_names(chunks[0]), all_names(chunks[3])
    assert "embed.weight" in first and "lm_head.weight" in last
    assert not any(name.startswith("blocks.") for name in first | last)
    assert_chain_matches(chunks, model)


def test_hf_llama_layerless_end_stages_match_the_model() -> None:
    torch.manual_seed(0)
    model = tiny_llama().eval()
    ranges = ranges_from_split_points([0, 4], num_layers=4, num_stages=3)
    stages = [build_stage(model, stage_index=i, num_stages=3, layer_ranges=ranges) for i in range(3)]
    ids = torch.randint(1, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(stages[2](stages[1](stages[0](ids))).logits, model(ids).logits, **EXACT)


def test_unsupported_model_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="registry has no entry None"):
        layer_costs(nn.Sequential(nn.Linear(2, 2)), seq_len=4)


def test_unknown_family_names_the_registry_entry_to_add() -> None:
    config = transformers.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)
    with pytest.raises(ValueError, match=r"no entry 'bloom' .* Add Architecture\('bloom', layers=\.\.\."):
        layer_costs(transformers.BloomForCausalLM(config), seq_len=4)


def test_alibi_falcon_is_refused_with_the_reason() -> None:
    config = transformers.FalconConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True
    )
    with pytest.raises(ValueError, match="alibi=True folds its position bias"):
        layer_costs(transformers.FalconForCausalLM(config), seq_len=4)


def all_names(model: nn.Module) -> set[str]:
    return {name for name, _ in model.named_parameters(remove_duplicate=False)}


def logits_of(outputs: object) -> torch.Tensor:
    return outputs if isinstance(outputs, torch.Tensor) else outputs.logits


def assert_stages_match(model: nn.Module, ids: torch.Tensor, **kwargs: torch.Tensor) -> list[nn.Module]:
    model.eval()
    ranges = partition_layers(model, pp=2, seq_len=ids.shape[1])
    stages = [build_stage(model, stage_index=i, num_stages=2, layer_ranges=ranges) for i in range(2)]
    names = [{name for name, _ in stage.named_parameters()} for stage in stages]
    assert names[0] | names[1] == all_names(model)
    assert not names[0] & names[1]
    with torch.no_grad():
        torch.testing.assert_close(
            logits_of(stages[1](stages[0](ids, **kwargs), **kwargs)), logits_of(model(ids, **kwargs)), **EXACT
        )
    return stages


def tiny_gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=128, n_positions=32, n_embd=32, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def tiny_llama(attn_implementation: str = "sdpa") -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        attn_implementation=attn_implementation,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_plait_gpt_stages_keep_names_and_logits(preset: str) -> None:
    torch.manual_seed(0)
    model = build(preset, num_layers=4)
    ids = torch.randint(512, (2, 16))
    stages = assert_stages_match(model, ids)
    assert "embed.weight" in dict(stages[0].named_parameters())
    assert "lm_head.weight" in dict(stages[1].named_parameters())
    assert "blocks.3.attn.q_proj.weight" in dict(stages[1].named_parameters())
    tied = model.config.tied_embeddings
    assert stages[1].tied_pairs == ([("embed.weight", "lm_head.weight")] if tied else [])
    assert stages[0].tied_pairs == stages[1].tied_pairs
    if tied:
        assert model.lm_head.weight is model.embed.weight  # the full model stays tied
    torch.testing.assert_close(stages[1].lm_head.weight, model.embed.weight if tied else model.lm_head.weight)


def test_hf_gpt2_stages() -> None:
    torch.manual_seed(0)
    model = tiny_gpt2()
    stages = assert_stages_match(model, torch.randint(128, (2, 16)))
    assert stages[1].tied_pairs == [("transformer.wte.weight", "lm_head.weight")]
    assert stages[1].get_parameter("lm_head.weight") is not model.transformer.wte.weight


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_hf_llama_stages(attn_implementation: str) -> None:
    torch.manual_seed(0)
    model = tiny_llama(attn_implementation)
    ids = torch.randint(1, 128, (2, 16))
    stages = assert_stages_match(model, ids)
    assert stages[1].tied_pairs == []
    assert_stages_match(model, ids, attention_mask=torch.ones_like(ids).index_fill_(1, torch.arange(12, 16), 0))
    positions = torch.arange(16) + 5
    first, last = assert_stages_match(model, ids, position_ids=positions[None])
    with torch.no_grad():  # (seq,) positions work too, as plait's GPT takes them
        torch.testing.assert_close(
            last(first(ids, position_ids=positions), position_ids=positions).logits,
            model(ids, position_ids=positions[None]).logits,
            **EXACT,
        )


def assert_chain_matches(chunks: list, model: torch.nn.Module) -> None:
    """The chunks applied one after another compute the model's logits."""
    ids = torch.randint(512, (2, 16))
    hidden = ids
    with torch.no_grad():
        for chunk in chunks:
            hidden = chunk(hidden)
        torch.testing.assert_close(hidden, model(ids), **EXACT)


def test_single_rank_chunks_stay_tied_and_chain() -> None:
    torch.manual_seed(0)
    model = build("tiny", num_layers=4).eval()
    ranges = partition_layers(model, pp=1, num_chunks=4, seq_len=16)
    chunks = build_stage_chunks(model, rank=0, num_ranks=1, num_chunks=4, ranges=ranges)
    assert chunks[0].get_parameter("embed.weight") is chunks[3].get_parameter("lm_head.weight")
    assert all(chunk.tied_pairs == [] for chunk in chunks)
    assert_chain_matches(chunks, model)


def test_interleaved_chunks_and_release_unused() -> None:
    model = build("tiny", num_layers=4)
    ranges = partition_layers(model, pp=2, num_chunks=2, seq_len=16)
    chunks = build_stage_chunks(model, rank=1, num_ranks=2, num_chunks=2, ranges=ranges)
    assert [chunk.spec.index for chunk in chunks] == [1, 3]
    assert chunks[1].spec.is_last and not chunks[0].spec.is_first
    kept = {name for chunk in chunks for name, _ in chunk.named_parameters()}
    assert "embed.weight" not in kept and "lm_head.weight" in kept
    held = {param for chunk in chunks for param in chunk.parameters()}
    expected = sum(param.numel() for param in model.parameters() if param not in held)
    assert release_unused(model, chunks) == expected
    assert model.embed.weight.is_meta and model.lm_head.weight is model.embed.weight  # still tied
    assert model.blocks[0].attn.q_proj.weight.is_meta and not model.blocks[1].attn.q_proj.weight.is_meta
    assert not chunks[1].get_parameter("lm_head.weight").is_meta


def test_build_stage_rejects_bad_ranges() -> None:
    model = build("tiny", num_layers=4)
    with pytest.raises(ValueError, match="cover"):
        build_stage(model, stage_index=0, num_stages=2, layer_ranges=[range(0, 2), range(3, 4)])
    with pytest.raises(ValueError, match="stage_index"):
        build_stage(model, stage_index=2, num_stages=2, layer_ranges=[range(0, 2), range(2, 4)])


def test_plait_train_accepts_layerless_end_stages_only_from_an_explicit_split() -> None:
    from plait.config import Config, Plan
    from plait.train.setup import validate

    plan = {"dp": 1, "pp": 2, "microbatches": 2, "pp_schedule": "interleaved", "pp_chunks": 2}
    accepted = validate(Config(plan=Plan(**plan, pp_split=[0, 1, 2])), world_size=2)  # tiny: 2 layers, 4 chunks
    assert accepted.plan.pp_split == [0, 1, 2]
    with pytest.raises(ValueError, match="4 stages but the model has 2 layers"):
        validate(Config(plan=Plan(**plan)), world_size=2)
    with pytest.raises(ValueError, match=r"pp_split=\[0, 0, 2\]"):
        validate(Config(plan=Plan(**plan, pp_split=[0, 0, 2])), world_size=2)
