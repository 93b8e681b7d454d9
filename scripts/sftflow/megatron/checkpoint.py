"""Checkpoints of the megatron backend, and their HF export.

A megatron checkpoint directory has the fsdp backend's life cycle (written into `step_N.tmp`, committed
by renaming it to `step_N` after every rank wrote its part, `meta.json` with `"backend": "megatron"` and
the parallel sizes), with megatron-specific contents::

    model/dense_tp{t}_pp{p}.safetensors           non-expert weights of tensor rank t, pipeline stage p
    model/experts_pp{p}_ep{e}_etp{x}.safetensors  expert weights of expert rank e, expert-tensor rank x
    state/rank{r}.pt                              rank r's CUDA RNG tracker and the other Stateful
                                                  components (sampler, schedule, rng, train)
    optimizer/rank{r}.pt                          rank r's distributed-optimizer shard (fp32 main weights,
                                                  Adam moments, step): only a resume reads it, retention
                                                  drops it from every checkpoint but the newest

(Checkpoints written before the optimizer got its own directory hold both in optim/rank{r}.pt; they still load.)

Model shards hold megatron-core local-spec names (sftflow.megatron.weights) whatever the layer spec
trained them, so the export needs neither a GPU nor Transformer Engine: it reads every shard, unshards
and maps back to HF names (`hf_weights`). Each weight is written once: by data-parallel rank 0 of its
replicas. Optimizer files are plain tensors and numbers, loaded with torch.load(weights_only=True).

Resuming needs the checkpoint's parallel sizes and GPU count (the optimizer shards follow them); a
different layout is refused naming the keys. Export and train from the exported model to change it.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from sftflow.errors import SftflowError
from sftflow.megatron.hf_config import ModelLayout, model_layout
from sftflow.megatron.weights import from_te_names, megatron_to_hf, to_te_names, unshard
from sftflow.train.checkpoint import ENGINE, Checkpointer
from sftflow.train.parallel import ParallelDims
from sftflow.train.retention import OPTIMIZER_DIR

LOG = logging.getLogger("sftflow.train")

_DENSE = re.compile(r"^dense_tp(\d+)_pp(\d+)\.safetensors$")
_EXPERTS = re.compile(r"^experts_pp(\d+)_ep(\d+)_etp(\d+)\.safetensors$")


def is_expert(name: str) -> bool:
    return ".mlp.experts." in name


def dense_file(rank: ParallelDims) -> str:
    return f"dense_tp{rank.tp_rank}_pp{rank.pp_rank}.safetensors"


def experts_file(rank: ParallelDims) -> str:
    return f"experts_pp{rank.pp_rank}_ep{rank.ep_rank}_etp{rank.etp_rank}.safetensors"


def stage_moe_layers(layout: ModelLayout, sizes: ParallelDims, stage: int) -> dict[int, bool]:
    """Local layer index -> is an MoE layer, for pipeline stage `stage`."""
    per_stage = layout.num_layers // sizes.pp
    return {i: layout.is_moe_layer(stage * per_stage + i) for i in range(per_stage)}


def module_weights(module) -> dict[str, torch.Tensor]:
    """A GPTModel's weights with local-spec names (without megatron's `_extra_state` entries), on CPU."""
    sd = {k: v for k, v in module.state_dict().items() if not k.endswith("_extra_state") and v is not None}
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in from_te_names(sd).items()}


def load_rank_weights(module, weights: dict[str, torch.Tensor], layout: ModelLayout, te: bool, stage: int = 0,
                      sizes: ParallelDims | None = None) -> None:  # fmt: skip
    """Copy this rank's local-spec `weights` into `module`; every weight of the module must be given, and
    only those (names are listed in the error)."""
    if te:
        weights = to_te_names(weights, stage_moe_layers(layout, sizes or ParallelDims(), stage))
    own = {k for k in module.state_dict() if not k.endswith("_extra_state")}
    missing, unexpected = sorted(own - set(weights)), sorted(set(weights) - own)
    if missing or unexpected:
        raise SftflowError(
            f"megatron weights do not match GPTModel's: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    result = module.load_state_dict(weights, strict=False)
    bad = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if bad:
        raise SftflowError(f"GPTModel weights not loaded: {bad[:5]}")


def read_shards(checkpoint: Path) -> tuple[dict[ParallelDims, dict[str, torch.Tensor]], ParallelDims]:
    """Every model shard of a megatron checkpoint, keyed as weights.unshard expects, and the sizes."""
    from safetensors.torch import load_file

    meta = json.loads((checkpoint / "meta.json").read_text(encoding="utf-8"))
    sizes = ParallelDims.from_layout(meta)
    shards: dict[ParallelDims, dict[str, torch.Tensor]] = {}
    for path in sorted((checkpoint / "model").glob("*.safetensors")):
        if m := _DENSE.match(path.name):
            at = sizes.at(tp_rank=int(m[1]), pp_rank=int(m[2]))
        elif m := _EXPERTS.match(path.name):
            at = sizes.at(pp_rank=int(m[1]), ep_rank=int(m[2]), etp_rank=int(m[3]))
        else:
            raise SftflowError(f"{path}: not a megatron model shard")
        shards.setdefault(at, {}).update(load_file(str(path)))
    for t in range(sizes.tp):
        for p in range(sizes.pp):
            if sizes.at(tp_rank=t, pp_rank=p) not in shards:
                raise SftflowError(f"{checkpoint}: model shard {dense_file(sizes.at(tp_rank=t, pp_rank=p))} is missing")
    return shards, sizes


def hf_weights(checkpoint: str | Path, base_model: str | Path) -> dict[str, torch.Tensor]:
    """The HF state dict of a megatron checkpoint (base_model: the HF folder training started from)."""
    from sftflow.megatron.weights import local_model_dir

    checkpoint = Path(checkpoint)
    config = local_model_dir(str(base_model)) / "config.json"
    layout = model_layout(json.loads(config.read_text(encoding="utf-8")), f"{base_model}/config.json")
    shards, sizes = read_shards(checkpoint)
    return megatron_to_hf(unshard(shards, layout, sizes), layout)


def write_model_shards(model_dir: Path, weights: dict[str, torch.Tensor], rank: ParallelDims) -> list[Path]:
    """This rank's model weights (module_weights) into `model_dir`: the dense ones if it is data-parallel
    rank 0 of its replicas, the experts if it is expert-data-parallel rank 0 of theirs. Returns the files
    written."""
    from megatron.core import parallel_state as ps
    from safetensors.torch import save_file

    model_dir.mkdir(parents=True, exist_ok=True)
    written = []
    parts = [
        (ps.get_data_parallel_rank(with_context_parallel=True) == 0, dense_file(rank), False),
        (ps.get_expert_data_parallel_rank() == 0, experts_file(rank), True),
    ]
    for writer, filename, experts in parts:
        part = {k: v for k, v in weights.items() if is_expert(k) == experts}
        if writer and part:
            save_file(part, str(model_dir / filename), metadata={"format": "pt"})
            written.append(model_dir / filename)
    return written


def _mark_unpadded(param_state: dict) -> dict:
    """get_parameter_state_dp_reshardable lists this rank's parameters only; its loader also accepts padding
    entries and expects every entry to say whether it is one."""
    for key, per_dtype in param_state.items():
        if isinstance(key, int):
            for buckets in per_dtype.values():
                for bucket in buckets:
                    for entry in bucket:
                        entry.setdefault("padding", False)
    return param_state


def _optimizers(optimizer) -> list:
    """The dense and (MoE) expert optimizers; one holding no parameters on this rank (e.g. the expert
    optimizer of a pipeline stage without MoE layers) is None: nothing to save or load."""
    return [
        o if any(group["params"] for group in o.optimizer.param_groups) else None
        for o in getattr(optimizer, "chained_optimizers", [optimizer])
    ]


def engine_state_dict(engine) -> dict:
    """A MegatronEngine's state: this rank's model weights (local-spec names, CPU), its distributed-optimizer
    shards (fp32 main weights, Adam moments, step) and megatron-core's CUDA RNG tracker."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    opts = _optimizers(engine.optimizer)
    return {
        "model": module_weights(engine.module),
        "optimizers": [o and o.state_dict() for o in opts],
        "parameter_states": [o and o.get_parameter_state_dp_reshardable() for o in opts],
        "cuda_rng_tracker": get_cuda_rng_tracker().get_states(),
    }


