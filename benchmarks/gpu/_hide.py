"""Run a script or module with some top-level packages made unimportable.

    python benchmarks/gpu/_hide.py ray,mlflow SCRIPT.py ARGS...
    python benchmarks/gpu/_hide.py ray,mlflow -m pytest ARGS...

The GPU machine has no Ray, MLflow, DALI or webdataset until their bundles are carried; tiers 1
to 3 of the check must not need what they do not use. The dry run here hides the same packages,
so an import that would fail there fails here first, in CI.
"""

from __future__ import annotations

import importlib.abc
import runpy
import sys


class _Hidden(importlib.abc.MetaPathFinder):
    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names or fullname in self.names:
            raise ModuleNotFoundError(
                f"No module named {fullname!r} (hidden: not on the GPU machine for this tier)", name=fullname
            )
        return None


def main() -> None:
    names = {n for n in sys.argv[1].split(",") if n}
    sys.meta_path.insert(0, _Hidden(names))
    if sys.argv[2] == "-m":
        sys.argv = [sys.argv[3], *sys.argv[4:]]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = sys.argv[2:]
        sys.path.insert(0, str(__import__("pathlib").Path(sys.argv[0]).resolve().parent))
        runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
