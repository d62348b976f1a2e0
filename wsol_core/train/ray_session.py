"""Connecting to Ray the same way from every entry point."""

from __future__ import annotations

import os


def init_ray(address: str | None = None) -> None:
    """Join ``address`` (or ``$RAY_ADDRESS``, as set inside ``ray job submit``), else start a
    private local instance.

    A private instance (``address="local"``) never attaches to another user's ``ray start``
    on the same machine. Its workers run this very interpreter (the project's environment), so
    Ray's ``uv run`` hook, which would rebuild the environment from the working directory and
    fails when the command starts outside the repository, is turned off for it, and its raylet
    gets 120 s instead of 30 to register (Ray's own advice when a busy machine misses it: "The
    current node timed out during startup"); both yield to values the user set.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # read when ray is imported
        os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address or "local", log_to_driver=True)
