"""VGG16-GAP as in the evaluation protocol (Choe et al., CVPR 2020, following Zhou et al.'s CAM).

torchvision's VGG16 ``features`` with the last max-pool removed, then ``conv6`` (3x3, 512 -> 1024)
and ReLU; global average pooling and a linear classifier follow in the head. At 224 px the map is
14x14; ``large_feature_map`` also turns ``pool4`` into an identity for 28x28.

Layer indices inside ``features`` are torchvision's, with removed pools kept as ``nn.Identity``
so that a torchvision state dict loads with no remapping.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import vgg16

from wsol_core.models.base import Backbone


class VGG16(Backbone):
    default_drop_stage = "block4"  # after conv4_3 (FMCG Table 2's best location)
    head_stages = ("conv6",)
    protocol_classifier_init = True

    def __init__(self, large_feature_map: bool = False) -> None:
        super().__init__()
        layers = list(vgg16(weights=None).features.children())[:30]  # pool5 (index 30) removed
        if large_feature_map:
            layers[23] = nn.Identity()  # pool4 removed too: 28x28 maps
        self.features = nn.Sequential(*layers)
        self.conv6 = nn.Conv2d(512, 1024, kernel_size=3, padding=1)
        self.relu6 = nn.ReLU(inplace=False)
        # The protocol's VggCam: He-normal (fan_out, ReLU) weights, zero bias for the new conv6.
        nn.init.kaiming_normal_(self.conv6.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv6.bias)  # type: ignore[arg-type]  # bias=True above

        f = list(self.features)
        # Index ranges in torchvision's numbering: block4 ends with conv4_3's ReLU (22) so that
        # "after block4" is FMCG's "after conv4_3"; pool4 (23) opens block5.
        self._set_stages(
            [
                ("block1", f[0:5], 64),
                ("block2", f[5:10], 128),
                ("block3", f[10:17], 256),
                ("block4", f[17:23], 512),
                ("block5", f[23:30], 512),
                ("conv6", [self.conv6, self.relu6], 1024),
            ]
        )
