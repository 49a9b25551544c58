"""Chunked (fused) cross entropy against the plain loss: peak live bytes and step time of the LM head + loss.

Work: final hidden states (batch x seq tokens, d_model) through an untied LM head (vocab x d_model, no
bias) into the causal LM loss, forward and backward, fp32, one thread. "plain" is what a plait GPT runs
by default: the head's logits, then `plait.losses.causal_lm` (shifted slice, F.cross_entropy).
"chunked" is `plait.losses.ChunkedCausalLM(chunk)` on the hidden states tagged with the head
(what `GPT.forward(return_hidden=True)` returns).

Peak live bytes: `plait.train.metrics.peak_live_tensor_bytes` (the allocator's events under
torch.profiler) over one forward + backward, minus the live bytes at its start (hidden states, weight,
targets), so what the step adds: activations, temporaries and the two gradients. The formula, with
N = batch x seq tokens, B = batch, V = vocab, d = d_model, c = chunk, 4-byte floats:

    plain   ~ 4 * (N*V + 3*(N-B)*V): the logits (kept through backward, as the engine keeps its outputs),
              then in backward the log-softmax output, its gradient and the gradient of its input
              (the shifted slice is a copy in forward); the head's gradients come after these are freed
    chunked ~ 4 * c*V + 4 * (V*d + N*d): one chunk's logits (softmax and gradient in place) beside the
              fp32 gradients of the weight and the hidden states that forward fills

Whole model: the same peak for a forward + backward of a plait GPT (`--model`, vocabulary replaced) with
each loss, the model's own activations included (the head's input is the model's, not `--d-model`).

Step time: plain and chunked alternate A B A B (`--pairs` pairs, one forward + backward each), the
median of per-pair ratios (chunked / plain seconds) with its spread.

    python benchmarks/fused_loss.py                    # vocab 32k and 128k, ~2 min on one quiet core
    python benchmarks/fused_loss.py --quick            # a smoke check
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from common import (
    RESULTS_DIR,
    environment,
    finish,
    format_bytes,
    format_table,
    load_average,
    ratio_summary,
    run_alternating,
    spread,
)
from torch import nn

from plait.losses import ChunkedCausalLM, causal_lm
from plait.models import build
from plait.models.head_output import with_head
from plait.train.metrics import peak_live_tensor_bytes

FLOAT = 4


def formula(*, tokens: int, batch: int, vocab: int, d_model: int, chunk: int) -> dict[str, int]:
    """Bytes the module docstring's formula gives for one step of each loss."""
    grads = FLOAT * (vocab * d_model + tokens * d_model)
    shifted = tokens - batch
    return {
        "plain": FLOAT * (tokens * vocab + 3 * shifted * vocab),
        "chunked": FLOAT * chunk * vocab + grads,
    }


