"""GPU check of the HF -> megatron-core import (issue 6): megatron-core's GPTModel, holding the mapped weights
of a tiny HF model, gives the HF model's logits (run by tests/gpu/run.sh; skipped without CUDA).

The CPU tests (tests/megatron_backend/) prove the mapping round-trips bit-exactly and that megatron-core accepts
every rank's shard; only a forward pass shows the layout means the same computation (fused QKV per group,
[gate; up], RoPE and its llama3 scaling, QK norms, MoE routing), and megatron-core's forward needs CUDA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.megatron_backend.conftest import imported_logits_match

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("family", ["llama", "llama3-tied", "qwen2", "qwen3", "qwen3_moe"])
def test_imported_megatron_model_gives_the_hf_logits(family, tmp_path: Path):
    imported_logits_match(family, tmp_path, cpu=False)
