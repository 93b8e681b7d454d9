"""sftflow's one C extension, the text scans of prepare_data's filters (metadata: pyproject.toml).

`pip install -e .` (make install) compiles it next to its source; sftflow.native uses it only when it was compiled
from the source as it is now, and the pure-Python references run otherwise.
"""

import hashlib
from pathlib import Path

from setuptools import Extension, setup

SOURCE = Path("scripts/sftflow/_scan.c")

setup(
    ext_modules=[
        Extension(
            "sftflow._scan",
            [str(SOURCE)],
            define_macros=[("SOURCE_SHA256", f'"{hashlib.sha256(SOURCE.read_bytes()).hexdigest()}"')],
            extra_compile_args=["-O2"],
            optional=True,  # no compiler: the install goes on, and prepare_data runs the pure-Python reading
        )
    ]
)
