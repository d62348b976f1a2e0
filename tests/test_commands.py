"""The programs: installed console scripts and the checkout's scripts run the same ``main``."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
CHECKOUT = {
    "wsol-train": "jobs/train_imagenet.py",
    "wsol-evaluate": "jobs/evaluate.py",
    "wsol-localize": "jobs/localize.py",
    "wsol-make-shards": "jobs/make_shards.py",
    "wsol-ablation-report": "jobs/ablation_report.py",
    "wsol-search": "tune/search_srd.py",
    "wsol-extract-boxes": "jobs/extract_boxes.py",
    "wsol-pretrain-trunk": "jobs/pretrain_trunk.py",
}


def test_every_program_is_installed_and_runnable_from_the_checkout():
    assert set(SCRIPTS) == set(CHECKOUT)


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(CHECKOUT))
def test_the_script_runs_the_installed_programs_main(name, tmp_path):
    module, _, attribute = SCRIPTS[name].partition(":")
    main = getattr(importlib.import_module(module), attribute)
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    # From another directory, as `ray job submit --working-dir . -- python jobs/...` runs it.
    done = subprocess.run(
        [sys.executable, str(ROOT / CHECKOUT[name]), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.startswith("usage:"), done.stderr[-2000:]
    assert f"from {module} import main" in (ROOT / CHECKOUT[name]).read_text()
