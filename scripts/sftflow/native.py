"""sftflow's compiled text scans (_scan.c: the equation finder and \\boxed{} finder of prepare_data's filters).

`pip install -e .` (what `make install` runs) compiles _scan.c next to its source. SCAN is that module when it was
compiled from the source as it is now, else None: then each caller runs its pure-Python reference, which gives the
same answers (tests/test_native_scan.py), only slower. SFTFLOW_PURE_PYTHON=1 chooses the references.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("_scan.c")


def load_scan():
    if os.environ.get("SFTFLOW_PURE_PYTHON"):
        return None
    try:
        from sftflow import _scan
    except ImportError:
        return None
    if SOURCE.is_file() and hashlib.sha256(SOURCE.read_bytes()).hexdigest() != _scan.SOURCE_SHA256:
        warnings.warn(
            f"{SOURCE} changed since it was compiled: using the slower pure-Python text scans "
            "(rebuild with `make install`, or `pip install -e .`)",
            stacklevel=2,
        )
        return None
    return _scan


SCAN = load_scan()


def missing_reason() -> str | None:
    """Why the pure-Python scans run instead of the compiled ones, for the log; None when the compiled ones run."""
    if SCAN is not None:
        return None
    if os.environ.get("SFTFLOW_PURE_PYTHON"):
        return "SFTFLOW_PURE_PYTHON is set: the text scans run in pure Python"
    return (
        "the compiled text scans (sftflow/_scan.c) are not built or are stale: the filters run their pure-Python "
        "references, same output with about 1.8x the CPU time (build them with `make install`: needs gcc and the "
        "Python headers)"
    )
