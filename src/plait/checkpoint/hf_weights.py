"""plait GPT weights <-> Hugging Face names and layouts (GPT2LMHeadModel, LlamaForCausalLM,
MixtralForCausalLM).

Llama is a renaming. GPT-2 also stores its projections as ``Conv1D`` (weight
(in, out), our ``nn.Linear`` transposed) and fuses q, k and v into one ``c_attn``.
Mixtral is Llama's renaming for attention; its experts are written one tensor per expert
(``block_sparse_moe.experts.{j}.w1/w3/w2``: gate, up, down), the layout Mixtral's checkpoints and
transformers' ``save_pretrained`` use, where plait stacks them along a leading expert dim. Import also
reads transformers 5's own module names (``mlp.gate``, stacked ``mlp.experts.gate_up_proj`` = [gate; up]
and ``down_proj``), which a checkpoint of an HF Mixtral trained under plait exports.
A tied head is written once, as its embedding, which is what every class expects.
"""

from __future__ import annotations

import re

import torch

from plait.checkpoint.hf_config import GPT2, MIXTRAL
from plait.models.gpt import GPT, GPTConfig

# (plait prefix, Hugging Face prefix); "{i}" is a layer index.
_LLAMA_PREFIXES = (
    ("embed.", "model.embed_tokens."),
    ("norm_f.", "model.norm."),
    ("lm_head.", "lm_head."),
    ("blocks.{i}.norm1.", "model.layers.{i}.input_layernorm."),
    ("blocks.{i}.norm2.", "model.layers.{i}.post_attention_layernorm."),
    ("blocks.{i}.attn.", "model.layers.{i}.self_attn."),
    ("blocks.{i}.mlp.", "model.layers.{i}.mlp."),
)
_GPT2_PREFIXES = (
    ("embed.", "transformer.wte."),
    ("pos_embed.", "transformer.wpe."),
    ("norm_f.", "transformer.ln_f."),
    ("lm_head.", "lm_head."),
    ("blocks.{i}.norm1.", "transformer.h.{i}.ln_1."),
    ("blocks.{i}.norm2.", "transformer.h.{i}.ln_2."),
    ("blocks.{i}.attn.o_proj.", "transformer.h.{i}.attn.c_proj."),
    ("blocks.{i}.mlp.up_proj.", "transformer.h.{i}.mlp.c_fc."),
    ("blocks.{i}.mlp.down_proj.", "transformer.h.{i}.mlp.c_proj."),
)
_MIXTRAL_PREFIXES = (
    *_LLAMA_PREFIXES[:-1],
    ("blocks.{i}.mlp.router.", "model.layers.{i}.block_sparse_moe.gate."),
)
# plait's stacked expert tensor -> Mixtral's per-expert name
_EXPERT_NAMES = {"gate_weight": "w1", "up_weight": "w3", "down_weight": "w2"}
_PLAIT_EXPERTS = re.compile(r"^blocks\.(\d+)\.mlp\.experts\.(gate_weight|up_weight|down_weight)$")
_HF_EXPERT = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
_FUSED_EXPERTS = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_FUSED_ROUTER = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.weight$")
_CONV1D_WEIGHT = re.compile(r"\.(c_attn|c_proj|c_fc)\.weight$")
_QKV = re.compile(r"^blocks\.(\d+)\.attn\.([qkv])_proj\.(weight|bias)$")
_C_ATTN = re.compile(r"^transformer\.h\.(\d+)\.attn\.c_attn\.(weight|bias)$")
# Buffers some checkpoints carry: GPT-2's causal mask, old Llama's rotary frequencies.
_BUFFERS = re.compile(r"(^|\.)attn\.(bias|masked_bias)$|rotary_emb\.inv_freq$")


def _rename(name: str, prefixes: tuple[tuple[str, str], ...], *, to_hf: bool) -> str | None:
    for plait_prefix, hf_prefix in prefixes:
        source, target = (plait_prefix, hf_prefix) if to_hf else (hf_prefix, plait_prefix)
        match = re.match(re.escape(source).replace(r"\{i\}", r"(?P<i>\d+)"), name)
        if match:
            return target.format(**match.groupdict()) + name[match.end() :]
    return None


def check_plait_state(state: dict[str, torch.Tensor], config: GPTConfig, *, source: str) -> None:
    """Raise ValueError unless ``state`` has exactly the names and shapes of ``GPT(config)``."""
    with torch.device("meta"):
        expected = {name: tensor.shape for name, tensor in GPT(config).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"the weights in {source} do not fit the model its config describes: "
            f"missing {missing[:4] or 'none'}, unexpected {unexpected[:4] or 'none'}; is the checkpoint complete?"
        )
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise ValueError(
                f"{source}: {name} has shape {tuple(state[name].shape)} but its config implies {tuple(shape)}"
            )


def plait_to_hf(state: dict[str, torch.Tensor], config: GPTConfig, *, family: str) -> dict[str, torch.Tensor]:
    """Hugging Face tensors (contiguous, no shared memory) for a checked plait ``state``."""
    state = dict(state)
    if config.tied_embeddings:
        del state["lm_head.weight"]  # Hugging Face re-ties lm_head to the embedding on load
    hf: dict[str, torch.Tensor] = {}
    if family == GPT2:
        hf |= _fuse_qkv(state)
    if family == MIXTRAL:
        hf |= _split_experts(state)
    prefixes = _prefixes(family)
    for name, tensor in state.items():
        hf_name = _rename(name, prefixes, to_hf=True)
        assert hf_name is not None, f"no Hugging Face name for {name}"
        hf[hf_name] = tensor
    return {name: _to_hf_layout(name, tensor) for name, tensor in hf.items()}


