"""Make the offline demo's inputs (tokenizer, base model, generated data); called by rules/demo.smk."""

import logging
from pathlib import Path

from sftflow import stage_config
from sftflow.logs import setup_logging

LOG = logging.getLogger("sftflow.demo")


def run(smk) -> None:
    setup_logging(smk.log[0])
    demo = stage_config.read(smk.input.config)  # the demo section (rules/demo.smk)
    what = smk.params.what
    if what == "tokenizer":
        from sftflow.demo.data import corpus
        from sftflow.demo.model import build_tokenizer

        tok = build_tokenizer(corpus(demo["seed"]), demo["vocab_size"], smk.output.tokenizer)
        LOG.info("trained a BPE tokenizer with %d tokens -> %s", len(tok), smk.output.tokenizer)
    elif what == "model":
        from sftflow.demo.model import build_model

        sizes = {
            k: demo[k]
            for k in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "intermediate_size",
                "max_position_embeddings",
            )
        }
        build_model(smk.input.tokenizer, smk.output.model, demo["seed"], **sizes)
        LOG.info("built a random Llama model %s -> %s", sizes, smk.output.model)
    elif what == "data":
        from sftflow.demo.data import DemoDataSpec, write_demo_data

        counts = write_demo_data(
            Path(smk.output.generations[0]).parent, smk.output.benchmark, DemoDataSpec.from_section(demo)
        )
        LOG.info("wrote demo generations and benchmark: %s", counts)
    else:
        raise ValueError(what)


run(snakemake)  # noqa: F821
