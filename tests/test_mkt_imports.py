"""mkt is a plain PyTorch library: importing any of its modules loads neither Spark nor Ray
(those belong to etl/, train/ and jobs/)."""

from __future__ import annotations

import ast
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


def _import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (`from a.b import c` counts as a.b.c where that
    is a module, else as a.b), read from the source files."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = {}
    for package in ("mkt", "etl", "train", "jobs", "benchmarks"):
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    deps.add(sub if sub in files else node.module)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def test_no_import_cycles() -> None:
    graph = _import_graph()
    assert "mkt.registry" in graph and "train.sweep" in graph  # the walk found the modules

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            for dep in graph[node]:
                if dep == goal:
                    return True
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return False

    cycles = sorted(
        (name, dep) for name, deps in graph.items() for dep in deps if reaches(dep, name)
    )
    assert cycles == [], f"import cycles through: {cycles}"


def test_the_contract_needs_only_the_standard_library() -> None:
    """etl/ (Spark), train/ (Ray) and serving import mkt.contract: it must pull in nothing."""
    graph = _import_graph()
    assert graph["mkt.contract"] == set()
    run = subprocess.run(
        [sys.executable, "-c", "import sys, mkt.contract; print(sorted(sys.modules))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    loaded = ast.literal_eval(run.stdout)
    assert not [m for m in loaded if m.split(".")[0] in ("torch", "numpy", "pyspark", "ray")]


def test_every_script_runs_through_the_installed_package(tmp_path) -> None:
    """pyproject.toml's scripts name a `cli` of an importable module, and an installed script
    starts from any directory: entry points need no sys.path edits."""
    import importlib
    import shutil
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    scripts = tomllib.loads(pyproject.read_text())["project"]["scripts"]
    assert "mkt-train" in scripts and "mkt-quickstart" in scripts
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), name
    installed = shutil.which("mkt-train", path=str(Path(sys.executable).parent))
    assert installed is not None, "reinstall the project: pip install -e ."
    run = subprocess.run(
        [installed, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and "usage: mkt-train" in run.stdout, run.stderr


def test_no_file_edits_sys_path() -> None:
    """Entry points import the project through the installed package, never by editing
    sys.path (which would let two checkouts' modules mix)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [
        p for d in ("mkt", "etl", "train", "jobs", "benchmarks") for p in (root / d).rglob("*.py")
    ]
    assert len(files) > 60
    editing = [str(p.relative_to(root)) for p in files if "sys.path.insert" in p.read_text()]
    assert editing == []
