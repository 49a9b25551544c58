"""A custom training loop with plait: ZeRO-3 with lazy init, bf16 and recomputation.

Run on 2 local ranks:  plait run --nproc-per-node 2 examples/custom_loop.py
"""

import torch

import plait
from plait.distributed import init_distributed


def main() -> None:
    init_distributed()
    torch.manual_seed(0)
    with torch.device("meta"):  # materialised shard by shard by boost (plan.zero=3)
        model = plait.models.build("tiny-llama", max_seq_len=64)
    engine = plait.boost(
        model,
        optimizer=plait.optim.adamw(lr=1e-3, weight_decay=0.1),
        loss_fn=plait.losses.causal_lm,
        plan=plait.Plan(dp=-1, zero=3, precision="fp32", microbatches=2, recompute="full"),
        lr_scheduler=lambda opt: plait.optim.warmup_cosine(opt, warmup=5, total=50),
        max_grad_norm=1.0,
    )
    generator = torch.Generator().manual_seed(engine.dp_rank)  # each dp rank feeds its own shard
    for step in range(50):
        tokens = torch.randint(0, model.config.vocab_size, (8, 64), generator=generator)
        result = engine.train_step({"input_ids": tokens, "labels": tokens})
        if step % 10 == 0 and engine.mesh.global_rank == 0:
            print(f"step {step} loss {result.loss.item():.4f} grad norm {result.grad_norm.item():.3f}")


if __name__ == "__main__":
    main()
