"""Load, default-fill and validate configuration against the schema (sftflow/schema.yaml, package data;
config/schema.yaml in the checkout links to it).

The schema is the single source of truth for config keys and their defaults: Snakemake's config and
the command-line `++key=value` overrides of the scripts are both checked (and filled) here, so a typo
fails before any work starts, with a message naming the key.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from sftflow.errors import SftflowError

# Package data: installed with the package (pyproject.toml), so an installed sftflow needs no checkout.
SCHEMA_RESOURCE = "schema.yaml"


@cache
def load_schema() -> dict:
    """The config schema: every key, its type and its default."""
    text = resources.files("sftflow").joinpath(SCHEMA_RESOURCE).read_text(encoding="utf-8")
    return with_registered_backends(yaml.safe_load(text))


def with_registered_backends(schema: dict) -> dict:
    """`schema` with the enum of `training.backend` set to the registered backends' names: the registry
    (sftflow.train.engine, which imports no torch) is the one list of backends, so the schema file has none."""
    from sftflow.train.engine import backend_names

    schema["properties"]["training"]["properties"]["backend"]["enum"] = backend_names()
    return schema


def _with_defaults(validator_class):
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, subschema in properties.items():
                if "default" in subschema and key not in instance:
                    instance[key] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def _key_path(prefix: str, path) -> str:
    parts = [prefix] if prefix else []
    parts += [str(p) for p in path]
    return ".".join(parts) or "<top level>"


def _describe(error: jsonschema.ValidationError, prefix: str) -> str:
    key = _key_path(prefix, error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        msgs = []
        for name in extra:
            full = f"{key}.{name}" if key != "<top level>" else name
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            where = "top-level keys" if key == "<top level>" else f"keys of '{key}'"
            msgs.append(f"unknown config key '{full}'{hint}; the {where} are listed in config/README.md")
        return "; ".join(msgs)
    if error.validator == "enum":
        return f"config key '{key}': {error.instance!r} is not one of {error.validator_value}"
    if error.validator in ("type", "anyOf", "oneOf"):
        want = error.schema.get("type") or [s.get("type") for s in error.schema.get(error.validator, [])]
        return f"config key '{key}': {error.instance!r} has the wrong type (expected {want})"
    return f"config key '{key}': {error.message}"


def validate(instance: dict, schema: dict, prefix: str = "") -> dict:
    """Fill defaults into `instance` (in place) and validate it; raise SftflowError naming the key."""
    validator = _Validator(schema)
    errors = sorted(validator.iter_errors(instance), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        raise SftflowError("; ".join(dict.fromkeys(_describe(e, prefix) for e in errors)))
    return instance


SCHEMA_DEFAULT = "schema default"


def merge_config(base: dict, overrides: Mapping) -> dict:
    """`overrides` deep-merged over `base` (a new dict), as Snakemake merges config files: nested sections
    merge key by key, other values replace."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = merge_config(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def demo_config(workflow_dir: str | Path) -> Path:
    """The offline demo's config in the workflow checkout `workflow_dir`: Snakemake reads it only when no
    --configfile is given (see the Snakefile), so a user's config file means exactly what it says, plus the
    schema's defaults. It belongs to the workflow, not to the package: callers name their checkout."""
    return Path(workflow_dir) / "config" / "config.yaml"


def config_layers(
    configfiles: Sequence[str | Path] = (), cli_config: Mapping | None = None, *, workflow_dir: str | Path = "."
) -> list[tuple[str, dict]]:
    """(source, values) in the order Snakemake merges them: the demo config of `workflow_dir` (demo_config) only
    when no --configfile is given, then each --configfile, then --config. `workflow_dir` defaults to the working
    directory, where Snakemake itself reads the Snakefile's `configfile: "config/config.yaml"`."""
    layers = []
    for path in [Path(f) for f in configfiles] or [demo_config(workflow_dir)]:
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as err:
            raise SftflowError(f"config file {path}: {err}") from None
        if not isinstance(values, dict):
            raise SftflowError(f"config file {path}: expected a mapping of config keys, got {type(values).__name__}")
        layers.append((_display_path(path, workflow_dir), values))
    if cli_config:
        layers.append(("--config", dict(cli_config)))
    return layers


def merged_layers(layers: Sequence[tuple[str, Mapping]]) -> dict:
    """The config the layers make, merged in order (schema defaults not filled in)."""
    config: dict = {}
    for _, values in layers:
        config = merge_config(config, values)
    return config


def _display_path(path: Path, workflow_dir: str | Path) -> str:
    for base in (Path.cwd(), Path(workflow_dir)):
        try:
            return str(path.resolve().relative_to(base.resolve()))
        except ValueError:
            continue
    return str(path)


