"""Starting Ray: an embedded local instance, or a connection to a running cluster.

Import this module before anything that imports Ray: on Linux, Ray replaces a loopback node
address with the machine's outward one unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is in the
environment when Ray is first imported, so `start_ray` sets it and only then imports Ray.
"""

from __future__ import annotations

import os
from typing import Any

LOOPBACK = "127.0.0.1"


def cluster_address(config: dict[str, Any]) -> str | None:
    """The cluster to join: `ray.address`, else RAY_ADDRESS (set by `ray job submit`)."""
    return config["ray"]["address"] or os.environ.get("RAY_ADDRESS") or None


def start_ray(config: dict[str, Any]) -> bool:
    """Connect to the configured cluster, or start a local Ray bound to 127.0.0.1.
    Returns True when this process started Ray (and so should shut it down)."""
    address = cluster_address(config)
    if address is None:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if address is not None:
        ray.init(address=address)
        return False
    # address="local": never attach to some other cluster found on this machine.
    ray.init(
        address="local",
        num_cpus=config["ray"]["num_cpus"],
        _node_ip_address=LOOPBACK,
        include_dashboard=False,
    )
    addresses = {node["NodeManagerAddress"] for node in ray.nodes()}
    if addresses != {LOOPBACK}:
        ray.shutdown()
        raise RuntimeError(
            f"the embedded Ray bound to {sorted(addresses)}, not {LOOPBACK}; was Ray imported "
            "before train.cluster.start_ray set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0?"
        )
    return True
