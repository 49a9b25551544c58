"""GPT: one decoder-only family covering GPT-2 and the Llama/PaLM options.

Module names are part of the contract: parallel plans address parameters by name.

    embed, pos_embed (learned positions only), drop,
    blocks.{i}.norm1, blocks.{i}.attn.{q,k,v,o}_proj,
    blocks.{i}.norm2 (absent with parallel_block),
    blocks.{i}.mlp.{gate_proj (SwiGLU only), up_proj, down_proj},
    MoE layers instead: blocks.{i}.mlp.router.weight (experts, d_model),
      blocks.{i}.mlp.experts.{up,gate,down}_weight and {up,gate,down}_bias, stacked with the
      expert first (plait.moe.Experts), blocks.{i}.mlp.shared.{gate_proj, up_proj, down_proj}
    norm_f, lm_head (its weight is embed.weight when tied)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from plait.models.gpt_config import GPTConfig
from plait.models.head_output import LMHead, with_head
from plait.models.layers import Attention, build_mlp, build_norm

if TYPE_CHECKING:
    from plait.models.kv_cache import KVCache

__all__ = ["GPT", "Block", "GPTConfig"]


class Block(nn.Module):
    """One transformer layer, pre-norm; sequential (GPT-2, Llama) or parallel (PaLM, GPT-J).

    Sequential: ``x + attn(norm1(x))`` then ``+ mlp(norm2(.))``.
    Parallel: ``x + attn(norm1(x)) + mlp(norm1(x))`` with no ``norm2``.
    ``moe=True``: the MLP is a Mixture of Experts (``plait.moe.MoELayer``).
    """

    def __init__(self, config: GPTConfig, *, moe: bool = False) -> None:
        super().__init__()
        self.norm1 = build_norm(config)
        self.attn = Attention(config)
        self.norm2 = None if config.parallel_block else build_norm(config)
        self.mlp = build_mlp(config, moe=moe)
        self.drop = nn.Dropout(config.dropout)

    def reset_parameters(self) -> None:
        """Initialise norms, attention and MLP, in that order."""
        self.norm1.reset_parameters()
        self.attn.reset_parameters()
        if self.norm2 is not None:
            self.norm2.reset_parameters()
        self.mlp.reset_parameters()

    def forward(self, x: torch.Tensor, *, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` is (batch, seq, d_model); ``position_ids`` default to ``0..seq-1``."""
        normed = self.norm1(x)
        attn_out = self.drop(self.attn(normed, position_ids=position_ids))
        if self.norm2 is None:
            return x + attn_out + self.drop(self.mlp(normed))
        x = x + attn_out
        return x + self.drop(self.mlp(self.norm2(x)))

    def decode(self, x: torch.Tensor, cache: KVCache, *, layer: int, positions: torch.Tensor) -> torch.Tensor:
        """Inference only (no dropout): ``forward`` for new positions, attending over ``cache``."""
        normed = self.norm1(x)
        attn_out = self.attn.decode(normed, cache, layer=layer, positions=positions)
        if self.norm2 is None:
            return x + attn_out + self.mlp(normed)
        x = x + attn_out
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Decoder-only transformer built from a :class:`GPTConfig`.

    Weights are initialised from torch's global RNG: normal(0, init_std) for linear and
    embedding weights, std / sqrt(2 * num_layers) for the residual output projections
    (``o_proj``, ``down_proj``, as in GPT-2), zero biases, unit norm scales.
    Building under ``torch.device("meta")`` skips initialisation; after
    ``model.to_empty(device=...)`` call ``model.init_weights()``, which draws the same
    weights a plain build under the same seed would.

    Example:
        >>> model = GPT(GPTConfig(vocab_size=512, max_seq_len=64, d_model=64,
        ...                       num_layers=2, num_heads=4))
        >>> model(torch.zeros(2, 16, dtype=torch.long)).shape
        torch.Size([2, 16, 512])
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        target_device = torch.get_default_device()
        # Built on meta so that nn.Linear's own init draws nothing from the RNG: a plain
        # build then consumes exactly what init_weights draws, the same as a meta build
        # materialised later, and large models skip a second full initialisation.
        with torch.device("meta"):
            self._build_modules(config)
        if target_device.type != "meta":
            self.to_empty(device=target_device)
            self.init_weights()

    def _build_modules(self, config: GPTConfig) -> None:
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        learned = config.position == "learned"
        self.pos_embed = nn.Embedding(config.max_seq_len, config.d_model) if learned else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, moe=config.is_moe_layer(i)) for i in range(config.num_layers))
        self.norm_f = build_norm(config)
        self.lm_head = LMHead(config.d_model, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share ``embed.weight`` with ``lm_head`` when the config ties them.

        ``Module.to_empty`` unties shared parameters; ``init_weights`` re-ties first.
        """
        if self.config.tied_embeddings:
            self.lm_head.weight = self.embed.weight

    def tp_plan(self) -> dict[str, str]:
        """Tensor-parallel styles by module-name pattern (read by plait.tensor; only names live here)."""
        plan = {"embed": "vocab_embed"}
        if self.pos_embed is not None:
            plan["pos_embed"] = "sequence_scatter"
        plan |= {
            "blocks.*.norm1": "sequence_norm",
            "blocks.*.attn.[qkv]_proj": "colwise",
            "blocks.*.attn.o_proj": "rowwise",
            "blocks.*.attn": "heads",
        }
        if not self.config.parallel_block:
            plan["blocks.*.norm2"] = "sequence_norm"
        if any(self.config.is_moe_layer(i) for i in range(self.config.num_layers)):
            # each expert split over tp; the router (and shared experts) whole: every tp rank routes alike
            plan["blocks.*.mlp.experts"] = "experts"
        if any(not self.config.is_moe_layer(i) for i in range(self.config.num_layers)):
            if self.config.activation == "swiglu":
                plan["blocks.*.mlp.gate_proj"] = "colwise"
            plan |= {"blocks.*.mlp.up_proj": "colwise", "blocks.*.mlp.down_proj": "rowwise"}
        return plan | {"norm_f": "sequence_norm", "lm_head": "vocab_head"}

    def init_order(self) -> list[nn.Module]:
        """The modules whose parameters ``init_weights`` draws, in the order it draws them."""
        order: list[nn.Module] = [self.embed]
        if self.pos_embed is not None:
            order.append(self.pos_embed)
        order += [*self.blocks, self.norm_f]
        if not self.config.tied_embeddings:
            order.append(self.lm_head)
        return order

    @torch.no_grad()
    def init_module(self, module: nn.Module) -> None:
        """Initialise one module of ``init_order`` (lazy ZeRO-3 init materialises module by module)."""
        if module is self.embed or module is self.pos_embed or module is self.lm_head:
            if module is self.lm_head and self.config.tied_embeddings:
                return  # the tied head's weight is the embedding's, drawn with it
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        elif isinstance(module, Block) or module is self.norm_f:
            module.reset_parameters()
        else:
            raise ValueError(f"init_module: {type(module).__name__} is not one of this GPT's init units")

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re-)initialise every parameter, module by module in a fixed order."""
        self.tie_weights()
        for module in self.init_order():
            self.init_module(module)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_hidden: bool = False,
        **_: object,
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab_size) for ``input_ids`` (batch, seq).

        ``attention_mask`` and ``labels`` are accepted so Hugging Face style batches can
        be passed as ``model(**batch)``, and are not used: the loss is computed outside
        (``plait.losses``), and attention is causal, which is exact for right-padded
        sequences (no real token attends to padding on its right).
        ``position_ids`` (seq,) default to ``0..seq-1``; (batch, seq) ones mark packed
        documents: each 0 starts a document, and attention stays inside it.
        ``return_hidden=True`` returns the final normed hidden states (batch, seq, d_model) tagged
        with ``lm_head`` (``plait.models.head_output``) instead of logits, for a loss that
        never materialises the whole vocabulary (``plait.losses.ChunkedCausalLM``).
        """
        self._check_input(input_ids)
        x = self.embed(input_ids)  # (batch, seq, d_model)
        if self.pos_embed is not None:
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
            x = x + self.pos_embed(position_ids)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, position_ids=position_ids)
        if return_hidden:
            return with_head(self.norm_f(x), self.lm_head)
        return self.lm_head(self.norm_f(x))

    @torch.no_grad()
    def decode(
        self, input_ids: torch.Tensor, cache: KVCache, *, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Inference only: logits (batch, new, vocab_size) of ``input_ids`` (batch, new), the positions
        after those ``cache`` holds, whose keys/values it then holds too. No dropout, no gradients.

        ``attention_mask`` (batch, new), 0 on left padding: padding takes no position and is never
        attended to. Past ``max_seq_len`` positions the cache refuses (ValueError).
        `plait.models.kv_cache.IncrementalDecoder` drives it.
        """
        self._check_input(input_ids)
        positions = cache.reserve(input_ids, attention_mask)  # (new,) or (batch, new)
        x = self.embed(input_ids)  # (batch, new, d_model)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        for layer, block in enumerate(self.blocks):
            x = block.decode(x, cache, layer=layer, positions=positions)
        return self.lm_head(self.norm_f(x))

    def _check_input(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}; "
                "add a batch dimension with input_ids[None]"
            )
        seq_len, max_seq_len = input_ids.shape[1], self.config.max_seq_len
        if seq_len > max_seq_len:
            raise ValueError(
                f"input has {seq_len} tokens but the model's max_seq_len is {max_seq_len}; "
                "raise max_seq_len in the model config or lower the data's seq_len"
            )