def load_engine_state_dict(engine, state: dict) -> None:
    """Inverse of engine_state_dict: weights first, then the optimizer (its fp32 main weights are views of them)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    rank = engine.parallel
    load_rank_weights(engine.module, state["model"], engine.layout, engine.use_te, rank.pp_rank, rank)
    with torch.no_grad():  # in fp32 the main weights are views of the model's parameters
        for opt, opt_state, param_state in zip(
            _optimizers(engine.optimizer), state["optimizers"], state["parameter_states"], strict=True
        ):
            if opt is None or opt_state is None:
                if (opt is None) != (opt_state is None):
                    raise SftflowError(f"rank {rank.rank}'s optimizer state does not fit this run")
                continue
            opt.load_state_dict(opt_state)
            opt.load_parameter_state_from_dp_reshardable(_mark_unpadded(param_state))
            # Without Apex / TE, megatron-core's load_state_dict gives every parameter the *same* step
            # tensor, which torch's Adam then increments once per parameter: give each its own.
            for param_state_dict in opt.optimizer.state.values():
                if isinstance(param_state_dict.get("step"), torch.Tensor):
                    param_state_dict["step"] = param_state_dict["step"].clone()
    get_cuda_rng_tracker().set_states(state["cuda_rng_tracker"])


class MegatronCheckpointer(Checkpointer):
    """Stores a checkpoint's Stateful components in the megatron format (see the module docstring): the
    engine's model weights as shared model shards, its optimizer shards in optimizer/rank{r}.pt, everything
    else of this rank in state/rank{r}.pt."""

    OPTIMIZER_KEYS = ("optimizers", "parameter_states")

    def _rank_file(self, checkpoint: Path, part: str) -> Path:
        return checkpoint / part / f"rank{self.parallel.rank:05d}.pt"

    def write(self, tmp: Path, states: dict) -> None:
        engine_state = states[ENGINE].state_dict()
        write_model_shards(tmp / "model", engine_state.pop("model"), self.parallel)
        optimizer = {key: engine_state.pop(key) for key in self.OPTIMIZER_KEYS}
        for part in ("state", OPTIMIZER_DIR):
            (tmp / part).mkdir(exist_ok=True)
        others = {name: component.state_dict() for name, component in states.items() if name != ENGINE}
        torch.save({**engine_state, **others}, self._rank_file(tmp, "state"))
        torch.save(optimizer, self._rank_file(tmp, OPTIMIZER_DIR))

    def _read_rank_state(self, path: Path) -> dict:
        if self._rank_file(path, "optim").is_file():  # written before the optimizer had its own directory
            return torch.load(self._rank_file(path, "optim"), weights_only=True, map_location="cpu")
        stored = torch.load(self._rank_file(path, "state"), weights_only=True, map_location="cpu")
        stored.update(torch.load(self._rank_file(path, OPTIMIZER_DIR), weights_only=True, map_location="cpu"))
        return stored

    def read(self, path: Path, states: dict) -> None:
        from safetensors.torch import load_file

        rank = self.parallel
        weights = load_file(str(path / "model" / dense_file(rank)))
        if (path / "model" / experts_file(rank)).is_file():
            weights.update(load_file(str(path / "model" / experts_file(rank))))
        stored = self._read_rank_state(path)
        engine_state = {"model": weights, **{k: v for k, v in stored.items() if k not in states}}
        for name, component in states.items():
            try:
                component.load_state_dict(engine_state if name == ENGINE else stored[name])
            except SftflowError as err:
                raise SftflowError(f"{path}: {err}") from None
