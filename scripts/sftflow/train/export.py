"""Export a training checkpoint to a Hugging Face model folder, on CPU, without a process group.

The backend that wrote the checkpoint (its meta.json) reads it as HF weights (`Engine.hf_weights`, see
sftflow.train.engine): names and shapes first, then the tensors a few at a time, so the export plans the
output shards before reading anything and writes one shard at a time. The fsdp backend's reader loads only
the asked-for tensors from DCP (memory stays around one output shard); the megatron backend's unshards the
whole model once (one copy in host memory). Output (written under a temporary name, renamed when
complete), the same for both backends:

    model-00001-of-0000N.safetensors ...   weights in the base model's dtype (or --dtype)
    model.safetensors.index.json           weight map
    config.json, generation_config.json    from the base model (use_cache back on for inference)
    tokenizer files                        with the chat template (model.chat_template overrides it)
    sftflow_export.json                    which checkpoint and step this is
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from sftflow.errors import SftflowError
from sftflow.io import atomic_path, write_json
from sftflow.train.checkpoint import complete_checkpoints, read_meta
from sftflow.train.engine import checkpoint_backend, engine_class

LOG = logging.getLogger("sftflow.export")

DEFAULT_SHARD_BYTES = 2 * 1024**3
READ_BATCH_BYTES = 256 * 1024**2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Group names (in order) into shards of at most max_shard_bytes (a bigger tensor gets its own shard)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes.items():
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


_FUSED_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def hub_expert_layout(shapes: dict, read):
    """MoE experts as hub checkpoints store them, one tensor per expert and projection
    (`mlp.experts.{e}.gate_proj.weight`, `up_proj`, `down_proj`), instead of transformers 5's fused in-memory
    tensors (`mlp.experts.gate_up_proj` [E, 2I, H] = [gate; up] per expert, `down_proj` [E, H, I]): what
    transformers' save_pretrained writes and vLLM / SGLang load. Returns the output shapes and a reader of
    output names; other tensors pass through."""
    plan: dict[str, tuple[str, int | None, slice | None]] = {}
    out_shapes = {}
    for name, (shape, dtype) in shapes.items():
        m = _FUSED_EXPERTS.match(name)
        if not m:
            plan[name], out_shapes[name] = (name, None, None), (shape, dtype)
            continue
        experts, rows, cols = shape
        for e in range(experts):
            if m[2] == "down_proj":
                parts = {"down_proj": slice(None)}
            else:
                parts = {"gate_proj": slice(0, rows // 2), "up_proj": slice(rows // 2, rows)}
            for proj, sl in parts.items():
                out = f"{m[1]}.{e}.{proj}.weight"
                plan[out] = (name, e, sl)
                out_shapes[out] = ((len(range(rows)[sl]), cols), dtype)
    if len(plan) == len(shapes):
        return shapes, read

    def read_split(names: list[str]) -> dict[str, torch.Tensor]:
        sources = read(sorted({plan[n][0] for n in names}))
        return {
            n: sources[src] if e is None else sources[src][e][sl].clone()
            for n, (src, e, sl) in ((n, plan[n]) for n in names)
        }

    return out_shapes, read_split


def resolve_checkpoint(checkpoint_dir: str | os.PathLike, step: int | None) -> Path:
    """The committed checkpoint of `step` (latest when None); errors list what exists."""
    found = complete_checkpoints(checkpoint_dir)
    if not found:
        raise SftflowError(f"{checkpoint_dir}: no complete checkpoint to export; run the training jobs first")
    if step is None:
        return found[-1].path
    for info in found:
        if info.step == step:
            return info.path
    saved = ", ".join(str(i.step) for i in found)
    raise SftflowError(
        f"step {step} was never saved in {checkpoint_dir} (asked for by training.conversion_step, "
        f"training.export_steps, training.average_steps or eval.models; checkpoints are written every "
        f"training.save_period steps and at the end of each job, and the run may have stopped early at "
        f"training.max_num_epochs: a check that planning makes only once the packed data exists; saved steps: {saved})"
    )


@dataclass(frozen=True)
class ExportTokenizer:
    """The tokenizer saved with an exported model: `name` (a local folder or hub name; default: the base
    model's) and `chat_template`, a Jinja file replacing its template."""

    name: str | None = None
    chat_template: str | None = None


def export_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    base_model: str,
    tokenizer: ExportTokenizer | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write the HF folder for one checkpoint directory (step_XXXXXXXX); returns the output path."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    checkpoint = Path(checkpoint)
    hf_config = AutoConfig.from_pretrained(base_model)
    backend = checkpoint_backend(read_meta(checkpoint))
    shapes, read = engine_class(backend).hf_weights(checkpoint, base_model)
    if not shapes:
        raise SftflowError(f"{checkpoint}: no model tensors in this checkpoint")
    shapes, read = hub_expert_layout(shapes, read)
    if bool(getattr(hf_config, "tie_word_embeddings", False)):
        # The input embedding is the output projection; HF stores it once and ties it on load.
        shapes.pop("lm_head.weight", None)
    out_dtype = DTYPES[dtype] if dtype else (getattr(hf_config, "dtype", None) or torch.float32)
    if isinstance(out_dtype, str):
        out_dtype = DTYPES.get(out_dtype, torch.float32)
    names = sorted(shapes)
    sizes = {n: torch.Size(shapes[n][0]).numel() * out_dtype.itemsize for n in names}
    shards = plan_shards(sizes, max_shard_bytes)

    tokenizer = tokenizer or ExportTokenizer()
    tok = AutoTokenizer.from_pretrained(tokenizer.name or base_model)
    if tokenizer.chat_template:
        tok.chat_template = Path(tokenizer.chat_template).read_text(encoding="utf-8")
    if not getattr(tok, "chat_template", None):
        LOG.warning(
            "tokenizer %s has no chat template; the exported model will have none", tokenizer.name or base_model
        )

    with atomic_path(output_dir) as tmp:
        tmp.mkdir(parents=True)
        _write_weights(tmp, shards, sizes, read, out_dtype)
        hf_config.use_cache = True
        hf_config.dtype = out_dtype
        if hasattr(hf_config, "_attn_implementation_internal"):
            hf_config._attn_implementation_internal = None
        hf_config.save_pretrained(tmp)
        try:
            generation = GenerationConfig.from_pretrained(base_model)
        except OSError:
            generation = GenerationConfig.from_model_config(hf_config)
        generation.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        meta = read_meta(checkpoint)
        (tmp / "sftflow_export.json").write_text(
            json.dumps(
                {
                    "checkpoint": str(checkpoint),
                    "step": meta.get("step"),
                    "base_model": base_model,
                    "dtype": str(out_dtype),
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
    LOG.info("exported %s -> %s", checkpoint, output_dir)
    return Path(output_dir)


def _write_weights(tmp: Path, shards: list[list[str]], sizes: dict[str, int], read, out_dtype: torch.dtype) -> None:
    """The safetensors shards and their index; each shard's tensors are read READ_BATCH_BYTES at a time."""
    weight_map: dict[str, str] = {}
    total_bytes = 0
    for k, shard_names in enumerate(shards, start=1):
        filename = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        shard: dict[str, torch.Tensor] = {}
        batch: list[str] = []
        batch_bytes = 0
        for name in [*shard_names, None]:
            if name is not None:
                batch.append(name)
                batch_bytes += sizes[name]
            if batch and (name is None or batch_bytes >= READ_BATCH_BYTES):
                for n, t in read(batch).items():
                    shard[n] = t.to(out_dtype).contiguous()
                batch, batch_bytes = [], 0
        save_file(shard, str(tmp / filename), metadata={"format": "pt"})
        for n in shard_names:
            weight_map[n] = filename
        total_bytes += sum(sizes[n] for n in shard_names)
        LOG.info("wrote %s (%d tensors)", filename, len(shard_names))
        del shard
    write_json(
        tmp / "model.safetensors.index.json", {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    )


def check_training_complete(done_file: str | os.PathLike) -> dict:
    """The last job's done record, or SftflowError saying how much is left and what to raise."""
    path = Path(done_file)
    if not path.is_file():
        raise SftflowError(f"{path}: the last training job's done-file is missing; run the training jobs first")
    record = json.loads(path.read_text(encoding="utf-8"))
    if not record.get("complete"):
        remaining = record.get("remaining_steps", record["total_steps"] - record["end_step"])
        raise SftflowError(
            f"training is incomplete: step {record['end_step']} of {record['total_steps']} after "
            f"{record.get('num_jobs', '?')} jobs, {remaining} steps remain. Raise config key "
            "'training.num_training_jobs' (more chained jobs) or 'training.time_limit' (longer jobs) and rerun; "
            "or lower 'training.max_num_steps' to stop here"
        )
    return record
