"""Average several exported HF model directories (saved training steps) into one, streaming, on CPU.

The NeMo-Skills `--average_steps=100,200,300` equivalent: the element-wise mean of every weight over
the models `results/hf_models/step_N/`. Memory stays bounded by a few fixed-size chunks, not by the
number or size of the models: the safetensors headers are parsed here, every tensor is read in chunks
of at most CHUNK_ELEMENTS elements with plain file reads (no mmap, so input pages never count toward
the process's RSS), summed in float32 (float64 for float64 weights), divided, cast back to the weights'
dtype and appended to a safetensors file whose header was written first. Output (written under a
temporary name, renamed when complete):

    model.safetensors, or the first model's shards   same file names and tensor -> shard grouping
    model.safetensors.index.json                     when sharded: weight map and metadata.total_size
    config.json, tokenizer files, chat template ...  copied from the LAST model (the most trained one)
    sftflow_average.json                             the averaged steps and source dirs, tensors, dtypes

torch is imported inside the functions that need it, so `check_average_steps` can run at DAG-build time.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import struct
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path

from sftflow.errors import SftflowError
from sftflow.io import atomic_path
from sftflow.logs import setup_logging

LOG = logging.getLogger("sftflow.averaging")

CONFIG_KEY = "training.average_steps"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
EXPORT_RECORD = "sftflow_export.json"
AVERAGE_RECORD = "sftflow_average.json"
CHUNK_ELEMENTS = 4 * 1024**2  # 16 MiB of float32 sum: a few times that is the working memory
MAX_HEADER_BYTES = 100 * 1024**2  # the safetensors library's own limit

# safetensors dtype code -> (torch dtype name, bytes per element); these can be averaged
FLOAT_DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
NON_FLOAT_DTYPES = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie in a safetensors file."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    begin: int  # absolute file offset of the first byte
    nbytes: int

    @property
    def numel(self) -> int:
        return prod(self.shape)


@dataclass
class ModelWeights:
    """The weights of one HF model directory: every tensor, and how they are grouped into files."""

    model_dir: Path
    tensors: dict[str, TensorInfo]
    shards: dict[str, list[str]]  # file name -> tensor names, in file order
    file_metadata: dict[str, dict]  # file name -> the header's __metadata__
    index_metadata: dict | None  # model.safetensors.index.json "metadata"; None for a single file


def read_safetensors_header(path: Path) -> tuple[list[TensorInfo], dict]:
    """(tensors in data order, __metadata__) of a safetensors file, from its header alone."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise SftflowError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise SftflowError(f"{path}: not a safetensors file (header length {header_len}, file size {size})")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, ValueError) as err:
            raise SftflowError(f"{path}: not a safetensors file (header is not JSON: {err})") from None
    if not isinstance(header, dict):
        raise SftflowError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SftflowError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}") from None
        itemsize = FLOAT_DTYPES[dtype][1] if dtype in FLOAT_DTYPES else None
        if not 0 <= begin <= end <= size - data_start or (itemsize and end - begin != prod(shape) * itemsize):
            raise SftflowError(
                f"{path}: tensor {name!r} ({dtype}, shape {list(shape)}) has data offsets [{begin}, {end}] "
                f"that do not fit its shape or the file ({size} bytes); the file is truncated or corrupt"
            )
        tensors.append(TensorInfo(name, dtype, shape, path, data_start + begin, end - begin))
    tensors.sort(key=lambda t: t.begin)
    return tensors, metadata


