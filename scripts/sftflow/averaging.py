"""Average several exported HF model directories (saved training steps) into one, streaming, on CPU.

The NeMo-Skills `--average_steps=100,200,300` equivalent: the element-wise mean of every weight over
the models `results/hf_models/step_N/`. Memory stays bounded by a few fixed-size chunks, not by the
number or size of the models: every tensor is read with the safetensors library (`safe_open`) in chunks
of at most CHUNK_ELEMENTS elements (whole rows: a chunk is larger only when one row of a tensor is),
summed in float32 (float64 for float64 weights), divided, cast back to the weights' dtype and appended
to a safetensors file whose header was written first (sftflow.safetensors_io). Output (written under a
temporary name, renamed when complete):

    model.safetensors, or the first model's shards   same file names and tensor -> shard grouping
    model.safetensors.index.json                     when sharded: weight map and metadata.total_size
    config.json, tokenizer files, chat template ...  copied from the LAST model (the most trained one)
    sftflow_average.json                             the averaged steps and source dirs, tensors, dtypes

torch and safetensors are imported inside the functions that need them, so `check_average_steps` and
`SavePlan` can run at DAG-build time.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path

from sftflow.errors import SftflowError
from sftflow.io import atomic_path
from sftflow.logs import setup_logging
from sftflow.safetensors_io import INDEX_FILE, ITEMSIZE, StreamingSafetensorsWriter, read_weight_index

LOG = logging.getLogger("sftflow.averaging")

CONFIG_KEY = "training.average_steps"
EXPORT_RECORD = "sftflow_export.json"
AVERAGE_RECORD = "sftflow_average.json"
CHUNK_ELEMENTS = 4 * 1024**2  # 16 MiB of float32 sum: a few times that is the working memory

# safetensors dtype code -> torch dtype name, of the dtypes that can be averaged
FLOAT_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
NON_FLOAT_DTYPES = set(ITEMSIZE) - set(FLOAT_DTYPES)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file, as its header describes it."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]


@dataclass
class ModelWeights:
    """The weights of one HF model directory: every tensor, and how they are grouped into files."""

    model_dir: Path
    tensors: dict[str, TensorInfo]
    shards: dict[str, list[str]]  # file name -> tensor names
    file_metadata: dict[str, dict]  # file name -> the header's __metadata__
    index_metadata: dict | None  # model.safetensors.index.json "metadata"; None for a single file


def read_safetensors_header(path: Path) -> tuple[list[TensorInfo], dict]:
    """(tensors, __metadata__) of a safetensors file, from its header (the library checks that the data fits it)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            slices = {name: f.get_slice(name) for name in f.keys()}
            tensors = [TensorInfo(n, s.get_dtype(), tuple(s.get_shape()), path) for n, s in slices.items()]
    except SafetensorError as err:
        raise SftflowError(
            f"{path}: tensor data or header unreadable by the safetensors library ({err}); the file is truncated or corrupt"
        ) from None
    return tensors, metadata


def read_model_weights(model_dir: Path) -> ModelWeights:
    """Parse the weight files of an HF model directory: model.safetensors, or the shards of its index."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise SftflowError(f"{model_dir}: model directory not found")
    index = read_weight_index(model_dir, "an HF model directory with safetensors weights (as written by convert_step)")
    weight_map = index.weight_map
    tensors: dict[str, TensorInfo] = {}
    shards: dict[str, list[str]] = {}
    file_metadata: dict[str, dict] = {}
    for filename in index.files:
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
    return ModelWeights(model_dir, tensors, shards, file_metadata, index.metadata)


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


def _row_chunks(shape: tuple[int, ...], chunk: int) -> Iterator[tuple[int, int]]:
    """[start, stop) ranges of rows (along the first dimension) holding about `chunk` elements, one row at least."""
    if not shape:
        yield 0, 1  # a scalar: one "row"
        return
    row = prod(shape[1:])
    rows = max(1, chunk // row) if row else shape[0]
    for start in range(0, shape[0], rows):
        yield start, min(start + rows, shape[0])


def _chunk_capacity(tensors, chunk: int) -> int:
    """The most elements one chunk of `_row_chunks` holds over `tensors` (chunk, or a row larger than it)."""
    most = 1
    for t in tensors:
        for start, stop in _row_chunks(t.shape, chunk):
            most = max(most, (stop - start) * prod(t.shape[1:]))
            break
    return most


class _Readers:
    """safe_open handles of the models' weight files, each opened on first use.

    The library maps a file into memory: the pages a read touches count toward the process's RSS until the
    file is closed. So every file is closed again once `budget` bytes have been read, which bounds the RSS
    that reading adds (without it, averaging n models would hold all n in RSS by the end).
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._handles: dict[Path, object] = {}
        self._read = 0

    def handle(self, path: Path):
        if self._read >= self.budget:
            self._handles.clear()  # unmapped once the tensors read from them are gone too
            self._read = 0
        if path not in self._handles:
            from safetensors import safe_open

            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]

    def count(self, nbytes: int) -> None:
        self._read += nbytes