def _leaves(values: Mapping, prefix: str = ""):
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from _leaves(value, dotted + ".")
        else:
            yield dotted


def value_sources(layers: Sequence[tuple[str, Mapping]]) -> dict[str, str]:
    """Dotted key -> the layer its value comes from (the last one that sets it); keys absent here come from
    the schema's defaults."""
    sources: dict[str, str] = {}
    for source, values in layers:
        for key in _leaves(values):
            for other in [k for k in sources if k.startswith(key + ".") or key.startswith(k + ".")]:
                del sources[other]  # a section replaced by a value, or a value by a section
            sources[key] = source
    return sources


def lookup(config: Mapping, dotted: str) -> tuple[bool, Any]:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def source_of(dotted: str, sources: Mapping[str, str]) -> str:
    """Where `dotted`'s value comes from: its own layer, else a layer that set a section above it, else the schema."""
    key = dotted
    while key:
        if key in sources:
            return sources[key]
        key = key.rpartition(".")[0]
    return SCHEMA_DEFAULT


_KEY_RE = re.compile(r"(?<![\w/.-])([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)+)(?![\w/-])")


def explain_sources(message: str, config: Mapping, sources: Mapping[str, str]) -> str:
    """`message` plus, for every config key it names, the value and where it came from."""
    named = []
    for key in dict.fromkeys(_KEY_RE.findall(message)):
        found, value = lookup(config, key)
        if found and not isinstance(value, Mapping):
            named.append(f"{key} = {value!r} ({source_of(key, sources)})")
    return message + ("\n  where these values come from: " + "; ".join(named) if named else "")


def effective_config_yaml(config: Mapping, sources: Mapping[str, str]) -> str:
    """The effective config as YAML, each value followed by `# <its source>`."""
    lines: list[str] = []

    def emit(node: Mapping, indent: int, prefix: str) -> None:
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            pad = "  " * indent
            if isinstance(value, Mapping) and value:
                lines.append(f"{pad}{key}:")
                emit(value, indent + 1, dotted + ".")
            else:
                text = yaml.safe_dump({key: value}, default_flow_style=True, width=10**9).strip()[1:-1]
                lines.append(f"{pad}{text}  # {source_of(dotted, sources)}")

    emit(config, 0, "")
    return "\n".join(lines) + "\n"


def validate_workflow_config(config: dict, sources: Mapping[str, str] | None = None) -> dict:
    """Validate the Snakemake config (filling defaults) plus the checks a schema cannot express. With
    `sources` (value_sources of the config's layers), an error also says where each value it names came from."""
    try:
        validate(config, load_schema())
        check_cross_keys(config)
    except SftflowError as err:
        if sources is None:
            raise
        raise SftflowError(explain_sources(str(err), config, sources)) from None  # config: given + defaults
    return config


def check_cross_keys(config: dict) -> None:
    """Rules that span several keys; each error names the keys involved."""
    prep = config["prepare_data"]
    if prep["input_files"] is None and not config["demo"]["enabled"]:
        raise SftflowError(
            "config key 'prepare_data.input_files' is null but 'demo.enabled' is false: "
            "point prepare_data.input_files at your generation outputs (e.g. 'gen/output-rs*.jsonl')"
        )
    if config["model"]["base_model"] is None and not config["demo"]["enabled"]:
        raise SftflowError(
            "config key 'model.base_model' is null but 'demo.enabled' is false: set a model path or hub name"
        )
    check_prepare_keys(prep, prefix="prepare_data.")
    from sftflow.train.config import check_training_keys  # imports torch-free code only

    check_training_keys(config)
    check_eval_keys(config)


def check_saved_steps(config: dict) -> None:
    """Every step an export or an average needs (training.conversion_step, training.export_steps,
    training.average_steps, eval.models' step_N) is one the run saves: checked against training.save_period,
    max_num_steps and, once pack_data has written results/data/packed/index.json, the data's epoch length
    (the early stop at max_num_epochs) and the chained jobs' ends. Errors name the key and the step."""
    from sftflow.averaging import SavePlan, packed_num_sequences

    t = config["training"]
    num_sequences = packed_num_sequences(Path(config["output_dir"]) / "data" / "packed")
    plan = SavePlan.from_training(t, num_sequences)
    plan.check(t["conversion_step"], "training.conversion_step")
    plan.check(t["export_steps"], "training.export_steps")
    plan.check(t["average_steps"], "training.average_steps")
    models = config["eval"]["models"] or []
    plan.check([int(m.split("_", 1)[1]) for m in dict.fromkeys(models) if m.startswith("step_")], "eval.models")


