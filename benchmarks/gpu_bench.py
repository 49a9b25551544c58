"""plait on one GPU: the bf16 matmul rate, then the demo model and a 1B Llama trained in bf16 (issue 20).

Run by benchmarks/gpu.sh (the only GPU entry point); by hand:

    PYTHONPATH=src python3 benchmarks/gpu_bench.py --out $OUT/gpu.json
    PYTHONPATH=src python3 benchmarks/gpu_bench.py --dry-run --device cpu --out /tmp/gpu.json   # the code paths, tiny

Parts, each in its own try (one failure records its error and the rest still run), the JSON
rewritten after each so a run cut short keeps what it finished:

- matmul: the 8192^3 bf16 product's rate (plait.train.peak, the MFU denominator), the data sheet beside it.
- sdpa: which attention kernels SDPA may use, and whether flash attention takes the 1B's shapes.
- demo / llama-1b (compiled per plan.compile) / llama-1b-eager: a one-process plait.boost in bf16
  (fp32 master weights, fused AdamW, SDPA with is_causal), random tokens, --steps steps; tokens/s is the
  median over the steps after the warm-up (compilation), MFU = tokens/s x flops_per_token / measured
  peak (GPTConfig.flops_per_token: 6N + 12 L d s), peak CUDA memory over the steady steps, and the
  attention kernels the profiler saw in one steady step. A micro-batch that runs out of memory is
  halved and tried again (said in the JSON).
- torchtitan: its published per-GPU tokens/s for Llama 3.1 8B scaled to the 1B by FLOPs per token.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
from common import environment, load_average, write_json
from torchtitan_figures import torchtitan_comparison

import plait
from plait.train import metrics


@dataclass(frozen=True)
class TrainCase:
    name: str
    preset: str
    seq_len: int
    batch: int  # sequences per step (one micro-batch)
    compile: str
    overrides: dict[str, Any]


def cases(args: argparse.Namespace) -> list[TrainCase]:
    if args.dry_run:
        return [
            TrainCase("demo", "tiny", 64, 2, args.compile, {}),
            TrainCase("llama-1b", "tiny-llama", 64, 2, args.compile, {}),
            TrainCase("llama-1b-eager", "tiny-llama", 64, 2, "off", {}),
        ]
    # The demo preset (configs/gpt-10m.toml) has learned positions for 256 tokens: its table grows to 2048.
    return [
        TrainCase("demo", "gpt-10m", 2048, 32, args.compile, {"max_seq_len": 2048}),
        TrainCase("llama-1b", "llama-1b", args.seq_len, args.batch, args.compile, {}),
        TrainCase("llama-1b-eager", "llama-1b", args.seq_len, args.batch, "off", {}),
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attention_kernels(engine: Any, batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Attention operators the profiler records in one training step (which SDPA backend really ran)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.train_step(batch).loss.item()
    names = [event.key for event in prof.key_averages()]
    counts = {event.key: event.count for event in prof.key_averages()}
    return {name: counts[name] for name in names if "attention" in name.lower()}


def attention_backend(ops: dict[str, int]) -> str:
    """The SDPA kernel family named by the profiled operators (math when no fused kernel ran)."""
    names = " ".join(ops).lower()
    found = [kind for kind in ("flash", "efficient", "cudnn") if kind in names]
    return "+".join(found) if found else "math"


def peak_memory(device: torch.device) -> dict[str, int]:
    if device.type == "cuda":
        return {
            "cuda_max_allocated": torch.cuda.max_memory_allocated(device),
            "cuda_max_reserved": torch.cuda.max_memory_reserved(device),
        }
    return {"peak_rss": metrics.peak_rss_bytes()}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        metrics.reset_peak_rss()


def loss_function(name: str) -> Any:
    """plait's causal LM loss: "chunked" (ChunkedCausalLM, no whole-batch logits) or "plain" (causal_lm)."""
    chunked = getattr(plait.losses, "ChunkedCausalLM", None)
    return chunked() if name == "chunked" and chunked is not None else plait.losses.causal_lm


def loss_name(loss_fn: Any) -> str:
    return repr(loss_fn) if type(loss_fn).__repr__ is not object.__repr__ else type(loss_fn).__name__


