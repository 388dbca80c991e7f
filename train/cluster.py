"""Starting Ray: an embedded local instance, or a connection to a running cluster.

Import this module before anything that imports Ray: on Linux, Ray replaces a loopback node
address with the machine's outward one unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is in the
environment when Ray is first imported, so `start_ray` sets it and only then imports Ray.

`start_ray` also keeps Ray's routine messages off the console with Ray's own settings (docs/
training.md, "Console output"): the driver's `ray` logger and Ray Data's loggers at WARNING,
Tune's old output engine (silent at `verbose=0`; the new one prints its experiment box anyway),
no Ray Data progress bars, and `quiet_worker` run in every worker process. Warnings and
errors still reach the console.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
# Environment of the driver and of every worker; a value already set wins, so a user can turn
# Ray's messages back on (e.g. RAY_DATA_LOG_LEVEL=INFO). No progress bars: tqdm is not
# installed, and bars drawn in workers would come to the console as lines.
QUIET_ENV = {"RAY_DATA_LOG_LEVEL": "WARNING", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
# Ray Data's warning, once per process, that the progress bars are off: they are, on purpose.
PROGRESS_LOGGER = "ray.data._internal.progress"
# Train's placement-group cleaner asks the State API, which runs in the dashboard, every second
# whether the controller lives, and warns each time it cannot. The embedded Ray runs without a
# dashboard, and shuts down with the run, which removes its placement groups anyway.
PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_worker() -> None:
    """`worker_process_setup_hook` of every Ray worker process of a run."""
    import ray
    from ray.util.annotations import RayDeprecationWarning

    # Ray's libraries log their routine steps at INFO; their warnings still show.
    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger(PROGRESS_LOGGER).setLevel(logging.ERROR)
    # Train's worker context logs every report ("Reporting training result ...") through a
    # logger named after its file, outside `ray.train`, so Train's LoggingConfig misses it.
    context = Path(ray.__file__).parent / "train" / "v2" / "_internal" / "execution" / "context.py"
    logging.getLogger(str(context)).setLevel(logging.WARNING)
    # Deprecated calls inside Ray's own code (e.g. Train's DatasetManager) are Ray's to fix;
    # ours, attributed to our modules, still show.
    warnings.filterwarnings("ignore", category=RayDeprecationWarning, module=r"ray\.")
    ignore_read_only_batches()


def ignore_read_only_batches() -> None:
    """mkt.features.to_tensors reads Ray's read-only Arrow-backed batches without copying and
    never writes into them, which is all that torch's warning is about. Workers and the driver
    (which scores small test sets itself) both read such batches."""
    warnings.filterwarnings(
        "ignore",
        message="The given NumPy array is not writable",
        category=UserWarning,
        module=r"mkt\.features",
    )


def quiet_embedded_worker() -> None:
    """`quiet_worker`, and no State API warnings: the embedded Ray has no dashboard. Ray's
    State API, which Train's placement-group cleaner calls without an address, finds the
    cluster by looking for running Ray instances; with another one on the machine (a second
    job, a test's head node) it fails and its thread dies printing a traceback. Naming this
    worker's own cluster in RAY_ADDRESS makes every such lookup find it."""
    import ray

    quiet_worker()
    logging.getLogger(PG_CLEANER_LOGGER).setLevel(logging.ERROR)
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def cluster_address(config: dict[str, Any]) -> str | None:
    """The cluster to join: `ray.address`, else RAY_ADDRESS (set by `ray job submit`)."""
    return config["ray"]["address"] or os.environ.get("RAY_ADDRESS") or None


def ray_environment(config: dict[str, Any]) -> dict[str, str]:
    """Set the environment Ray must find when it is first imported (a value already set wins);
    returns the quiet settings every worker of the run gets. Call before importing Ray."""
    if cluster_address(config) is None:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Train's preemption watcher (one more actor process a stage) waits for a node to be
        # drained; the embedded Ray's one node never is.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Train's controller looks at its workers every 2 s by default (sized for clusters of
        # many nodes); each stage waits for that poll to see its workers started, its reports
        # and its end. Polling one node's few workers every 0.25 s costs little and saved 6-11 s
        # of a two-stage run on this 2-core machine (docs/training.md, "Both ways of running").
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
        # Ray reports usage statistics to its project's server unless told not to; a run sends
        # traffic nowhere but 127.0.0.1.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Pyarrow decodes 8 batches ahead of a Parquet read task by default, which a local disk
        # does not need: one keeps a read task's memory lower while streaming a large table
        # (docs/BENCHMARKS.md, "Streaming memory"). A cluster reading object storage keeps 8.
        os.environ.setdefault("RAY_DATA_PARQUET_READER_BATCH_READAHEAD", "1")
    env = {name: os.environ.setdefault(name, value) for name, value in QUIET_ENV.items()}
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the driver's only: Tune runs there
    return env


def start_ray(config: dict[str, Any]) -> bool:
    """Connect to the configured cluster, or start a local Ray bound to 127.0.0.1.
    Returns True when this process started Ray (and so should shut it down)."""
    address = cluster_address(config)
    env = ray_environment(config)
    import ray

    logging.getLogger(PROGRESS_LOGGER).setLevel(logging.ERROR)
    ignore_read_only_batches()
    if address is not None:
        ray.init(
            address=address,
            logging_level=logging.WARNING,
            runtime_env={"env_vars": env, "worker_process_setup_hook": quiet_worker},
        )
        return False
    # address="local": never attach to some other cluster found on this machine.
    ray.init(
        address="local",
        num_cpus=config["ray"]["num_cpus"],
        _node_ip_address=LOOPBACK,
        include_dashboard=False,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": env, "worker_process_setup_hook": quiet_embedded_worker},
    )
    addresses = {node["NodeManagerAddress"] for node in ray.nodes()}
    if addresses != {LOOPBACK}:
        ray.shutdown()
        raise RuntimeError(
            f"the embedded Ray bound to {sorted(addresses)}, not {LOOPBACK}; was Ray imported "
            "before train.cluster.start_ray set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0?"
        )
    return True


@contextmanager
def ray_session(config: dict[str, Any]) -> Iterator[None]:
    """Ray for the `with` block: the Ray this process already holds (a test, a notebook), the
    configured cluster joined, or an embedded one started here and shut down after the block."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        yield
        return
    started_here = start_ray(config)
    try:
        yield
    finally:
        if started_here:
            import ray

            ray.shutdown()
