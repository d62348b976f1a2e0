"""Hyperparameter search over the SRD / contrastive knobs with Ray Tune, recorded in MLflow.

``tune/search_srd.py`` is the command line; everything else lives here:

- **The space.** Short parameter names (``theta_drop``, ``S``, ``tau_fg``, ``tau_bg``, ``alpha``,
  ``margin``) map to each method's own config field (:data:`PARAMETERS`); only the parameters the
  chosen method has can be searched. Each parameter is a float range (``uniform`` /
  ``loguniform``), a set of values (``choice``) or a pinned value. :func:`validate_space` checks
  everything -- empty ranges, even kernel sizes, ``tau_bg`` not below ``tau_fg``, unknown names,
  bounds the method's config rejects -- before Ray starts. ``tau_bg < tau_fg`` is kept for every
  sample by requiring ``tau_bg``'s range to lie entirely below ``tau_fg``'s (TPE samples both
  independently, so the space itself must be valid everywhere).
- **The trials.** Each trial is a training run of the training job's own code: the trial's
  function builds a Ray Train ``TorchTrainer`` over :func:`wsol_core.train.loop.train_loop_per_worker`
  with ``ray.tune.integration.ray_train.TuneReportCallback``, the pattern Ray 2.60 documents for
  Train V2 inside Tune (also for one worker: the loop needs a Train context). Train's per-epoch
  reports (``val/score``, ``val/maxboxacc_v2``, ``train/loss``, ``epoch``, ...) reach Tune through the callback.
- **Selection.** TPE (Optuna through Ray Tune) behind a concurrency limit, ASHA on
  ``val/score`` (max; val MaxBoxAccV2, or val PxAP on a dataset with masks only) with ``epoch``
  as its time axis. Only val figures are used to rank:
  ``test/*`` keys never enter the ranking, the table or the plot.
- **MLflow.** One parent run per search (its space and settings as params and ``space.yaml``), one
  nested child run per trial (tag ``mlflow.parentRunId``) that the loop logs into; at the end the
  parent gets ``top_trials.json`` (a table), ``score_vs_params.png`` and ``best_config.yaml``.
- **Resume.** The search lives in ``<storage>/<name>``; the same command finds Tune's experiment
  state there and restores it (unfinished trials continue from their Train checkpoints, in the
  same child runs; the parent run is found again by its run key).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wsol_core.config import Config, ConfigError, dump_yaml, flatten, load_config, to_dict
from wsol_core.methods import tunable_parameters

METRIC = "val/score"  # the training loop's SCORE_KEY: val MaxBoxAccV2 (val PxAP on mask-only data)
MODE = "max"
TIME_ATTR = "epoch"

# short name -> method name -> dotted config field: declared by each method's config (TUNABLE)
PARAMETERS: dict[str, dict[str, str]] = tunable_parameters()
KINDS = ("uniform", "loguniform", "choice", "fixed")
SPACES_DIR = Path(__file__).resolve().parent / "spaces"  # package data, like the presets


def method_parameters(method: str) -> dict[str, str]:
    """The searchable short names of ``method`` and their config fields."""
    return {name: fields[method] for name, fields in PARAMETERS.items() if method in fields}


# ---------------------------------------------------------------------------------------------
# The space
# ---------------------------------------------------------------------------------------------


@dataclass
class Param:
    name: str
    kind: str  # uniform | loguniform | choice | fixed
    low: float | None = None
    high: float | None = None
    values: list = field(default_factory=list)
    value: Any = None

    @property
    def searched(self) -> bool:
        return self.kind != "fixed"

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"{self.value!r} (pinned)"
        if self.kind == "choice":
            return f"choice {self.values}"
        return f"{self.kind} [{self.low}, {self.high}]"

    def extremes(self) -> list:
        if self.kind == "fixed":
            return [self.value]
        if self.kind == "choice":
            return list(self.values)
        return [self.low, self.high]

    def to_tune(self):
        from ray import tune

        if self.kind == "uniform":
            return tune.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        return tune.choice(list(self.values))

    def to_dict(self) -> Any:
        if self.kind == "fixed":
            return self.value
        if self.kind == "choice":
            return {"type": "choice", "values": list(self.values)}
        return {"type": self.kind, "low": self.low, "high": self.high}


def parse_param(name: str, spec: Any, origin: str = "space") -> Param:
    """A parameter from YAML (a scalar pins it; ``{type, low, high}`` / ``{type: choice, values}``)
    or from the command line (``0.8`` pins, ``0.5:0.9`` is a range, ``1,3,5`` a choice)."""
    where = f"{origin}: parameter {name!r}"
    if isinstance(spec, str):
        text = spec.strip()
        try:
            if ":" in text:
                low, high = (yaml.safe_load(part) for part in text.split(":", 1))
                spec = {"type": "uniform", "low": low, "high": high}
            elif "," in text:
                spec = {"type": "choice", "values": [yaml.safe_load(v) for v in text.split(",") if v.strip()]}
            else:
                spec = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{where}: cannot parse {text!r}: {err}") from None
    if isinstance(spec, list):
        spec = {"type": "choice", "values": spec}
    if not isinstance(spec, dict):
        if isinstance(spec, bool) or not isinstance(spec, (int, float)):
            raise ConfigError(f"{where} = {spec!r} must be a number, a range or a choice")
        return Param(name, "fixed", value=spec)
    kind = spec.get("type", "uniform")
    if kind not in KINDS:
        raise ConfigError(f"{where}: type {kind!r} is not one of {list(KINDS)}")
    unknown = sorted(set(spec) - {"type", "low", "high", "values", "value"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}")
    if kind == "fixed":
        return parse_param(name, spec.get("value"), origin)
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: a choice needs a non-empty list of values, got {values!r}")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{where}: choice value {v!r} must be a number")
        if len(set(values)) != len(values):
            raise ConfigError(f"{where}: choice values {values} repeat")
        return Param(name, "choice", values=list(values)) if len(values) > 1 else Param(name, "fixed", value=values[0])
    low, high = spec.get("low"), spec.get("high")
    for bound, label in ((low, "low"), (high, "high")):
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
            raise ConfigError(f"{where}: {label} = {bound!r} must be a finite number")
    if not low < high:
        raise ConfigError(f"{where}: the range [{low}, {high}] is empty (low must be below high)")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: a loguniform range needs low > 0, got {low}")
    return Param(name, kind, low=float(low), high=float(high))


@dataclass
class SearchSpace:
    method: str
    params: dict[str, Param]

    @property
    def searched(self) -> dict[str, Param]:
        return {n: p for n, p in self.params.items() if p.searched}

    @property
    def pinned(self) -> dict[str, Any]:
        return {n: p.value for n, p in self.params.items() if not p.searched}

    def to_dict(self) -> dict:
        return {"method": self.method, "params": {n: p.to_dict() for n, p in self.params.items()}}

    def overrides(self, values: dict[str, Any]) -> list[str]:
        """``--set``-style overrides for a sample (short names) plus the pinned values."""
        fields = method_parameters(self.method)
        merged = {**self.pinned, **values}
        return [f"{fields[name]}={merged[name]!r}" for name in self.params if name in merged]


def default_space_file(method: str) -> Path:
    return SPACES_DIR / f"{method}.yaml"


def load_space(method: str, files: list[str | Path] = (), params: list[str] = ()) -> SearchSpace:
    """The method's default space (``wsol_core/spaces/<method>.yaml``) <- ``files`` <- ``params``
    (``NAME=SPEC``); validated against the method's config fields."""
    allowed = method_parameters(method)
    if not allowed:
        raise ConfigError(f"method {method!r} has none of the searchable parameters {list(PARAMETERS)}; choose fmcg, icl, caml or c2am")
    raw: dict[str, tuple[Any, str]] = {}
    sources = [default_space_file(method)] if default_space_file(method).is_file() else []
    for source in [*sources, *files]:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"search space file {str(path)!r} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        if data.get("method", method) != method:
            raise ConfigError(f"{path}: the space is for method {data['method']!r}, the search runs {method!r}")
        entries = data.get("params", {})
        unknown_top = sorted(set(data) - {"method", "params"})
        if unknown_top or not isinstance(entries, dict):
            raise ConfigError(f"{path}: expected the keys 'method' and 'params' (a mapping), got {sorted(data)}")
        for name, spec in entries.items():
            raw[name] = (spec, str(path))
    for text in params:
        if "=" not in text:
            raise ConfigError(f"--param {text!r} must look like NAME=VALUE, NAME=LOW:HIGH or NAME=V1,V2,...")
        name, spec = text.split("=", 1)
        raw[name.strip()] = (spec, "--param")
    space = SearchSpace(method, {})
    for name, (spec, origin) in raw.items():
        if name not in PARAMETERS:
            raise ConfigError(f"{origin}: unknown parameter {name!r}; searchable parameters are {list(PARAMETERS)}")
        if name not in allowed:
            raise ConfigError(f"{origin}: parameter {name!r} is not used by method {method!r}; it searches {list(allowed)}")
        space.params[name] = parse_param(name, spec, origin)
    return space


