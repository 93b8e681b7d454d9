"""GPU check of the HF -> megatron-core import (issue 6): megatron-core's GPTModel, holding the mapped weights
of a tiny HF model, gives the HF model's logits (run by tests/gpu/run.sh; skipped without CUDA).

The CPU tests (tests/megatron_backend/) prove the mapping round-trips bit-exactly and that megatron-core accepts
every rank's shard; only a forward pass shows the layout means the same computation (fused QKV per group,
[gate; up], RoPE and its llama3 scaling, QK norms, MoE routing), and megatron-core's forward needs CUDA.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.megatron_backend.test_mapping import HERE as MEGATRON_TESTS
from tests.megatron_backend.test_mapping import hf_model, save_hf

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("family", ["llama", "llama3-tied", "qwen2", "qwen3", "qwen3_moe"])
def test_imported_megatron_model_gives_the_hf_logits(family, tmp_path: Path):
    model = hf_model(family).eval()
    model_dir = save_hf(model, tmp_path / "hf")
    out = tmp_path / "out"
    out.mkdir()
    tokens = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, out / "tokens.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           str(MEGATRON_TESTS / "megatron_ranks.py"), str(model_dir), str(out), "1", "1", "1", "1", "--forward"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    megatron_logits = torch.load(out / "logits.pt", weights_only=True)
    with torch.no_grad():
        hf_logits = model.cuda()(input_ids=tokens.cuda()).logits.float().cpu()
    assert megatron_logits.shape == hf_logits.shape
    # fp32 on both sides: only the order of floating-point operations differs
    torch.testing.assert_close(megatron_logits, hf_logits, rtol=1e-4, atol=1e-4)
