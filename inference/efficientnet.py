"""EfficientNet-Lite0 and -Lite2 (Tan & Le 2019, the Lite variant: no squeeze-excitation, ReLU6,
the stem and head kept at 32 and 1280 channels) with one output logit (IDC), for patches of any
size (50x50 at 4 um/px ends in a 2x2 map, 4x4 with the stem at stride 1). Lite2 is Lite0 scaled
1.1x wider and 1.2x deeper (6.1 M weights against 4.7 M with ImageNet's classifier).

The layout matches :class:`inference.model.WideResNet` where training needs it: ``trunk`` is
everything up to the last batch norm ``bn``, then ReLU, global average pooling and ``head``.
ImageNet weights, when a run starts from them, come from training.imagenet.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

#: Each variant's stages: (kernel, stride, expansion, output channels, repeats).
STAGES = {
    "lite0": ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
              (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)),
    "lite2": ((3, 1, 1, 16, 1), (3, 2, 6, 24, 3), (5, 2, 6, 48, 3), (3, 2, 6, 88, 4),
              (5, 1, 6, 120, 4), (5, 2, 6, 208, 5), (3, 1, 6, 352, 1)),
}
STEM, HEAD = 32, 1280


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)  # as the TensorFlow original was trained


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expansion, depthwise kxk, 1x1 linear projection."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = c_in * expand
        self.expand = nn.Sequential(nn.Conv2d(c_in, mid, 1, bias=False), _bn(mid), nn.ReLU6()) if expand != 1 else None
        self.depthwise = nn.Sequential(
            nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False), _bn(mid), nn.ReLU6()
        )
        self.project = nn.Sequential(nn.Conv2d(mid, c_out, 1, bias=False), _bn(c_out))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return y + x if self.residual else y


class EfficientNetLite(nn.Module):
    """``variant`` is a key of STAGES; ``stem_stride`` 1 keeps the first layer at the input's
    resolution (ImageNet's is 2)."""

    def __init__(self, in_channels: int = 3, dropout: float = 0.2, stem_stride: int = 2,
                 variant: str = "lite0") -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, STEM, 3, stem_stride, 1, bias=False), _bn(STEM), nn.ReLU6()
        ]
        c = STEM
        for kernel, stride, expand, c_out, repeats in STAGES[variant]:
            for i in range(repeats):
                layers.append(MBConv(c, c_out, kernel, stride if i == 0 else 1, expand))
                c = c_out
        layers.append(nn.Conv2d(c, HEAD, 1, bias=False))
        self.trunk = nn.Sequential(*layers)
        self.bn = _bn(HEAD)
        self.dropout = dropout
        self.head = nn.Linear(HEAD, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn(self.trunk(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        if self.dropout:
            f = F.dropout(f, self.dropout, self.training)
        return self.head(f).squeeze(1)