def read_model_weights(model_dir: Path) -> ModelWeights:
    """Parse the weight files of an HF model directory: model.safetensors, or the shards of its index."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise SftflowError(f"{model_dir}: model directory not found")
    if (model_dir / INDEX_FILE).is_file():
        try:
            index = json.loads((model_dir / INDEX_FILE).read_text(encoding="utf-8"))
            weight_map = dict(index["weight_map"])
        except (ValueError, KeyError, TypeError) as err:
            raise SftflowError(f"{model_dir / INDEX_FILE}: not a safetensors index ({err!r})") from None
        index_metadata = dict(index.get("metadata") or {})
        files = list(dict.fromkeys(sorted(weight_map.values())))
    elif (model_dir / SINGLE_FILE).is_file():
        weight_map, index_metadata, files = None, None, [SINGLE_FILE]
    else:
        raise SftflowError(
            f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}; expected an HF model directory with safetensors "
            "weights (as written by convert_step)"
        )
    tensors: dict[str, TensorInfo] = {}
    shards: dict[str, list[str]] = {}
    file_metadata: dict[str, dict] = {}
    for filename in files:
        path = model_dir / filename
        if not path.is_file():
            raise SftflowError(f"{model_dir / INDEX_FILE}: lists weight file {filename}, which is missing")
        infos, file_metadata[filename] = read_safetensors_header(path)
        shards[filename] = [t.name for t in infos]
        for info in infos:
            if info.name in tensors:
                raise SftflowError(f"{model_dir}: tensor {info.name!r} is stored twice ({filename} and another file)")
            if weight_map is not None and weight_map.get(info.name) != filename:
                raise SftflowError(
                    f"{model_dir}: tensor {info.name!r} is in {filename} but {INDEX_FILE} maps it to "
                    f"{weight_map.get(info.name)}; the index does not match the weight files"
                )
            tensors[info.name] = info
    if weight_map is not None and set(weight_map) != set(tensors):
        missing = sorted(set(weight_map) - set(tensors))[0]
        raise SftflowError(f"{model_dir}: tensor {missing!r} is in {INDEX_FILE} but in none of the weight files")
    if not tensors:
        raise SftflowError(f"{model_dir}: the weight files hold no tensors")
    return ModelWeights(model_dir, tensors, shards, file_metadata, index_metadata)


def _first_few(names: set[str], k: int = 3) -> str:
    shown = ", ".join(repr(n) for n in sorted(names)[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


def check_compatible(models: Sequence[ModelWeights]) -> None:
    """SftflowError unless every model has the same floating-point tensors (names, shapes, dtypes) as the first."""
    first = models[0]
    for name, info in first.tensors.items():
        if info.dtype not in FLOAT_DTYPES:
            kind = "an integer/bool" if info.dtype in NON_FLOAT_DTYPES else "an unsupported"
            raise SftflowError(
                f"{first.model_dir}: tensor {name!r} has {kind} dtype {info.dtype}; only floating-point tensors "
                f"({', '.join(FLOAT_DTYPES)}) can be averaged"
            )
    for other in models[1:]:
        missing = set(first.tensors) - set(other.tensors)
        extra = set(other.tensors) - set(first.tensors)
        if missing:
            raise SftflowError(
                f"{other.model_dir}: missing tensor {_first_few(missing)} (present in {first.model_dir}); "
                "only models of the same architecture can be averaged"
            )
        if extra:
            raise SftflowError(
                f"{other.model_dir}: extra tensor {_first_few(extra)} (not in {first.model_dir}); "
                "only models of the same architecture can be averaged"
            )
        for name, info in first.tensors.items():
            theirs = other.tensors[name]
            if theirs.shape != info.shape:
                raise SftflowError(
                    f"{other.model_dir}: tensor {name!r} has shape {list(theirs.shape)} but {list(info.shape)} in "
                    f"{first.model_dir}; only models of the same architecture can be averaged"
                )
            if theirs.dtype != info.dtype:
                raise SftflowError(
                    f"{other.model_dir}: tensor {name!r} has dtype {theirs.dtype} but {info.dtype} in "
                    f"{first.model_dir}; export all steps with the same dtype"
                )


class StreamingSafetensorsWriter:
    """Write a safetensors file tensor by tensor: the header (names, dtypes, shapes) first, then the bytes in order."""

    def __init__(self, path: Path, tensors: Sequence[tuple[str, str, tuple[int, ...]]], metadata: dict) -> None:
        header: dict = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
        self.expected: list[tuple[str, int]] = []
        offset = 0
        for name, dtype, shape in tensors:
            nbytes = prod(shape) * FLOAT_DTYPES[dtype][1]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.expected.append((name, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # keep the data buffer 8-byte aligned, as the safetensors library does
        self.data_bytes = offset
        self.path = path
        self._file = open(path, "wb")  # noqa: SIM115 (closed by __exit__)
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0  # index in self.expected of the tensor being written
        self._written = 0  # bytes of it written so far
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self._next < len(self.expected) and self.expected[self._next][1] == 0:
            self._next += 1

    def write(self, name: str, data: memoryview | bytes) -> None:
        """Append (part of) tensor `name`'s bytes; tensors must come in header order."""
        expected_name, nbytes = self.expected[self._next] if self._next < len(self.expected) else (None, 0)
        if name != expected_name or self._written + len(data) > nbytes:
            raise RuntimeError(
                f"internal error: {self.path}: got {len(data)} bytes of {name}, expected {expected_name}"
            )
        self._file.write(data)
        self._written += len(data)
        if self._written == nbytes:
            self._next, self._written = self._next + 1, 0
            self._skip_empty()

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._file.close()
        if exc_type is None and self._next != len(self.expected):
            raise RuntimeError(
                f"internal error: {self.path}: only {self._next} of {len(self.expected)} tensors written"
            )


