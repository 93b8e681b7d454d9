"""Fixtures of the trainer tests: a tiny Llama on disk, packed data, and a one-process world for in-process runs."""

from __future__ import annotations

import pytest

from tests.train.helpers import make_model, make_packed


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def packed(tmp_path_factory):
    return make_packed(tmp_path_factory.mktemp("data") / "packed")


@pytest.fixture(scope="session")
def world1():
    """A process group of one (gloo, in-memory store) shared by the in-process training tests."""
    from sftflow.train.parallel import init_parallel, shutdown

    pd = init_parallel(tp=1)
    yield pd
    shutdown()
