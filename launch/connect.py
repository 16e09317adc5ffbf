"""Connecting the driver to Ray: an existing cluster, the job it runs in, or an embedded local instance."""

from __future__ import annotations

import os
import shutil
import tempfile

# The embedded instance needs no big shared-memory store: actors exchange only small messages.
_LOCAL_OBJECT_STORE_BYTES = 100 * 2**20


def connect(address: str | None, num_cpus: int) -> str | None:
    """Connect to Ray; returns the temp dir of an embedded instance this call started (None otherwise).

    ``address`` (``auto``, ``host:port``, ``ray://…``) joins that cluster. Without one a local
    instance starts, bound to 127.0.0.1 with the dashboard off, offering at least ``num_cpus``
    CPUs: like torchrun, more ranks than cores is allowed on one machine.
    """
    if address:
        import ray

        ray.init(address=address, log_to_driver=False)
        return None
    # Measured here: without this Ray rewrote 127.0.0.1 (to the machine's address) and ray.init could
    # hang. Ray reads it when first imported, so the CLI imports nothing of Ray before this call.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # A single-user local instance needs no token; it listens on 127.0.0.1 only.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    temp_dir = None
    if "RAY_TMPDIR" not in os.environ:  # keep clear of other Ray sessions in the shared /tmp/ray
        temp_dir = os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="megamix-ray-")
    import ray

    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
             num_cpus=max(os.cpu_count() or 1, num_cpus), object_store_memory=_LOCAL_OBJECT_STORE_BYTES,
             log_to_driver=False)
    return temp_dir


def disconnect(temp_dir: str | None) -> None:
    """Shut down what :func:`connect` started (an embedded instance and its temp dir)."""
    import ray

    try:
        ray.shutdown()
    finally:
        if temp_dir is not None:
            del os.environ["RAY_TMPDIR"]
            shutil.rmtree(temp_dir, ignore_errors=True)