def _read_exact(path: Path, offset: int, out) -> None:
    """Fill the writable buffer `out` with the bytes of `path` from `offset` on (plain reads, no mmap)."""
    view = memoryview(out).cast("B")
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < len(view):
            got = f.readinto(view[done:])
            if not got:
                raise SftflowError(f"{path}: file ends at byte {offset + done}, inside a tensor; it is truncated")
            done += got


def _average_tensor(
    name: str, models: Sequence[ModelWeights], writer: StreamingSafetensorsWriter, buffers, chunk: int
) -> None:
    """Stream the mean of tensor `name` over `models` into `writer`, `chunk` elements at a time."""
    import torch

    read_buffer, sum_buffer, cast_buffer = buffers
    info = models[0].tensors[name]
    dtype_name, itemsize = FLOAT_DTYPES[info.dtype]
    dtype = getattr(torch, dtype_name)
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for start in range(0, info.numel, chunk):
        count = min(chunk, info.numel - start)
        acc = sum_buffer[: count * acc_dtype.itemsize].view(acc_dtype)
        raw = read_buffer[: count * itemsize]
        # add_ of another dtype would allocate a converted copy per call; convert into a reused buffer instead
        values = raw.view(dtype) if dtype == acc_dtype else cast_buffer[: count * acc_dtype.itemsize].view(acc_dtype)
        for i, model in enumerate(models):
            source = model.tensors[name]
            _read_exact(source.file, source.begin + start * itemsize, raw.numpy())
            if i == 0:
                acc.copy_(raw.view(dtype))
                continue
            if dtype != acc_dtype:
                values.copy_(raw.view(dtype))
            acc.add_(values)
        acc.div_(len(models))
        if dtype == acc_dtype:
            out = acc
        else:
            out = raw.view(dtype)  # the read buffer is free again: cast the mean back into it
            out.copy_(acc)  # round to nearest, like .to(dtype)
        writer.write(name, out.view(torch.uint8).numpy().data)


def _output_order(model: ModelWeights, filename: str) -> list[str]:
    # The safetensors library's order: widest dtype first, then by name, so every tensor stays aligned.
    names = model.shards[filename]
    return sorted(names, key=lambda n: (-FLOAT_DTYPES[model.tensors[n].dtype][1], n))


def _check_steps(model_dirs: Sequence[Path], steps: Sequence[int] | None) -> list[int | None]:
    """The step of each model: `steps` if given, checked against the dir name step_N and sftflow_export.json."""
    if steps is not None and len(steps) != len(model_dirs):
        raise SftflowError(f"{len(steps)} steps {list(steps)} for {len(model_dirs)} model directories")
    labels: list[int | None] = []
    for i, model_dir in enumerate(model_dirs):
        known = {}
        match = re.fullmatch(r"step_(\d+)", model_dir.name)
        if match:
            known["its directory name"] = int(match.group(1))
        record = model_dir / EXPORT_RECORD
        try:
            exported = json.loads(record.read_text(encoding="utf-8")).get("step")
        except (OSError, ValueError, AttributeError):
            exported = None  # no export record (not made by convert_step): nothing to check against
        if isinstance(exported, int):
            known[EXPORT_RECORD] = exported
        step = steps[i] if steps is not None else next(iter(known.values()), None)
        for source, value in known.items():
            if value != step:
                raise SftflowError(f"{model_dir}: given as step {step}, but {source} says step {value}")
        labels.append(step)
    return labels


