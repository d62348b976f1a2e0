"""Typed configuration: dataclasses, YAML files, dotted command-line overrides, up-front validation.

A run is described by one :class:`Config`. It is built in three layers, later ones winning:

1. the dataclass defaults (the embedded default: synthetic data, the tiny backbone, FMCG);
2. YAML files (a preset shipped in ``wsol_core/presets/`` by name, or any path);
3. ``--set section.field=value`` overrides, values parsed as YAML scalars.

The ``method`` section is a tagged union: ``method.name`` picks the method's own config dataclass
(registered by each method file), so ``method.srd.theta_drop`` only exists where SRD does and a
typo fails loudly instead of being ignored.

Every field is checked before anything expensive starts (no Ray, no data): types, ranges and
choices come from field metadata (:func:`spec`), cross-field rules from each dataclass's
``validate`` method. Errors name the dotted field, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

# The leaf the methods build their configs from (no import of them here at module level, so
# no circle): re-exported, as every caller knows them from this module.
from wsol_core.config_fields import ConfigError, MethodConfig, flatten_dict, spec  # noqa: F401


def _describe_range(meta: Mapping[str, Any]) -> str:
    low = (
        f"[{meta['ge']}"
        if meta.get("ge") is not None
        else (f"({meta['gt']}" if meta.get("gt") is not None else "(-inf")
    )
    high = (
        f"{meta['le']}]" if meta.get("le") is not None else (f"{meta['lt']})" if meta.get("lt") is not None else "inf)")
    )
    return f"{low}, {high}"


def _check_number(path: str, value: float, meta: Mapping[str, Any]) -> None:
    bad = (
        (meta.get("ge") is not None and not value >= meta["ge"])
        or (meta.get("gt") is not None and not value > meta["gt"])
        or (meta.get("le") is not None and not value <= meta["le"])
        or (meta.get("lt") is not None and not value < meta["lt"])
        or value != value  # NaN
    )
    if bad:
        raise ConfigError(f"{path} = {value!r} is outside the allowed range {_describe_range(meta)}")
    if meta.get("odd") and (int(value) != value or int(value) % 2 != 1):
        raise ConfigError(f"{path} = {value!r} must be an odd positive integer")


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Backbone choice, as in the evaluation protocol (Choe et al., CVPR 2020)."""

    backbone: Literal["vgg16", "resnet50", "inception_v3", "tiny"] = "tiny"
    large_feature_map: bool = False
    # A torchvision-format state dict on disk, "torchvision" to fetch the weights enum (online
    # machines only), or a training checkpoint of this project (its backbone, any backbone
    # kind). None trains from scratch.
    pretrained: str | None = None
    # 0 takes the number of classes from the dataset manifest.
    num_classes: int = spec(0, ge=0)


@dataclass
class SyntheticDataConfig:
    """The generated WSOL benchmark used when ``data.root`` is empty (the embedded default)."""

    num_train: int = spec(1600, ge=1)
    num_val: int = spec(300, ge=1)
    num_test: int = spec(300, ge=1)
    size: int = spec(128, ge=32)
    classes: int = spec(10, ge=2)
    seed: int = 0
    # Creatures in a canonical pose (body near horizontal, part on top, lit from above), as
    # photographs have; the default draws every orientation (see wsol_core/data/synthetic.py).
    upright: bool = False
    # Every body wears the same checker texture, so the whole object (not only its part) differs
    # from the background in a class-agnostic way (see wsol_core/data/synthetic.py).
    body_texture: bool = False
    # Where generated shards are cached; "" means ``$XDG_CACHE_HOME/wsol/synthetic``.
    cache_dir: str = ""