def check_eval_keys(config: dict) -> None:
    """eval.*: benchmarks that exist, models that the workflow can make, a server it can reach."""
    from sftflow.evaluation.benchmarks import NORMALIZED_BENCHMARKS, parse_benchmarks_spec

    e, t = config["eval"], config["training"]
    names = [name for name, _ in parse_benchmarks_spec(e["benchmarks"], NORMALIZED_BENCHMARKS)]
    if "demo" in names and not config["demo"]["enabled"]:
        raise SftflowError(
            "config key 'eval.benchmarks' lists 'demo', but 'demo.enabled' is false (the demo benchmark is "
            "made by the demo): remove it or enable the demo"
        )
    for name in e["benchmark_files"]:
        if name not in NORMALIZED_BENCHMARKS:
            raise SftflowError(
                f"config key 'eval.benchmark_files.{name}': unknown benchmark; known: {', '.join(NORMALIZED_BENCHMARKS)}"
            )
    models = e["models"] or []
    if "averaged" in models and not t["average_steps"]:
        raise SftflowError(
            "config key 'eval.models' lists 'averaged', but 'training.average_steps' is null: "
            "set the steps to average (e.g. [100, 200, 300]) or drop 'averaged'"
        )
    if "base" in models and config["model"]["base_model"] is None and not config["demo"]["enabled"]:
        raise SftflowError("config key 'eval.models' lists 'base', but there is no base model (model.base_model)")
    check_saved_steps(config)
    try:
        re.compile(e["extract_regex"])
    except re.error as err:
        raise SftflowError(
            f"config key 'eval.extract_regex': {e['extract_regex']!r} is not a regular expression ({err})"
        ) from None
    if e["server_type"] == "openai" and not e["server_address"]:
        raise SftflowError(
            "config key 'eval.server_address' is null, but 'eval.server_type' is 'openai' (no server is started): "
            "set the base URL of the running server, e.g. http://host:8000/v1"
        )


def check_prepare_keys(prep: dict, prefix: str = "") -> None:
    if prep["num_output_samples"] is not None and prep["downsampling_method"] is None:
        raise SftflowError(
            f"config key '{prefix}num_output_samples' is set but '{prefix}downsampling_method' is null: "
            "choose 'fair' or 'random'"
        )
    if prep["downsampling_method"] is not None and prep["num_output_samples"] is None:
        raise SftflowError(
            f"config key '{prefix}downsampling_method' is '{prep['downsampling_method']}' "
            f"but '{prefix}num_output_samples' is null: set how many rows to keep"
        )
    for what in ("problem", "solution"):
        lo, hi = prep[f"min_{what}_length"], prep[f"max_{what}_length"]
        if lo is not None and hi is not None and lo > hi:
            raise SftflowError(f"config keys '{prefix}min_{what}_length' ({lo}) > '{prefix}max_{what}_length' ({hi})")
        flag = f"remove_len_outlier_{what}s"
        if prep["filters"][flag] and lo is None and hi is None:
            raise SftflowError(
                f"config key '{prefix}filters.{flag}' is on but '{prefix}min_{what}_length' and "
                f"'{prefix}max_{what}_length' are both null: set the bound(s) it should apply"
            )


def section_schema(name: str) -> dict:
    return load_schema()["properties"][name]


def validate_section(name: str, values: Mapping | None) -> dict:
    """A defaults-filled, schema-checked copy of the config section `name` (errors name `name.<key>`)."""
    return validate(copy.deepcopy(dict(values or {})), section_schema(name), prefix=name)


def validate_sections(config: dict) -> dict:
    """A defaults-filled, schema-checked copy of {"training": ..., "packing": ...} (as the trainer receives it)."""
    out = copy.deepcopy(config)
    for section in ("training", "packing"):
        out[section] = validate_section(section, out.get(section))
    return out


def parse_overrides(args: list[str]) -> dict:
    """Parse NeMo-Skills/Hydra style `++a.b=value` arguments into a nested dict.

    Values are parsed as YAML scalars/flow collections (true, null, 3, 0.5, [a, b], {k: v}); anything
    YAML cannot parse (e.g. a glob starting with '*') is kept as a plain string.
    """
    result: dict[str, Any] = {}
    for arg in args:
        if not arg.startswith("++") or "=" not in arg:
            raise SftflowError(f"argument {arg!r}: expected ++key=value (e.g. ++output_path=sft.jsonl)")
        key, raw = arg[2:].split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise SftflowError(f"argument {arg!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (str, int, float, bool, list, dict)) or value is None:
            pass
        else:  # dates and other YAML types: keep what the user typed
            value = raw
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SftflowError(f"argument {arg!r}: '{part}' is set both as a value and as a section")
        node[parts[-1]] = value
    return result


def yaml_value(value: Any) -> str:
    """`value` as the text of a `++key=value` argument that parse_overrides reads back to the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000)
    return text.removesuffix("\n").removesuffix("\n...").strip()
