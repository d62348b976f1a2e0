"""InceptionV3 as modified by the evaluation protocol (Choe et al., CVPR 2020; SPG-style head).

Built from torchvision's Inception blocks, with the protocol's changes:

- ``Conv2d_1a_3x3`` gets padding 1, ``Conv2d_4a_3x3`` none; the two stem max-pools use
  padding 1 and ``ceil_mode``, so a 224 px input is 28x28 after ``Mixed_5d``;
- a max-pool (stride 2, ``ceil_mode``) before ``Mixed_6a`` gives the 14x14 map; it is skipped with
  ``large_feature_map`` (28x28);
- ``Mixed_6a`` runs at stride 1 with padding 1 (the reduction moved into that pool);
- ``Mixed_7*`` and the auxiliary classifier are removed;
- the head stage ``SPG_A3_1b``/``SPG_A3_2b`` (two 3x3 convs to 1024 with ReLU, dropout 0.5 before
  each) replaces them; the protocol's 1x1 class-map conv ``SPG_A4`` is the linear classifier of
  :class:`~wsol_core.models.head.CAMHead` (a 1x1 conv followed by GAP equals GAP followed by
  the same linear map).

Layer names follow torchvision, so its state dict loads directly (``Mixed_7*``, ``AuxLogits``
and ``fc`` are reported as dropped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.inception import BasicConv2d, InceptionA, InceptionB, InceptionC

from wsol_core.models.base import Backbone, init_new_layers


class _StrideOneInceptionB(InceptionB):
    """torchvision's InceptionB (Mixed_6a) at stride 1 with padding 1, same parameter names."""

    def __init__(self, in_channels: int) -> None:
        super().__init__(in_channels)
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=1, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=1, padding=1)

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        branch3x3 = self.branch3x3(x)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return [branch3x3, branch3x3dbl, branch_pool]


class _MaxPool(nn.Module):
    def __init__(self, padding: int) -> None:
        super().__init__()
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=self.padding, ceil_mode=True)


class InceptionV3(Backbone):
    default_drop_stage = "mixed5"
    head_stages = ("spg",)
    protocol_classifier_init = True

    def __init__(self, large_feature_map: bool = False) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2, padding=1)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = _StrideOneInceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.SPG_A3_1b = nn.Sequential(nn.Conv2d(768, 1024, 3, padding=1), nn.ReLU(inplace=False))
        self.SPG_A3_2b = nn.Sequential(nn.Conv2d(1024, 1024, 3, padding=1), nn.ReLU(inplace=False))
        self.dropout = nn.Dropout(0.5)
        init_new_layers([self.SPG_A3_1b, self.SPG_A3_2b])

        reduce = nn.Identity() if large_feature_map else _MaxPool(padding=0)
        self._set_stages(
            [
                (
                    "stem",
                    [
                        self.Conv2d_1a_3x3,
                        self.Conv2d_2a_3x3,
                        self.Conv2d_2b_3x3,
                        _MaxPool(1),
                        self.Conv2d_3b_1x1,
                        self.Conv2d_4a_3x3,
                        _MaxPool(1),
                    ],
                    192,
                ),
                ("mixed5", [self.Mixed_5b, self.Mixed_5c, self.Mixed_5d], 288),
                ("mixed6", [reduce, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e], 768),
                ("spg", [self.dropout, self.SPG_A3_1b, self.dropout, self.SPG_A3_2b, self.dropout], 1024),
            ]
        )