@dataclass
class DataConfig:
    """Shard location and the input pipeline."""

    # A shard root with train/, val/, test/ (jobs/make_shards.py writes it). Empty: synthetic.
    root: str = ""
    loader: Literal["auto", "dali", "torch"] = "auto"
    # 0 = automatic: the protocol's 256 / 224 on real data; on the synthetic benchmark its image
    # size and 7/8 of it (128 -> 112 px, a 14x14 map on the tiny backbone).
    resize_size: int = spec(0, ge=0)
    crop_size: int = spec(0, ge=0)
    random_resized_crop: bool = False
    batch_size: int = spec(32, ge=1, doc="per worker")
    num_threads: int = spec(2, ge=1, doc="decode threads per worker")
    skip_corrupt: bool = False
    # Where the torch loader decodes JPEGs: "workers" (PIL, the protocol's exact pixels) or
    # "device" (batched nvJPEG on the GPU with GPU crops and resizes: GPU decoding where DALI is
    # missing). DALI always decodes on the GPU when there is one.
    decode: Literal["workers", "device"] = "workers"
    # How each JPEG is checked before it counts: "strict" decodes its entropy data with
    # libjpeg-turbo in strict mode (a corrupt scan is a bad sample: named, or skipped and counted);
    # "structure" checks only its markers, as before (for DALI on a GPU host reading shards that
    # were checked when written: the strict pass costs about one CPU decode per image).
    jpeg_check: Literal["strict", "structure"] = "strict"
    # The rest of the input pipeline's options (LoaderOptions documents each), same names:
    hflip: bool = True
    rrc_scale: tuple[float, float] = spec((0.08, 1.0), gt=0.0, le=1.0, doc="random-resized crop: area fraction range")
    rrc_ratio: tuple[float, float] = spec((3 / 4, 4 / 3), gt=0.0, doc="random-resized crop: aspect-ratio range")
    shuffle_buffer: int = spec(1024, ge=1, doc="training shuffle buffer, samples per worker")
    prefetch: int = spec(2, ge=1, doc="batches prepared ahead")
    verify: Literal["none", "fast", "full"] = "fast"
    mask_size: int = spec(224, ge=1, doc="PxAP masks are resized to mask_size x mask_size")
    worker_start: Literal["fork", "forkserver", "spawn"] = "fork"
    # A pseudo-box sidecar of the training split (jobs/extract_boxes.py writes it): absolute, or
    # relative to the data root (extraction's default is "train.pseudo_boxes"). The training
    # batches then carry each sample's pseudo box; a box regressor needs it.
    pseudo_boxes: str = ""
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)

    def resolved_sizes(self) -> tuple[int, int]:
        """``(resize_size, crop_size)`` with the automatic values filled in."""
        if self.root:
            default_resize, default_crop = 256, 224
        else:
            default_resize, default_crop = self.synthetic.size, self.synthetic.size * 7 // 8
        return self.resize_size or default_resize, self.crop_size or default_crop

    def validate(self, path: str) -> None:
        for name in ("resize_size", "crop_size"):
            value = getattr(self, name)
            if 0 < value < 8:
                raise ConfigError(f"{path}.{name} = {value} must be 0 (automatic) or at least 8")
        if self.decode == "device" and self.loader == "dali":
            raise ConfigError(
                f"{path}.decode = device applies to the torch loader; {path}.loader = dali decodes on the GPU itself"
            )
        for name in ("rrc_scale", "rrc_ratio"):
            low, high = getattr(self, name)
            if low > high:
                raise ConfigError(f"{path}.{name} = {[low, high]} must be a range [low, high] with low <= high")
        resize, crop = self.resolved_sizes()
        if crop > resize and not self.random_resized_crop:
            raise ConfigError(
                f"{path}.crop_size = {crop} is larger than {path}.resize_size = "
                f"{resize}; the protocol crops inside the resized image"
            )


@dataclass
class OptimConfig:
    """SGD with the protocol's two learning-rate groups and a step decay."""

    lr: float = spec(0.01, gt=0.0)
    momentum: float = spec(0.9, ge=0.0, lt=1.0)
    weight_decay: float = spec(1e-4, ge=0.0)
    nesterov: bool = False
    # The protocol trains newly added layers 10x faster than the pretrained trunk.
    head_lr_mult: float = spec(10.0, gt=0.0)
    # "step": lr_decay_factor every lr_decay_every epochs (the protocol); "poly": decay to 0 as
    # (1 - progress) ** poly_power (C2AM's released recipe); "cosine": half a cosine to 0 over
    # the run, per step (PSOL's CosineAnnealingLR, the box regressor's recipe).
    schedule: Literal["step", "poly", "cosine"] = "step"
    lr_decay_every: int = spec(15, ge=1, doc="epochs between decays")
    lr_decay_factor: float = spec(0.1, gt=0.0, le=1.0)
    poly_power: float = spec(0.9, gt=0.0)
    warmup_epochs: float = spec(0.0, ge=0.0)
    fused: bool = True


