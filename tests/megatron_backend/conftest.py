"""The trainer tests' tiny model and packed data, for the megatron backend's tests."""

from tests.train.conftest import packed, tiny_model  # noqa: F401  (fixtures)
