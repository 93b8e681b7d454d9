"""Stage config files: how a rule hands its job the job's resolved, validated config.

While the workflow is parsed, rules/common.smk writes one JSON file per stage under OUT/config/ (e.g.
train.json) and the stage's rule takes it as an `input:`. The file is rewritten only when its content changes,
so its modification time moves only then, and Snakemake's mtime trigger reruns exactly the jobs that read it.
Keys a stage may change without rerunning (e.g. training's log period) go to a second file beside it
(e.g. train.run.json) that no rule takes as an input; the job reads both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sftflow.errors import SftflowError
from sftflow.io import atomic_path


def canonical_json(data: Any) -> str:
    """`data` as the text a stage file holds: sorted keys, indented, one trailing newline."""
    return json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def write_if_changed(path: str | os.PathLike, data: Any) -> bool:
    """Write `data` to `path` as canonical JSON (atomically) unless the file already holds exactly that text.

    Returns whether it wrote. An unchanged file keeps its modification time, so nothing that reads it reruns.
    """
    text = canonical_json(data)
    path = Path(path)
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass  # absent or unreadable: write it
    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(text, encoding="utf-8")
    return True


def read(path: str | os.PathLike) -> Any:
    """The data of a stage file (or any JSON file); errors name the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SftflowError(f"{path}: stage config file not found (the workflow writes it while planning)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SftflowError(f"{path}: cannot read the stage config file ({err})") from None
    except json.JSONDecodeError as err:
        raise SftflowError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None


def read_mapping(path: str | os.PathLike) -> dict:
    """A config file the user wrote or the workflow did (JSON, or YAML by its suffix) that must be a mapping."""
    if Path(path).suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SftflowError(f"{path}: config file not found") from None
        except (OSError, yaml.YAMLError) as err:
            raise SftflowError(f"{path}: cannot read the YAML config file ({err})") from None
        data = {} if data is None else data
    else:
        data = read(path)
    if not isinstance(data, dict):
        raise SftflowError(f"{path}: expected a mapping of config keys, found {type(data).__name__}")
    return data