@dataclass
class TrainConfig:
    epochs: int = spec(4, ge=1)
    seed: int = 0
    amp: Literal["auto", "bf16", "off"] = "auto"
    channels_last: bool = True
    compile: bool = False
    eval_every: int = spec(1, ge=1, doc="epochs between val evaluations")
    keep_best: int = spec(2, ge=1, doc="checkpoints kept by val MaxBoxAccV2, plus the latest")
    grad_clip: float = spec(0.0, ge=0.0, doc="0 disables")
    # Score the test split once at the end. Search trials turn it off: they select on val only
    # (the protocol's rule) and never look at test.
    evaluate_test: bool = True


@dataclass
class EvalConfig:
    """Evaluation protocol knobs (Choe et al., CVPR 2020)."""

    # The protocol's threshold step (wsolevaluation's default): 1000 thresholds. The all-thresholds
    # evaluator costs about the same at 1000 as at 100, and a coarser grid scores lower (it can
    # miss the best threshold), which made in-training and offline scores differ.
    cam_curve_interval: float = spec(0.001, gt=0.0, lt=1.0)
    iou_thresholds: tuple[int, ...] = spec((30, 50, 70), gt=0, lt=100)
    num_vis_images: int = spec(8, ge=0)
    batch_size: int = spec(64, ge=1)
    # Images per rank on which the method's training-time loss masks are measured (area and
    # share inside the GT boxes, logged as <split>/mask_<name>_*); 0 turns it off.
    mask_stat_images: int = spec(256, ge=0)
    # Score the method's alternative inference maps (FMCG's erased / original / max, C2AM's two
    # orientations p / one_minus_p) beside the configured one, as <split>/maxboxacc_v2_map_<name>.
    # Costs one more forward pass per evaluation batch for those methods.
    compare_inference_maps: bool = True
    # The protocol computes CAMs in fp32; bf16 maps moved MaxBoxAccV2 by about 0.2 points (CPU),
    # so evaluation runs in fp32 whatever train.amp says. bf16 is an explicit, faster option.
    precision: Literal["fp32", "bf16"] = "fp32"
    # Input path of val / test: "exact" reads them with the torch loader, bit-identical to the
    # protocol's transform (PIL bilinear resize); "same" uses data.loader (DALI's resize differs
    # by up to 2 grey levels on CPU). Training always uses data.loader.
    loader: Literal["exact", "same"] = "exact"


@dataclass
class RunConfig:
    """Where and how a run executes and is recorded."""

    name: str = ""
    storage_path: str = ""
    tracking_uri: str = ""
    experiment: str = ""
    num_workers: int = spec(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = spec(1.0, gt=0.0)
    max_failures: int = spec(2, ge=-1)
    # Resuming a run with the same name and storage path: "auto" continues from the newest
    # checkpoint that verifies (a damaged one is named and skipped); "never" starts a fresh run
    # under a new name. resume_from: one checkpoint directory of this run to continue from.
    resume: Literal["auto", "never"] = "auto"
    resume_from: str = ""


DEFAULT_METHOD = "fmcg"


def _default_method_config() -> MethodConfig:
    return _method_config_class(DEFAULT_METHOD, "method")()


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=_default_method_config)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ---------------------------------------------------------------------------------------------
# Building from dicts, YAML and overrides
# ---------------------------------------------------------------------------------------------


def _method_config_class(name: str, path: str) -> type[MethodConfig]:
    from wsol_core.methods import METHOD_NAMES, method_config_class  # here: methods import this module

    if name not in METHOD_NAMES:
        raise ConfigError(f"{path}.name = {name!r} is not a method; choose one of {list(METHOD_NAMES)}")
    return method_config_class(name)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Turn a YAML/CLI value into ``tp``, or raise naming ``path``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{path} = {value!r} has the wrong type")
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool):
            # YAML 1.1 reads off/no/on/yes as booleans; map them back to a matching choice.
            spelled = ("on", "yes", "true") if value else ("off", "no", "false")
            value = next((c for c in choices if isinstance(c, str) and c.lower() in spelled), value)
        if value not in choices:
            raise ConfigError(f"{path} = {value!r} is not one of {list(choices)}")
        return value
    if origin is tuple:
        args = get_args(tp)
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} = {value!r} must be a list")
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[T, ...]: any length
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):  # tuple[T1, T2]: exactly that many
            raise ConfigError(f"{path} = {list(value)!r} must have {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, t, f"{path}[{i}]") for i, (v, t) in enumerate(zip(value, args)))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return _from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path} = {value!r} must be true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path} = {value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; accept any float literal.
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{path} = {value!r} must be a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} = {value!r} must be a number")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{path} = {value!r} must be a string")
        return str(value)
    raise ConfigError(f"{path}: unsupported field type {tp!r}")


