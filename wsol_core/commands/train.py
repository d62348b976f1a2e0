"""Train a WSOL method on Ray Train and record it in MLflow.

    ray job submit --working-dir . -- python jobs/train_imagenet.py [options]
    uv run python jobs/train_imagenet.py            # the embedded default, local Ray on CPU

With no options: synthetic shards are generated into a cache on first use, and FMCG on the tiny
backbone trains with 2 CPU workers for a few epochs. Re-running with the same --name and
--storage-path resumes the run (and its MLflow run) from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys

from wsol_core.cli import add_config_options, config_from_args
from wsol_core.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(parser)
    parser.add_argument(
        "--ray-address", default=None, help="Ray cluster address (default: the job's cluster, else a local instance)"
    )
    parser.add_argument(
        "--register-model", default="", metavar="NAME", help="also register the final model in the MLflow registry"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
    except ConfigError as err:
        parser.error(str(err))

    from wsol_core.train.driver import run_training
    from wsol_core.train.ray_session import RayStartError, report_start_failure

    try:
        outcome = run_training(cfg, ray_address=args.ray_address, registered_model_name=args.register_model)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RayStartError as err:  # a busy machine, said plainly: no internal traceback
        return report_start_failure(err)
    except KeyboardInterrupt as stop:  # SIGINT or SIGTERM: the driver closed the run and said how to resume
        return getattr(stop, "exit_code", 130)
    metrics = outcome.metrics
    print()
    print(f"[wsol] finished {outcome.run_name!r} ({'resumed' if outcome.resumed else 'new'} run)")
    for split in ("val", "test"):
        shown = [
            (label, metrics[f"{split}/{key}"])
            for key, label in (
                ("maxboxacc_v2", "MaxBoxAccV2"),
                ("maxboxacc_v1", "MaxBoxAcc v1"),
                ("gt_known_loc", "GT-known Loc"),
                ("top1_loc", "Top-1 Loc"),
                ("pxap", "PxAP"),
            )
            if f"{split}/{key}" in metrics
        ]
        if shown:
            print(f"[wsol] {split} " + ", ".join(f"{label} = {value:.2f}" for label, value in shown))
    print(f"[wsol] checkpoints: {outcome.checkpoint_path}")
    print(f"[wsol] MLflow run {outcome.mlflow_run_id} in experiment {outcome.experiment!r}; open the dashboard with:")
    print(f"    {outcome.dashboard_command()}")
    return 0
