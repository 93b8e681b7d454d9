"""The `slurm_cluster` fixture: one two-node Slurm cluster on localhost for the whole test run, stopped by PID.

Under pytest-xdist the first worker that needs the cluster starts it (under a file lock in the run's common
temporary folder), every worker's Slurm tests submit to that one cluster, and the controller stops it when the
whole run ends (`pytest_sessionfinish` in tests/conftest.py calls `stop_shared_cluster`): a worker cannot know
when the others are done with it. Each test checks only its own jobs (by the job ids in its own workflow's
logs), so tests running side by side on one cluster do not see each other's jobs.
"""

from __future__ import annotations

import os

import pytest
from filelock import FileLock

from tests.slurm.cluster import SlurmCluster, available


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    reason = available()
    if reason:
        pytest.skip(reason)
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.stop()
        return
    root = tmp_path_factory.getbasetemp().parent  # common to the run's workers
    with FileLock(str(root / "slurm.lock")):
        cluster = SlurmCluster.attach(root / "slurm")
        if cluster is None:
            cluster = SlurmCluster(root / "slurm")
            cluster.start()
    yield cluster
