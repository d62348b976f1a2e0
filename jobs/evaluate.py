"""Score a trained checkpoint on a shard split with the protocol's metrics.

The program is :mod:`wsol_core.commands.evaluate` (installed as ``wsol-evaluate``); this file runs it from a
checkout, as ``python jobs/evaluate.py ...`` and ``ray job submit --working-dir . -- python jobs/evaluate.py`` do.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's wsol_core, wherever the command starts

from wsol_core.commands.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
