"""Shared fixtures of the integration tests: Prometheus' binaries from Debian's `prometheus` package, and
bench/ on the import path for the hostile client the poisoning test shares with the benchmarks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# bench/hostile.py (the hostile client the poisoning test shares with the benchmarks) imports as `hostile`.
BENCH = str(Path(__file__).resolve().parents[2] / "bench")
if BENCH not in sys.path:
    sys.path.append(BENCH)


def _apt_install(package: str) -> str:
    """Install a Debian package (sudo -n when not root); the output of the last try, for a skip reason."""
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*sudo, "apt-get", "install", "-y", "--no-install-recommends", package]
    tried = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600)
    if tried.returncode != 0:  # a fresh machine may have no package lists yet
        subprocess.run([*sudo, "apt-get", "update"], capture_output=True, text=True, env=env, timeout=600)
        tried = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600)
    return (tried.stdout + tried.stderr)[-500:]


@pytest.fixture(scope="session")
def prometheus_tools() -> tuple[Path, Path]:
    """Paths of `prometheus` and `promtool`, installing Debian's package when they are missing."""
    found = shutil.which("prometheus"), shutil.which("promtool")
    if None in found:
        output = _apt_install("prometheus")
        found = shutil.which("prometheus"), shutil.which("promtool")
        if None in found:
            pytest.skip(f"Debian's prometheus package could not be installed: {output}")
    server, tool = found
    assert server is not None and tool is not None
    return Path(server), Path(tool)
