"""The bad-input catalogue: every input checkable before launch is refused with exit code 2 and one
line on stderr naming the field and the fix; no traceback, no process group, and no run output
(checkpoints, metrics.csv, train.log; the token cache aside). Cases run in-process through
`plait.cli.main`, so the whole catalogue takes seconds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from plait.checkpoint.io import save_checkpoint
from plait.cli import main
from plait.config import Config, DataConfig, load_config, model_config_for
from plait.data.tokenizer import train_tokenizer
from plait.models.gpt import GPT

VOCAB = 300
CASE_OUT = "{root}/out/{case}"  # every case's own train.out_dir, which must stay empty
BASE = [
    "--set", "data.corpus=['{root}/corpus']",
    "--set", "data.cache_dir={root}/cache",
    "--set", f"data.vocab_size={VOCAB}",
    "--set", "data.seq_len=32",
    "--set", "data.val_fraction=0.3",
    "--set", "train.global_batch=4",
    "--set", f"train.out_dir={CASE_OUT}",
]  # fmt: skip
TEXT = "def f{i}(x):\n    '''Document {i}.'''\n    return x * {i} + sum(range({i}))\n" * 12


def train(*extra: str) -> list[str]:
    return ["train", *BASE, *extra]


def sets(*items: str) -> list[str]:
    return train(*(part for item in items for part in ("--set", item)))


# case: (argv, a part of the one stderr line). "{root}" is the catalogue's directory, "{case}" the case.
CONFIG = {
    "toml wrong type": (
        ["train", "{root}/configs/steps-ten.toml"],
        'train.steps="ten" is a string, but train.steps takes an integer',
    ),
    "toml float for int": (["train", "{root}/configs/batch-float.toml"], "train.global_batch=8.5 is a number, but"),
    "toml list for string": (["train", "{root}/configs/precision-list.toml"], 'plan.precision=["fp32"] is a list'),
    "toml corpus number": (
        ["train", "{root}/configs/corpus-number.toml"],
        "data.corpus=5 is an integer, but data.corpus takes a string or a list of strings",
    ),
    "toml key outside section": (
        ["train", "{root}/configs/outside.toml"],
        "steps is outside any section; put it under [train]",
    ),
    "toml section not table": (["train", "{root}/configs/not-table.toml"], "[train] must be a table of settings"),
    "toml invalid": (["train", "{root}/configs/invalid.toml"], "is not valid TOML"),
    "toml binary": (["train", "{root}/configs/binary.toml"], "is not valid TOML"),
    "config is a directory": (["train", "{root}/configs"], "is a directory; pass a TOML file"),
    "config missing": (["train", "{root}/configs/nope.toml"], "does not exist"),
    "set wrong type": (
        sets('train.steps="ten"'),
        'train.steps="ten" is a string, but train.steps takes an integer; write it like train.steps=200',
    ),
    "set bare word for int": (sets("plan.dp=two"), 'plan.dp="two" is a string, but plan.dp takes an integer'),
    "set bool for int": (sets("train.steps=true"), "train.steps=true is a boolean"),
    "set int for bool": (sets("train.async_checkpoints=1"), "train.async_checkpoints takes true or false"),
    "set string for list": (
        sets('plan.recompute_modules="attn"'),
        'takes a list of strings; write it like plan.recompute_modules=["attn"]',
    ),
    "set floats in int list": (sets("plan.pp_split=[1.5]"), "plan.pp_split takes a list of integers"),
    "set lr inf": (sets("train.lr=inf"), "train.lr=inf: give a finite number"),
    "set lr nan": (sets("train.lr=nan"), "train.lr=nan: give a finite number"),
    "set negative lr": (sets("train.lr=-0.1"), "learning rate must be positive"),
    "set beta2 one": (sets("train.beta2=1.0"), "train.beta2=1.0: Adam's beta2 lies in [0, 1)"),
    "set eval_batches zero": (sets("train.eval_batches=0"), "train.eval_batches=0: use 1 or more"),
    "set log_every zero": (sets("train.log_every=0"), "train.log_every=0: use 1 or more"),
    "set steps zero": (sets("train.steps=0"), "train.steps=0: train for at least one step"),
    "set seed negative": (sets("train.seed=-1"), "train.seed=-1: use a non-negative seed"),
    "set out_dir empty": (sets('train.out_dir=""'), "train.out_dir is empty"),
    "set val_fraction half": (sets("data.val_fraction=0.7"), "data.val_fraction=0.7: use a fraction in [0, 0.5)"),
    "set seq_len one": (sets("data.seq_len=1"), "at least 2 tokens per sample"),
    "set vocab small": (sets("data.vocab_size=100"), "more than 256 tokens"),
    "set corpus empty list": (sets("data.corpus=[]"), "data.corpus is an empty list"),
    "set unknown key": (sets("train.step=3"), "unknown key train.step (did you mean 'steps'?)"),
    "set unknown section": (sets("trainer.steps=3"), "unknown section 'trainer'"),
    "set no equals": (train("--set", "train.steps"), "write it as section.key=value"),
    "set precision": (sets("plan.precision=fp8"), "choose one of fp32, bf16, fp16"),
    "set zero stage": (sets("plan.zero=4"), "ZeRO stages are 0, 1, 2 or 3"),
    "set dp zero": (sets("plan.dp=0"), "plan.dp=0: use a positive degree or -1"),
    "set tp zero": (sets("plan.tp=0"), "plan.tp=0: degrees are positive"),
    "set recompute mode": (sets("plan.recompute=some"), "plan.recompute='some': choose one of none, full, selective"),
    "set recompute ratio": (sets("plan.recompute=selective", "plan.recompute_ratio=0"), "plan.recompute_ratio=0.0"),
    "set bucket zero": (sets("plan.bucket_mb=0"), "plan.bucket_mb=0.0: gradient buckets need a positive size"),
    "set pp schedule": (sets("plan.pp_schedule=zigzag"), "plan.pp_schedule='zigzag': choose one of"),
    "set memory budget": (sets("plan.zero=1", "plan.memory_budget=lots"), "plan.memory_budget='lots' is not a size"),
    "set offload tier": (sets("plan.offload_optimizer=ram"), "plan.offload_optimizer='ram': choose one of"),
    "set offload auto no budget": (sets("plan.offload_optimizer=auto"), "set plan.memory_budget"),
    "set zero3 gather mode": (sets("plan.zero=3", "plan.zero3_gather=layer"), "plan.zero3_gather='layer': choose"),
    "zero3 gather without zero 3": (sets("plan.zero=2", "plan.zero3_gather=step"), "applies to ZeRO-3 only"),
    "zero3 step with offloaded params": (
        sets("plan.zero=3", "plan.zero3_gather=step", "plan.offload_params=cpu"),
        "plan.zero3_gather='step' keeps each stage's whole parameters",
    ),
    "zero3 microbatch under zb-h1": (
        sets("plan.zero=3", "plan.pp=2", "plan.pp_schedule=zb-h1", "plan.zero3_gather=microbatch"),
        "plan.zero3_gather='microbatch' with plan.pp_schedule='zb-h1'",
    ),
    "unknown preset": (sets("model.preset=gpt5"), "unknown model preset 'gpt5'"),
    "unknown model field": (sets("model.hidden=5"), "unknown GPTConfig field"),
    "model heads": (sets("model.num_heads=5"), "num_heads"),
    "preset and pretrained": (sets("model.preset=gpt-10m", "model.pretrained=/x"), "both name a model; keep one"),
    "seq beyond model": (sets("data.seq_len=4096"), "longer than the model's max_seq_len"),
}
PLANS = {
    "degrees vs world": (train("--nproc", "4", "--set", "plan.dp=2"), "but the world size is 4"),
    "batch vs dp": (sets("plan.dp=2", "train.global_batch=7"), "does not split over dp=2"),
    "microbatches": (sets("plan.dp=2", "plan.microbatches=3"), "plan.microbatches=3 does not divide"),
    "cp seq_len": (
        sets("plan.cp=2", "plan.dp=1", "data.seq_len=30"),
        "does not split into 2 * plan.cp = 4 equal chunks",
    ),
    "cp with offload": (
        sets("plan.cp=2", "plan.dp=1", "plan.zero=1", "plan.offload_optimizer=cpu"),
        "plan.cp=2 with offloaded states is not available yet",
    ),
    "pp microbatches": (sets("plan.pp=2", "plan.dp=1"), "plan.microbatches=1 is fewer than plan.pp=2"),
    "pp layers": (
        [*sets("plan.pp=4", "plan.dp=1", "plan.microbatches=4"), "--nproc", "4"],
        "4 stages but the model has 2 layers",
    ),
    "pp chunks schedule": (
        sets("plan.pp=2", "plan.dp=1", "plan.microbatches=2", "plan.pp_chunks=2"),
        "needs plan.pp_schedule='interleaved'",
    ),
    "pp_split wrong length": (
        sets("plan.pp=2", "plan.dp=1", "plan.microbatches=2", "plan.pp_split=[1, 1]"),
        "plan.pp_split=[1, 1]: give the 1 layer indices",
    ),
    "pp_split out of range": (
        sets("plan.pp=2", "plan.dp=1", "plan.microbatches=2", "plan.pp_split=[3]"),  # [2]: the head alone
        "within 1..1 (the model has 2 layers",
    ),
    "pp_split without pp": (sets("plan.pp_split=[1]"), "plan.pp_split=[1]: give the 0 layer indices"),
    "recompute names nothing": (
        sets("plan.recompute=selective", 'plan.recompute_modules=["nope"]'),
        "plan.recompute_modules=['nope']",
    ),
    "recompute modules without mode": (
        sets('plan.recompute_modules=["attn"]'),
        "recompute mode 'none' takes no ratio or modules",
    ),
    "tp heads": (
        train("--nproc", "3", "--set", "plan.tp=3", "--set", "plan.dp=1"),
        "model.num_heads=4 is not divisible by plan.tp=3; use plan.tp in [1, 2, 4]",
    ),
    "offload dir missing": (
        sets("plan.zero=3", "plan.offload_optimizer=disk", "plan.offload_dir=/no/such/dir"),
        "plan.offload_dir=/no/such/dir does not exist; create it",
    ),
    "offload params zero": (
        sets("plan.zero=1", "plan.offload_params=cpu", "plan.offload_optimizer=cpu"),
        "plan.offload_params='cpu' needs plan.zero=3",
    ),
    "nproc zero": (train("--nproc", "0"), "--nproc 0: launch at least one rank"),
    "zero shard without zero": (sets("plan.zero_shard=2"), "plan.zero_shard=2 shards ZeRO's states, but plan.zero=0"),
    "zero shard mode": (sets("plan.zero=1", "plan.zero_shard=rack"), "plan.zero_shard='rack': choose 'all'"),
    "zero shard vs dp": (
        [*sets("plan.zero=3", "plan.zero_shard=3"), "--nproc", "4"],
        "plan.zero_shard=3 does not divide dp=4",
    ),
    "zero shard node vs nodes": (
        [
            *sets("plan.zero=1", "plan.zero_shard=node", "plan.tp=2"),
            "--nproc",
            "3",
            "--nnodes",
            "2",
            "--rdzv-endpoint",
            "127.0.0.1:29400",
        ],
        "plan.zero_shard='node' with 3 ranks per node",
    ),
}
FLAGS = {
    "nproc not a number": (train("--nproc", "two"), "argument --nproc: invalid int value: 'two'"),
    "ep without experts": ([*sets("plan.ep=2"), "--nproc", "2"], "plan.ep=2 splits the experts of MoE layers, but"),
    "ep not dividing experts": (
        [*sets("model.preset=switch-tiny", "plan.ep=3", "train.global_batch=6"), "--nproc", "3"],
        "model.moe_experts=4 does not split over plan.ep=3 ranks; use plan.ep in [1]",
    ),
    "ep not dividing dp": (
        [*sets("model.preset=switch-tiny", "plan.ep=4"), "--nproc", "2"],
        "plan.ep=4 does not divide dp=2 (world size 2)",
    ),
    "moe sequence parallel": (
        [*sets("model.preset=switch-tiny", "plan.tp=2", "plan.sequence_parallel=true"), "--nproc", "2"],
        "plan.sequence_parallel with a Mixture-of-Experts model",
    ),
    "moe expert width vs tp": (
        [*sets("model.preset=switch-tiny", "model.moe_d_ff=101", "plan.tp=2"), "--nproc", "2"],
        "model.moe_d_ff=101 (each expert's width, split over tp) is not divisible by plan.tp=2",
    ),
    "plan choice": (train("--plan", "best"), "plan string 'best': not KEY=VALUE"),
    "unknown flag": (train("--step", "3"), "unrecognized arguments: --step"),
    "unknown command": (["fly"], "argument command: invalid choice: 'fly'"),
}
DATA = {
    "corpus missing": (sets("data.corpus=['/no/such/file.txt']"), "corpus path /no/such/file.txt does not exist"),
    "corpus suffix": (sets("data.corpus=['{root}/data/notes.pdf']"), "has unsupported suffix '.pdf'"),
    "corpus no files": (sets("data.corpus=['{root}/data/empty-dir']"), "contains no .txt/.py/.md/.jsonl files"),
    "corpus random bytes": (sets("data.corpus=['{root}/data/random']"), "holds no text: its 2 file(s) are binary"),
    "corpus empty file": (sets("data.corpus=['{root}/data/empty.txt']"), "holds no non-empty documents"),
    "corpus bad jsonl": (sets("data.corpus=['{root}/data/bad.jsonl']"), "bad.jsonl, line 2 is not valid JSON"),
    "corpus jsonl no text": (sets("data.corpus=['{root}/data/notext.jsonl']"), 'has no string "text" field'),
    "one document": (
        sets("data.corpus=['{root}/data/one.txt']"),
        "too few to hold one out for validation; add documents, or set val_fraction=0",
    ),
    "seq beyond data": (
        sets("data.corpus=['{root}/data/short.txt']", "data.val_fraction=0", "data.seq_len=64"),
        "fewer than one sample of data.seq_len=64",
    ),
    "batch beyond eval set": (sets("train.global_batch=1024"), "fewer than one eval batch of train.global_batch=1024"),
}
RUNS = {
    "out_dir under a file": (
        sets("train.out_dir={root}/afile/run"),
        "afile is a file, so no directory can be made under it",
    ),
    "out_dir holds metrics": (
        sets("train.out_dir={root}/used-metrics"),
        "used-metrics already holds a run (metrics.csv); continue it with --resume auto",
    ),
    "out_dir holds checkpoints": (
        sets("train.out_dir={root}/bad/flipped"),
        "already holds a run (checkpoints/step-000010)",
    ),
    "resume elsewhere into a used out_dir": (
        train("--set", "train.out_dir={root}/used-metrics", "--resume", "{root}/used/checkpoints/step-000010"),
        "holds another run (metrics.csv) and --resume",
    ),
    "resume missing": (train("--resume", "{root}/nope"), "no such checkpoint directory"),
    "resume a file": (train("--resume", "{root}/afile"), "no such checkpoint directory"),
    "resume incomplete": (
        train("--resume", "{root}/bad/no-manifest/checkpoints/step-000010"),
        "is not a complete plait checkpoint: manifest.json is missing",
    ),
    "resume truncated shard": (
        train("--resume", "{root}/bad/truncated/checkpoints/step-000010"),
        "is corrupt (its size or sha256 differs",
    ),
    "resume flipped byte": (train("--resume", "{root}/bad/flipped/checkpoints/step-000010"), "trainer.pt is corrupt"),
    "resume manifest garbage": (
        train("--resume", "{root}/bad/garbage-manifest/checkpoints/step-000010"),
        "manifest.json is corrupt: it is not valid JSON",
    ),
    "resume missing file": (
        train("--resume", "{root}/bad/missing-config/checkpoints/step-000010"),
        "is missing config.json",
    ),
    "resume auto all corrupt": (
        [*sets("train.out_dir={root}/bad/truncated"), "--resume", "auto"],
        "none of the 1 checkpoints under",
    ),
    "resume another model": (
        [*sets("model.num_layers=4"), "--resume", "{root}/used/checkpoints/step-000010"],
        "the checkpoint holds another model (model.overrides differ)",
    ),
    "resume other precision": (
        [*sets("plan.precision=fp16"), "--resume", "{root}/used/checkpoints/step-000010"],
        "saved with precision=fp32, this run uses fp16",
    ),
}
GENERATE = {
    "generate top-k zero": (
        ["generate", "{ckpt}", "--top-k", "0"],
        "--top-k 0: sample from at least the 1 most likely token",
    ),
    "generate top-k negative": (["generate", "{ckpt}", "--top-k", "-3"], "--top-k -3"),
    "generate temperature nan": (
        ["generate", "{ckpt}", "--temperature", "nan"],
        "--temperature nan: use a finite temperature >= 0",
    ),
    "generate temperature negative": (["generate", "{ckpt}", "--temperature", "-1"], "--temperature -1.0"),
    "generate temperature inf": (["generate", "{ckpt}", "--temperature", "inf"], "--temperature inf"),
    "generate tokens negative": (
        ["generate", "{ckpt}", "--max-new-tokens", "-5"],
        "--max-new-tokens -5: generate at least one token",
    ),
    "generate tokens beyond context": (
        ["generate", "{ckpt}", "--max-new-tokens", "100000000"],
        "the model reads a window of 64 tokens (the length the checkpoint was trained at",
    ),
    "generate max-length past context": (
        ["generate", "{ckpt}", "--max-length", "65"],
        "step-000010 has 64 positions; give at most 64 (or leave it out for the length it was trained at, 64)",
    ),
    "generate max-length one": (["generate", "{ckpt}", "--max-length", "1"], "--max-length 1: a window holds"),
    "generate missing checkpoint": (["generate", "{root}/nope"], "is not a checkpoint directory"),
    "generate corrupt checkpoint": (["generate", "{root}/bad/truncated/checkpoints/step-000010"], "is corrupt"),
    "generate not a checkpoint": (["generate", "{root}/data"], "manifest.json is missing"),
}
EXPORT = {
    "export missing checkpoint": (
        ["export", "{root}/nope", "--to", "hf", "{root}/out/{case}/hf"],
        "is not a plait checkpoint (no manifest.json)",
    ),
    "export corrupt checkpoint": (
        ["export", "{root}/bad/flipped/checkpoints/step-000010", "--to", "hf", "{root}/out/{case}/hf"],
        "is corrupt",
    ),
    "export format": (
        ["export", "{ckpt}", "--to", "onnx", "{root}/out/{case}/x"],
        "argument --to: invalid choice: 'onnx'",
    ),
    "export missing hf config": (
        ["export", "{ckpt}", "--to", "hf", "{root}/out/{case}/hf", "--config", "{root}/nope"],
        "nope: no config.json there",
    ),
    "import not a directory": (
        ["import", "{root}/afile", "{root}/out/{case}/ckpt"],
        "is not a directory; pass a Hugging Face model directory",
    ),
    "import no config": (["import", "{root}/data", "{root}/out/{case}/ckpt"], "has no config.json"),
}
PLAN_COMMAND = {
    "plan gpus zero": (["plan", "--model", "tiny", "--gpus-per-node", "0"], "--gpus-per-node 0: use 1 or more"),
    "plan nodes zero": (["plan", "--model", "tiny", "--nodes", "0"], "--nodes 0: use 1 or more"),
    "plan global batch zero": (["plan", "--model", "tiny", "--global-batch", "0"], "--global-batch 0: use 1 or more"),
    "plan seq zero": (["plan", "--model", "tiny", "--seq", "0"], "--seq 0: use 2 or more"),
    "plan top zero": (["plan", "--model", "tiny", "--top", "0"], "--top 0: use 1 or more"),
    "plan microbatches zero": (["plan", "--model", "tiny", "--microbatches", "0"], "--microbatches 0: use 1 or more"),
    "plan unknown model": (["plan", "--model", "nosuch"], "unknown model preset 'nosuch'"),
    "plan memory": (["plan", "--model", "tiny", "--gpu-mem", "abc"], "cannot read 'abc' as a size"),
    "plan zero stage": (["plan", "--model", "tiny", "--zero", "7"], "ZeRO stages are 0, 1, 2 or 3"),
}
CATALOGUE = {**CONFIG, **PLANS, **FLAGS, **DATA, **RUNS, **GENERATE, **EXPORT, **PLAN_COMMAND}


def write_corpus(directory: Path, count: int) -> None:
    directory.mkdir(parents=True)
    for i in range(count):
        (directory / f"doc{i:02d}.py").write_text(TEXT.format(i=i))


def save_run_checkpoint(path: Path, root: Path) -> None:
    """A checkpoint as `plait train` leaves it, for the catalogue's base config."""
    config = base_config(root)
    torch.manual_seed(0)
    model = GPT(model_config_for(config))
    tokenizer = train_tokenizer([TEXT.format(i=i) for i in range(4)], vocab_size=VOCAB).to_str()
    trainer_state = {"step": 10, "tokenizer": tokenizer}
    save_checkpoint(path, model_state=model.state_dict(), trainer_state=trainer_state, config=config.to_dict())


