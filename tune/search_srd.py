"""Hyperparameter search for the WSOL methods with Ray Tune, recorded in MLflow.

The program is :mod:`wsol_core.commands.search` (installed as ``wsol-search``); this file runs it from a
checkout, as ``python tune/search_srd.py ...`` and ``ray job submit --working-dir . -- python tune/search_srd.py`` do.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's wsol_core, wherever the command starts

from wsol_core.commands.search import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