def _read_rows(readers: _Readers, source: TensorInfo, start: int, stop: int):
    """Rows [start, stop) of a tensor, flat (the whole tensor for a scalar); valid until the next read."""
    handle = readers.handle(source.file)
    values = handle.get_tensor(source.name) if not source.shape else handle.get_slice(source.name)[start:stop]
    readers.count(values.numel() * ITEMSIZE[source.dtype])
    return values.reshape(-1)


def _average_tensor(
    name: str,
    models: Sequence[ModelWeights],
    readers: _Readers,
    writer: StreamingSafetensorsWriter,
    buffers,
    chunk: int,
) -> None:
    """Stream the mean of tensor `name` over `models` into `writer`, about `chunk` elements at a time."""
    import torch

    sum_buffer, cast_buffer = buffers
    info = models[0].tensors[name]
    dtype = getattr(torch, FLOAT_DTYPES[info.dtype])
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for start, stop in _row_chunks(info.shape, chunk):
        count = (stop - start) * prod(info.shape[1:])
        acc = sum_buffer[: count * acc_dtype.itemsize].view(acc_dtype)
        # add_ of another dtype would allocate a converted copy per call; convert into a reused buffer instead
        converted = cast_buffer[: count * acc_dtype.itemsize].view(acc_dtype)
        for i, model in enumerate(models):
            values = _read_rows(readers, model.tensors[name], start, stop)
            if i == 0:
                acc.copy_(values)
            elif dtype == acc_dtype:
                acc.add_(values)
            else:
                converted.copy_(values)
                acc.add_(converted)
        acc.div_(len(models))
        if dtype == acc_dtype:
            out = acc
        else:
            out = cast_buffer[: count * dtype.itemsize].view(dtype)
            out.copy_(acc)  # round to nearest, like .to(dtype)
        writer.write(name, out.view(torch.uint8).numpy())


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


