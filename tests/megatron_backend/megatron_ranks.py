"""One rank of a CPU (gloo) megatron-core world, run by torchrun from tests/megatron_backend/test_mapping.py.

Builds GPTModel for the HF model in MODEL_DIR with the given parallel sizes, maps the HF weights with
sftflow.megatron.weights, loads this rank's shard with strict=True (every name and shape must be the
one megatron-core itself gives this rank), and writes the rank's coordinates and weight shapes as JSON.

    torchrun --standalone --nproc-per-node=W megatron_ranks.py MODEL_DIR OUT_DIR TP PP EP ETP [--forward] [--save-shards]

With --forward (one rank: CUDA and NCCL, or with --cpu the CPU through cpu_shim.py), the model is built on
the device and the logits of a fixed batch (tokens.pt in OUT_DIR) are saved as logits.pt. With --save-shards
every rank writes its weights as the megatron backend's checkpoints do (sftflow.megatron.checkpoint.
write_model_shards) into OUT_DIR/step_00000001/model, and rank 0 that checkpoint's meta.json.
"""

import json
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def weight_shapes(model) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every weight of a GPTModel (without megatron's `_extra_state` entries)."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def main() -> None:
    model_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    tp, pp, ep, etp = (int(x) for x in sys.argv[3:7])
    forward = "--forward" in sys.argv[7:]
    on_gpu = forward and "--cpu" not in sys.argv[7:]
    if forward and not on_gpu:  # megatron-core's forward on the CPU (tests/megatron_backend/cpu_shim.py)
        from tests.megatron_backend import cpu_shim

        cpu_shim.install()
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if on_gpu else "gloo")
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)  # fmt: skip
    from safetensors.torch import load_file

    from sftflow.megatron.hf_config import model_layout, padded_vocab_size
    from sftflow.megatron.model import PipelineStage, build_gpt_model
    from sftflow.megatron.weights import hf_to_megatron, shard
    from sftflow.train.parallel import ParallelDims

    layout = model_layout(json.loads((model_dir / "config.json").read_text()))
    padded = padded_vocab_size(layout.vocab_size, tp)
    parallel = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "expert_model_parallel_size": ep}
    if pp > 1:
        parallel["pipeline_dtype"] = torch.float32  # the dtype of the activations sent between stages
    if layout.num_experts:
        parallel["expert_tensor_parallel_size"] = etp
    stage = PipelineStage(first=ps.is_pipeline_first_stage(), last=ps.is_pipeline_last_stage())
    if forward:  # attention forks megatron-core's model-parallel RNG stream (dropout), which needs a seed
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(0)
    if layout.num_experts:
        from sftflow.megatron.engine import _patch_moe_router_without_te

        _patch_moe_router_without_te()
    model = build_gpt_model(layout, padded, 64, stage, cpu_init=not on_gpu, **parallel)
    ranks = {
        "tp": ps.get_tensor_model_parallel_rank(),
        "pp": ps.get_pipeline_model_parallel_rank(),
        "ep": ps.get_expert_model_parallel_rank(),
        "etp": ps.get_expert_tensor_parallel_rank(),
    }
    hf = load_file(model_dir / "model.safetensors")
    if layout.tied_embeddings:
        hf.setdefault("lm_head.weight", hf["model.embed_tokens.weight"])
    at = ParallelDims(tp=tp, pp=pp, ep=ep, etp=etp, tp_rank=ranks["tp"], pp_rank=ranks["pp"], ep_rank=ranks["ep"],
                      etp_rank=ranks["etp"])  # fmt: skip
    mine = shard(hf_to_megatron(hf, layout, padded), layout, at)
    extra = {k: v for k, v in model.state_dict().items() if k.endswith("_extra_state")}
    model.load_state_dict({**mine, **extra}, strict=True)  # names and shapes exactly as megatron-core shards them
    loaded = {k: torch.equal(v.detach().cpu(), mine[k]) for k, v in model.state_dict().items() if k in mine}
    record = {
        "ranks": ranks,
        "shapes": weight_shapes(model),
        "loaded": all(loaded.values()) and len(loaded) == len(mine),
    }
    if "--save-shards" in sys.argv[7:]:
        from sftflow.megatron.checkpoint import module_weights, write_model_shards

        step_dir = out_dir / "step_00000001"
        record["wrote"] = [f.name for f in write_model_shards(step_dir / "model", module_weights(model), at)]
        if dist.get_rank() == 0:
            meta = {"step": 1, "backend": "megatron", "world_size": dist.get_world_size(),
                    "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "context_parallel_size": 1,
                    "expert_model_parallel_size": ep, "expert_tensor_parallel_size": etp}  # fmt: skip
            (step_dir / "meta.json").write_text(json.dumps(meta))
    (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(record))
    if forward:
        tokens = torch.load(out_dir / "tokens.pt", weights_only=True).cuda()
        positions = torch.arange(tokens.shape[1], device="cuda").expand_as(tokens)
        model.eval()
        with torch.no_grad():
            logits = model(tokens, positions, attention_mask=None)
        torch.save(logits[..., : layout.vocab_size].float().cpu(), out_dir / "logits.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
