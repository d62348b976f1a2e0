"""Write WebDataset shards (tar + DALI index + dataset.json per split) for WSOL training.

The program is :mod:`wsol_core.commands.make_shards` (installed as ``wsol-make-shards``); this file runs it from a
checkout, as ``python jobs/make_shards.py ...`` and ``ray job submit --working-dir . -- python jobs/make_shards.py`` do.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's wsol_core, wherever the command starts

from wsol_core.commands.make_shards import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