def make_work(*, batch: int, seq: int, vocab: int, d_model: int) -> tuple[torch.Tensor, nn.Linear, dict]:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, seq, d_model, generator=gen).requires_grad_()
    head = nn.Linear(d_model, vocab, bias=False)
    nn.init.normal_(head.weight, std=0.02, generator=gen)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[:, : seq // 8] = -100  # some ignored targets, as padding or prompts give
    return hidden, head, {"input_ids": labels.clamp(min=0), "labels": labels}


def step(kind: str, hidden: torch.Tensor, head: nn.Linear, batch: dict, *, chunk: int) -> float:
    """One forward + backward of the head and the loss; returns the summed loss."""
    hidden.grad = head.weight.grad = None
    # The outputs stay referenced through backward, as the engine's forward_backward keeps them.
    outputs = head(hidden) if kind == "plain" else with_head(hidden.view_as(hidden), head)
    loss_fn = causal_lm if kind == "plain" else ChunkedCausalLM(chunk)
    loss_sum, _ = loss_fn(outputs, batch)
    loss_sum.backward()
    return loss_sum.item()


def measure(vocab: int, args: argparse.Namespace) -> dict[str, Any]:
    hidden, head, batch = make_work(batch=args.batch, seq=args.seq, vocab=vocab, d_model=args.d_model)
    losses = {kind: step(kind, hidden, head, batch, chunk=args.chunk) for kind in ("plain", "chunked")}  # warm-up
    peaks = {}
    for kind in ("plain", "chunked"):
        hidden.grad = head.weight.grad = None
        live = peak_live_tensor_bytes(lambda kind=kind: step(kind, hidden, head, batch, chunk=args.chunk))
        peaks[kind] = live["peak"] - live["start"]

    def timed(kind: str) -> float:
        start = time.perf_counter()
        step(kind, hidden, head, batch, chunk=args.chunk)
        return time.perf_counter() - start

    runs = run_alternating({kind: lambda kind=kind: timed(kind) for kind in ("plain", "chunked")}, num_pairs=args.pairs)
    tokens = args.batch * args.seq
    return {
        "vocab": vocab,
        "tokens": tokens,
        "loss": losses,
        "peak_bytes": peaks,
        "formula_bytes": formula(tokens=tokens, batch=args.batch, vocab=vocab, d_model=args.d_model, chunk=args.chunk),
        "seconds": {kind: spread(values) for kind, values in runs["seconds"].items()},
        "time_ratio_chunked_over_plain": ratio_summary(runs["seconds"]["chunked"], runs["seconds"]["plain"]),
    }


def model_step(kind: str, model: torch.nn.Module, batch: dict, *, chunk: int) -> float:
    """One forward + backward of a whole plait GPT and the loss, as the engine runs them."""
    model.zero_grad(set_to_none=True)
    if kind == "plain":
        outputs, loss_fn = model(batch["input_ids"]), causal_lm
    else:
        outputs, loss_fn = model(batch["input_ids"], return_hidden=True), ChunkedCausalLM(chunk)
    loss_sum, _ = loss_fn(outputs, batch)
    loss_sum.backward()
    return loss_sum.item()


def measure_model(vocab: int, args: argparse.Namespace) -> dict[str, int]:
    """Peak live bytes a whole step adds (activations, logits or chunks, gradients) to the weights."""
    torch.manual_seed(0)
    model = build(args.model, vocab_size=vocab, max_seq_len=args.seq)
    _, _, batch = make_work(batch=args.batch, seq=args.seq, vocab=vocab, d_model=args.d_model)
    peaks = {}
    for kind in ("plain", "chunked"):
        model_step(kind, model, batch, chunk=args.chunk)
        model.zero_grad(set_to_none=True)
        live = peak_live_tensor_bytes(lambda kind=kind: model_step(kind, model, batch, chunk=args.chunk))
        peaks[kind] = live["peak"] - live["start"]
    return peaks


def table(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        for kind in ("plain", "chunked"):
            rows.append(
                [
                    f"{kind} vocab {r['vocab']}",
                    format_bytes(r["peak_bytes"][kind]),
                    format_bytes(r["formula_bytes"][kind]),
                    f"{r['peak_bytes'][kind] / r['formula_bytes'][kind]:.2f}",
                    f"{r['seconds'][kind]['median']:.3f}",
                ]
            )
        ratio = r["time_ratio_chunked_over_plain"]
        saving = 1 - r["peak_bytes"]["chunked"] / r["peak_bytes"]["plain"]
        rows.append(
            [
                "  chunked/plain",
                f"-{saving:.1%}",
                "",
                "",
                f"x{ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f})",
            ]
        )
    return format_table(["loss", "peak live", "formula", "meas/formula", "step s (median)"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--model", default="llama-10m", help="the preset of the whole-model rows (vocab replaced)")
    parser.add_argument("--quick", action="store_true", help="vocab 4096, seq 128, 2 pairs")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.vocabs, args.seq, args.pairs = [4096], 128, 2
    torch.set_num_threads(1)
    started = time.perf_counter()
    load_before = load_average()
    results = [measure(vocab, args) for vocab in args.vocabs]
    for result in results:
        result["model_peak_bytes"] = measure_model(result["vocab"], args)
    print(
        f"batch {args.batch} x seq {args.seq} tokens, d_model {args.d_model}, chunk {args.chunk}, fp32, "
        f"1 thread; load {load_before} -> {load_average()}"
    )
    print(table(results))
    print(f"\nwhole {args.model} step (forward + backward, model and loss), peak live bytes above the weights:")
    rows = [
        [f"vocab {r['vocab']}", *(format_bytes(r["model_peak_bytes"][k]) for k in ("plain", "chunked"))]
        for r in results
    ]
    print(format_table(["model step", "plain", "chunked"], rows))
    out = args.out or RESULTS_DIR / ("fused_loss-quick.json" if args.quick else "fused_loss.json")
    payload = {
        "environment": environment(),
        "args": vars(args),
        "load_average": {"before": load_before, "after": load_average()},
        "results": results,
    }
    wall = time.perf_counter() - started
    finish(out, payload, wall_s=wall, phase_wall_s={"measure": wall})


if __name__ == "__main__":
    main()
