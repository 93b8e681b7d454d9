"""The parallel layout of a training run, for both backends, in one object; and the process group.

`ParallelDims` holds the sizes (dp, tp, pp, cp, ep, etp), this rank's coordinates in them, and the
data-parallel group (and, for the fsdp backend, the ("dp", "tp") device mesh). `launch_environment` is the
only place that reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE). Everything
else asks the layout: `pd.dp_size`, `pd.dp_rank`, `pd.tp_mesh`, `pd.layout()` ...

The fsdp mesh is always 2-D ("dp", "tp"), even when one of the sizes is 1, so the model code has a single
path: FSDP over `pd.dp_mesh`, tensor parallelism over `pd.tp_mesh`. The megatron backend fills the same
object from megatron-core's parallel state (it has no mesh).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from sftflow.errors import SftflowError

# What a checkpoint's meta.json calls the sizes of `layout()`.
LAYOUT_KEYS = {
    "world_size": "world_size",
    "tensor_model_parallel_size": "tp",
    "pipeline_model_parallel_size": "pp",
    "context_parallel_size": "cp",
    "expert_model_parallel_size": "ep",
    "expert_tensor_parallel_size": "etp",
}


@dataclass(frozen=True)
class ParallelDims:
    """Sizes, this rank's coordinates, and its process groups. Data parallel is what the model-parallel
    sizes leave of the world: dp = world / (tp x pp x cp). Frozen (and hashable): the weight mapping keys
    the shards of a checkpoint by the coordinates they were written at (`at`)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1
    # This rank's coordinates.
    dp_rank: int = 0
    tp_rank: int = 0
    pp_rank: int = 0
    cp_rank: int = 0
    ep_rank: int = 0
    etp_rank: int = 0
    mesh: DeviceMesh | None = dataclasses.field(default=None, compare=False)  # fsdp's ("dp", "tp") mesh
    dp_group: Any = dataclasses.field(default=None, compare=False)  # None: the default group

    @property
    def dp_size(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def dp_mesh(self) -> DeviceMesh:
        return self._mesh()["dp"]

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self._mesh()["tp"]

    def _mesh(self) -> DeviceMesh:
        if self.mesh is None:
            raise RuntimeError("this parallel layout has no device mesh (it is built by the fsdp backend's init)")
        return self.mesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_layout(cls, sizes: dict) -> ParallelDims:
        """The sizes of `layout()` (e.g. a checkpoint's meta.json), at coordinates 0."""
        return cls(**{field: sizes[key] for key, field in LAYOUT_KEYS.items() if key in sizes})

    def at(self, **coordinates: int) -> ParallelDims:
        """The same sizes at other coordinates (tp_rank=..., pp_rank=..., ep_rank=..., etp_rank=...)."""
        return dataclasses.replace(self, **coordinates)

    def layout(self) -> dict[str, int]:
        """The sizes under their config / meta.json names (LAYOUT_KEYS)."""
        return {key: getattr(self, field) for key, field in LAYOUT_KEYS.items()}

    def barrier(self) -> None:
        dist.barrier()

    def dp_sum(self, value: float | int) -> float:
        """Sum a number over the data-parallel group (the model-parallel ranks of one replica hold the same data)."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.dp_group)
        return float(t.item())

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank (so all ranks take the same branch)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def on_main(self, fn: Callable[[], object]) -> None:
        """Run `fn` on rank 0 only; if it fails, every rank raises (instead of waiting at the next collective)."""
        error: BaseException | None = None
        if self.is_main:
            try:
                fn()
            except Exception as err:  # re-raised below, after the other ranks have been told
                error = err
        if self.any_rank(error is not None):
            if error is not None:
                raise error
            raise SftflowError("rank 0 failed (see its error above)")


@dataclass(frozen=True)
class LaunchEnvironment:
    """Where torchrun placed this process (a world of one when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    from_torchrun: bool = False


def launch_environment() -> LaunchEnvironment:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return LaunchEnvironment(
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
            from_torchrun=True,
        )
    return LaunchEnvironment()


def init_process_group(timeout_minutes: float = 30.0) -> tuple[LaunchEnvironment, torch.device]:
    """Join (or create) the default process group; returns where this process runs, and its device.

    Launched by torchrun the environment describes the world; launched as a plain `python` process
    it is a world of one (a private in-memory store, no port needed), which tests and small CPU runs use.
    GPU runs use NCCL for CUDA tensors and gloo for CPU tensors; CPU runs use gloo.
    """
    env = launch_environment()
    store = None if env.from_torchrun else dist.HashStore()
    if torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
        backend = "cuda:nccl,cpu:gloo"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        kwargs = {"timeout": datetime.timedelta(minutes=timeout_minutes)}
        if store is not None:
            kwargs.update(store=store, rank=env.rank, world_size=env.world_size)
        dist.init_process_group(backend=backend, **kwargs)
    return env, device


def init_parallel(tp: int = 1, timeout_minutes: float = 30.0) -> ParallelDims:
    """The process group (init_process_group) and the ("dp", "tp") mesh of the fsdp backend."""
    world = launch_environment().world_size
    if world % tp:
        raise SftflowError(
            f"config key 'training.tensor_model_parallel_size' ({tp}) does not divide the number of processes ({world})"
        )
    env, device = init_process_group(timeout_minutes)
    mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    return ParallelDims(
        world_size=world,
        rank=env.rank,
        local_rank=env.local_rank,
        local_world_size=env.local_world_size,
        device=device,
        tp=tp,
        dp_rank=mesh["dp"].get_local_rank(),
        tp_rank=mesh["tp"].get_local_rank(),
        mesh=mesh,
        dp_group=mesh["dp"].get_group(),
    )


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
