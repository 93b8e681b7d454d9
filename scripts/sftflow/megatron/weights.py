"""Hugging Face <-> megatron-core GPTModel weights, and their tensor / expert parallel shards.

Names are those of GPTModel built with megatron-core's local layer spec (`get_gpt_layer_local_spec`):

    embedding.word_embeddings.weight                          model.embed_tokens.weight (vocab padded)
    decoder.layers.{i}.input_layernorm.weight                 model.layers.{i}.input_layernorm.weight
    decoder.layers.{i}.self_attention.linear_qkv.{weight,bias} q_proj, k_proj, v_proj fused per query group
    decoder.layers.{i}.self_attention.q_layernorm.weight      ...self_attn.q_norm.weight (qwen3)
    decoder.layers.{i}.self_attention.k_layernorm.weight      ...self_attn.k_norm.weight (qwen3)
    decoder.layers.{i}.self_attention.linear_proj.weight      ...self_attn.o_proj.weight
    decoder.layers.{i}.pre_mlp_layernorm.weight               ...post_attention_layernorm.weight
    decoder.layers.{i}.mlp.linear_fc1.weight                  [gate_proj; up_proj]
    decoder.layers.{i}.mlp.linear_fc2.weight                  down_proj
    decoder.layers.{i}.mlp.router.weight                      ...mlp.gate.weight (MoE layers)
    decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc1.weight   ...mlp.experts.gate_up_proj[e]
    decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc2.weight   ...mlp.experts.down_proj[e]
    decoder.final_layernorm.weight                            model.norm.weight
    output_layer.weight                                       lm_head.weight (absent when tied)

The fused QKV holds, for each of the num_kv_heads query groups in turn, that group's query heads, then
its key head, then its value head: megatron splits it that way (SelfAttention.get_query_key_value_tensors),
and a tensor-parallel rank holds a contiguous run of whole groups. The gated MLP's fc1 is [gate; up], so
a TP rank holds [its gate rows; its up rows] (not a contiguous slice). HF state dicts are those of
transformers 5 models (`model.state_dict()`), whose MoE experts are fused 3-D tensors.
"""

from __future__ import annotations

import re

import torch

from sftflow.errors import SftflowError
from sftflow.megatron.hf_config import ModelLayout
from sftflow.train.parallel import ParallelDims

# How each megatron weight is split across tensor-parallel ranks.
COLUMN, ROW, VOCAB, GATED, REPLICATED = "column", "row", "vocab", "gated", "replicated"


def _hf_layer(i: int) -> str:
    return f"model.layers.{i}."


def _mc_layer(i: int) -> str:
    return f"decoder.layers.{i}."


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ModelLayout) -> torch.Tensor:
    """HF q/k/v projections (weights [out, hidden] or biases [out]) -> megatron's per-group QKV."""
    groups, hpg, d = layout.num_kv_heads, layout.heads_per_group, layout.head_dim
    tail = q.shape[1:]
    parts = (q.reshape(groups, hpg * d, *tail), k.reshape(groups, d, *tail), v.reshape(groups, d, *tail))
    return torch.cat(parts, dim=1).reshape(groups * (hpg + 2) * d, *tail)