def base_config(root: Path) -> Config:
    return load_config(None, [item.format(root=root, case="base") for item in BASE[1::2]])


def damage(root: Path, good: Path) -> None:
    """Copies of a good checkpoint, each broken in one way."""

    def copy(name: str) -> Path:
        target = root / "bad" / name / "checkpoints" / good.name
        shutil.copytree(good, target)
        return target

    (copy("no-manifest") / "manifest.json").unlink()
    shard = next(copy("truncated").glob("shard-*"))
    shard.write_bytes(shard.read_bytes()[:100])
    trainer = copy("flipped") / "trainer.pt"
    data = bytearray(trainer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    trainer.write_bytes(bytes(data))
    (copy("garbage-manifest") / "manifest.json").write_bytes(os.urandom(64))
    (copy("missing-config") / "config.json").unlink()


def write_configs(directory: Path) -> None:
    directory.mkdir()
    files = {
        "steps-ten.toml": '[train]\nsteps = "ten"\n',
        "batch-float.toml": "[train]\nglobal_batch = 8.5\n",
        "precision-list.toml": '[plan]\nprecision = ["fp32"]\n',
        "corpus-number.toml": "[data]\ncorpus = 5\n",
        "outside.toml": "steps = 3\n",
        "not-table.toml": "train = 5\n",
        "invalid.toml": "[train\nsteps = 3\n",
    }
    for name, text in files.items():
        (directory / name).write_text(text)
    (directory / "binary.toml").write_bytes(b"\xff\xfe\x00\x01" * 8)


def write_bad_data(directory: Path) -> None:
    (directory / "empty-dir").mkdir(parents=True)
    (directory / "random").mkdir()
    for name in ("a.txt", "b.txt"):
        (directory / "random" / name).write_bytes(os.urandom(4096))
    (directory / "notes.pdf").write_bytes(b"%PDF-1.4")
    (directory / "empty.txt").write_text("")
    (directory / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n')
    (directory / "notext.jsonl").write_text('{"body": "no text field"}\n')
    (directory / "one.txt").write_text(TEXT.format(i=1))
    (directory / "short.txt").write_text("x = 1\n")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("catalogue")
    write_corpus(root / "corpus", 24)
    write_configs(root / "configs")
    write_bad_data(root / "data")
    (root / "afile").write_text("a file, not a directory\n")
    good = root / "used" / "checkpoints" / "step-000010"
    save_run_checkpoint(good, root)
    (root / "used" / "metrics.csv").write_text("step,loss\n10,5.0\n")
    (root / "used-metrics").mkdir()
    (root / "used-metrics" / "metrics.csv").write_text("step,loss\n1,5.0\n")
    damage(root, good)
    return root


def files_under(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if "cache" not in path.relative_to(root).parts}


@pytest.mark.parametrize("case", list(CATALOGUE))
def test_refused_before_launch(case: str, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv, message = CATALOGUE[case]
    ckpt = root / "used" / "checkpoints" / "step-000010"
    argv = [item.format(root=root, case=case, ckpt=ckpt) for item in argv]
    before = files_under(root)
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, (err, captured.out[-2000:])
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"plait {argv[0]}: error: ") or err.startswith("plait: error: "), err
    assert message.format(root=root) in err, err
    assert "Traceback" not in captured.err + captured.out
    assert not dist.is_initialized()
    assert files_under(root) == before, sorted(map(str, files_under(root) - before))  # no run output


def test_the_catalogue_has_at_least_60_cases() -> None:
    assert len(CATALOGUE) >= 60


def test_the_base_config_passes_every_check_before_launch(root: Path) -> None:
    """So each case fails for its own reason: the base config itself is launchable."""
    from plait.cli.launching import preflight
    from plait.train.setup import validate

    config = base_config(root)
    preflight(config, validated=validate(config, world_size=1), resume=None)
    assert not Path(config.train.out_dir).exists()


def test_the_defaults_are_consistent() -> None:
    """`plait train` with no config trains the tiny preset on its own positions."""
    from plait.train.setup import validate

    config = Config()
    assert config.data.seq_len <= model_config_for(config).max_seq_len
    validate(config, world_size=1)


def test_console_script_exits_2_without_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "plait.cli", "train", "--nproc", "2", "--set", "plan.dp=4"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "Traceback" not in result.stderr and "launch 4 ranks" in result.stderr


def test_files_that_are_not_text_are_skipped_and_counted(tmp_path: Path) -> None:
    from plait.data.shards import prepare_dataset

    write_corpus(tmp_path / "corpus", 6)
    (tmp_path / "corpus" / "noise.txt").write_bytes(os.urandom(2048))
    data = prepare_dataset([str(tmp_path / "corpus")], vocab_size=VOCAB, cache_dir=tmp_path / "cache", val_fraction=0.2)
    assert [Path(p).name for p in data.skipped_files] == ["noise.txt"]
    again = prepare_dataset(
        [str(tmp_path / "corpus")], vocab_size=VOCAB, cache_dir=tmp_path / "cache", val_fraction=0.2
    )
    assert again.skipped_files == data.skipped_files  # a cached dataset still reports them


def test_resume_auto_takes_the_newest_checkpoint_that_verifies(root: Path, tmp_path: Path) -> None:
    from plait.train.preflight import newest_verified_checkpoint

    assert newest_verified_checkpoint(tmp_path)[0] is None  # none: a fresh start, said in the log
    good = root / "used" / "checkpoints" / "step-000010"
    shutil.copytree(good, tmp_path / "checkpoints" / good.name)
    shutil.copytree(root / "bad" / "truncated" / "checkpoints" / good.name, tmp_path / "checkpoints" / "step-000020")
    path, note = newest_verified_checkpoint(tmp_path)
    assert path == tmp_path / "checkpoints" / "step-000010"
    assert "skipped step-000020" in note and "is corrupt" in note


def test_val_fraction_zero_is_accepted() -> None:
    assert DataConfig(val_fraction=0).val_fraction == 0


def test_resume_under_another_plan_passes_the_checks(root: Path) -> None:
    """Another plan is fine (the checkpoint reshards); another model or precision family is not (above)."""
    from plait.cli.launching import preflight
    from plait.train.setup import validate

    config = load_config(None, [*(item.format(root=root, case="replan") for item in BASE[1::2]), "plan.zero=2"])
    checkpoint = str(root / "used" / "checkpoints" / "step-000010")
    preflight(config, validated=validate(config, world_size=4), resume=checkpoint)


def test_a_used_out_dir_is_refused_and_resume_auto_continues_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The data-loss case: a second run into an out_dir would replace its metrics.csv and prune its
    checkpoints. It is refused; --resume auto continues the newest checkpoint and appends to the metrics."""
    from plait.train.logs import read_metrics

    write_corpus(tmp_path / "corpus", 24)
    base = [item.format(root=tmp_path, case="run") for item in BASE]
    run = ["train", *base, "--set", "train.checkpoint_every=2", "--set", "train.eval_every=2"]
    assert main([*run, "--set", "train.steps=4"]) == 0
    capsys.readouterr()
    assert main([*run, "--set", "train.steps=6"]) == 2
    assert "already holds a run (metrics.csv); continue it with --resume auto" in capsys.readouterr().err
    assert main([*run, "--set", "train.steps=6", "--resume", "auto"]) == 0
    out_dir = tmp_path / "out" / "run"
    assert [int(row["step"]) for row in read_metrics(out_dir / "metrics.csv")] == list(range(7))
    assert "--resume auto: continuing from" in (out_dir / "train.log").read_text()
    assert sorted(p.name for p in (out_dir / "checkpoints").iterdir()) == ["step-000004", "step-000006"]
    assert not dist.is_initialized()
