"""Data: the shard format, writers and converters, the synthetic benchmark, DALI and torch loaders.

Modules (import what you need; this package imports nothing heavy by itself, so writer
processes and the CLI start fast):

* :mod:`~wsol_core.data.format` - names, keys, tar members, DALI index files, per-sample checks;
* :mod:`~wsol_core.data.manifest` - ``dataset.json`` and the loaders' up-front checks;
* :mod:`~wsol_core.data.writer` - parallel, resumable, deterministic shard writing;
* :mod:`~wsol_core.data.converters` - wsolevaluation metadata, raw CUB-200-2011, raw ImageNet;
* :mod:`~wsol_core.data.synthetic` - the generated WSOL benchmark;
* :mod:`~wsol_core.data.loader` - :class:`LoaderOptions` and :func:`build_loader`;
* :mod:`~wsol_core.data.dali_loader`, :mod:`~wsol_core.data.torch_loader` - the two pipelines;
* :mod:`~wsol_core.data.batch` - the :class:`Batch` every loader yields.

The names below are also available from the package itself, loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Batch": "wsol_core.data.batch",
    "LoaderOptions": "wsol_core.data.loader",
    "build_loader": "wsol_core.data.loader",
    "EpochPlan": "wsol_core.data.loader",
    "SkipReport": "wsol_core.data.loader",
    "ShardError": "wsol_core.data.format",
    "Manifest": "wsol_core.data.manifest",
    "load_manifest": "wsol_core.data.manifest",
    "verify_split": "wsol_core.data.manifest",
    "WriterOptions": "wsol_core.data.writer",
    "write_split": "wsol_core.data.writer",
    "SyntheticConfig": "wsol_core.data.synthetic",
    "SyntheticWSOL": "wsol_core.data.synthetic",
    "write_synthetic": "wsol_core.data.synthetic",
    "convert_wsolmeta": "wsol_core.data.converters",
    "convert_cub": "wsol_core.data.converters",
    "convert_imagenet": "wsol_core.data.converters",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'wsol_core.data' has no attribute {name!r}")
