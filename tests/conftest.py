"""Shared pytest setup."""

from __future__ import annotations

import os

# Tests never reach a tracking server by accident.
os.environ.pop("MLFLOW_TRACKING_URI", None)
# Keep torch from oversubscribing the 2-core CI machine when tests run beside Ray workers.
os.environ.setdefault("OMP_NUM_THREADS", "2")
