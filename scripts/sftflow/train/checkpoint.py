"""Sharded, exactly resumable checkpoints with torch.distributed.checkpoint (DCP).

Layout of the checkpoint directory (shared by all chained jobs)::

    step_00000100/          a complete checkpoint (DCP: .metadata + one __R_0.distcp per rank, meta.json)
      optimizer/            its optimizer state, a second DCP checkpoint (only a resume reads it; retention
                            drops it from every checkpoint but the newest, training.keep_optimizer_state)
    step_00000200.tmp/      being written; never read, removed by the next job
    step_00000050.removing/ being deleted by retention (sftflow.train.retention); removed by the next job

A checkpoint is a dict of Stateful components, torchtitan-style: the engine (its model and optimizer),
the data order (`sampler`), the learning-rate schedule (`schedule`), every rank's RNG (`rng`) and the
train state (`train`); saving writes each one's state_dict, resuming is one `load` into each. The fsdp
backend stores them as one DCP state dict:

    model.<fqn>             full-model parameter names (get_state_dict unshards the names, not the data)
    optim.state.<fqn>.*     AdamW moments and step counts, same names; optim.param_groups (in optimizer/)
    sampler.*, schedule.*   data position (epoch, bins consumed), LR schedule state
    train.step              optimizer steps taken
    rng.rank<r>.*           every rank's torch CPU (and CUDA) generator and Python `random` state

All ranks write into `step_N.tmp`; after a barrier rank 0 renames it to `step_N`. The rename is the
commit point: a job killed mid-save leaves only a `.tmp` directory, which resume never looks at. meta.json
records the step, the run's settings, the checkpoint's metrics (val_loss, train_loss: retention ranks by
them) and whether it still holds its optimizer state.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element

from sftflow.errors import SftflowError
from sftflow.io import fsync_dir
from sftflow.train.checkpoint_dir import (  # noqa: F401  (re-exported: the checkpoint API in one place)
    STEP_DIR_RE,
    TMP_SUFFIX,
    CheckpointInfo,
    complete_checkpoints,
    latest_checkpoint,
    read_meta,
    step_dir_name,
)
from sftflow.train.engine import checkpoint_backend
from sftflow.train.parallel import ParallelDims
from sftflow.train.retention import OPTIMIZER_DIR, clean_leftovers, has_optimizer_state

LOG = logging.getLogger("sftflow.train")


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner unpickles non-tensor entries (optimizer param_groups) with weights_only=False;
    this one only accepts plain data (numbers, strings, tuples, lists, dicts), like torch.load(weights_only=True)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


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


class Stateful(Protocol):
    """What a checkpoint holds: anything with torch-style state_dict / load_state_dict."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class RngState:
    """This rank's random generators, under its own rank's key (every rank saves and restores its own)."""

    # Saved with fewer ranks, a checkpoint has none for this rank: the weights, optimizer and data position
    # still resume exactly, but this rank's random stream starts fresh (only matters with dropout).
    optional = True

    def __init__(self, parallel: ParallelDims) -> None:
        self.key, self.device = f"rank{parallel.rank}", parallel.device

    def state_dict(self) -> dict:
        return {self.key: rng_state(self.device)}

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state[self.key], self.device)


@dataclass
class TrainState:
    """The optimizer steps taken so far."""

    step: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


# The component whose state dict is stored at the top level of a checkpoint (its "model" and optimizer
# entries keep their own names: the export reads "model.<name>"), as torchtitan flattens its model's.
ENGINE = "engine"


def _to_storage(state: dict) -> dict:
    """Plain ints as int64 tensors (DCP stores tensors sharded by rank, other values pickled by rank 0)."""
    return {k: torch.tensor(v, dtype=torch.int64) if type(v) is int else v for k, v in state.items()}


def _from_storage(loaded: dict, template: dict) -> dict:
    return {k: int(v) if type(template[k]) is int else v for k, v in loaded.items()}


