"""Extract pseudo boxes over a split with a trained model (C2AM Sec. 3.4, first stage).

The program is :mod:`wsol_core.commands.extract_boxes` (installed as ``wsol-extract-boxes``); this file runs it from a
checkout, as ``python jobs/extract_boxes.py ...`` and ``ray job submit --working-dir . -- python jobs/extract_boxes.py`` do.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's wsol_core, wherever the command starts

from wsol_core.commands.extract_boxes import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
