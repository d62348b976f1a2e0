"""The backbone contract every method builds on.

A backbone is a trunk split into named stages, run in order. Methods that act in the middle of
the trunk (FMCG's scheduled region drop after ``conv4_3``, ICL's drops, consistency losses on
earlier layers) run it in two pieces::

    mid = backbone.forward_features(x, until="block4")
    feats = backbone.forward_features(mid, after="block4")

The classifier is not part of the backbone: every protocol architecture ends in global average
pooling and a linear map (InceptionV3's 1x1 class-map conv is the same linear map applied before
pooling), so :class:`wsol_core.models.head.CAMHead` serves all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


class Backbone(nn.Module):
    """Named stages over modules registered on the subclass.

    Subclasses register their layers under the names torchvision uses (so pretrained weights
    load with little or no remapping) and call :meth:`_set_stages` with the stage order.

    Attributes:
        out_channels: channels of the final feature map.
        default_drop_stage: where region-drop methods act by default (the analogue of VGG16's
            ``conv4_3`` in FMCG's Table 2).
        head_stages: stages that the protocol trains at the head learning rate (layers that
            are new or repurposed relative to ImageNet pretraining).
        protocol_classifier_init: the evaluation protocol's architecture, whose classifiers start
            from N(0, 0.01) weights and zero biases (wsolevaluation ``initialize_weights``);
            :func:`~wsol_core.methods.build_method` applies it to every classifier head.
    """

    out_channels: int
    default_drop_stage: str
    head_stages: tuple[str, ...] = ()
    protocol_classifier_init: bool = False

    def _set_stages(self, stages: Sequence[tuple[str, Sequence[Callable[[torch.Tensor], torch.Tensor]], int]]) -> None:
        # Plain lists, not ModuleLists: the layers are already registered under their
        # torchvision names, and registering them twice would duplicate state-dict keys.
        self._stage_order = [name for name, _, _ in stages]
        self._stage_layers = {name: list(layers) for name, layers, _ in stages}
        self._stage_channels = {name: channels for name, _, channels in stages}
        self.out_channels = stages[-1][2]

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(self._stage_order)

    def stage_channels(self, stage: str) -> int:
        """Channels of the feature map right after ``stage``."""
        self._check_stage(stage)
        return self._stage_channels[stage]

    def _check_stage(self, stage: str) -> None:
        if stage not in self._stage_layers:
            raise ValueError(f"{type(self).__name__} has no stage {stage!r}; stages are {self.stage_names}")

    def forward_features(self, x: torch.Tensor, *, after: str | None = None, until: str | None = None) -> torch.Tensor:
        """Run the stages strictly after ``after`` up to and including ``until``."""
        start = 0 if after is None else self._index(after) + 1
        stop = len(self._stage_order) if until is None else self._index(until) + 1
        for name in self._stage_order[start:stop]:
            for layer in self._stage_layers[name]:
                x = layer(x)
        return x

    def _index(self, stage: str) -> int:
        self._check_stage(stage)
        return self._stage_order.index(stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    def head_parameter_names(self) -> set[str]:
        """Names (relative to this module) of the parameters in :attr:`head_stages`."""
        names: set[str] = set()
        layer_ids = {id(layer) for stage in self.head_stages for layer in self._stage_layers[stage]}
        for module_name, module in self.named_modules():
            if id(module) in layer_ids:
                names.update(f"{module_name}.{p}" for p, _ in module.named_parameters())
        return names


def init_new_layers(modules: Sequence[nn.Module] | nn.Module) -> None:
    """Xavier-uniform conv/linear weights and zero biases, as the protocol initializes new layers."""
    iterable = modules.modules() if isinstance(modules, nn.Module) else modules
    for module in iterable:
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.Conv1d)):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
