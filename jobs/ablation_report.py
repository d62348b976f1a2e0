"""Build the papers' ablation table from MLflow runs and log it as an artifact of a summary run.

The program is :mod:`wsol_core.commands.ablation_report` (installed as ``wsol-ablation-report``); this file runs it from a
checkout, as ``python jobs/ablation_report.py ...`` and ``ray job submit --working-dir . -- python jobs/ablation_report.py`` do.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's wsol_core, wherever the command starts

from wsol_core.commands.ablation_report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
