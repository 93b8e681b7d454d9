"""Sharded, exactly resumable checkpoints with torch.distributed.checkpoint (DCP).

Layout of the checkpoint directory (shared by all chained jobs)::

    step_00000100/          a complete checkpoint (DCP: .metadata + one __R_0.distcp per rank, meta.json)
    step_00000200.tmp/      being written; never read, removed by the next job

Each checkpoint holds one DCP state dict:

    model.<fqn>             full-model parameter names (get_state_dict unshards the names, not the data)
    optim.state.<fqn>.*     AdamW moments and step counts, same names; optim.param_groups
    train.*                 step, data position (epoch, bins consumed), LR schedule state
    rng.rank<r>.*           every rank's torch CPU (and CUDA) generator and Python `random` state

All ranks write into `step_N.tmp`; after a barrier rank 0 renames it to `step_N`. The rename is the
commit point: a job killed mid-save leaves only a `.tmp` directory, which resume never looks at.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from sftflow.errors import SftflowError
from sftflow.train.engine import checkpoint_backend
from sftflow.train.parallel import ParallelDims

LOG = logging.getLogger("sftflow.train")

STEP_DIR_RE = re.compile(r"^step_(\d{8})$")
TMP_SUFFIX = ".tmp"


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner unpickles non-tensor entries (optimizer param_groups) with weights_only=False;
    this one only accepts plain data (numbers, strings, tuples, lists, dicts), like torch.load(weights_only=True)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path


def complete_checkpoints(root: str | os.PathLike) -> list[CheckpointInfo]:
    """Committed checkpoints (renamed, with their meta.json), oldest first."""
    root = Path(root)
    found = []
    if root.is_dir():
        for child in root.iterdir():
            m = STEP_DIR_RE.match(child.name)
            if m and child.is_dir() and (child / "meta.json").is_file():
                found.append(CheckpointInfo(int(m.group(1)), child))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(root: str | os.PathLike) -> CheckpointInfo | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's random generators (torch CPU and CUDA, Python `random`) as tensors."""
    version, internal, gauss = random.getstate()
    state = {
        "torch_cpu": torch.get_rng_state(),
        "python_version": torch.tensor([version]),
        "python_state": torch.tensor(internal, dtype=torch.int64),
        # gauss_next is None or a float; keep both facts in one float64 tensor (NaN means None).
        "python_gauss": torch.tensor([float("nan") if gauss is None else gauss], dtype=torch.float64),
    }
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore what rng_state returned."""
    torch.set_rng_state(state["torch_cpu"])
    gauss = float(state["python_gauss"][0])
    random.setstate(
        (
            int(state["python_version"][0]),
            tuple(int(x) for x in state["python_state"].tolist()),
            None if gauss != gauss else gauss,
        )
    )
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"], device)


def _ints_to_tensors(values: dict) -> dict:
    return {
        k: (_ints_to_tensors(v) if isinstance(v, dict) else torch.tensor(int(v), dtype=torch.int64))
        for k, v in values.items()
    }


def _tensors_to_ints(values: dict) -> dict:
    return {k: (_tensors_to_ints(v) if isinstance(v, dict) else int(v)) for k, v in values.items()}


class Checkpointer:
    def __init__(self, root: str | os.PathLike, parallel: ParallelDims) -> None:
        self.root = Path(root)
        self.parallel = parallel

    def clean_partial(self) -> None:
        """Remove `.tmp` directories left by a job that died while saving (rank 0, then everyone waits)."""
        if self.parallel.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for child in self.root.iterdir():
                if child.is_dir() and child.name.startswith("step_") and child.name.endswith(TMP_SUFFIX):
                    LOG.info("removing incomplete checkpoint %s", child)
                    shutil.rmtree(child, ignore_errors=True)
        self.parallel.barrier()

    def _state(self, model, optimizer, train_state: dict) -> dict:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        return {
            "model": model_sd,
            "optim": optim_sd,
            "train": _ints_to_tensors(train_state),
            "rng": {f"rank{self.parallel.rank}": rng_state(self.parallel.device)},
        }

    def _write(self, tmp: Path, model, optimizer, train_state: dict) -> None:
        """This rank's part of the checkpoint, into the uncommitted directory `tmp`."""
        dcp.save(self._state(model, optimizer, train_state), checkpoint_id=str(tmp))

    def save(self, step: int, model, optimizer, train_state: dict, meta: dict) -> tuple[Path, float]:
        """Write step `step` and commit it; returns (path, seconds). Collective: every rank calls it."""
        start = time.perf_counter()
        final = self.root / step_dir_name(step)
        tmp = self.root / (step_dir_name(step) + TMP_SUFFIX)
        if self.parallel.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.parallel.barrier()
        self._write(tmp, model, optimizer, train_state)
        if self.parallel.is_main:
            (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2) + "\n", encoding="utf-8")
        self.parallel.barrier()
        if self.parallel.is_main:
            self.commit(tmp, final)
        self.parallel.barrier()
        return final, time.perf_counter() - start

    def commit(self, tmp: Path, final: Path) -> None:
        """Rank 0, once every rank wrote its part into `tmp`: the rename that makes the checkpoint exist."""
        if final.exists():  # a re-save of the same step (e.g. after max_num_steps changed): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)

    def load(self, path: Path, model, optimizer) -> dict:
        """Load model, optimizer, RNG and return the train state (step, data position, schedule)."""
        state = self._state(
            model, optimizer, {"step": 0, "epoch": 0, "bins_consumed": 0, "scheduler": {"next_step": 0}}
        )
        stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        rng_key = f"rng.rank{self.parallel.rank}.torch_cpu"
        if rng_key not in stored:
            # Saved with fewer ranks: the weights, optimizer and data position still resume exactly,
            # but this rank's random stream starts fresh (only matters with dropout).
            LOG.warning("%s has no RNG state for rank %d (saved with another world size)", path, self.parallel.rank)
            del state["rng"]
        dcp.load(state, checkpoint_id=str(path), planner=SafeLoadPlanner())
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if "rng" in state:
            set_rng_state(state["rng"][f"rank{self.parallel.rank}"], self.parallel.device)
        return _tensors_to_ints(state["train"])


def check_layout(meta: dict, current: dict, path: Path) -> None:
    """Refuse to resume checkpoint `path` (its meta.json: `meta`) under another backend, or with other
    parallel sizes where its backend needs the same ones (`current`: the backend's name and those sizes)."""
    backend = checkpoint_backend(meta)
    if backend != current["backend"]:
        raise SftflowError(
            f"checkpoint {path} was written by backend {backend!r}, not {current['backend']!r} (config key "
            f"'training.backend'); set it back, or export the checkpoint and train from the exported model"
        )

    def name(key: str) -> str:
        return "GPUs (training.num_nodes x training.num_gpus)" if key == "world_size" else f"training.{key}"

    sizes = [k for k in current if k != "backend"]
    changed = [f"{name(k)}: {meta.get(k)} -> {current[k]}" for k in sizes if meta.get(k) != current[k]]
    if changed:
        raise SftflowError(
            f"checkpoint {path} was written with other parallel sizes ({'; '.join(changed)}); a {backend} "
            "checkpoint resumes with the sizes it was written with"
        )


def read_meta(path: str | os.PathLike) -> dict:
    meta = Path(path) / "meta.json"
    return json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else {}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
