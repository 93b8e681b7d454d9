"""The contract between the trainer and a training backend, and the registry that names the backends.

The `Trainer` (sftflow.train.trainer), the HF export (sftflow.train.export) and the config checks
(sftflow.train.config) know backends only by the name in `training.backend`: they ask this registry for
the backend's engine class or its config check, and the registry imports that backend's module then, so
none of them imports a backend. Importing this module imports neither torch nor a backend.

A backend is two things, named here by "module:attribute":

* `engine`: a class following `Engine` (below): it joins the process group, builds the model and optimizer
  for this rank, runs a step and an evaluation, hands its model / optimizer state to the checkpointer and
  reads its checkpoints back as HF weights for the export;
* `checks`: `check_config(training, world_size, model_config)`, in a module that imports no torch (the
  workflow runs it while planning): it refuses settings the backend cannot run, naming the keys.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from sftflow.errors import SftflowError

if TYPE_CHECKING:
    import torch

    from sftflow.train.parallel import ParallelDims

# HF weight name -> (shape, dtype), and a reader of a list of those names -> {name: tensor}.
WeightShapes = dict[str, tuple[tuple[int, ...], "torch.dtype"]]
WeightReader = Callable[[list[str]], dict[str, "torch.Tensor"]]


@runtime_checkable
class Engine(Protocol):
    """One rank's part of a training run under one backend; the `Trainer` drives it the same way for every backend.

    The Trainer builds it once the resume point is known (`engine_class(name)(training, spec, parallel,
    seq_len, pad_id)`, training being the job's TrainingConfig), sets the learning rate of `optimizer.param_groups` before each step, calls `train_step`
    with this rank's micro-batches (each a list of packed bins) and `evaluate` with each validation batch.
    Every method is collective: all ranks call it in the same order. tests/train/test_engine_registry.py
    checks every registered engine class against these members.
    """

    name: ClassVar[str]  # the training.backend value; written to every checkpoint's meta.json
    optimizer: Any  # a torch.optim-like object: the Trainer's schedule sets param_groups[i]["lr"]
    num_params: int  # parameters of the HF model (for MFU)
    checkpointer: Any  # a sftflow.train.checkpoint.Checkpointer: saves / loads the checkpoint's Stateful components in the backend's format

    # training: the job's sftflow.train.settings.TrainingConfig (not imported here: settings imports the schema,
    # whose backend enum comes from this registry)
    def __init__(self, training: Any, spec: JobSpec, parallel: ParallelDims, seq_len: int, pad_id: int) -> None: ...

    @classmethod
    def init_parallel(cls, training: Any) -> ParallelDims:
        """Join the process group and set up the backend's parallel state for the training config's sizes."""
        ...

    @classmethod
    def resume_layout(cls, parallel: ParallelDims) -> dict[str, int]:
        """The parallel sizes a checkpoint of this backend can only be resumed with (meta.json keys -> values;
        empty when the backend reshards its checkpoints to any layout)."""
        ...

    @staticmethod
    def hf_weights(checkpoint: Path, base_model: str) -> tuple[WeightShapes, WeightReader]:
        """The HF weights of one committed checkpoint, read on CPU without a process group."""
        ...

    def meta(self) -> dict:
        """What meta.json records about this run's backend and layout (at least the "backend" key)."""
        ...

    def train_step(self, micro_bins: list[list[dict]]) -> tuple[float, float, float]:
        """One optimizer step; returns (mean token loss, loss tokens, gradient norm) of the global batch."""
        ...

    def evaluate(self, micro_bins: list[list[dict]]) -> tuple[float, int]:
        """Mean token loss and loss tokens of one validation batch (the model in eval mode, no gradients): this
        rank's micro-batches as train_step takes them, the mean and count over the whole data-parallel world."""
        ...

    def state_dict(self) -> dict:
        """Its model and optimizer state: one Stateful component of the checkpoint (sftflow.train.checkpoint),
        stored at the checkpoint's top level."""
        ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class JobSpec:
    """Where one chained job reads and writes (the command line of scripts/train.py)."""

    packed: str
    model: str
    checkpoint_dir: str
    job_index: int = 0
    num_jobs: int = 1
    done_file: str | None = None
    metrics_dir: str | None = None
    tokenizer: str | None = None
    chat_template: str | None = None
    validation_packed: str | None = None  # pack_data's held-out share (training.val_set_size)


@dataclass(frozen=True)
class Backend:
    engine: str  # "module:Class" of the Engine
    checks: str  # "module:function" of its check_config (a module that imports no torch)


# training.backend name -> Backend: the one list of backends (the config schema's `training.backend` enum is
# filled in from it, see sftflow.config.with_registered_backends).
BACKENDS: dict[str, Backend] = {}
# The backend of checkpoints written before meta.json named one.
DEFAULT_BACKEND = "fsdp"


def register(name: str, engine: str, checks: str) -> None:
    """Make `training.backend: name` use the Engine class `engine` and the config check `checks`, both given as
    "module:attribute" import strings (registering imports neither). Register before the config is first
    validated: sftflow.config reads the registry's names into the schema once."""
    for target in (engine, checks):
        module, colon, attribute = target.partition(":")
        if not (module and colon and attribute):
            raise ValueError(f"backend {name!r}: {target!r} is not a 'module:attribute' import string")
    if name in BACKENDS and BACKENDS[name] != Backend(engine, checks):
        raise ValueError(f"backend {name!r} is already registered as {BACKENDS[name]}")
    BACKENDS[name] = Backend(engine, checks)


def backend_names() -> list[str]:
    """The registered backends' names, in registration order (the built-in ones first)."""
    return list(BACKENDS)


register("fsdp", engine="sftflow.train.fsdp:FsdpEngine", checks="sftflow.train.fsdp_config:check_config")
register("megatron", engine="sftflow.megatron.engine:MegatronEngine", checks="sftflow.megatron.config:check_config")


def _load(target: str) -> Any:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise SftflowError(f"config key 'training.backend': unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    return BACKENDS[name]


def engine_class(name: str) -> type[Engine]:
    """The Engine class of backend `name` (imports the backend)."""
    return _load(_backend(name).engine)


def config_check(name: str) -> Callable[[dict, int, dict | None], None]:
    """check_config(training, world_size, model_config) of backend `name` (imports no torch)."""
    return _load(_backend(name).checks)


def checkpoint_backend(meta: dict) -> str:
    """The backend that wrote a checkpoint, from its meta.json."""
    return meta.get("backend", DEFAULT_BACKEND)