def split_qkv(qkv: torch.Tensor, layout: ModelLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, hpg, d = layout.num_kv_heads, layout.heads_per_group, layout.head_dim
    tail = qkv.shape[1:]
    per_group = qkv.reshape(groups, (hpg + 2) * d, *tail)
    q, k, v = torch.split(per_group, [hpg * d, d, d], dim=1)
    return (
        q.reshape(groups * hpg * d, *tail).clone(),
        k.reshape(groups * d, *tail).clone(),
        v.reshape(groups * d, *tail).clone(),
    )


def _pad_vocab(weight: torch.Tensor, padded: int) -> torch.Tensor:
    if padded < weight.shape[0]:
        raise SftflowError(f"padded vocabulary {padded} is smaller than the model's {weight.shape[0]}")
    if padded == weight.shape[0]:
        return weight.clone()
    return torch.cat([weight, weight.new_zeros(padded - weight.shape[0], *weight.shape[1:])])


class _Source:
    """Reads named tensors from one state dict, remembering which were read, so that a tensor left over
    (a weight the mapping does not know) is an error rather than silently dropped."""

    def __init__(self, tensors: dict[str, torch.Tensor], label: str, layout: ModelLayout) -> None:
        self.tensors, self.label, self.model_type = tensors, label, layout.model_type
        self.used: set[str] = set()

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise SftflowError(f"{self.label} weights: {name} is missing (model_type {self.model_type})")
        self.used.add(name)
        return self.tensors[name]

    def check_all_used(self, target: str) -> None:
        unused = sorted(set(self.tensors) - self.used)
        if unused:
            raise SftflowError(
                f"{self.label} weights not mapped to {target} (model_type {self.model_type}): {unused[:5]}"
            )


def hf_to_megatron(hf: dict[str, torch.Tensor], layout: ModelLayout, padded_vocab: int) -> dict[str, torch.Tensor]:
    """The full (unsharded) GPTModel state dict of a HF model's state dict. Every HF tensor is used once;
    a missing or unexpected one is an error naming it."""
    take = _Source(hf, "HF", layout)
    out = {"embedding.word_embeddings.weight": _pad_vocab(take("model.embed_tokens.weight"), padded_vocab)}
    for i in range(layout.num_layers):
        h, m = _hf_layer(i), _mc_layer(i)
        out[m + "input_layernorm.weight"] = take(h + "input_layernorm.weight").clone()
        attn = h + "self_attn."
        out[m + "self_attention.linear_qkv.weight"] = fuse_qkv(
            take(attn + "q_proj.weight"), take(attn + "k_proj.weight"), take(attn + "v_proj.weight"), layout
        )
        if layout.qkv_bias:
            out[m + "self_attention.linear_qkv.bias"] = fuse_qkv(
                take(attn + "q_proj.bias"), take(attn + "k_proj.bias"), take(attn + "v_proj.bias"), layout
            )
        if layout.qk_norm:
            out[m + "self_attention.q_layernorm.weight"] = take(attn + "q_norm.weight").clone()
            out[m + "self_attention.k_layernorm.weight"] = take(attn + "k_norm.weight").clone()
        out[m + "self_attention.linear_proj.weight"] = take(attn + "o_proj.weight").clone()
        out[m + "pre_mlp_layernorm.weight"] = take(h + "post_attention_layernorm.weight").clone()
        if layout.is_moe_layer(i):
            out[m + "mlp.router.weight"] = take(h + "mlp.gate.weight").clone()
            gate_up, down = take(h + "mlp.experts.gate_up_proj"), take(h + "mlp.experts.down_proj")
            for e in range(layout.num_experts):
                out[m + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = gate_up[e].clone()
                out[m + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = down[e].clone()
        else:
            out[m + "mlp.linear_fc1.weight"] = torch.cat(
                [take(h + "mlp.gate_proj.weight"), take(h + "mlp.up_proj.weight")]
            )
            out[m + "mlp.linear_fc2.weight"] = take(h + "mlp.down_proj.weight").clone()
    out["decoder.final_layernorm.weight"] = take("model.norm.weight").clone()
    if not layout.tied_embeddings:
        out["output_layer.weight"] = _pad_vocab(take("lm_head.weight"), padded_vocab)
    elif "lm_head.weight" in hf:
        take("lm_head.weight")  # tied: the same tensor as the embedding
    take.check_all_used("megatron")
    return out


def megatron_to_hf(mc: dict[str, torch.Tensor], layout: ModelLayout) -> dict[str, torch.Tensor]:
    """The HF state dict of a full GPTModel state dict (vocab padding dropped); inverse of hf_to_megatron."""
    take = _Source(mc, "megatron", layout)
    vocab = layout.vocab_size
    hf = {"model.embed_tokens.weight": take("embedding.word_embeddings.weight")[:vocab].clone()}
    for i in range(layout.num_layers):
        h, m = _hf_layer(i), _mc_layer(i)
        hf[h + "input_layernorm.weight"] = take(m + "input_layernorm.weight").clone()
        attn = h + "self_attn."
        q, k, v = split_qkv(take(m + "self_attention.linear_qkv.weight"), layout)
        hf[attn + "q_proj.weight"], hf[attn + "k_proj.weight"], hf[attn + "v_proj.weight"] = q, k, v
        if layout.qkv_bias:
            q, k, v = split_qkv(take(m + "self_attention.linear_qkv.bias"), layout)
            hf[attn + "q_proj.bias"], hf[attn + "k_proj.bias"], hf[attn + "v_proj.bias"] = q, k, v
        if layout.qk_norm:
            hf[attn + "q_norm.weight"] = take(m + "self_attention.q_layernorm.weight").clone()
            hf[attn + "k_norm.weight"] = take(m + "self_attention.k_layernorm.weight").clone()
        hf[attn + "o_proj.weight"] = take(m + "self_attention.linear_proj.weight").clone()
        hf[h + "post_attention_layernorm.weight"] = take(m + "pre_mlp_layernorm.weight").clone()
        if layout.is_moe_layer(i):
            hf[h + "mlp.gate.weight"] = take(m + "mlp.router.weight").clone()
            experts = range(layout.num_experts)
            hf[h + "mlp.experts.gate_up_proj"] = torch.stack(
                [take(m + f"mlp.experts.local_experts.{e}.linear_fc1.weight") for e in experts]
            )
            hf[h + "mlp.experts.down_proj"] = torch.stack(
                [take(m + f"mlp.experts.local_experts.{e}.linear_fc2.weight") for e in experts]
            )
        else:
            gate, up = torch.chunk(take(m + "mlp.linear_fc1.weight"), 2, dim=0)
            hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"] = gate.clone(), up.clone()
            hf[h + "mlp.down_proj.weight"] = take(m + "mlp.linear_fc2.weight").clone()
    hf["model.norm.weight"] = take("decoder.final_layernorm.weight").clone()
    if layout.tied_embeddings:
        hf["lm_head.weight"] = hf["model.embed_tokens.weight"]
    else:
        hf["lm_head.weight"] = take("output_layer.weight")[:vocab].clone()
    take.check_all_used("HF")
    return hf


_EXPERT = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.local_experts\.)(\d+)(\..*)$")


def split_kind(name: str) -> str:
    """How the megatron weight `name` is split across tensor-parallel ranks (experts: expert-TP ranks)."""
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return VOCAB
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        return COLUMN
    if name.endswith("linear_fc1.weight"):
        return GATED
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return ROW
    return REPLICATED


def _split(tensor: torch.Tensor, kind: str, parts: int, rank: int, name: str) -> torch.Tensor:
    if parts == 1 or kind == REPLICATED:
        return tensor.clone()
    if kind == GATED:
        gate, up = torch.chunk(tensor, 2, dim=0)
        if gate.shape[0] % parts:
            raise SftflowError(f"{name}: {gate.shape[0]} MLP rows do not split into {parts} tensor-parallel ranks")
        return torch.cat([torch.chunk(gate, parts)[rank], torch.chunk(up, parts)[rank]]).clone()
    dim = 1 if kind == ROW else 0
    if tensor.shape[dim] % parts:
        raise SftflowError(f"{name}: dimension {dim} ({tensor.shape[dim]}) does not split into {parts} ranks")
    return torch.chunk(tensor, parts, dim=dim)[rank].clone()


def _join(shards: list[torch.Tensor], kind: str) -> torch.Tensor:
    if len(shards) == 1 or kind == REPLICATED:
        return shards[0].clone()
    if kind == GATED:
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(shards, dim=1 if kind == ROW else 0)


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def _check_sizes(layout: ModelLayout, sizes: ParallelDims) -> None:
    if layout.num_kv_heads % sizes.tp:
        raise SftflowError(
            f"num_key_value_heads ({layout.num_kv_heads}) must be divisible by tensor parallel {sizes.tp}"
        )
    if layout.num_layers % sizes.pp:
        raise SftflowError(f"num_hidden_layers ({layout.num_layers}) must be divisible by pipeline parallel {sizes.pp}")
    if layout.num_experts and layout.num_experts % sizes.ep:
        raise SftflowError(f"num_experts ({layout.num_experts}) must be divisible by expert parallel {sizes.ep}")


def shard(mc: dict[str, torch.Tensor], layout: ModelLayout, at: ParallelDims) -> dict[str, torch.Tensor]:
    """The part of a full GPTModel state dict that the rank at `at` holds (its sizes and its coordinates).

    Pipeline stage s holds layers s*L/pp ... (renumbered from 0), the embedding if first and the final norm
    and output layer if last (with tied embeddings and pp > 1 the last stage keeps its own copy of the
    embedding as output_layer.weight, as megatron-core does). Dense weights are split over tp ranks;
    experts over ep ranks (rank r holds experts r*E/ep ... as local_experts.0 ...), each over etp ranks.
    """
    _check_sizes(layout, at)
    per_stage = layout.num_layers // at.pp
    per_ep = layout.num_experts // at.ep if layout.num_experts else 0
    first, last = at.pp_rank == 0, at.pp_rank == at.pp - 1
    out = {}
    for name, tensor in mc.items():
        layer = _LAYER.match(name)
        if layer:
            i = int(layer[1])
            if i // per_stage != at.pp_rank:
                continue
            local = f"decoder.layers.{i - at.pp_rank * per_stage}.{layer[2]}"
            expert = _EXPERT.match(local)
            if expert:
                e = int(expert[2])
                if e // per_ep == at.ep_rank:
                    out[f"{expert[1]}{e - at.ep_rank * per_ep}{expert[3]}"] = _split(
                        tensor, split_kind(name), at.etp, at.etp_rank, name
                    )
            else:
                out[local] = _split(tensor, split_kind(name), at.tp, at.tp_rank, name)
        elif name == "embedding.word_embeddings.weight":
            if first:
                out[name] = _split(tensor, VOCAB, at.tp, at.tp_rank, name)
            if last and at.pp > 1 and layout.tied_embeddings:
                out["output_layer.weight"] = _split(tensor, VOCAB, at.tp, at.tp_rank, name)
        elif last:  # final norm, output layer
            out[name] = _split(tensor, split_kind(name), at.tp, at.tp_rank, name)
    return out


def unshard(
    shards: dict[ParallelDims, dict[str, torch.Tensor]], layout: ModelLayout, sizes: ParallelDims
) -> dict[str, torch.Tensor]:
    """The full state dict from every rank's part (keyed by `sizes.at(...)` the rank's coordinates); inverse
    of shard.

    Dense weights are read from the ep/etp rank 0 copies (the others are replicas), experts from tp rank 0."""
    per_stage = layout.num_layers // sizes.pp
    per_ep = layout.num_experts // sizes.ep if layout.num_experts else 0
    origin = sizes.at(tp_rank=0, pp_rank=0, ep_rank=0, etp_rank=0)
    out: dict[str, torch.Tensor] = {}
    for stage in range(sizes.pp):
        last = stage == sizes.pp - 1
        for name in shards[origin.at(pp_rank=stage)]:
            if last and sizes.pp > 1 and layout.tied_embeddings and name == "output_layer.weight":
                continue  # the last stage's copy of the embedding
            layer = _LAYER.match(name)
            full = f"decoder.layers.{int(layer[1]) + stage * per_stage}.{layer[2]}" if layer else name
            expert = _EXPERT.match(full)
            if expert:
                for r in range(sizes.ep):
                    parts = [shards[origin.at(pp_rank=stage, ep_rank=r, etp_rank=j)][name] for j in range(sizes.etp)]
                    out[f"{expert[1]}{int(expert[2]) + r * per_ep}{expert[3]}"] = _join(parts, split_kind(full))
            else:
                parts = [shards[origin.at(tp_rank=t, pp_rank=stage)][name] for t in range(sizes.tp)]
                out[full] = _join(parts, split_kind(full))
    return out


_HUB_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def fuse_hub_experts(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert MoE weights as stored in hub checkpoints (`mlp.experts.{e}.gate_proj.weight`, ...) as the
    fused tensors of transformers 5's state dicts (`mlp.experts.gate_up_proj` [E, 2I, H] holding
    [gate; up] per expert, `mlp.experts.down_proj` [E, H, I]); other tensors unchanged."""
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    out = {}
    for name, tensor in hf.items():
        m = _HUB_EXPERT.match(name)
        if m:
            experts.setdefault(m[1], {}).setdefault(m[3], {})[int(m[2])] = tensor
        else:
            out[name] = tensor
    for prefix, parts in experts.items():
        count = len(parts.get("down_proj", {}))
        for kind in ("gate_proj", "up_proj", "down_proj"):
            if sorted(parts.get(kind, {})) != list(range(count)):
                raise SftflowError(f"{prefix}: experts 0..{count - 1} do not all have a {kind}.weight")
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([parts["gate_proj"][e], parts["up_proj"][e]]) for e in range(count)]
        )
        out[f"{prefix}.down_proj"] = torch.stack([parts["down_proj"][e] for e in range(count)])
    return out


def local_model_dir(model: str):
    """`model` as a local folder: itself, or its config and safetensors from the Hugging Face hub (cached;
    the hub client reads HF_TOKEN itself)."""
    from pathlib import Path

    if Path(model).is_dir():
        return Path(model)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as err:  # offline, unknown repo, no access: say which key to fix
        raise SftflowError(
            f"config key 'model.base_model': {model!r} is not a local directory and could not be fetched from the "
            f"Hugging Face hub ({type(err).__name__}); give a local HF model folder"
        ) from None


def read_hf_weights(model_dir) -> dict[str, torch.Tensor]:
    """Every tensor of a HF model folder's safetensors (one file or an index of shards), hub MoE experts fused."""
    from pathlib import Path

    from safetensors.torch import load_file

    from sftflow.safetensors_io import read_weight_index

    model_dir = Path(model_dir)
    files = read_weight_index(
        model_dir, "safetensors weights (config key 'model.base_model'; backend megatron imports them)"
    ).files
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(model_dir / name)))
    return fuse_hub_experts(tensors)


