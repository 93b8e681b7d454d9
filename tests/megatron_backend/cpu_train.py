"""One rank of a megatron-backend training job on CPU gloo ranks, under torchrun (see cpu_shim.py).

From the repo root (PYTHONPATH for the tests' own helpers; sftflow is installed):

    PYTHONPATH=. torchrun --standalone --nproc-per-node=W tests/megatron_backend/cpu_train.py \\
        CONFIG_JSON PACKED MODEL CKPT JOB NUM_JOBS
"""

import json
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

from tests.megatron_backend import cpu_shim  # noqa: E402

cpu_shim.install()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main() -> None:
    cfg_path, packed, model, ckpt, job, jobs = sys.argv[1:7]
    from megatron.core import parallel_state as ps

    from sftflow.logs import setup_logging
    from sftflow.megatron.engine import megatron_parallel_dims
    from sftflow.train.cli import load_train_config
    from sftflow.train.parallel import launch_environment
    from sftflow.train.trainer import JobSpec, Trainer

    setup_logging()
    cfg = load_train_config([cfg_path])
    t = cfg["training"]
    dist.init_process_group("gloo")
    sizes = {"tp": t["tensor_model_parallel_size"], "pp": t["pipeline_model_parallel_size"],
             "cp": t["context_parallel_size"], "ep": t["expert_model_parallel_size"],
             "etp": t["expert_tensor_parallel_size"]}  # fmt: skip
    ps.initialize_model_parallel(
        tensor_model_parallel_size=sizes["tp"], pipeline_model_parallel_size=sizes["pp"],
        context_parallel_size=sizes["cp"], expert_model_parallel_size=sizes["ep"],
        expert_tensor_parallel_size=sizes["etp"],
    )  # fmt: skip
    parallel = megatron_parallel_dims(launch_environment(), torch.device("cpu"))
    spec = JobSpec(packed=packed, model=model, checkpoint_dir=ckpt, job_index=int(job), num_jobs=int(jobs),
                   done_file=str(Path(ckpt) / f"job{job}.done"))  # fmt: skip
    record = Trainer(cfg, spec, parallel).train()
    if parallel.is_main:
        print(json.dumps(record.to_json()))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
