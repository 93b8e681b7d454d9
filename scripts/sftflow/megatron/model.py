"""megatron-core's GPTModel for a HF model layout (megatron-core's local layer spec, or
Transformer Engine's). Needs megatron-core's parallel state to be initialised (`parallel_state.initialize_model_parallel`)."""

from __future__ import annotations

from dataclasses import dataclass

from sftflow.megatron.hf_config import ModelLayout, gpt_model_kwargs, transformer_config_kwargs


@dataclass(frozen=True)
class PipelineStage:
    """Which ends of the model this rank's pipeline stage holds: the embedding (`first`) and the output
    layer (`last`); without pipeline parallelism the one stage holds both."""

    first: bool = True
    last: bool = True


def build_gpt_model(
    layout: ModelLayout,
    padded_vocab: int,
    max_sequence_length: int,
    stage: PipelineStage = PipelineStage(),
    cpu_init: bool = False,
    transformer_engine: bool = False,
    **parallel,
):
    """GPTModel with `parallel` (tensor_model_parallel_size, expert_model_parallel_size, ...) in its config;
    `stage`: the part of the model this pipeline stage builds;
    `transformer_engine`: TE layers (needs transformer_engine; norms fused into the following linear layer,
    see weights.to_te_names) instead of megatron-core's local ones."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(**transformer_config_kwargs(layout), use_cpu_initialization=cpu_init, **parallel)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=transformer_engine, normalization="RMSNorm")
    return GPTModel(
        config,
        spec,
        pre_process=stage.first,
        post_process=stage.last,
        **gpt_model_kwargs(layout, padded_vocab, max_sequence_length),
    )