def train_once(case: TrainCase, *, batch: int, loss: str, args: argparse.Namespace, peak: float) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    with device:
        model = plait.models.build(case.preset, **case.overrides)
    config = model.config
    plan = plait.Plan(precision="bf16", compile=case.compile)
    boost_start = time.perf_counter()
    engine = plait.boost(
        model,
        optimizer=plait.optim.adamw(lr=3e-4, weight_decay=0.1),  # fused AdamW over the fp32 master weights
        loss_fn=loss_function(loss),
        plan=plan,
        max_grad_norm=1.0,
    )
    boost_s = time.perf_counter() - boost_start
    generator = torch.Generator(device=device).manual_seed(1)

    def next_batch() -> dict[str, torch.Tensor]:
        tokens = torch.randint(0, config.vocab_size, (batch, case.seq_len), device=device, generator=generator)
        return {"input_ids": tokens, "labels": tokens}

    meter = metrics.Throughput(num_warmup_steps=args.warmup)
    losses, step_s = [], []
    for step in range(args.steps):
        if step == args.warmup:
            reset_peak_memory(device)
        data = next_batch()
        sync(device)
        start = time.perf_counter()
        losses.append(engine.train_step(data).loss.item())  # .item() waits for the step
        step_s.append(time.perf_counter() - start)
        meter.record(step, tokens=batch * case.seq_len, seconds=step_s[-1])
        print(f"  {case.name} step {step}: {step_s[-1]:.3f} s, loss {losses[-1]:.4f}", flush=True)
    memory = peak_memory(device)
    tokens_per_s = meter.tokens_per_s()
    flops_per_token = config.flops_per_token(case.seq_len)
    result = {
        "preset": case.preset,
        "num_parameters": config.num_parameters(),
        "flops_per_token": flops_per_token,
        "seq_len": case.seq_len,
        "batch": batch,
        "tokens_per_step": batch * case.seq_len,
        "compile": case.compile,
        "loss_fn": loss_name(loss_function(loss)),
        "optimizer": {"type": type(engine.optimizer).__name__, "fused": engine.optimizer.defaults.get("fused")},
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "boost_s": boost_s,
        "first_steps_s": step_s[: args.warmup],
        "median_step_s": statistics.median(step_s[args.warmup :] or step_s),
        "tokens_per_s": tokens_per_s,
        "mfu": metrics.mfu(tokens_per_s=tokens_per_s, flops_per_token=flops_per_token, peak_flops=peak, num_ranks=1),
        "losses": [losses[0], losses[-1]],
        "memory_bytes": memory,
        "compile_stats": _compile_stats(engine),
    }
    try:  # after the figures: a profiler failure must not lose them
        result["attention_ops_in_one_step"] = attention_kernels(engine, next_batch())
        result["attention_backend"] = attention_backend(result["attention_ops_in_one_step"])
    except Exception as error:
        result["attention_ops_in_one_step"] = {"error": f"{type(error).__name__}: {error}"[:500]}
    engine_close = getattr(engine, "close", None)
    if engine_close is not None:
        engine_close()
    return result


def _compile_stats(engine: Any) -> dict[str, Any] | None:
    stats = getattr(engine, "compile_stats", None)  # plait.compile's report after the first step
    if stats is None:
        return None
    fields = ("graphs", "num_breaks", "recompiles", "seconds", "cache_hits", "cache_misses")
    return {name: getattr(stats, name, None) for name in fields} | {
        "break_reasons": dict(getattr(stats, "break_reasons", {}))
    }


def is_out_of_memory(error: BaseException) -> bool:
    out_of_memory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(error, out_of_memory) or "out of memory" in str(error).lower()


def train_case(case: TrainCase, *, args: argparse.Namespace, peak: float) -> dict[str, Any]:
    """Train `case`, halving its batch after each out-of-memory failure (down to one sequence), and with
    the plain loss after any other failure of the chunked one (its error kept in the result)."""
    batch, halved_from, loss, notes = case.batch, [], args.loss, {}
    while True:
        torch._dynamo.reset()  # each case compiles afresh: no recompile limit, no shapes marked dynamic by the last
        try:
            result = train_once(case, batch=batch, loss=loss, args=args, peak=peak)
            return result | notes | ({"halved_from_batch": halved_from} if halved_from else {})
        except Exception as error:
            if not is_out_of_memory(error) and loss == "chunked":
                traceback.print_exc()
                print(f"  {case.name}: failed with the chunked loss; again with the plain one", flush=True)
                notes["chunked_loss_error"], loss = f"{type(error).__name__}: {error}"[:1000], "plain"
                continue
            if not is_out_of_memory(error) or batch == 1:
                raise
            print(f"  {case.name}: out of memory at batch {batch}; halving", flush=True)
            halved_from.append(batch)
            batch //= 2
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def matmul_part(args: argparse.Namespace) -> dict[str, Any]:
    size = 256 if args.dry_run else 8192
    peak = metrics.measure_peak(torch.device(args.device), dtype=torch.bfloat16, size=size)
    print(peak.line(), flush=True)
    return asdict(peak) | {"line": peak.line()}


