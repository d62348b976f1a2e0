"""Localize your own pictures with a trained model: class, score and boxes per image.

The program is :mod:`wsol_core.commands.localize` (installed as ``wsol-localize``); this file runs it from a
checkout, as ``python jobs/localize.py ...`` and ``ray job submit --working-dir . -- python jobs/localize.py`` do.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's wsol_core, wherever the command starts

from wsol_core.commands.localize import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