def _fuse_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pop every q/k/v projection from ``state``; return GPT-2's fused c_attn (our layout, (3*out, in))."""
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name in [n for n in state if _QKV.match(n)]:
        layer, which, kind = _QKV.match(name).groups()
        parts.setdefault((layer, kind), {})[which] = state.pop(name)
    return {
        f"transformer.h.{layer}.attn.c_attn.{kind}": torch.cat([found[w] for w in "qkv"])
        for (layer, kind), found in parts.items()
    }


def _prefixes(family: str) -> tuple[tuple[str, str], ...]:
    return {GPT2: _GPT2_PREFIXES, MIXTRAL: _MIXTRAL_PREFIXES}.get(family, _LLAMA_PREFIXES)


def _split_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pop every stacked expert tensor from ``state``; return Mixtral's one tensor per expert."""
    hf: dict[str, torch.Tensor] = {}
    for name in [n for n in state if _PLAIT_EXPERTS.match(n)]:
        layer, kind = _PLAIT_EXPERTS.match(name).groups()
        for expert, tensor in enumerate(state.pop(name)):
            hf[f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{_EXPERT_NAMES[kind]}.weight"] = tensor.clone()
    return hf


def _stack_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pop Mixtral's per-expert tensors from ``tensors``; return plait's stacked ones (experts in order)."""
    found: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name in [n for n in tensors if _HF_EXPERT.match(n)]:
        layer, expert, kind = _HF_EXPERT.match(name).groups()
        found.setdefault((layer, kind), {})[int(expert)] = tensors.pop(name)
    kinds = {hf: plait for plait, hf in _EXPERT_NAMES.items()}
    stacked = {}
    for (layer, kind), experts in found.items():
        if sorted(experts) != list(range(len(experts))):
            raise ValueError(f"cannot import: layer {layer} has experts {sorted(experts)} of {kind}; expected 0..n-1")
        stacked[f"blocks.{layer}.mlp.experts.{kinds[kind]}"] = torch.stack([experts[j] for j in range(len(experts))])
    return stacked | _unfused_experts(tensors)


def _unfused_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pop transformers 5's module-named Mixtral tensors from ``tensors``; return plait's."""
    state = {}
    for name in [n for n in tensors if _FUSED_ROUTER.match(n)]:
        state[f"blocks.{_FUSED_ROUTER.match(name).group(1)}.mlp.router.weight"] = tensors.pop(name)
    for name in [n for n in tensors if _FUSED_EXPERTS.match(n)]:
        layer, kind = _FUSED_EXPERTS.match(name).groups()
        prefix, tensor = f"blocks.{layer}.mlp.experts.", tensors.pop(name)
        if kind == "down_proj":
            state[prefix + "down_weight"] = tensor
        else:
            gate, up = tensor.chunk(2, dim=1)  # (E, 2 * d_ff, d)
            state[prefix + "gate_weight"], state[prefix + "up_weight"] = gate.contiguous(), up.contiguous()
    return state


def _to_hf_layout(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if _CONV1D_WEIGHT.search(name):
        tensor = tensor.T
    return tensor.detach().contiguous()


def hf_to_plait(tensors: dict[str, torch.Tensor], config: GPTConfig, *, family: str) -> dict[str, torch.Tensor]:
    """plait's state dict for Hugging Face ``tensors``; checked against ``GPT(config)``.

    A tied ``lm_head.weight`` is the embedding tensor itself, so saving stores it once.
    """
    tensors = {name: tensor for name, tensor in tensors.items() if not _BUFFERS.search(name)}
    if family == GPT2 and not any(name.startswith("transformer.") for name in tensors):
        # GPT2Model checkpoints (such as OpenAI's GPT-2) name weights without the LM wrapper's prefix.
        tensors = {(n if n.startswith("lm_head.") else f"transformer.{n}"): t for n, t in tensors.items()}
    if config.tied_embeddings:
        tensors.pop("lm_head.weight", None)  # some writers store the tied copy too; the embedding rules
    state, unknown = _rename_all(tensors, family=family)
    if unknown:
        raise ValueError(f"cannot import: no plait weight for Hugging Face tensor(s) {sorted(unknown)[:4]}")
    if config.tied_embeddings and "embed.weight" in state:
        state["lm_head.weight"] = state["embed.weight"]
    check_plait_state(state, config, source="the Hugging Face checkpoint")
    return state


def _rename_all(tensors: dict[str, torch.Tensor], *, family: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    state: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    prefixes = _prefixes(family)
    if family == MIXTRAL:
        tensors = dict(tensors)
        state |= _stack_experts(tensors)
    for hf_name, tensor in tensors.items():
        if _CONV1D_WEIGHT.search(hf_name):
            tensor = tensor.T
        if family == GPT2 and (match := _C_ATTN.match(hf_name)):
            layer, kind = match.groups()
            for which, part in zip("qkv", tensor.chunk(3, dim=0), strict=True):
                state[f"blocks.{layer}.attn.{which}_proj.{kind}"] = part.contiguous()
            continue
        name = _rename(hf_name, prefixes, to_hf=False)
        if name is None:
            unknown.append(hf_name)
        else:
            state[name] = tensor.contiguous()
    return state, unknown
