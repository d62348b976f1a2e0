"""A small VGG-style backbone for the embedded default and the tests.

Four conv blocks with batch norm (BN makes it train from scratch in a few CPU epochs) and a
``conv6``-like head stage, so it has the same stage vocabulary as VGG16-GAP. Stride 8: a 112 px
input gives a 14x14 map, the protocol's resolution at 224 px. ``large_feature_map`` drops the
last pool (stride 4).
"""

from __future__ import annotations

from torch import nn

from wsol_core.models.base import Backbone, init_new_layers


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=False)]


class TinyCNN(Backbone):
    default_drop_stage = "block3"
    head_stages = ("conv6",)

    def __init__(self, large_feature_map: bool = False, width: int = 32) -> None:
        super().__init__()
        w = width
        self.block1 = nn.Sequential(*_conv_bn(3, w), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(*_conv_bn(w, 2 * w), nn.MaxPool2d(2))
        self.block3 = nn.Sequential(*_conv_bn(2 * w, 4 * w), *_conv_bn(4 * w, 4 * w))
        self.block4 = nn.Sequential(nn.Identity() if large_feature_map else nn.MaxPool2d(2), *_conv_bn(4 * w, 4 * w))
        self.conv6 = nn.Sequential(nn.Conv2d(4 * w, 8 * w, 3, padding=1), nn.ReLU(inplace=False))
        init_new_layers(self)
        self._set_stages(
            [
                ("block1", [self.block1], w),
                ("block2", [self.block2], 2 * w),
                ("block3", [self.block3], 4 * w),
                ("block4", [self.block4], 4 * w),
                ("conv6", [self.conv6], 8 * w),
            ]
        )