def validate_space(space: SearchSpace, base: Config) -> None:
    """Every sample of ``space`` on top of ``base`` is a valid config, or a ConfigError naming why."""
    p = space.params
    if "S" in p:
        for value in p["S"].extremes():
            if isinstance(value, float) and not value.is_integer() or int(value) % 2 != 1 or value < 1:
                raise ConfigError(f"search space: S = {value!r} must be an odd positive integer (the region stays centred)")
        if p["S"].kind in ("uniform", "loguniform"):
            raise ConfigError("search space: S must be a choice of odd integers (e.g. [1, 3, 5, 7]), not a continuous range")
    if "tau_fg" in p or "tau_bg" in p:
        fields = method_parameters(space.method)
        fg = p["tau_fg"].extremes() if "tau_fg" in p else [_get(base, fields["tau_fg"])]
        bg = p["tau_bg"].extremes() if "tau_bg" in p else [_get(base, fields["tau_bg"])]
        if not max(bg) < min(fg):
            what = "pinned " if all(not p[n].searched for n in ("tau_fg", "tau_bg") if n in p) else ""
            raise ConfigError(
                f"search space: {what}tau_bg ({_show(p, 'tau_bg', max(bg))}) must lie below tau_fg "
                f"({_show(p, 'tau_fg', min(fg))}) for every sample: the largest tau_bg {max(bg)} is not below the smallest tau_fg {min(fg)}"
            )
    # Every bound alone, with the rest pinned/at its low end, through the method's own checks.
    lows = {n: q.extremes()[0] for n, q in p.items()}
    for name, param in p.items():
        for value in param.extremes():
            sample = {**lows, name: value}
            if name != "tau_bg" and "tau_bg" in p:
                sample["tau_bg"] = p["tau_bg"].extremes()[0]
            if name == "tau_bg" and "tau_fg" in p:
                sample["tau_fg"] = max(p["tau_fg"].extremes())
            try:
                load_config(base=to_dict(base), overrides=space.overrides(sample))
            except ConfigError as err:
                raise ConfigError(f"search space: {name} = {value!r} ({param.describe()}) is invalid for method {space.method!r}: {err}") from None


