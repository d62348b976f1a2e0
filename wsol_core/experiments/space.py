"""The search space: short parameter names, their ranges, and the checks that every sample is a
valid config.

Short names (``theta_drop``, ``S``, ``tau_fg``, ``tau_bg``, ``alpha``, ``margin``) map to each
method's own config field, as each method's config declares them (``TUNABLE``; collected in
:data:`PARAMETERS`); only the parameters the chosen method has can be searched. Each parameter is
a float range (``uniform`` / ``loguniform``), a set of values (``choice``) or a pinned value.
:func:`validate_space` checks everything -- empty ranges, even kernel sizes, ``tau_bg`` not below
``tau_fg``, unknown names, bounds the method's config rejects -- before Ray starts. ``tau_bg <
tau_fg`` is kept for every sample by requiring ``tau_bg``'s range to lie entirely below
``tau_fg``'s (TPE samples both independently, so the space itself must be valid everywhere).

The default spaces and the search's base config ship as package data (``wsol_core/spaces``).
Nothing here imports Ray except :meth:`Param.to_tune`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wsol_core.config import Config, ConfigError, load_config, to_dict
from wsol_core.methods import tunable_parameters

# short name -> method name -> dotted config field: declared by each method's config (TUNABLE)
PARAMETERS: dict[str, dict[str, str]] = tunable_parameters()
KINDS = ("uniform", "loguniform", "choice", "fixed")
SPACES_DIR = Path(__file__).resolve().parents[1] / "spaces"  # package data, like the presets


def method_parameters(method: str) -> dict[str, str]:
    """The searchable short names of ``method`` and their config fields."""
    return {name: fields[method] for name, fields in PARAMETERS.items() if method in fields}


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
    bounds = {"low": spec.get("low"), "high": spec.get("high")}
    for label, bound in bounds.items():
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
            raise ConfigError(f"{where}: {label} = {bound!r} must be a finite number")
    low, high = float(bounds["low"]), float(bounds["high"])  # type: ignore[arg-type]  # checked above
    if not low < high:
        raise ConfigError(f"{where}: the range [{low}, {high}] is empty (low must be below high)")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: a loguniform range needs low > 0, got {low}")
    return Param(name, kind, low=low, high=high)


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


def load_space(method: str, files: Sequence[str | Path] = (), params: Sequence[str] = ()) -> SearchSpace:
    """The method's default space (``wsol_core/spaces/<method>.yaml``) <- ``files`` <- ``params``
    (``NAME=SPEC``); validated against the method's config fields."""
    allowed = method_parameters(method)
    if not allowed:
        raise ConfigError(
            f"method {method!r} has none of the searchable parameters {list(PARAMETERS)}; choose fmcg, icl, caml, c2am or regressor"
        )
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
            raise ConfigError(
                f"{origin}: parameter {name!r} is not used by method {method!r}; it searches {list(allowed)}"
            )
        space.params[name] = parse_param(name, spec, origin)
    return space


def validate_space(space: SearchSpace, base: Config) -> None:
    """Every sample of ``space`` on top of ``base`` is a valid config, or a ConfigError naming why."""
    p = space.params
    if "S" in p:
        for value in p["S"].extremes():
            if isinstance(value, float) and not value.is_integer() or int(value) % 2 != 1 or value < 1:
                raise ConfigError(
                    f"search space: S = {value!r} must be an odd positive integer (the region stays centred)"
                )
        if p["S"].kind in ("uniform", "loguniform"):
            raise ConfigError(
                "search space: S must be a choice of odd integers (e.g. [1, 3, 5, 7]), not a continuous range"
            )
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
                raise ConfigError(
                    f"search space: {name} = {value!r} ({param.describe()}) is invalid for method {space.method!r}: {err}"
                ) from None


def _show(p: dict[str, Param], name: str, value: Any) -> str:
    return p[name].describe() if name in p else f"{value!r} from the config"


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def embedded_base() -> dict:
    """The search's lowest config layer (``wsol_core/spaces/base.yaml``): small synthetic data, the
    tiny backbone, FMCG, one worker per trial, a few epochs."""
    path = SPACES_DIR / "base.yaml"
    return copy.deepcopy(yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
