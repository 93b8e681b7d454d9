"""One chained training job: `torchrun --standalone --nproc-per-node=N scripts/train.py --packed ... [--config FILE]`.

`scripts/train.py launch ... -- <command>` is the train_job rule's launcher: it fills in the Slurm
allocation's rendezvous address, runs the torchrun (or srun + torchrun) command and checks the done-file.
See sftflow/train/cli.py (the worker) and sftflow/train/launch.py (the launcher and its exit codes) for the
arguments.
"""

import sys

from sftflow.train.cli import train_main
from sftflow.train.launch import launch_main

if __name__ == "__main__":
    if sys.argv[1:2] == ["launch"]:
        sys.exit(launch_main(sys.argv[2:]))
    sys.exit(train_main())
