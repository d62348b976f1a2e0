"""ResNet50 as in the evaluation protocol (Choe et al., CVPR 2020).

torchvision's ResNet50 with ``layer4`` at stride 1 (no dilation), so a 224 px input gives a
14x14 map; ``large_feature_map`` sets ``layer3`` to stride 1 as well (28x28). The protocol trains
``layer4`` with the classifier at the head learning rate.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet50
from torchvision.models.resnet import BasicBlock, Bottleneck

from wsol_core.models.base import Backbone


def set_stride_one(layer: nn.Sequential) -> None:
    """The protocol's change to a ResNet stage: its first block keeps the resolution. Works for
    torchvision's ``Bottleneck`` (v1.5 strides in the 3x3 ``conv2``) and ``BasicBlock`` (``conv1``)."""
    first: Bottleneck | BasicBlock = layer[0]
    strided = first.conv2 if isinstance(first, Bottleneck) else first.conv1
    strided.stride = (1, 1)
    assert first.downsample is not None  # the first block of every stage projects its shortcut
    downsample_conv: nn.Conv2d = first.downsample[0]
    downsample_conv.stride = (1, 1)


class ResNet50(Backbone):
    default_drop_stage = "layer3"
    head_stages = ("layer4",)
    protocol_classifier_init = True

    def __init__(self, large_feature_map: bool = False) -> None:
        super().__init__()
        net = resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        set_stride_one(self.layer4)
        if large_feature_map:
            set_stride_one(self.layer3)
        self._set_stages(
            [
                ("stem", [self.conv1, self.bn1, self.relu, self.maxpool], 64),
                ("layer1", [self.layer1], 256),
                ("layer2", [self.layer2], 512),
                ("layer3", [self.layer3], 1024),
                ("layer4", [self.layer4], 2048),
            ]
        )
