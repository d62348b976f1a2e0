"""What a method's config is made of, apart from the whole :class:`~wsol_core.config.Config`.

The methods declare their config dataclasses with :class:`MethodConfig` and :func:`spec` from
here, and :mod:`wsol_core.config` picks the method's dataclass by name when it parses a config.
This module imports nothing of the project, so the methods never import :mod:`wsol_core.config`
and the two cannot form an import circle.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field, the value and the rule."""


# ---------------------------------------------------------------------------------------------
# Field specs
# ---------------------------------------------------------------------------------------------


def spec(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    odd: bool = False,
    doc: str = "",
) -> Any:
    """A dataclass field with its allowed range.

    ``ge``/``gt``/``le``/``lt`` bound numbers (and every element of a tuple of numbers); ``odd``
    requires an odd integer (kernel sizes that must keep the map centred). Choices are expressed
    with ``Literal`` in the annotation instead.
    """
    metadata = {"ge": ge, "gt": gt, "le": le, "lt": lt, "odd": odd, "doc": doc}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class MethodConfig:
    """Base of every method's config; ``name`` selects the method class.

    Each method's config also declares what the outer layers name (the search, the ablation
    sweep, the reports), so that renaming one of its fields touches its own file only:

    * ``TUNABLE``: the search's short name -> the dotted field inside the method section
      (``"theta_drop": "srd.theta_drop"``), for ``tune/search_srd.py --param`` and the spaces;
    * ``SWITCHES``: the parts an ablation turns off (``method.<part>.enabled``) -> their label
      in tables, in the paper's column order;
    * ``ABLATED``: the switches the paper's own ablation table removes one at a time (one sweep
      variant ``<method>-no-<part>`` each).
    """

    TUNABLE: ClassVar[dict[str, str]] = {}
    SWITCHES: ClassVar[dict[str, str]] = {}
    ABLATED: ClassVar[tuple[str, ...]] = ()

    name: str = "cam"


def flatten_dict(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