def _from_dict(cls: type, data: dict, path: str) -> Any:
    if cls is MethodConfig:  # the tagged union: the name picks the method's own dataclass
        cls = _method_config_class(data.get("name", DEFAULT_METHOD), path)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {unknown}; known fields are {sorted(known)}")
    kwargs = {name: _coerce(value, hints[name], f"{path}.{name}" if path else name) for name, value in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    """A plain, YAML-safe dict of a config (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values, e.g. ``{"method.srd.theta_drop": 0.8}`` (MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in to_dict(cfg).items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_dict(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            # A new method name discards the old method's fields: they may not exist there.
            if key == "method" and "name" in value and value["name"] != merged[key].get("name"):
                merged[key] = dict(value)
            else:
                merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict:
    """``"a.b.c=0.8"`` -> ``{"a": {"b": {"c": 0.8}}}``; the value is parsed as a YAML scalar."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: cannot parse value {raw!r}: {err}") from None
    nested: dict = {}
    cursor = nested
    parts = key.split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def preset_names() -> list[str]:
    return sorted(
        p.name[: -len(".yaml")] for p in resources.files("wsol_core.presets").iterdir() if p.name.endswith(".yaml")
    )


def read_yaml(source: str | Path) -> dict:
    """A preset name (``fmcg_vgg16_cub``) or a YAML file path, as a dict."""
    path = Path(source)
    if not path.suffix and str(source) in preset_names():
        text = resources.files("wsol_core.presets").joinpath(f"{source}.yaml").read_text()
        origin = f"preset {source!r}"
    elif path.is_file():
        text = path.read_text()
        origin = str(path)
    else:
        raise ConfigError(f"config {str(source)!r} is neither a file nor a preset; presets: {preset_names()}")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{origin}: invalid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping")
    return data


def load_config(
    sources: list[str | Path] | None = None,
    overrides: list[str] | None = None,
    base: dict | None = None,
) -> Config:
    """Defaults <- ``base`` <- YAML ``sources`` in order <- ``overrides``; validated."""
    # Method defaults come from the method's own dataclass once its name is known.
    merged: dict = {
        f.name: to_dict(f.default_factory() if callable(f.default_factory) else f.default)
        for f in dataclasses.fields(Config)
        if f.name != "method"
    }
    merged["method"] = {"name": DEFAULT_METHOD}
    if base:
        merged = _deep_merge(merged, base)
    for source in sources or []:
        merged = _deep_merge(merged, read_yaml(source))
    for text in overrides or []:
        merged = _deep_merge(merged, parse_override(text))
    cfg = _from_dict(Config, merged, "")
    validate(cfg)
    return cfg


def read_through_schema(config: dict) -> dict:
    """A config as written by an earlier version, read by today's schema: fields added since take
    their defaults. Returned unchanged when it no longer parses (a field since removed or renamed),
    so that a comparison names the difference."""
    try:
        return to_dict(load_config(base=config))
    except (ConfigError, TypeError, ValueError):
        return config


def validate(cfg: Any, path: str = "") -> None:
    """Range/choice checks from field metadata, then each section's own ``validate``."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        dotted = f"{path}.{f.name}" if path else f.name
        if dataclasses.is_dataclass(value):
            validate(value, dotted)
            continue
        _coerce(value, hints[f.name], dotted)  # type and Literal choices
        numbers = value if isinstance(value, tuple) else (value,)
        for number in numbers:
            if isinstance(number, (int, float)) and not isinstance(number, bool):
                _check_number(dotted, number, f.metadata)
    own = getattr(cfg, "validate", None)
    if callable(own) and path:
        own(path)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