def _show(p: dict[str, Param], name: str, value: Any) -> str:
    return p[name].describe() if name in p else f"{value!r} from the config"


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------------------------------
# Settings and resources
# ---------------------------------------------------------------------------------------------


@dataclass
class SearchSettings:
    name: str = "srd-search"
    storage_path: str = ""
    num_samples: int = 8
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_concurrent_trials: int = 0  # 0: derived from the cluster's CPUs (or GPUs) per trial
    tpe_startup_trials: int = 0  # 0: a third of the trials, at least 2
    seed: int = 0
    top_k: int = 5

    def validate(self, epochs: int) -> None:
        if self.num_samples < 1:
            raise ConfigError(f"--num-samples = {self.num_samples} must be at least 1")
        if self.grace_period < 1:
            raise ConfigError(f"--grace-period = {self.grace_period} must be at least 1 epoch")
        if self.grace_period > epochs:
            raise ConfigError(f"--grace-period = {self.grace_period} is longer than train.epochs = {epochs}: ASHA could never stop a trial")
        if not self.reduction_factor > 1:
            raise ConfigError(f"--reduction-factor = {self.reduction_factor} must be above 1")
        if self.max_concurrent_trials < 0:
            raise ConfigError(f"--max-concurrent-trials = {self.max_concurrent_trials} must be >= 0 (0 derives it from the resources)")
        if not self.name or "/" in self.name:
            raise ConfigError(f"--name {self.name!r} must be a non-empty name without '/'")


