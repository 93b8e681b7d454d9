"""The process group and device mesh of a training run, in one object.

`ParallelDims` is the only place that reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and
the only place that knows how the world splits into data-parallel ("dp", FSDP shards) and
tensor-parallel ("tp") groups. Everything else asks it: `pd.dp_size`, `pd.dp_rank`, `pd.tp_mesh`, ...

The mesh is always 2-D ("dp", "tp"), even when one of the sizes is 1, so the model code has a single
path: FSDP over `pd.dp_mesh`, tensor parallelism over `pd.tp_mesh`.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from sftflow.errors import SftflowError


@dataclass
class ParallelDims:
    world_size: int
    rank: int
    local_rank: int
    tp: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tp

    @property
    def dp_mesh(self) -> DeviceMesh:
        return self.mesh["dp"]

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self.mesh["tp"]

    @property
    def dp_rank(self) -> int:
        return self.dp_mesh.get_local_rank()

    @property
    def tp_rank(self) -> int:
        return self.tp_mesh.get_local_rank()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_type(self) -> str:
        return self.device.type

    def barrier(self) -> None:
        dist.barrier()

    def dp_sum(self, value: float | int) -> float:
        """Sum a number over the data-parallel group (tp ranks of one dp group hold the same data)."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.dp_mesh.get_group())
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

    def broadcast_float(self, value: float) -> float:
        """Rank 0's value on every rank."""
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return float(t.item())


def init_process_group(timeout_minutes: float = 30.0) -> tuple[int, int, int, torch.device]:
    """Join (or create) the default process group; returns (rank, world size, local rank, device).

    Launched by torchrun the environment describes the world; launched as a plain `python` process
    it is a world of one (a private in-memory store, no port needed), which tests and small CPU runs use.
    GPU runs use NCCL for CUDA tensors and gloo for CPU tensors; CPU runs use gloo.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        store = None
    else:
        rank, world, local_rank = 0, 1, 0
        store = dist.HashStore()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cuda:nccl,cpu:gloo"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        kwargs = {"timeout": datetime.timedelta(minutes=timeout_minutes)}
        if store is not None:
            kwargs.update(store=store, rank=rank, world_size=world)
        dist.init_process_group(backend=backend, **kwargs)
    return rank, world, local_rank, device


def init_parallel(tp: int = 1, timeout_minutes: float = 30.0) -> ParallelDims:
    """The process group (init_process_group) and the ("dp", "tp") mesh of the fsdp backend."""
    world = int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ and "WORLD_SIZE" in os.environ else 1
    if world % tp:
        raise SftflowError(
            f"config key 'training.tensor_model_parallel_size' ({tp}) does not divide the number of processes ({world})"
        )
    rank, world, local_rank, device = init_process_group(timeout_minutes)
    mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    return ParallelDims(world_size=world, rank=rank, local_rank=local_rank, tp=tp, device=device, mesh=mesh)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
