"""Train a WSOL method on Ray Train and record it in MLflow.

The program is :mod:`wsol_core.commands.train` (installed as ``wsol-train``); this file runs it from a
checkout, as ``python jobs/train_imagenet.py ...`` and ``ray job submit --working-dir . -- python jobs/train_imagenet.py`` do.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's wsol_core, wherever the command starts

from wsol_core.commands.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
