"""The packed-attention kernels give the per-segment SDPA loop's outputs and gradients, and `auto` picks the right one."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from sftflow.errors import SftflowError
from sftflow.packing import collate_bins
from sftflow.train import attention as A
from sftflow.train.loss import token_loss_sum
from sftflow.train.model import model_inputs
from tests.train.conftest import PAD_ID, random_sequences, tiny_llama_config

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    """torch refuses flex_attention's backward on CPU (a guard in its Python entry point; the autograd formula
    behind it is device-independent). Lifting the guard lets the gradients through our reshapes, document mask,
    GQA and scaling be compared on CPU; the compiled CUDA kernels are compared on the GPU (tests/gpu)."""
    import torch.nn.attention.flex_attention as flex_module

    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)


def _qkv(batch: int, heads: int, kv_heads: int, length: int, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, length, dim), (batch, kv_heads, length, dim), (batch, kv_heads, length, dim)]
    return [torch.randn(s, generator=g).requires_grad_() for s in shapes]


def _cu(segments: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(segments).cumsum(0).tolist()], dtype=torch.int32)


def _run(kernel: str, q, k, v, cu, scaling: float, **kw):
    out, _ = A.varlen_attention(
        None, q, k, v, None, scaling=scaling, cu_seq_lens_q=cu, max_length_q=int(cu.diff().max()),
        sftflow_attention=kernel, **kw,
    )  # fmt: skip
    weights = torch.linspace(-1, 1, out.numel()).view(out.shape)  # a loss whose gradient differs per element
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    return out.detach(), grads


CASES = {
    # name: (batch, heads, kv_heads, length, segments over the flattened batch)
    "uneven, GQA, one-token segments": (2, 4, 2, 48, [1, 30, 17, 1, 1, 46]),
    "segments crossing 128-token blocks": (1, 4, 1, 300, [129, 1, 100, 70]),
    "one row, no GQA": (1, 2, 2, 40, [5, 35]),
}


@pytest.mark.parametrize("case", CASES)
def test_flex_gives_the_per_segment_loop_outputs_and_gradients(case, flex_backward_on_cpu):
    batch, heads, kv_heads, length, segments = CASES[case]
    q, k, v = _qkv(batch, heads, kv_heads, length)
    cu, scaling = _cu(segments), 0.37  # not the default 1/sqrt(16): the scaling must reach the kernel
    ref_out, ref_grads = _run("sdpa_loop", q, k, v, cu, scaling)
    out, grads = _run("flex", q, k, v, cu, scaling)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for name, g, ref in zip("qkv", grads, ref_grads, strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-5, msg=f"d{name}")


def test_the_per_segment_loop_is_attention_with_a_block_diagonal_causal_mask():
    """The reference itself, against one masked SDPA over the flattened batch."""
    q, k, v = _qkv(2, 4, 2, 48)
    cu = _cu([1, 30, 17, 1, 1, 46])
    out, _ = _run("sdpa_loop", q, k, v, cu, 0.37)
    doc = torch.repeat_interleave(torch.arange(cu.numel() - 1), cu.diff())
    pos = torch.arange(doc.numel())
    mask = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])

    def flat(x):
        return x.detach().transpose(0, 1).reshape(1, x.shape[1], -1, x.shape[-1])

    ref = F.scaled_dot_product_attention(flat(q), flat(k), flat(v), attn_mask=mask, scale=0.37, enable_gqa=True)
    torch.testing.assert_close(out, ref[0].view(4, 2, 48, 16).permute(1, 2, 0, 3), rtol=1e-5, atol=1e-5)


def _fake_varlen(with_gqa: bool):
    """A stand-in for torch's varlen_attn on CPU (its kernel is CUDA-only), with the keywords of torch 2.11
    (`with_gqa=False`) or of >= 2.12: attention per segment from the [tokens, heads, dim] layout."""

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), **kw):
        assert window_size == (-1, 0), "causal is window (-1, 0)"
        assert torch.equal(cu_seq_q, cu_seq_k) and cu_seq_q.dtype == torch.int32
        if key.shape[1] != query.shape[1]:
            assert kw.pop("enable_gqa", False), "grouped-query keys need enable_gqa"
        assert not kw
        bounds = cu_seq_q.tolist()
        outs = [
            F.scaled_dot_product_attention(
                query[s:e].transpose(0, 1), key[s:e].transpose(0, 1), value[s:e].transpose(0, 1),
                is_causal=True, scale=scale, enable_gqa=True,
            ).transpose(0, 1)
            for s, e in zip(bounds[:-1], bounds[1:], strict=True)
        ]  # fmt: skip
        return torch.cat(outs)

    if not with_gqa:
        return varlen_attn

    def varlen_attn_gqa(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                        window_size=(-1, -1), enable_gqa=False):  # fmt: skip
        return varlen_attn(
            query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size,
            enable_gqa=enable_gqa,
        )  # fmt: skip

    return varlen_attn_gqa


@pytest.mark.parametrize("with_gqa", [False, True], ids=["torch 2.11 keywords", "enable_gqa (torch >= 2.12)"])
def test_torch_varlen_path_lays_out_tokens_and_heads_like_the_loop(monkeypatch, with_gqa):
    fake = _fake_varlen(with_gqa)
    monkeypatch.setattr(A, "torch_varlen_attn", lambda: fake)
    monkeypatch.setattr(A, "_varlen_has_gqa", lambda: "enable_gqa" in inspect.signature(fake).parameters)
    q, k, v = _qkv(2, 4, 2, 48)
    cu = _cu([1, 30, 17, 1, 1, 46])
    ref_out, ref_grads = _run("sdpa_loop", q, k, v, cu, 0.37)
    out, grads = _run("varlen", q, k, v, cu, 0.37)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for g, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-5)


def test_flash_path_passes_flash_attn_its_layout_and_arguments(monkeypatch):
    fake = _fake_varlen(with_gqa=True)

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
        assert causal and dropout_p == 0.0 and max_q == max_k == 46
        return fake(q, k, v, cu_q, cu_k, max_q, max_k, scale=softmax_scale, window_size=(-1, 0), enable_gqa=True)

    monkeypatch.setattr(A, "flash_attn_varlen_func", flash_attn_varlen_func)
    q, k, v = _qkv(2, 4, 2, 48)
    cu = _cu([1, 30, 17, 1, 1, 46])
    ref_out, _ = _run("sdpa_loop", q, k, v, cu, 0.37)
    out, _ = _run("flash", q, k, v, cu, 0.37)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)


# --- through the model --------------------------------------------------------------------------------------


def _tiny_llama():
    from transformers import AutoModelForCausalLM

    A.register_attention()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config(), attn_implementation=A.VARLEN_ATTENTION)


def _packed_batch():
    """Two rows of 64 tokens, each with uneven sequences (one of a single token) and padding."""
    rows = []
    for seed, lengths in ((1, [1, 20, 9]), (2, [30, 1, 25])):
        seqs = random_sequences(len(lengths), seed=seed, min_len=30, max_len=30)
        seqs = [(ids[:n], mask[:n] | (n == 1)) for (ids, mask), n in zip(seqs, lengths, strict=True)]
        rows.append(
            {
                "input_ids": torch.cat([torch.as_tensor(ids) for ids, _ in seqs]),
                "loss_mask": torch.cat([torch.as_tensor(mask) for _, mask in seqs]),
                "seq_lens": lengths,
            }
        )
    return collate_bins(rows, 64, PAD_ID)


def _loss_and_grads(model, batch, kernel):
    model.zero_grad()
    logits = model(**model_inputs(batch, CPU, attention=kernel)).logits
    loss = token_loss_sum(logits, batch["targets"]) / batch["num_loss_tokens"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_a_tiny_llama_trains_the_same_on_a_packed_batch_with_flex_as_with_the_loop(flex_backward_on_cpu):
    model, batch = _tiny_llama(), _packed_batch()
    assert 1 in batch["cu_seqlens"].diff().tolist()
    ref_loss, ref_grads = _loss_and_grads(model, batch, "sdpa_loop")
    A._document_block_mask.cache_clear()
    loss, grads = _loss_and_grads(model, batch, "flex")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)
    # the block mask is built once per batch, not once per layer
    info = A._document_block_mask.cache_info()
    assert (info.misses, info.hits) == (1, tiny_llama_config().num_hidden_layers - 1)


# --- choosing the kernel --------------------------------------------------------------------------------------


def test_auto_takes_the_per_segment_loop_on_cpu():
    assert A.auto_kernel(CPU, torch.float32) == "sdpa_loop"
    assert A.auto_kernel(CPU, torch.bfloat16) == "sdpa_loop"


def test_auto_on_a_gpu_prefers_flash_then_torch_varlen_then_flex(monkeypatch):
    monkeypatch.setattr(A, "flash_attn_varlen_func", lambda *a, **k: None)
    monkeypatch.setattr(A, "torch_varlen_attn", lambda: _fake_varlen(True))
    assert A.auto_kernel(CUDA, torch.bfloat16) == "flash"
    assert A.auto_kernel(CUDA, torch.float32) == "flex"  # both varlen kernels need bf16/fp16
    monkeypatch.setattr(A, "flash_attn_varlen_func", None)
    assert A.auto_kernel(CUDA, torch.bfloat16) == "varlen"
    monkeypatch.setattr(A, "torch_varlen_attn", lambda: None)
    assert A.auto_kernel(CUDA, torch.bfloat16) == "flex"
    assert A.auto_kernel(CUDA, torch.bfloat16, dropout=0.1) == "sdpa_loop"  # only flash and the loop drop out


def test_torch_varlen_is_found_in_this_torch_only_with_the_keywords_used():
    fn = A.torch_varlen_attn()
    if fn is not None:
        assert {"scale", "window_size"} <= inspect.signature(fn).parameters.keys()


@pytest.mark.parametrize(
    ("requested", "device", "dtype", "message"),
    [
        ("flash", CPU, torch.float32, "needs a CUDA GPU"),
        ("varlen", CPU, torch.bfloat16, "needs a CUDA GPU"),
        ("varlen", CUDA, torch.float32, "training.precision: bf16"),
        ("flex", CPU, torch.float32, "no flex_attention backward on cpu"),
    ],
)
def test_a_kernel_that_cannot_run_here_is_refused_naming_the_key(requested, device, dtype, message):
    with pytest.raises(SftflowError, match=rf"'training.attention' is '{requested}'.*{message}"):
        A.resolve_kernel(requested, device, dtype)


def test_flash_without_the_package_is_refused(monkeypatch):
    monkeypatch.setattr(A, "flash_attn_varlen_func", None)
    with pytest.raises(SftflowError, match="flash_attn package is not installed"):
        A.resolve_kernel("flash", CUDA, torch.bfloat16)


def test_attention_dropout_needs_a_kernel_that_drops_out():
    with pytest.raises(SftflowError, match="attention_dropout is 0.1"):
        A.resolve_kernel("flex", CUDA, torch.bfloat16, dropout=0.1)
    assert A.resolve_kernel("sdpa_loop", CPU, torch.float32, dropout=0.1) == "sdpa_loop"


def test_the_trainer_refuses_an_impossible_kernel_before_training(tmp_path, world1, packed, tiny_model):
    from tests.train.conftest import run_inprocess

    with pytest.raises(SftflowError, match="'training.attention' is 'flash'"):
        run_inprocess(world1, tmp_path / "ckpt", packed, tiny_model, attention="flash", max_num_steps=1)
