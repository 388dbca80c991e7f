"""mkt is a plain PyTorch library: importing any of its modules loads neither Spark nor Ray
(those belong to etl/, train/ and jobs/)."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("pyspark", "ray")

# Run in a fresh interpreter: this test process may already hold pyspark or ray.
SCRIPT = f"""
import importlib, pkgutil, sys
import mkt

names = ["mkt"]
for info in pkgutil.walk_packages(mkt.__path__, "mkt.", onerror=lambda name: sys.exit(name)):
    importlib.import_module(info.name)
    names.append(info.name)
loaded = sorted(
    m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in {FORBIDDEN!r})
)
print(len(names), loaded)
"""


def test_no_mkt_module_imports_spark_or_ray() -> None:
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stderr
    count, loaded = run.stdout.split(" ", 1)
    assert int(count) > 20  # every subpackage was walked (layers, models, serving)
    assert loaded.strip() == "[]", f"mkt imports {loaded.strip()}"
