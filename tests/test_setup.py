"""The set-up's Java check (scripts/check_java.sh, run by `make quickstart` and `make test`):
Spark 4 needs Java 17+, and a machine without it must hear so plainly, with how to install it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_java.sh"


def run_check(bin_dir: Path) -> subprocess.CompletedProcess[str]:
    """The script with PATH holding only `bin_dir` (awk, and a fake java if the test made one)."""
    awk = shutil.which("awk")
    assert awk is not None
    (bin_dir / "awk").symlink_to(awk)
    bash = shutil.which("bash")
    assert bash is not None
    return subprocess.run(
        [bash, str(SCRIPT)],
        env={**os.environ, "PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=30,
    )


def fake_java(bin_dir: Path, version: str) -> None:
    java = bin_dir / "java"
    java.write_text(f"#!/bin/sh\necho 'openjdk version \"{version}\" 2019-01-15' >&2\n")
    java.chmod(0o755)


def test_missing_java_is_named_with_the_install_command(tmp_path: Path) -> None:
    result = run_check(tmp_path)
    assert result.returncode == 1
    assert "Java 17+ is required" in result.stderr and "not on PATH" in result.stderr
    assert "apt-get install -y openjdk-17-jre-headless" in result.stderr


@pytest.mark.parametrize(
    ("version", "ok"), [("11.0.2", False), ("1.8.0_392", False), ("17.0.9", True), ("21", True)]
)
def test_java_version_is_checked(tmp_path: Path, version: str, ok: bool) -> None:
    fake_java(tmp_path, version)
    result = run_check(tmp_path)
    assert (result.returncode == 0) == ok, result.stderr
    if not ok:
        assert f"found Java {version}" in result.stderr
