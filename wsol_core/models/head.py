"""The classifier every protocol architecture shares: global average pooling then a linear map.

Class activation maps (Zhou et al., CVPR 2016, eq. 2) are the same linear map applied at every
position of the feature map before pooling: ``M_k(x, y) = sum_c w_kc f_c(x, y)``. The bias is a
constant per map and disappears in the protocol's min-max normalization, so it is left out.
"""

from __future__ import annotations

import torch
from torch import nn


class CAMHead(nn.Module):
    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` features -> ``[B, K]`` logits."""
        return self.fc(features.mean(dim=(2, 3)))

    def class_maps(self, features: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """CAMs: ``[B, h, w]`` for one class per image when ``classes`` is given, else ``[B, K, h, w]``."""
        if classes is None:
            return torch.einsum("kc,bchw->bkhw", self.fc.weight, features)
        return torch.einsum("bc,bchw->bhw", self.fc.weight[classes], features)