def trial_resources(cfg: Config) -> dict[str, float]:
    """What one trial's Train workers take (the trial's own driver function takes nothing)."""
    per_worker = {"CPU": cfg.run.cpus_per_worker, **({"GPU": 1.0} if cfg.run.use_gpu else {})}
    return {k: v * cfg.run.num_workers for k, v in per_worker.items()}


def derive_max_concurrent(cfg: Config, cluster: dict[str, float], requested: int = 0) -> int:
    """How many trials fit side by side in ``cluster`` (at least 1), capped by ``requested``."""
    need = trial_resources(cfg)
    fits = min(int(cluster.get(k, 0.0) // v) for k, v in need.items() if v > 0)
    fits = max(1, fits)
    return min(fits, requested) if requested else fits


# ---------------------------------------------------------------------------------------------
# The trial
# ---------------------------------------------------------------------------------------------


def run_trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """One Tune trial: a training run of the training job's loop on its own ``TorchTrainer``.

    ``config`` is the sample (short names); ``setup`` the search's fixed context. The trial's
    MLflow child run is keyed by the trial id, so a restored trial logs into the same run, and its
    Train run name is the trial id, so it resumes from its own latest checkpoint.
    """
    import ray.tune

    space = SearchSpace(setup["method"], {n: parse_param(n, s) for n, s in setup["space"]["params"].items()})
    sample = {k: config[k] for k in space.searched}
    cfg = load_config(base=setup["config"], overrides=[*space.overrides(sample), "train.evaluate_test=false"])
    train_in_trial(
        cfg,
        setup,
        run_name=ray.tune.get_context().get_trial_name(),
        tags={"wsol.method": cfg.method.name},
        extra_params={f"search.{k}": v for k, v in sample.items()},
    )


def train_in_trial(cfg: Config, setup: dict[str, Any], *, run_name: str, tags: dict[str, str], extra_params: dict[str, Any]) -> None:
    """Train ``cfg`` inside the current Tune trial, as a nested MLflow run of ``setup``'s parent.

    Shared by the search and the seeded sweeps (:mod:`wsol_core.sweep`). ``setup`` holds
    ``tracking_uri``, ``experiment``, ``parent_run_id``, ``search_key`` (the parent's run key),
    ``data_root`` and ``train_storage``. The child run's key and the Train run's name are the
    trial id, so a restored trial resumes its MLflow run and its latest checkpoint.
    """
    import ray.tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from wsol_core.tracking import RunLogger, start_or_resume_run
    from wsol_core.train.loop import SCORE_KEY, train_loop_per_worker

    trial_id = ray.tune.get_context().get_trial_id()
    run_id, _ = start_or_resume_run(
        setup["tracking_uri"],
        setup["experiment"],
        f"{setup['search_key']}/{trial_id}",
        run_name=run_name,
        tags={"mlflow.parentRunId": setup["parent_run_id"], "wsol.search.trial_id": trial_id, **tags},
    )
    logger = RunLogger(setup["tracking_uri"], run_id)
    logger.log_params({**flatten(cfg), **extra_params, "data.resolved_root": setup["data_root"]})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": to_dict(cfg),
            "data_root": setup["data_root"],
            "tracking_uri": setup["tracking_uri"],
            "mlflow_run_id": run_id,
            "registered_model_name": "",
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.run.num_workers,
            use_gpu=cfg.run.use_gpu,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker, **({"GPU": 1} if cfg.run.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=trial_id,
            storage_path=setup["train_storage"],
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=SCORE_KEY, checkpoint_score_order="max"),
            callbacks=[TuneReportCallback()],
        ),
    )
    try:
        trainer.fit()
    except Exception:
        logger.finish("FAILED")
        raise
    logger.finish("FINISHED")