def _write_mean_weights(models: Sequence[ModelWeights], directory: Path, chunk: int, log: logging.Logger) -> None:
    """The mean of the models' weights, in the first model's weight files (same names, same grouping)."""
    import torch

    first = models[0]
    # Allocated once and reused for every chunk: with the chunk being read, these are the whole working memory.
    capacity = _chunk_capacity(first.tensors.values(), chunk)
    widest = max(ITEMSIZE[t.dtype] for t in first.tensors.values())
    buffers = (
        torch.empty(capacity * max(widest, 4), dtype=torch.uint8),  # the running sum (float32/float64)
        torch.empty(capacity * max(widest, 4), dtype=torch.uint8),  # a chunk converted to the sum's dtype, the mean
    )
    readers = _Readers(budget=capacity * widest)
    for filename, names in first.shards.items():
        layout = [(name, first.tensors[name].dtype, first.tensors[name].shape) for name in names]
        metadata = {"format": "pt", **first.file_metadata[filename]}
        with StreamingSafetensorsWriter(directory / filename, layout, metadata) as writer:
            for name in writer.names:
                _average_tensor(name, models, readers, writer, buffers, chunk)
        log.info("wrote %s (%d tensors, %.2f GB)", filename, len(names), writer.data_bytes / 1e9)


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
    widest = max(ITEMSIZE[t.dtype] for t in first.tensors.values())
    with atomic_path(output_dir) as tmp:
        tmp.mkdir(parents=True)
        _write_mean_weights(models, tmp, chunk_elements, log)
        total_size = sum(t.nbytes for t in first.tensors.values())
        if first.index_metadata is not None:
            index_metadata = {**first.index_metadata, "total_size": total_size}
            if "total_parameters" in index_metadata:
                index_metadata["total_parameters"] = sum(t.numel for t in first.tensors.values())
            weight_map = {name: filename for filename, names in first.shards.items() for name in sorted(names)}
            index = {"metadata": index_metadata, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        copied = _copy_non_weight_files(model_dirs[-1], tmp)
        dtypes = Counter(FLOAT_DTYPES[t.dtype] for t in first.tensors.values())
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


@dataclass(frozen=True)
class SavePlan:
    """Which steps a run saves, as far as planning can tell (the trainer, train/trainer.py, saves every
    training.save_period steps, at the end of each job and at the run's last step).

    The last step is min(max_num_steps, max_num_epochs x floor(num_sequences / train_global_batch_size)) once
    the packed data exists (`num_sequences` from results/data/packed/index.json), else max_num_steps: the
    early stop at max_num_epochs is checked only once pack_data has run. `job_ends` are the chained jobs' last
    steps when they are known (the data packed) and fixed (no training.time_limit; a Slurm job's own end time
    is not known here): ceil(last x (i+1) / num_training_jobs), as train/data.py job_target_step.
    """

    save_period: int
    max_num_steps: int
    last_step: int
    why_last: str
    job_ends: tuple[int, ...] = ()

    @classmethod
    def from_training(cls, training: dict, num_sequences: int | None = None) -> SavePlan:
        """From the `training:` section (validated) and, when known, the packed data's number of sequences."""
        max_steps, gbs = training["max_num_steps"], training["train_global_batch_size"]
        last, why = max_steps, f"training.max_num_steps = {max_steps}"
        if num_sequences is not None:
            epochs, per_epoch = training["max_num_epochs"], num_sequences // gbs
            if epochs * per_epoch < max_steps:
                last = epochs * per_epoch
                why = (
                    f"{last} = training.max_num_epochs = {epochs} x {per_epoch} steps per epoch (floor of the "
                    f"packed data's {num_sequences} sequences / training.train_global_batch_size = {gbs}), before "
                    f"training.max_num_steps = {max_steps}"
                )
        jobs = training["num_training_jobs"]
        job_ends: tuple[int, ...] = ()
        if num_sequences is not None and training.get("time_limit") is None and jobs > 1:
            job_ends = tuple(sorted({-(-last * (i + 1) // jobs) for i in range(jobs)}))
        return cls(training["save_period"], max_steps, last, why, job_ends)

    def saves(self, step: int) -> bool:
        return 0 < step <= self.last_step and (
            step % self.save_period == 0 or step == self.last_step or step in self.job_ends
        )

    def check(self, steps: Sequence[int] | int | None, key: str) -> list[int]:
        """The steps, sorted, or SftflowError naming config key `key`, the step and the keys that decide it.
        None or [] -> []; a single int is one step (training.conversion_step)."""
        if steps is None:
            return []
        if isinstance(steps, int) and not isinstance(steps, bool):
            steps = [steps]
        if isinstance(steps, str | bytes) or not isinstance(steps, Sequence):
            raise SftflowError(f"config key '{key}': expected a list of steps, got {steps!r}")
        seen: set[int] = set()
        for step in steps:
            if isinstance(step, bool) or not isinstance(step, int) or step < 1:
                raise SftflowError(f"config key '{key}': {step!r} is not a positive integer step")
            if step in seen:
                raise SftflowError(f"config key '{key}': step {step} is listed twice")
            seen.add(step)
            if step > self.last_step:
                raise SftflowError(
                    f"config key '{key}': step {step} is after the last step ({self.why_last}); "
                    f"list saved steps up to {self.last_step}"
                )
            if not self.saves(step):
                jobs = f", at the chained jobs' ends {list(self.job_ends)}" if self.job_ends else ""
                raise SftflowError(
                    f"config key '{key}': step {step} is never saved: checkpoints are written every "
                    f"training.save_period = {self.save_period} steps{jobs} and at the last step ({self.why_last}); "
                    f"use multiples of {self.save_period} or {self.last_step}"
                )
        return sorted(seen)


def check_average_steps(
    steps: Sequence[int] | None, save_period: int, max_num_steps: int, key: str = CONFIG_KEY
) -> list[int]:
    """The steps of config key training.average_steps, sorted, or SftflowError naming a step that is never saved.

    A step is saved when it is a multiple of training.save_period or the final step training.max_num_steps
    (steps are matched as integers: step 100 is the directory step_100, never step_1000). None or [] -> [].
    `key` is the config key named in errors. The planning-time check with the data's epoch length and the
    chained jobs' ends is SavePlan.check.
    """
    plan = SavePlan(save_period, max_num_steps, max_num_steps, f"training.max_num_steps = {max_num_steps}")
    return plan.check(steps, key)


def packed_num_sequences(packed_dir: str | Path) -> int | None:
    """num_sequences of the packed data's index.json (sftflow.packing), or None when it does not exist yet
    (or cannot be read: pack_data rewrites it, and the export's own check then names the saved steps)."""
    try:
        index = json.loads((Path(packed_dir) / "index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    n = index.get("num_sequences") if isinstance(index, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None


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