def sdpa_part(args: argparse.Namespace) -> dict[str, Any]:
    """SDPA's enabled backends, and a flash-only call on the 1B's attention shapes (bf16, GQA 32/8)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = torch.device(args.device)
    out: dict[str, Any] = {}
    if device.type == "cuda":
        cuda = torch.backends.cuda
        out["enabled"] = {
            "flash": cuda.flash_sdp_enabled(),
            "mem_efficient": cuda.mem_efficient_sdp_enabled(),
            "math": cuda.math_sdp_enabled(),
            "cudnn": getattr(cuda, "cudnn_sdp_enabled", lambda: None)(),
        }
    seq = 64 if args.dry_run else args.seq_len
    q = torch.randn(1, 32, seq, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 8, seq, 64, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            attn.sum().backward()
        out["flash_takes_gqa_bf16"] = True
    except RuntimeError as error:
        out["flash_takes_gqa_bf16"] = False
        out["flash_error"] = str(error).splitlines()[0]
    return out


def run_part(name: str, results: dict[str, Any], path: Path, run: Any) -> Any:
    start = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        value = run()
        results[name] = value
    except Exception as error:  # one failed part must not lose the others
        traceback.print_exc()
        value = None
        results[name] = {"error": f"{type(error).__name__}: {error}"[:2000]}
    results.setdefault("part_wall_s", {})[name] = round(time.perf_counter() - start, 1)
    write_json(path, results)
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes and 2 steps: the code paths only")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "benchmarks/results"), "gpu.json"))
    parser.add_argument("--compile", default="blocks", choices=["off", "blocks", "full"], help="plan.compile")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of tokens/s (compilation)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8, help="the 1B's sequences per step (halved on OOM)")
    parser.add_argument("--loss", default="chunked", choices=["chunked", "plain"], help="causal LM loss")
    parser.add_argument("--budget-s", type=float, default=270.0, help="the eager 1B runs only if time is left")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.steps, args.warmup = min(args.steps, 2), 1
    if args.warmup >= args.steps:
        parser.error(f"--warmup {args.warmup} must be below --steps {args.steps} (tokens/s needs a steady step)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: torch.cuda.is_available() is False (use --dry-run --device cpu to test here)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    path = Path(args.out)
    results: dict[str, Any] = {"args": vars(args), "environment": environment(), "load_average": load_average()}
    if args.device == "cuda":
        results["device"] = torch.cuda.get_device_name()
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers (norm statistics, loss) as a trainer runs
    print(f"torch {torch.__version__} on {results.get('device', 'cpu')}", flush=True)
    matmul = run_part("matmul", results, path, lambda: matmul_part(args))
    run_part("sdpa", results, path, lambda: sdpa_part(args))
    peak = matmul["flops"] if matmul else metrics.measure_peak_flops(torch.device(args.device), dtype=torch.bfloat16)
    for case in cases(args):
        if case.name.endswith("-eager") and time.perf_counter() - started > args.budget_s:
            results[case.name] = {"skipped": f"past --budget-s {args.budget_s:.0f} s"}
            continue
        run_part(case.name, results, path, lambda case=case: train_case(case, args=args, peak=peak))
    llama = results.get("llama-1b") or {}
    run_part("torchtitan", results, path, lambda: torchtitan_comparison(llama if "tokens_per_s" in llama else None))
    results["summary"] = summary(results)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    write_json(path, results)
    print_table(results)
    print(f"wrote {path} ({results['wall_s']:.0f} s)")
    return 0 if all("error" not in value for value in results.values() if isinstance(value, dict)) else 1


MFU_TARGET_1B = 0.55  # issue 20: the 1B in bf16 against the measured matmul rate


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The headline figures: the 1B's MFU against the target, compiled over eager, and over torchtitan."""
    compiled, eager = results.get("llama-1b") or {}, results.get("llama-1b-eager") or {}
    out: dict[str, Any] = {"mfu_target_1b": MFU_TARGET_1B}
    if "mfu" in compiled:
        out |= {"mfu_1b": compiled["mfu"], "mfu_1b_meets_target": compiled["mfu"] >= MFU_TARGET_1B}
    if "tokens_per_s" in compiled and "tokens_per_s" in eager:
        out["compiled_over_eager_1b"] = compiled["tokens_per_s"] / eager["tokens_per_s"]
    titan = results.get("torchtitan") or {}
    if "plait_over_torchtitan_compiled" in titan:
        out["plait_over_torchtitan_compiled"] = titan["plait_over_torchtitan_compiled"]
    return out


def print_table(results: dict[str, Any]) -> None:
    print(f"\n{'part':<16} {'tokens/s':>10} {'MFU':>7} {'step s':>8} {'peak GiB':>9}  attention")
    for name, value in results.items():
        if isinstance(value, dict) and "tokens_per_s" in value:
            memory = value["memory_bytes"].get("cuda_max_allocated", value["memory_bytes"].get("peak_rss", 0))
            print(
                f"{name:<16} {value['tokens_per_s']:>10,.0f} {value['mfu']:>7.1%} "
                f"{value['median_step_s']:>8.3f} {memory / 2**30:>9.2f}  {value.get('attention_backend', '?')}"
            )
    titan = results.get("torchtitan") or {}
    if "equivalent_1b_tokens_per_s" in titan:
        equivalent = titan["equivalent_1b_tokens_per_s"]
        print(
            f"torchtitan Llama 3.1 8B on H100 ({titan['source']}): {equivalent['compiled']:,.0f} tokens/s compiled, "
            f"{equivalent['eager']:,.0f} eager as 1B tokens/s ({titan['conversion']}); "
            f"plait / torchtitan compiled = {titan['plait_over_torchtitan_compiled']:.2f}"
        )
    print(
        "summary: "
        + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in results["summary"].items())
    )


if __name__ == "__main__":
    sys.exit(main())
