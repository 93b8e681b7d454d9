"""The `slurm_cluster` fixture: a two-node Slurm cluster on localhost for the whole module, stopped by PID."""

from __future__ import annotations

import pytest

from tests.slurm.cluster import SlurmCluster, available


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    reason = available()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
