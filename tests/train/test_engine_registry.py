"""The backend registry is the one list of backends: the built-in ones register through it, the config schema's
`training.backend` enum comes from it, and every registered engine class has the members of the Engine protocol."""

from __future__ import annotations

import ast
import inspect
import textwrap
import types

import pytest

from sftflow import config as C
from sftflow.errors import SftflowError
from sftflow.train import engine as E


def protocol_methods() -> set[str]:
    return {
        name
        for name, value in vars(E.Engine).items()
        if not name.startswith("_") and isinstance(value, classmethod | staticmethod | types.FunctionType)
    }


def protocol_attributes() -> set[str]:
    return set(E.Engine.__annotations__)


def attributes_set_on_self(cls: type) -> set[str]:
    """The attributes that the code of cls (and of its sftflow base classes) assigns on `self`."""
    found: set[str] = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("sftflow."):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name):
                if node.value.id == "self":
                    found.add(node.attr)
    return found


def missing_members(cls: type) -> list[str]:
    """The Engine protocol's members that `cls` lacks: methods (with their parameter names), the class
    attribute `name`, and the instance attributes its methods set."""
    missing = []
    for method in sorted(protocol_methods()):
        ours = inspect.getattr_static(cls, method, None)
        if ours is None or not callable(getattr(cls, method)):
            missing.append(f"method {method}")
            continue
        want = list(inspect.signature(getattr(E.Engine, method)).parameters)
        have = list(inspect.signature(getattr(cls, method)).parameters)
        if have[: len(want)] != want:
            missing.append(f"method {method}{tuple(want)} (has {tuple(have)})")
    class_attributes = {name for name in protocol_attributes() if "ClassVar" in str(E.Engine.__annotations__[name])}
    for name in sorted(class_attributes):
        if not hasattr(cls, name):
            missing.append(f"class attribute {name}")
    for name in sorted(protocol_attributes() - class_attributes - attributes_set_on_self(cls)):
        missing.append(f"attribute {name}")
    return missing


def test_both_built_in_backends_are_registered_with_import_strings():
    assert E.backend_names()[:2] == ["fsdp", "megatron"]
    for backend in E.BACKENDS.values():
        for target in (backend.engine, backend.checks):
            module, _, attribute = target.partition(":")
            assert module.startswith("sftflow.") and attribute


@pytest.mark.parametrize("name", E.backend_names())
def test_every_registered_engine_class_has_the_engine_protocols_members(name):
    cls = E.engine_class(name)
    assert missing_members(cls) == []
    assert cls.name == name  # what meta.json records, and what a resume is checked against


def test_the_check_finds_a_missing_method_or_attribute():
    fsdp = E.engine_class("fsdp")

    class NoEvaluate(fsdp):
        evaluate = None

    assert "method evaluate" in missing_members(NoEvaluate)

    class Empty:
        name = "empty"

    assert {"attribute optimizer", "attribute checkpointer", "method train_step"} <= set(missing_members(Empty))
    assert "class attribute name" in missing_members(type("Nameless", (), {}))


def test_the_schema_enum_is_the_registry(monkeypatch):
    schema = C.load_schema()
    assert schema["properties"]["training"]["properties"]["backend"]["enum"] == E.backend_names()
    with pytest.raises(SftflowError, match=r"training.backend.*'nccl' is not one of \['fsdp', 'megatron'\]"):
        C.validate_sections({"training": {"backend": "nccl"}})

    # A backend registered before the schema is read is a valid training.backend.
    monkeypatch.setattr(E, "BACKENDS", dict(E.BACKENDS))
    E.register("toy", engine="toy_backend:ToyEngine", checks="toy_backend:check_config")
    C.load_schema.cache_clear()
    try:
        assert C.validate_sections({"training": {"backend": "toy"}})["training"]["backend"] == "toy"
    finally:
        C.load_schema.cache_clear()


def test_register_refuses_a_malformed_target_or_a_second_definition(monkeypatch):
    monkeypatch.setattr(E, "BACKENDS", dict(E.BACKENDS))
    with pytest.raises(ValueError, match="not a 'module:attribute' import string"):
        E.register("toy", engine="toy_backend.ToyEngine", checks="toy_backend:check_config")
    with pytest.raises(ValueError, match="'fsdp' is already registered"):
        E.register("fsdp", engine="toy_backend:ToyEngine", checks="toy_backend:check_config")
    E.register("fsdp", engine=E.BACKENDS["fsdp"].engine, checks=E.BACKENDS["fsdp"].checks)  # the same: a no-op
