"""The `slurm_cluster` fixture: one two-node Slurm cluster on localhost for the whole test run, stopped by PID.

Under pytest-xdist the first worker that needs the cluster starts it (`once_per_run`, tests/conftest.py), every
worker's Slurm tests submit to that one cluster, and the controller stops it when the whole run ends
(`pytest_sessionfinish` in tests/conftest.py): a worker cannot know when the others are done with it. Each test
checks only its own jobs (by the job ids in its own workflow's logs), so tests running side by side on one
cluster do not see each other's jobs.
"""

from __future__ import annotations

import os

import pytest

from tests.conftest import once_per_run
from tests.slurm.cluster import SlurmCluster, available


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    reason = available()
    if reason:
        pytest.skip(reason)
    root = once_per_run(tmp_path_factory, "slurm", lambda folder: SlurmCluster(folder).start().root)
    cluster = SlurmCluster.attach(root)
    yield cluster
    if os.environ.get("PYTEST_XDIST_WORKER") is None:  # no controller to stop it: this process started it
        cluster.stop()
