"""GPU tier: generation with the KV cache and the fine-tuning recipes on a CUDA device (skipped without one).

The CPU tiers cannot see a tensor left on the wrong device; these run the same code with the model on the GPU.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

import plait
from plait.losses import logits_of
from plait.recipes.rollout import SamplingConfig, rollout
from plait.train.decoding import IncrementalDecoder
from plait.train.generate import sample
from tests.unit.test_recipes_cli_e2e import finetune, save_base, write_corpus

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def exact_fp32():
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False


def _pair(preset: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same random weights on the CPU and on the GPU, in eval mode."""
    torch.manual_seed(0)
    cpu = plait.models.build(preset, max_seq_len=32).eval()
    gpu = plait.models.build(preset, max_seq_len=32).eval().cuda()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
@torch.no_grad()
def test_cached_decoding_on_the_gpu_matches_the_full_forward(preset: str) -> None:
    _, gpu = _pair(preset)
    ids = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(1))
    decoder = IncrementalDecoder(gpu)  # CPU ids in, the GPU's logits out
    steps = [decoder.feed(ids[:, :6])] + [decoder.feed(ids[:, t : t + 1]) for t in range(6, 20)]
    cached = torch.cat(steps, dim=1)
    assert cached.device.type == "cuda"
    torch.testing.assert_close(cached, logits_of(gpu(ids.cuda())), rtol=0, atol=1e-4)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sample_on_the_gpu_draws_the_cpus_tokens(temperature: float) -> None:
    cpu, gpu = _pair("tiny")
    kwargs = {"max_new_tokens": 16, "temperature": temperature, "top_k": 50, "seed": 3}
    prompt = [5, 17, 42, 8]
    assert (
        sample(gpu, prompt, **kwargs) == sample(gpu, prompt, kv_cache=False, **kwargs) == sample(cpu, prompt, **kwargs)
    )


def test_a_rollout_on_the_gpu_lies_there_and_draws_the_cpus_tokens() -> None:
    cpu, gpu = _pair("tiny")
    args = {"num_samples": 3, "first_index": 4, "sampling": SamplingConfig(max_new_tokens=8, seed=2), "eos_id": 0}
    on_gpu, on_cpu = rollout(gpu, [[5, 6, 7], [9, 10]], **args), rollout(cpu, [[5, 6, 7], [9, 10]], **args)
    assert {t.device.type for t in vars(on_gpu).values()} == {"cuda"}
    assert torch.equal(on_gpu.input_ids.cpu(), on_cpu.input_ids)
    torch.testing.assert_close(on_gpu.logps.cpu(), on_cpu.logps, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("finetune-gpu")
    save_base(root / "base", write_corpus(root / "corpus", 10))
    return root


@pytest.mark.parametrize("kind", ["sft", "dpo", "grpo", "ppo"])
def test_plait_finetune_runs_on_the_gpu(kind: str, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.cuda.reset_peak_memory_stats()
    code, out = finetune(root, kind)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    log = (out / "finetune.log").read_text()
    assert "done: 1 steps | held-out loss" in log, log[-2000:]
    assert torch.cuda.max_memory_allocated() > 0  # the run trained on the GPU, not on the CPU beside it
    if kind in ("grpo", "ppo"):
        rows = list(csv.DictReader((out / "metrics.csv").open()))
        assert 0.0 <= float(rows[-1]["reward"]) <= 1.0, rows[-1]