class Checkpointer:
    """Saves and loads a dict of Stateful components (the engine's model and optimizer, the data order, the
    schedule, RNG, the train state) as one checkpoint directory; this class stores them with DCP, a backend
    with its own format overrides `write` and `read` (sftflow.megatron.checkpoint).

    The engine's OPTIMIZER_KEYS entries go to the checkpoint's `optimizer/` subdirectory, so that retention can
    remove them without rewriting the rest."""

    OPTIMIZER_KEYS: tuple[str, ...] = ("optim",)

    def __init__(self, root: str | os.PathLike, parallel: ParallelDims) -> None:
        self.root = Path(root)
        self.parallel = parallel

    def clean_partial(self) -> None:
        """Remove `.tmp` directories left by a job that died while saving, and finish removals retention began
        (`.removing`), rank 0, then everyone waits."""
        if self.parallel.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for child in self.root.iterdir():
                if child.is_dir() and child.name.startswith("step_") and child.name.endswith(TMP_SUFFIX):
                    LOG.info("removing incomplete checkpoint %s", child)
                    shutil.rmtree(child, ignore_errors=True)
            for leftover in clean_leftovers(self.root):
                LOG.info("finished removing %s", leftover)
        self.parallel.barrier()

    def _state(self, states: dict[str, Stateful]) -> dict:
        """One state dict of every component: the engine's entries at the top level, the others by name."""
        state: dict = {}
        for name, component in states.items():
            if name == ENGINE:
                state.update(component.state_dict())
            else:
                state[name] = _to_storage(component.state_dict())
        return state

    def write(self, tmp: Path, states: dict[str, Stateful]) -> None:
        """This rank's part of the checkpoint, into the uncommitted directory `tmp` (optimizer state into
        `tmp/optimizer`, a DCP checkpoint of its own)."""
        state = self._state(states)
        optimizer = {key: state.pop(key) for key in self.OPTIMIZER_KEYS}
        dcp.save(state, checkpoint_id=str(tmp))
        dcp.save(optimizer, checkpoint_id=str(tmp / OPTIMIZER_DIR))

    def read(self, path: Path, states: dict[str, Stateful]) -> None:
        """Load every component from `path` (an optional one the checkpoint lacks keeps its state)."""
        state = self._state(states)  # the current state dicts are the template DCP loads into
        stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        skipped = [
            name
            for name, component in states.items()
            if getattr(component, "optional", False) and not any(key.startswith(f"{name}.") for key in stored)
        ]
        for name in skipped:
            LOG.warning(
                "%s has no %s state for rank %d (saved with another world size)", path, name, self.parallel.rank
            )
            del state[name]
        optimizer = {}  # a checkpoint written before the optimizer had its own directory holds it inline
        if (path / OPTIMIZER_DIR).is_dir():
            optimizer = {key: state.pop(key) for key in self.OPTIMIZER_KEYS}
            dcp.load(optimizer, checkpoint_id=str(path / OPTIMIZER_DIR), planner=SafeLoadPlanner())
        dcp.load(state, checkpoint_id=str(path), planner=SafeLoadPlanner())
        state.update(optimizer)
        for name, component in states.items():
            if name == ENGINE:
                component.load_state_dict({k: v for k, v in state.items() if k not in states})
            elif name not in skipped:
                component.load_state_dict(_from_storage(state[name], component.state_dict()))

    def save(self, step: int, states: dict[str, Stateful], meta: dict) -> tuple[Path, float]:
        """Write step `step` and commit it; returns (path, seconds). Collective: every rank calls it."""
        start = time.perf_counter()
        final = self.root / step_dir_name(step)
        tmp = self.root / (step_dir_name(step) + TMP_SUFFIX)
        if self.parallel.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / OPTIMIZER_DIR).mkdir(parents=True)
        self.parallel.barrier()
        self.write(tmp, states)
        if self.parallel.is_main:
            record = {"step": step, **meta, "optimizer_state": True}
            (tmp / "meta.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
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
        fsync_dir(self.root)

    def load(self, path: Path, states: dict[str, Stateful]) -> None:
        """Restore every component from the committed checkpoint `path` (resume is this one call)."""
        if not has_optimizer_state(path):
            raise SftflowError(
                f"checkpoint {path} has no optimizer state (training.keep_optimizer_state: latest keeps it only in "
                "the newest checkpoint): it cannot resume training exactly; export it and train from the exported "
                "model, or resume from the newest checkpoint"
            )
        self.read(path, states)


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