def _copy_non_weight_files(source: Path, dest: Path) -> list[str]:
    skip = {INDEX_FILE, EXPORT_RECORD, AVERAGE_RECORD}
    copied = []
    for entry in sorted(source.iterdir()):
        if entry.name in skip or entry.name.endswith(".safetensors") or entry.name.startswith("."):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dest / entry.name)
        else:
            shutil.copy2(entry, dest / entry.name)
        copied.append(entry.name)
    return copied


def average_hf_models(
    model_dirs: Sequence[Path],
    output_dir: Path,
    steps: Sequence[int] | None = None,
    log: logging.Logger = LOG,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> dict:
    """Write the element-wise mean of the models to `output_dir`; returns what it records in sftflow_average.json.

    Weights are laid out like the first model's (same files, same tensor -> file grouping); config,
    tokenizer, chat template and generation config are copied from the last model, the most trained one
    when the models are given in step order. `steps` (one per model) are recorded and checked against
    each dir's name step_N and its sftflow_export.json.
    """
    import torch

    if sys.byteorder != "little":
        raise SftflowError("checkpoint averaging needs a little-endian machine (safetensors data is little-endian)")
    model_dirs = [Path(d) for d in model_dirs]
    output_dir = Path(output_dir)
    if not model_dirs:
        raise SftflowError(f"no models to average (config key '{CONFIG_KEY}' lists no steps)")
    seen: dict[Path, Path] = {}
    for d in model_dirs:
        if d.resolve() in seen:
            raise SftflowError(f"{d}: the same model directory is given twice (as {seen[d.resolve()]} and {d})")
        seen[d.resolve()] = d
    if output_dir.resolve() in seen:
        raise SftflowError(f"{output_dir}: the output directory is one of the models to average")
    labels = _check_steps(model_dirs, steps)
    models = [read_model_weights(d) for d in model_dirs]
    check_compatible(models)

    first = models[0]
    n = len(models)
    started = time.perf_counter()
    log.info(
        "averaging %d models (steps %s), %d tensors, %.2f GB each -> %s",
        n,
        labels,
        len(first.tensors),
        sum(t.nbytes for t in first.tensors.values()) / 1e9,
        output_dir,
    )
    # Allocated once and reused for every chunk: these buffers are the whole working memory.
    widest = max(FLOAT_DTYPES[t.dtype][1] for t in first.tensors.values())
    buffers = (
        torch.empty(chunk_elements * widest, dtype=torch.uint8),  # one model's chunk as stored, then the mean
        torch.empty(chunk_elements * max(widest, 4), dtype=torch.uint8),  # the running sum (float32/float64)
        torch.empty(chunk_elements * max(widest, 4), dtype=torch.uint8),  # a chunk converted to the sum's dtype
    )
    with atomic_path(output_dir) as tmp:
        tmp.mkdir(parents=True)
        for filename, names in first.shards.items():
            order = _output_order(first, filename)
            layout = [(name, first.tensors[name].dtype, first.tensors[name].shape) for name in order]
            with StreamingSafetensorsWriter(
                tmp / filename, layout, {"format": "pt", **first.file_metadata[filename]}
            ) as writer:
                for name in order:
                    _average_tensor(name, models, writer, buffers, chunk_elements)
            log.info("wrote %s (%d tensors, %.2f GB)", filename, len(names), writer.data_bytes / 1e9)

        total_size = sum(t.nbytes for t in first.tensors.values())
        if first.index_metadata is not None:
            index_metadata = {**first.index_metadata, "total_size": total_size}
            if "total_parameters" in index_metadata:
                index_metadata["total_parameters"] = sum(t.numel for t in first.tensors.values())
            weight_map = {name: filename for filename, names in first.shards.items() for name in sorted(names)}
            index = {"metadata": index_metadata, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        copied = _copy_non_weight_files(model_dirs[-1], tmp)
        dtypes = Counter(FLOAT_DTYPES[t.dtype][0] for t in first.tensors.values())
        record = {
            "method": "mean",
            "steps": labels,
            "models": [str(d) for d in model_dirs],
            "num_models": n,
            "config_from": str(model_dirs[-1]),
            "copied_files": copied,
            "weight_files": list(first.shards),
            "num_tensors": len(first.tensors),
            "total_size": total_size,
            "dtypes": dict(sorted(dtypes.items())),
            "accumulation_dtype": "float64" if widest == 8 else "float32",
        }
        (tmp / AVERAGE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    log.info("averaged %d models -> %s in %.1f s", n, output_dir, time.perf_counter() - started)
    return record


def check_average_steps(
    steps: Sequence[int] | None, save_period: int, max_num_steps: int, key: str = CONFIG_KEY
) -> list[int]:
    """The steps of config key training.average_steps, sorted, or SftflowError naming a step that is never saved.

    A step is saved when it is a multiple of training.save_period or the final step training.max_num_steps
    (steps are matched as integers: step 100 is the directory step_100, never step_1000). None or [] -> [].
    `key` is the config key named in errors (the same check serves eval.models' step_N entries).
    """
    if steps is None:
        return []
    if isinstance(steps, str | bytes) or not isinstance(steps, Sequence):
        raise SftflowError(f"config key '{key}': expected a list of steps, got {steps!r}")
    seen: set[int] = set()
    for step in steps:
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise SftflowError(f"config key '{key}': {step!r} is not a positive integer step")
        if step in seen:
            raise SftflowError(f"config key '{key}': step {step} is listed twice")
        seen.add(step)
        if step > max_num_steps:
            raise SftflowError(
                f"config key '{key}': step {step} is after the last step (training.max_num_steps = "
                f"{max_num_steps}); list saved steps up to {max_num_steps}"
            )
        if step % save_period != 0 and step != max_num_steps:
            raise SftflowError(
                f"config key '{key}': step {step} is never saved: checkpoints are written every "
                f"training.save_period = {save_period} steps and at training.max_num_steps = {max_num_steps}; "
                f"use multiples of {save_period} or {max_num_steps}"
            )
    return sorted(seen)


def average_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Average several HF model directories (saved steps) into one.")
    p.add_argument("--models", nargs="+", required=True, help="HF model directories, e.g. results/hf_models/step_100")
    p.add_argument("--steps", nargs="+", type=int, default=None, help="the step of each --models directory, in order")
    p.add_argument("--output", required=True, help="HF model directory to write (atomically)")
    return p


def average(args: argparse.Namespace) -> dict:
    models = [Path(m) for m in args.models]
    if args.steps is not None and len(args.steps) != len(models):
        raise SftflowError(f"--steps lists {len(args.steps)} steps but --models {len(models)} directories")
    for i, model_dir in enumerate(models):
        if not model_dir.is_dir():
            step = f"step {args.steps[i]}: " if args.steps is not None else ""
            raise SftflowError(
                f"{step}model directory {model_dir} not found; export that step first "
                f"(snakemake target {model_dir}, rule convert_step)"
            )
    return average_hf_models(models, Path(args.output), steps=args.steps)


def average_main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = average_parser().parse_args(argv)
    try:
        average(args)
    except SftflowError as err:
        LOG.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def average_from_snakemake(smk) -> None:
    """Snakemake rule: input.models (dirs, in step order), params.steps, output.model, log[0]."""
    setup_logging(smk.log[0] if smk.log else None)
    argv = ["--models", *map(str, smk.input.models), "--output", str(smk.output.model)]
    steps = smk.params.get("steps", None)
    if steps:
        argv += ["--steps", *map(str, steps)]
    try:
        average(average_parser().parse_args(argv))
    except SftflowError as err:
        LOG.error("%s", err)
        raise SystemExit(f"error: {err}") from None
