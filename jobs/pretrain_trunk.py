"""Pretrain a trunk on the disjoint synthetic task and export it as torchvision-format weights (issue 16's ImageNet proxy).

The program is :mod:`wsol_core.commands.pretrain_trunk` (installed as ``wsol-pretrain-trunk``); this file runs it from a
checkout, as ``python jobs/pretrain_trunk.py ...`` and ``ray job submit --working-dir . -- python jobs/pretrain_trunk.py`` do.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's wsol_core, wherever the command starts

from wsol_core.commands.pretrain_trunk import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
