"""Fine-tuning recipes on plait's plans: SFT, LoRA, reward models, DPO, GRPO, PPO and diffusion.

Each recipe is data, a model wrapper and a loss in the `loss_fn(outputs, batch)` contract, so it runs
under any plan `plait.boost` accepts without changing the recipe. Import the recipe's own module
(`plait.recipes.sft`, ...); `plait finetune CONFIG` runs one from a TOML file.
"""
