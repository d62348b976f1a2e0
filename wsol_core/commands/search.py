"""Hyperparameter search for the WSOL methods with Ray Tune, recorded in MLflow.

    uv run python tune/search_srd.py                      # the embedded default (FMCG, synthetic data, 8 trials)
    uv run python tune/search_srd.py --method icl --param S=3 --param theta_drop=0.6:0.9
    uv run python tune/search_srd.py --space my_space.yaml --num-samples 32 --data /shards/cub --epochs 50

Searches theta_drop, S, tau_fg / tau_bg, alpha and margin -- those the method has -- with TPE
(Optuna) behind a concurrency limit and ASHA early stopping on val MaxBoxAccV2. Default spaces are
in wsol_core/spaces/<method>.yaml; --space FILE and --param NAME=VALUE|LOW:HIGH|V1,V2,... override them
(a single value pins a parameter). Config layers: wsol_core/spaces/base.yaml <- --config <- options.

One MLflow parent run per search, one nested child run per trial. The best config is written to
<storage>/<name>/best_config.yaml, which `python jobs/train_imagenet.py --config FILE` takes as is.
Running the same command again (same --name and --storage-path) resumes an interrupted search.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from wsol_core.cli import add_config_options, config_from_args
from wsol_core.config import ConfigError
from wsol_core.experiments.search import METRIC, SearchSettings, elapsed, run_search
from wsol_core.experiments.space import embedded_base, load_space
from wsol_core.train.ray_session import RayStartError, report_start_failure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(parser)
    group = parser.add_argument_group("search")
    group.add_argument(
        "--space",
        action="append",
        default=[],
        metavar="FILE",
        help="search space YAML over the method's default; repeatable",
    )
    group.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="theta_drop=0.6:0.9 (range), S=3,5 (choice), tau_fg=0.8 (pin); repeatable",
    )
    group.add_argument("--num-samples", type=int, default=8, help="trials (default 8)")
    group.add_argument(
        "--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped (default 1)"
    )
    group.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA reduction factor (default 2)")
    group.add_argument(
        "--max-concurrent-trials", type=int, default=0, help="default: as many as the cluster's CPUs/GPUs fit"
    )
    group.add_argument(
        "--tpe-startup-trials",
        type=int,
        default=0,
        help="random trials before TPE models the space (default: a third, >= 2)",
    )
    group.add_argument("--search-seed", type=int, default=0, help="TPE sampler seed")
    group.add_argument("--top-k", type=int, default=5, help="rows of the top-trials table")
    group.add_argument(
        "--ray-address", default=None, help="Ray cluster address (default: the job's cluster, else a local instance)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        cfg = config_from_args(args, base=embedded_base())
        space = load_space(cfg.method.name, args.space, args.param)
        settings = SearchSettings(
            name=cfg.run.name or f"search-{cfg.method.name}",
            storage_path=cfg.run.storage_path,
            num_samples=args.num_samples,
            grace_period=args.grace_period,
            reduction_factor=args.reduction_factor,
            max_concurrent_trials=args.max_concurrent_trials,
            tpe_startup_trials=args.tpe_startup_trials,
            seed=args.search_seed,
            top_k=args.top_k,
        )
        outcome = run_search(cfg, space, settings, ray_address=args.ray_address)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RayStartError as err:  # a busy machine, said plainly: no internal traceback
        return report_start_failure(err)
    except KeyboardInterrupt as err:
        print(f"\n[wsol] {err or 'interrupted; the same command resumes the search'}", file=sys.stderr)
        return 130
    print()
    print(
        f"[wsol] search {outcome.name!r} {'(restored) ' if outcome.restored else ''}finished in {elapsed(start)}: "
        f"{len(outcome.trials)} trials, {len(outcome.early_stopped)} stopped early by ASHA"
    )
    print(
        f"[wsol] best {METRIC} = {outcome.best_score:.2f} with "
        + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in outcome.best_params.items())
    )
    print(f"[wsol] best config written to {outcome.best_config_path}")
    print(f"[wsol] train it with: python jobs/train_imagenet.py --config {outcome.best_config_path}")
    print(
        f"[wsol] MLflow parent run {outcome.parent_run_id} in experiment {outcome.experiment!r}; open the dashboard with:"
    )
    print(f"    uv run mlflow ui --backend-store-uri {outcome.tracking_uri} --host 127.0.0.1 --port 5000")
    return 0
