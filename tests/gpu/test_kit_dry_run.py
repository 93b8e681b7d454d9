"""The GPU kit on a CPU machine (CI): its pins, the dry-run's isolation, and `tests/gpu/run.sh --dry-run` end to end.

The dry-run installs the kit's wheels (this Python's builds) into a fresh --target and imports every module the
GPU checks import, seeing only the GPU image's packages and the kit; a wheel missing from the kit, or one that
conflicts with the image, fails here instead of on the GPU machine. Fetching the wheels needs PyPI: without it the
end-to-end test is skipped, saying so.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.gpu import kit


def test_kit_pins_are_exact_unique_and_never_torch(tmp_path):
    pins = kit.read_pins(kit.REQUIREMENTS)
    assert "megatron-core" in pins and "torch" not in pins
    assert set(kit.read_pins(kit.STANDINS)).isdisjoint(pins)  # a package is either the image's or the kit's
    assert set(pins).isdisjoint(kit.image_packages() - {"typing-extensions", "anyio"})  # the two shadowed on purpose
    for bad, why in [
        ("orjson>=3\n", "not an exact pin"),
        ("a==1\nA==2\n", "pinned twice"),
        ("torch==2.11.0\n", "image"),
    ]:
        path = tmp_path / "req.txt"
        path.write_text(bad)
        with pytest.raises(kit.KitError, match=why):
            kit.read_pins(path)


def test_image_site_shows_the_image_packages_and_hides_the_others(tmp_path):
    """What the dry-run relies on: under `python -S` with the linked folder, yaml (in the image) imports, orjson
    (not in the image: the kit brings it) does not."""
    subprocess.run([sys.executable, str(kit.HERE / "kit.py"), "image-site", str(tmp_path / "site")], check=True)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    probe = "import yaml\ntry:\n    import orjson\nexcept ImportError:\n    print('hidden')\n"
    out = subprocess.run([sys.executable, "-S", "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "hidden"


def pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_dry_run_installs_the_kit_and_imports_everything_the_gpu_checks_import(tmp_path):
    fetch = subprocess.run(
        [sys.executable, str(kit.HERE / "kit.py"), "fetch", "--dry-run-builds"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if fetch.returncode != 0 and not pypi_reachable():
        pytest.skip(f"PyPI (pypi.org:443) is unreachable, so the kit's wheels cannot be fetched: {fetch.stderr[-300:]}")
    assert fetch.returncode == 0, fetch.stdout[-3000:] + fetch.stderr[-3000:]

    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    run = subprocess.run(
        ["bash", "tests/gpu/run.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "kit_check.json").read_text())
    assert report["mode"] == "dry-run" and report["problems"] == []
    assert report["versions"]["transformers"] == kit.read_pins(kit.STANDINS)["transformers"]  # the image's version
    failed = {m: r for m, r in report["imports"].items() if not r.startswith(("ok", "skipped"))}
    assert not failed
    assert set(kit.GPU_IMPORTS) <= {m for m, r in report["imports"].items() if r.startswith("ok")}
    summary = json.loads((tmp_path / "summary.json").read_text())
    parts = {p["part"]: p for p in summary["parts"]}
    assert parts["kit"]["status"] == "ok"
    assert all(p["status"] == "skipped" and "dry-run" in p["note"] for name, p in parts.items() if name != "kit")
    assert sum(p["budget_seconds"] for p in summary["parts"]) <= 8 * 60
    assert {"run.log", "logs.tar.gz", "summary.json", "kit_check.json"} <= {p.name for p in tmp_path.iterdir()}
