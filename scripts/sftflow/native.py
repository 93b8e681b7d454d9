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
