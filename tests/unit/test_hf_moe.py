"""Hugging Face sparse-MoE blocks swapped for plait MoELayers (plait.moe.hf, plait.models.hf_moe):
the same logits and gradients as the HF model, and back to HF blocks with the same weights."""

from __future__ import annotations

import copy

import pytest
import torch

from plait.models.hf_moe import hf_names, use_hf_moe, use_plait_moe
from plait.moe import MoELayer, has_moe
from plait.moe.hf import moe_config_from_hf
from tests.hf_models import MOE_FAMILIES, tiny_config, tiny_model

pytest.importorskip("transformers")

NUM_SPARSE = {"mixtral": 2, "qwen2_moe": 2, "qwen3_moe": 2}


def _batch() -> torch.Tensor:
    return torch.randint(3, 90, (3, 12), generator=torch.Generator().manual_seed(7))


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.grad for name, param in model.named_parameters()}


def _run(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens).logits
    logits.square().mean().backward()  # a loss that weighs every logit
    return logits.detach()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_swapped_model_computes_hf_logits_and_gradients(family: str) -> None:
    hf = tiny_model(family)
    swapped = copy.deepcopy(hf)
    assert use_plait_moe(swapped) == NUM_SPARSE[family]
    assert has_moe(swapped) and not has_moe(hf)
    tokens = _batch()
    torch.testing.assert_close(_run(swapped, tokens), _run(hf, tokens), rtol=1e-5, atol=1e-5)
    expected, got = _grads(hf), hf_names(swapped, _grads(swapped))
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=f"gradient of {name}")


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_swapping_back_restores_the_hf_blocks_and_weights(family: str) -> None:
    hf = tiny_model(family)
    model = copy.deepcopy(hf)
    use_plait_moe(model)
    with torch.no_grad():  # a change made under plait must come back
        next(layer for layer in model.modules() if isinstance(layer, MoELayer)).experts.up_weight[1, 0, 0] += 1.0
    assert use_hf_moe(model) == NUM_SPARSE[family]
    assert [type(m).__name__ for m in model.modules()] == [type(m).__name__ for m in hf.modules()]
    changed = [n for n, t in model.state_dict().items() if not torch.equal(t, hf.state_dict()[n])]
    assert changed == ["model.layers.0.mlp.experts.gate_up_proj"]
    up = model.state_dict()[changed[0]] - hf.state_dict()[changed[0]]
    d_ff = up.shape[1] // 2
    assert torch.count_nonzero(up) == 1 and up[1, d_ff, 0] == pytest.approx(1.0)  # the up half, after gate


def test_routing_options_follow_the_config() -> None:
    mixtral = moe_config_from_hf(tiny_config("mixtral"), num_moe_layers=2)
    assert (mixtral.normalize_topk, mixtral.top_k, mixtral.capacity_factor, mixtral.aux_loss_weight) == (
        True,
        2,
        None,
        0.0,
    )
    qwen2 = tiny_config("qwen2_moe")
    assert not moe_config_from_hf(qwen2, num_moe_layers=2).normalize_topk
    qwen2.output_router_logits = True  # HF adds coef x one pooled loss; plait coef / layers x each layer's
    assert moe_config_from_hf(qwen2, num_moe_layers=2).aux_loss_weight == pytest.approx(0.02 / 2)


def test_what_a_moe_layer_cannot_compute_is_refused() -> None:
    config = tiny_config("mixtral")
    config.router_jitter_noise = 0.1
    with pytest.raises(ValueError, match=r"router_jitter_noise=0\.1; set it to 0"):
        moe_config_from_hf(config, num_moe_layers=1)
    dense = tiny_model("qwen2")
    with pytest.raises(ValueError, match="no Mixture-of-Experts blocks"):
        use_plait_moe(dense)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_tensor_parallel_loader_reads_per_expert_checkpoints(family: str, tmp_path) -> None:
    """save_pretrained writes one tensor per expert (Mixtral's under block_sparse_moe); the tp reader,
    which reads keys itself, stacks them as transformers' own loading does."""
    from plait.tensor.hf import load_pretrained_tp

    model = tiny_model(family)
    model.save_pretrained(tmp_path)
    loaded = load_pretrained_tp(type(model), tmp_path, group=None).state_dict()
    expected = model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in expected.items())


def test_plait_train_refuses_an_aux_loss_it_would_drop(tmp_path) -> None:
    from plait.checkpoint.hf_pretrained import inspect_pretrained

    tiny_model("mixtral", output_router_logits=True).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"output_router_logits=true, but transformers adds .* only to the loss"):
        inspect_pretrained(tmp_path)