# Transformer Engine layers fuse the norm before a linear layer into it: local-spec name -> TE-spec name.
_TE_NORMS = (
    (
        re.compile(r"^(decoder\.layers\.\d+\.)input_layernorm\.weight$"),
        r"\1self_attention.linear_qkv.layer_norm_weight",
    ),
    (re.compile(r"^(decoder\.layers\.\d+\.)pre_mlp_layernorm\.weight$"), r"\1mlp.linear_fc1.layer_norm_weight"),
)


def to_te_names(sd: dict[str, torch.Tensor], local_layer_moe: dict[int, bool]) -> dict[str, torch.Tensor]:
    """A (local-spec) GPTModel state dict with the names of the Transformer Engine spec. MoE layers keep
    their pre-MLP norm (the router reads its output); `local_layer_moe`: this stage's layer index -> MoE."""
    out = {}
    for name, tensor in sd.items():
        new = name
        for pattern, repl in _TE_NORMS:
            m = pattern.match(name)
            if m and not (repl.endswith("linear_fc1.layer_norm_weight") and local_layer_moe[int(name.split(".")[2])]):
                new = pattern.sub(repl, name)
        out[new] = tensor
    return out


def from_te_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of to_te_names."""
    out = {}
    for name, tensor in sd.items():
        if name.endswith("self_attention.linear_qkv.layer_norm_weight"):
            name = name.replace("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight")
        elif name.endswith("mlp.linear_fc1.layer_norm_weight"):
            name = name.replace("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")
        out[name] = tensor
    return out
