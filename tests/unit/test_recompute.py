"""Activation recomputation: parity with no recomputation, unchanged names, memory saved, errors."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from plait.losses import causal_lm_mean
from plait.models import build
from plait.recompute import Recomputed, apply_recompute, find_layer_list, recompute_module

pytestmark = pytest.mark.timeout(60)

EXACT = {"rtol": 1e-6, "atol": 1e-7}
LAYERS = [f"blocks.{index}" for index in range(4)]
CASES = {
    "full": ({"mode": "full"}, LAYERS),
    "ratio-0.5": ({"mode": "selective", "ratio": 0.5}, LAYERS[:2]),
    "ratio-0.3": ({"mode": "selective", "ratio": 0.3}, LAYERS[:2]),  # ceil(1.2) layers
    "attn": ({"mode": "selective", "modules": ["attn"]}, [f"{layer}.attn" for layer in LAYERS]),
    "mlp": ({"mode": "selective", "modules": ["mlp"]}, [f"{layer}.mlp" for layer in LAYERS]),
    "mlp-star": ({"mode": "selective", "modules": ["mlp*"]}, [f"{layer}.mlp" for layer in LAYERS]),
    "attn-half": ({"mode": "selective", "ratio": 0.5, "modules": ["attn"]}, ["blocks.0.attn", "blocks.1.attn"]),
}


def random_ids(vocab_size: int, *, batch: int = 2, seq: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(vocab_size, (batch, seq), generator=generator)


def loss_and_grads(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # the same dropout masks for both models
    loss = causal_lm_mean(model(input_ids=ids), {"labels": ids})
    loss.backward()
    return loss.detach(), {name: param.grad for name, param in model.named_parameters()}


def assert_same_training(reference: nn.Module, model: nn.Module, ids: torch.Tensor) -> None:
    ref_loss, ref_grads = loss_and_grads(reference, ids)
    loss, grads = loss_and_grads(model, ids)
    torch.testing.assert_close(loss, ref_loss, **EXACT)
    assert list(grads) == list(ref_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], **EXACT, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("case", list(CASES))
def test_parity_names_and_state_dict(preset: str, case: str) -> None:
    torch.manual_seed(0)
    reference = build(preset, num_layers=4)
    model = copy.deepcopy(reference)
    kwargs, expected = CASES[case]
    assert apply_recompute(model, **kwargs) == expected
    for name, module in model.named_modules():
        assert isinstance(module, Recomputed) == (name in expected), name
    assert list(model.state_dict()) == list(reference.state_dict())
    assert [name for name, _ in model.named_parameters()] == [name for name, _ in reference.named_parameters()]
    assert_same_training(reference, model, random_ids(reference.config.vocab_size))


def test_dropout_replays_the_same_masks() -> None:
    torch.manual_seed(0)
    reference = build("tiny", dropout=0.2)
    model = copy.deepcopy(reference)
    apply_recompute(model, mode="full")
    assert_same_training(reference, model, random_ids(reference.config.vocab_size))


def test_recomputed_module_keeps_its_class_and_methods() -> None:
    model = build("tiny")
    block_class = type(model.blocks[0])
    apply_recompute(model, mode="full")
    assert isinstance(model.blocks[0], block_class)
    assert type(model.blocks[0]).__name__ == f"Recomputed{block_class.__name__}"
    model.init_weights()  # reaches Block.reset_parameters through the subclass


def saved_activation_bytes(model: nn.Module, ids: torch.Tensor) -> int:
    """Bytes autograd keeps for backward, not counting parameters (or views of them)."""
    param_ptrs = {param.data_ptr() for param in model.parameters()}
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if tensor.data_ptr() not in param_ptrs:
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = causal_lm_mean(model(input_ids=ids), {"labels": ids})
    loss.backward()
    return total


def test_recompute_saves_activation_memory() -> None:
    ids = random_ids(512, batch=4, seq=64)
    saved = {}
    for label, kwargs in {"none": {"mode": "none"}, "half": {"mode": "selective", "ratio": 0.5}}.items():
        model = build("tiny", num_layers=4, d_model=64, max_seq_len=64)
        apply_recompute(model, **kwargs)
        saved[label] = saved_activation_bytes(model, ids)
    model = build("tiny", num_layers=4, d_model=64, max_seq_len=64)
    apply_recompute(model, mode="full")
    saved["full"] = saved_activation_bytes(model, ids)
    model.eval()  # eval runs the layers as they are: nothing recomputed, everything saved
    saved["full-eval"] = saved_activation_bytes(model, ids)
    assert saved["full"] < 0.4 * saved["none"], saved
    assert saved["full"] < saved["half"] < saved["none"], saved
    assert saved["full-eval"] == saved["none"], saved


def test_hooks_on_a_recomputed_layer_run_once_and_on_its_children_again() -> None:
    """Pins what ZeRO-3 may rely on: layer hooks are outside the replay, child hooks inside."""
    model = build("tiny")
    apply_recompute(model, mode="full")
    events = []
    block = model.blocks[0]
    block.register_forward_pre_hook(lambda *_: events.append("block forward"))
    block.register_forward_hook(lambda *_: events.append("block forward done"))
    block.register_full_backward_pre_hook(lambda *_: events.append("block backward"))
    block.attn.register_forward_pre_hook(lambda *_: events.append("attn forward"))
    ids = random_ids(512)
    causal_lm_mean(model(ids), {"labels": ids}).backward()
    assert events == ["block forward", "attn forward", "block forward done", "block backward", "attn forward"]


def test_deepcopy_and_pickle_keep_recompute() -> None:
    torch.manual_seed(0)
    reference = build("tiny")
    model = copy.deepcopy(reference)
    apply_recompute(model, mode="selective", modules=["attn"])
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for restored in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert all(isinstance(block.attn, Recomputed) for block in restored.blocks)
        assert_same_training(reference, restored, random_ids(512))


def test_find_layer_list_prefers_known_names_then_size() -> None:
    class Model(nn.Module):
        def __init__(self, small_name: str) -> None:
            super().__init__()
            self.big = nn.ModuleList(nn.Linear(32, 32) for _ in range(3))
            self.add_module(small_name, nn.ModuleList(nn.Linear(4, 4) for _ in range(2)))
            self.mixed = nn.ModuleList([nn.Linear(64, 64), nn.LayerNorm(64)])

    assert find_layer_list(Model("blocks"))[0] == "blocks"
    assert find_layer_list(Model("small"))[0] == "big"
    name, layers = find_layer_list(build("tiny"))
    assert name == "blocks" and len(layers) == 2


def test_errors() -> None:
    model = build("tiny")
    for ratio in (0.0, 1.5, math.nan, -0.5):
        with pytest.raises(ValueError, match=r"ratio=.* must be in \(0, 1\]"):
            apply_recompute(model, mode="selective", ratio=ratio)
    with pytest.raises(ValueError, match="full, selective"):
        apply_recompute(model, mode="partial")
    with pytest.raises(ValueError, match="takes no ratio or modules"):
        apply_recompute(model, mode="full", ratio=0.5)
    with pytest.raises(ValueError, match=r"\['atn'\] match no submodule.*attn, attn.q_proj"):
        apply_recompute(model, mode="selective", modules=["attn", "atn"])
    assert not any(isinstance(module, Recomputed) for module in model.modules())
    apply_recompute(model, mode="full")
    with pytest.raises(ValueError, match=r"recompute already applied to blocks\.0"):
        apply_recompute(model, mode="selective", modules=["mlp"])
    with pytest.raises(ValueError, match="already applied"):
        recompute_module(model.blocks[0])


def test_model_without_layer_list() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"no list of transformer layers in Sequential.*recompute_modules"):
        apply_recompute(model, mode="full")
    with pytest.raises(ValueError, match="no list of transformer layers"):
        apply_recompute(model, mode="selective", ratio=0.5)
    assert apply_recompute(model, mode="selective", modules=["[01]"]) == ["0", "1"]


transformers = pytest.importorskip("transformers")


def tiny_llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def tiny_gpt2() -> nn.Module:
    # GPT-2's default dropouts (0.1) stay on: the replay must draw the same masks.
    config = transformers.GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(config)


def tiny_bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    return transformers.BertModel(config)


@pytest.mark.parametrize(
    ("factory", "layer_list"),
    [(tiny_llama, "model.layers"), (tiny_gpt2, "transformer.h"), (tiny_bert, "encoder.layer")],
)
def test_hugging_face_layer_lists(factory, layer_list: str) -> None:
    assert find_layer_list(factory())[0] == layer_list


@pytest.mark.parametrize(("factory", "attention"), [(tiny_llama, "self_attn"), (tiny_gpt2, "attn")])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_hugging_face_parity(factory, attention: str, mode: str) -> None:
    torch.manual_seed(0)
    reference = factory().train()
    model = copy.deepcopy(reference)
    list_name, _ = find_layer_list(model)
    layers = [f"{list_name}.{index}" for index in range(2)]
    if mode == "full":
        assert apply_recompute(model, mode="full") == layers
    else:
        names = apply_recompute(model, mode="selective", modules=[attention])
        assert names == [f"{layer}.{attention}" for layer in layers]
    assert model.config.use_cache is False
    assert list(model.state_dict()) == list(reference.state_dict())
    assert_same_training(reference, model, random_ids(128))


def test_hugging_face_kv_cache_is_refused_under_recompute() -> None:
    model = tiny_llama().train()
    apply_recompute(model, mode="full")
    ids = random_ids(128)
    with pytest.raises(ValueError, match="use_cache=False"):
        model(input_ids=ids, use_cache=True)
    with torch.no_grad():  # nothing is replayed without gradients: the cache is fine
        assert model(input_ids=ids, use_cache=True).past_key_values is not None


def test_hf_gradient_checkpointing_and_recompute_do_not_stack() -> None:
    model = tiny_llama()
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient_checkpointing_disable"):
        apply_recompute(model, mode="full")