# ---------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------


@dataclass
class SearchOutcome:
    name: str
    path: str
    restored: bool
    parent_run_id: str
    tracking_uri: str
    experiment: str
    best_params: dict[str, Any]
    best_score: float
    best_config_path: str
    trials: list[dict[str, Any]]

    @property
    def early_stopped(self) -> list[dict[str, Any]]:
        return [t for t in self.trials if t["status"] == "early_stopped"]


def run_search(
    cfg: Config,
    space: SearchSpace,
    settings: SearchSettings,
    *,
    ray_address: str | None = None,
) -> SearchOutcome:
    """Validate, start (or restore) the Tune experiment, record it in MLflow, export the best."""
    from wsol_core.data.resolve import resolve_data_root
    from wsol_core.tracking import RunLogger, git_commit, resolve_tracking_uri, start_or_resume_run
    from wsol_core.train.driver import check_data, default_storage_path

    if cfg.method.name != space.method:
        raise ConfigError(f"the space is for {space.method!r} but method.name = {cfg.method.name!r}")
    settings.validate(cfg.train.epochs)
    validate_space(space, cfg)
    if not space.searched:
        raise ConfigError("search space: every parameter is pinned; nothing to search")

    storage = str(Path(settings.storage_path or cfg.run.storage_path or default_storage_path()).resolve())
    search_dir = Path(storage) / settings.name
    data_root = resolve_data_root(cfg.data)
    data = check_data(data_root)
    tracking_uri = resolve_tracking_uri(cfg.run.tracking_uri)
    experiment = cfg.run.experiment or f"{data['dataset']}-search"
    search_key = str(search_dir)
    parent_id, parent_resumed = start_or_resume_run(
        tracking_uri,
        experiment,
        search_key,
        run_name=settings.name,
        tags={"mlflow.source.git.commit": git_commit(), "wsol.method": space.method, "wsol.search": "true"},
    )
    parent = RunLogger(tracking_uri, parent_id)
    fixed = load_config(base=to_dict(cfg), overrides=space.overrides({}))  # the pinned values applied
    parent.log_params(
        {
            **{f"space.{n}": p.describe() for n, p in space.params.items()},
            **{f"search.{k}": v for k, v in dataclasses.asdict(settings).items() if k != "storage_path"},
            "search.metric": METRIC,
            "search.mode": MODE,
            "search.algorithm": "TPE (Optuna) + ASHA",
            **flatten(fixed),
        }
    )
    parent.log_text(yaml.safe_dump(space.to_dict(), sort_keys=False), "space.yaml")
    parent.log_text(dump_yaml(fixed), "base_config.yaml")

    from wsol_core.train.ray_session import init_ray

    init_ray(ray_address)
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    max_concurrent = derive_max_concurrent(cfg, ray.cluster_resources(), settings.max_concurrent_trials)
    parent.log_params({"search.max_concurrent_trials_used": max_concurrent})
    setup = {
        "method": space.method,
        "space": space.to_dict(),
        **trial_setup(to_dict(fixed), data_root, tracking_uri, experiment, parent_id, search_dir),
    }
    trainable = trial_trainable(run_trial, setup)
    restored = tune.Tuner.can_restore(str(search_dir))
    if restored:
        print(f"[wsol] restoring the search in {search_dir}", flush=True)
        tuner = tune.Tuner.restore(str(search_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        import optuna

        startup = settings.tpe_startup_trials or max(2, settings.num_samples // 3)
        searcher = OptunaSearch(
            space={n: p.to_tune() for n, p in space.searched.items()},
            metric=METRIC,
            mode=MODE,
            sampler=optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=startup),
        )
        scheduler = ASHAScheduler(
            time_attr=TIME_ATTR,
            max_t=cfg.train.epochs,
            grace_period=settings.grace_period,
            reduction_factor=settings.reduction_factor,
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode=MODE,
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=settings.num_samples,
                max_concurrent_trials=max_concurrent,
            ),
            run_config=tune.RunConfig(name=settings.name, storage_path=storage, verbose=1),
        )
    print(f"[wsol] search {settings.name!r}: MLflow parent run {parent_id} ({'resumed' if parent_resumed else 'new'}); "
          f"{settings.num_samples} trials, up to {max_concurrent} at a time", flush=True)
    results = fit_recorded(tuner, parent)
    trials = _collect_trials(results, space, cfg.train.epochs)
    if _interrupted(trials, settings.num_samples):
        parent.finish("KILLED")
        raise KeyboardInterrupt(f"the search was interrupted; run the same command again to resume it from {search_dir}")
    _close_child_runs(tracking_uri, experiment, parent_id, trials)
    ranked = sorted((t for t in trials if t["score"] is not None), key=lambda t: -t["score"])
    if not ranked:
        parent.finish("FAILED")
        raise RuntimeError(f"no trial reported {METRIC}; see the trial errors in {search_dir}")
    best = ranked[0]
    best_cfg = load_config(base=to_dict(fixed), overrides=space.overrides(best["params"]))
    best_cfg.run.name = ""  # a fresh training run, not a resume of a trial
    best_path = search_dir / "best_config.yaml"
    best_path.parent.mkdir(parents=True, exist_ok=True)
    best_path.write_text(
        f"# Best of search {settings.name!r} by {METRIC} (val split), trial {best['trial_id']}: {best['score']:.3f}\n"
        f"# Train it with: python jobs/train_imagenet.py --config {best_path}\n" + dump_yaml(best_cfg)
    )
    _record_summary(parent, ranked[: settings.top_k], trials, space, best_path, best)
    parent.finish("FINISHED")
    return SearchOutcome(
        name=settings.name,
        path=str(search_dir),
        restored=restored,
        parent_run_id=parent_id,
        tracking_uri=tracking_uri,
        experiment=experiment,
        best_params=best["params"],
        best_score=best["score"],
        best_config_path=str(best_path),
        trials=trials,
    )


def trial_setup(config: dict, data_root: Path, tracking_uri: str, experiment: str, parent_id: str, directory: Path) -> dict[str, Any]:
    """What :func:`train_in_trial` needs besides the trial's config; ``directory`` is the Tune
    experiment's (its path is the parent run's key, the child runs' keys extend it)."""
    return {
        "config": config,
        "data_root": str(data_root),
        "tracking_uri": tracking_uri,
        "experiment": experiment,
        "parent_run_id": parent_id,
        "search_key": str(directory),
        "train_storage": str(directory / "train_runs"),
    }


def trial_trainable(function, setup: dict[str, Any]):
    """``function(config, setup)`` as a Tune trainable. The trial's own process only waits on its
    Train run, whose workers request their own CPUs/GPUs, so it reserves none itself."""
    from ray import tune

    return tune.with_resources(tune.with_parameters(function, setup=setup), {"CPU": 0, "memory": 64 * 1024**2})


def fit_recorded(tuner, parent):
    """``tuner.fit()``; the MLflow parent run is closed as KILLED / FAILED if the fit is cut short."""
    try:
        return tuner.fit()
    except KeyboardInterrupt:
        parent.finish("KILLED")
        raise
    except Exception:
        parent.finish("FAILED")
        raise


def _collect_trials(results, space: SearchSpace, epochs: int) -> list[dict[str, Any]]:
    """Per trial: sample, best val score over its epochs, epochs run, status. Test keys dropped."""
    trials = []
    for result in results:
        history = result.metrics_dataframe
        score, done = None, 0
        if history is not None and METRIC in history and len(history):
            column = history[METRIC]
            column = column[column >= 0]  # -1 marks "not evaluated yet"
            score = float(column.max()) if len(column) else None
            done = int(history[TIME_ATTR].max()) if TIME_ATTR in history else 0
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        params = {k: result.config[k] for k in space.searched if k in result.config}
        if result.error is not None:
            status = "error"
        elif done >= epochs:
            status = "completed"
        elif done > 0:
            status = "early_stopped"
        else:
            status = "not_run"
        trials.append({"trial_id": trial_id, "params": params, "score": score, "epochs": done, "status": status, "path": result.path})
    return trials


def _interrupted(trials: list[dict[str, Any]], num_samples: int) -> bool:
    """Tune returns normally on Ctrl-C with unfinished trials; a complete search has them all."""
    return len(trials) < num_samples or any(t["status"] == "not_run" for t in trials) and not all(t["status"] == "error" for t in trials)


def _close_child_runs(tracking_uri: str, experiment: str, parent_id: str, trials: list[dict[str, Any]]) -> None:
    """Trials ASHA stopped were killed mid-fit: close their child runs and tag how they ended."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000)
    by_trial = {r.data.tags.get("wsol.search.trial_id"): r for r in runs}
    for trial in trials:
        run = by_trial.get(str(trial["trial_id"]))
        if run is None:
            continue
        trial["mlflow_run_id"] = run.info.run_id
        client.set_tag(run.info.run_id, "wsol.search.status", trial["status"])
        client.set_tag(run.info.run_id, "wsol.search.epochs", str(trial["epochs"]))
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="FAILED" if trial["status"] == "error" else ("KILLED" if trial["status"] == "early_stopped" else "FINISHED"))


def _record_summary(parent, top: list[dict], trials: list[dict], space: SearchSpace, best_path: Path, best: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = {
        "rank": list(range(1, len(top) + 1)),
        "trial_id": [t["trial_id"] for t in top],
        METRIC: [round(t["score"], 4) for t in top],
        "epochs": [t["epochs"] for t in top],
        "status": [t["status"] for t in top],
        "mlflow_run_id": [t.get("mlflow_run_id", "") for t in top],
        **{name: [t["params"].get(name) for t in top] for name in space.searched},
    }
    parent.client.log_table(parent.run_id, data=table, artifact_file="top_trials.json")
    header = ["rank", "trial_id", METRIC, "epochs", "status", *space.searched]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, t in enumerate(top):
        row = [i + 1, t["trial_id"], f"{t['score']:.3f}", t["epochs"], t["status"], *(_fmt(t["params"].get(n)) for n in space.searched)]
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    parent.log_text("\n".join(lines) + "\n", "top_trials.md")

    names = list(space.searched)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
    scored = [t for t in trials if t["score"] is not None]
    for ax, name in zip(axes[0], names):
        for status, marker in (("completed", "o"), ("early_stopped", "x"), ("error", "s")):
            group = [t for t in scored if t["status"] == status]
            if group:
                ax.scatter([t["params"][name] for t in group], [t["score"] for t in group], marker=marker, label=status)
        ax.scatter([best["params"][name]], [best["score"]], s=160, facecolors="none", edgecolors="red", label="best")
        ax.set_xlabel(name)
        ax.set_ylabel("val MaxBoxAccV2")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    parent.log_figure(fig, "score_vs_params.png")
    plt.close(fig)
    parent.log_artifact(best_path)
    parent.log_metrics({f"best/{METRIC}": best["score"], "search/trials": len(trials),
                        "search/early_stopped": sum(t["status"] == "early_stopped" for t in trials)}, step=0)
    parent.set_tags({"wsol.search.best_trial": best["trial_id"], "wsol.search.best_config": str(best_path),
                     **{f"best.{k}": _fmt(v) for k, v in best["params"].items()}})


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def embedded_base() -> dict:
    """The search's lowest config layer (``wsol_core/spaces/base.yaml``): small synthetic data, the
    tiny backbone, FMCG, one worker per trial, a few epochs."""
    path = SPACES_DIR / "base.yaml"
    return copy.deepcopy(yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def elapsed(start: float) -> str:
    seconds = time.perf_counter() - start
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"

