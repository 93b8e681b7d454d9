"""A Hugging Face causal-LM config (config.json as a dict) in megatron-core's terms.

`model_layout` reads the shape of the model (the families megatron-core's GPTModel can hold exactly:
llama, qwen2, qwen3 dense and qwen3_moe); `transformer_config_kwargs` and `gpt_model_kwargs` give the
arguments of `megatron.core.transformer.TransformerConfig` and `megatron.core.models.gpt.GPTModel`.
Anything the translation cannot represent exactly (another model type, an unsupported RoPE scaling,
sliding-window attention, biased MLPs) is an error naming the config.json field, never an approximation.
Importing this module does not import megatron-core or torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from sftflow.errors import SftflowError

FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe")
# The llama3 RoPE scaling megatron-core's GPTModel implements (rope_scaling=True): only the factor is free.
LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class ModelLayout:
    """Everything the weight mapping and megatron-core need to know about the model's shape."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    tied_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    norm_eps: float
    rope_theta: float
    rope_scaling_factor: float | None  # llama3-style scaling, None = plain RoPE
    max_position_embeddings: int
    num_experts: int = 0  # 0: dense
    moe_top_k: int = 0
    moe_ffn_hidden_size: int = 0
    moe_norm_topk_prob: bool = False
    # the router load-balancing loss's coefficient (0: none); the engine sets it from training.moe_aux_loss_coeff
    moe_aux_loss_coef: float = 0.0
    moe_layers: tuple[bool, ...] = ()  # per layer: MoE (True) or dense MLP (False)

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def is_moe_layer(self, layer: int) -> bool:
        return bool(self.moe_layers) and self.moe_layers[layer]


def _rope(cfg: dict, where: str) -> tuple[float, float | None]:
    """(theta, llama3 scaling factor or None) from transformers 5's rope_parameters or the older keys."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise SftflowError(
            f"{where}: RoPE type {rope_type!r} has no exact megatron-core equivalent here (supported: default, llama3)"
        )
    source = {**scaling, **params}
    for key, want in LLAMA3_ROPE_FIXED.items():
        if key in source and float(source[key]) != float(want):
            raise SftflowError(
                f"{where}: llama3 RoPE scaling with {key}={source[key]}; megatron-core's GPTModel fixes it at {want}"
            )
    return float(theta), float(source.get("factor", 8.0))


def num_experts(cfg: dict) -> int:
    """The number of experts of a HF config dict (config.json says num_experts, transformers 5's to_dict()
    num_local_experts); 0 for a dense model."""
    return int(cfg.get("num_experts", cfg.get("num_local_experts")) or 0)


def model_layout(cfg: dict, where: str = "config.json") -> ModelLayout:
    """The layout of a HF config dict; `where` names it in errors (e.g. the model directory's config.json)."""
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise SftflowError(
            f"{where}: model_type {model_type!r} is not supported by backend megatron "
            f"(supported: {', '.join(FAMILIES)}); use backend: fsdp, which trains any transformers model"
        )
    if cfg.get("use_sliding_window"):
        raise SftflowError(f"{where}: use_sliding_window is true; megatron-core's GPTModel here has no sliding window")
    if cfg.get("mlp_bias"):
        raise SftflowError(f"{where}: mlp_bias is true; the megatron mapping supports bias-free MLPs only")
    if cfg.get("hidden_act", "silu") != "silu":
        raise SftflowError(f"{where}: hidden_act {cfg.get('hidden_act')!r}; only silu (SwiGLU) is mapped")
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    if heads % kv:
        raise SftflowError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    theta, factor = _rope(cfg, where)
    # qwen2 always has q/k/v biases (its config has no switch); llama and qwen3 follow attention_bias.
    qkv_bias = model_type == "qwen2" or bool(cfg.get("attention_bias"))
    layers = int(cfg["num_hidden_layers"])
    moe = {}
    if model_type == "qwen3_moe":
        step = int(cfg.get("decoder_sparse_step") or 1)
        dense_only = set(cfg.get("mlp_only_layers") or [])
        experts = num_experts(cfg)
        if not experts:
            raise SftflowError(f"{where}: a qwen3_moe config without num_experts")
        moe = {
            "num_experts": experts,
            "moe_top_k": int(cfg["num_experts_per_tok"]),
            "moe_ffn_hidden_size": int(cfg["moe_intermediate_size"]),
            "moe_norm_topk_prob": bool(cfg.get("norm_topk_prob")),
            "moe_layers": tuple(i not in dense_only and experts > 0 and (i + 1) % step == 0 for i in range(layers)),
        }
    return ModelLayout(
        model_type=model_type,
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        ffn_hidden_size=int(cfg["intermediate_size"]),
        vocab_size=int(cfg["vocab_size"]),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling_factor=factor,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        **moe,
    )


def transformer_config_kwargs(layout: ModelLayout) -> dict:
    """Keyword arguments of megatron-core's TransformerConfig for this model (parallelism is added by the caller)."""
    import torch.nn.functional as F

    kwargs = {
        "num_layers": layout.num_layers,
        "hidden_size": layout.hidden_size,
        "num_attention_heads": layout.num_heads,
        "num_query_groups": layout.num_kv_heads,
        "kv_channels": layout.head_dim,
        "ffn_hidden_size": layout.ffn_hidden_size,
        "normalization": "RMSNorm",
        "layernorm_epsilon": layout.norm_eps,
        "gated_linear_unit": True,
        "activation_func": F.silu,
        "add_bias_linear": False,
        "add_qkv_bias": layout.qkv_bias,
        "qk_layernorm": layout.qk_norm,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "bias_dropout_fusion": False,
        "apply_rope_fusion": False,
        "masked_softmax_fusion": False,
        "persist_layer_norm": False,
    }
    if layout.num_experts:
        kwargs.update(
            num_moe_experts=layout.num_experts,
            moe_router_topk=layout.moe_top_k,
            moe_ffn_hidden_size=layout.moe_ffn_hidden_size,
            # softmax over all experts, then top-k; renormalised only when the HF model does
            moe_router_pre_softmax=not layout.moe_norm_topk_prob,
            moe_router_load_balancing_type="aux_loss" if layout.moe_aux_loss_coef else "none",
            moe_aux_loss_coeff=layout.moe_aux_loss_coef,
            moe_layer_freq=[1 if m else 0 for m in layout.moe_layers],
        )
    return kwargs


def gpt_model_kwargs(layout: ModelLayout, padded_vocab_size: int, max_sequence_length: int) -> dict:
    """Keyword arguments of GPTModel besides config and layer spec."""
    kwargs = {
        "vocab_size": padded_vocab_size,
        "max_sequence_length": max_sequence_length,
        "position_embedding_type": "rope",
        "rotary_base": int(layout.rope_theta) if float(layout.rope_theta).is_integer() else layout.rope_theta,
        "share_embeddings_and_output_weights": layout.tied_embeddings,
    }
    if layout.rope_scaling_factor is not None:
        kwargs.update(rope_scaling=True, rope_scaling_factor=layout.rope_scaling_factor)
    return kwargs


def padded_vocab_size(vocab_size: int, tensor_parallel: int, divisible_by: int = 128) -> int:
    """The vocabulary rounded up to a multiple of divisible_by x TP, as Megatron-LM pads it (rows are zero)."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple
