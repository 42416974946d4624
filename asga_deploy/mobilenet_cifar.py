"""MobileNetV2 for 28-32 px inputs (registered in models.py as mobilenetv2-cifar and -w0.5).

Its layers differ the way mixed precision cares about: 3x3 depthwise convs with few MACs and weights,
1x1 expansions and projections with most of the MACs, and linear bottlenecks whose outputs are signed.
"""

from __future__ import annotations

import torch
from torch import nn


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion, 3x3 depthwise, linear 1x1 projection; adds the input where shapes match.

    Names follow timm (conv_pw, conv_dw, conv_pwl); a block with expansion 1 has no conv_pw, so the
    names of the layers it does have never shift.
    """

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.conv_pw = self.bn1 = self.act1 = None
        if expand != 1:
            self.conv_pw = nn.Conv2d(cin, hidden, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(hidden)
            self.act1 = nn.ReLU6()
        self.conv_dw = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.act2 = nn.ReLU6()
        self.conv_pwl = nn.Conv2d(hidden, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)  # no activation: the linear bottleneck (Sandler et al. 2018)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        out = x if self.conv_pw is None else self.act1(self.bn1(self.conv_pw(x)))
        out = self.bn3(self.conv_pwl(self.act2(self.bn2(self.conv_dw(out)))))
        return x + out if self.use_res else out


def _divisible(v: float, d: int = 8) -> int:
    """Round a scaled width to a multiple of d, never below 90% of it (torchvision's _make_divisible)."""
    new = max(d, int(v + d / 2) // d * d)
    return new + d if new < 0.9 * v else new


# (expansion t, channels c, blocks n, first stride s) per stage: MobileNetV2's first five stages with
# fewer blocks, a stride-1 stem (/8 instead of /32: 28-32 px inputs end at 4x4) and without the 160/320
# stages (most of the parameters), so that a Fashion-MNIST epoch takes minutes on 2 CPU cores: per MAC
# it trains 4-6x slower than ResNet-20 there (depthwise convs and BN on expanded tensors are memory-bound).
MBV2_CIFAR = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 3, 2), (6, 96, 2, 1))


class MobileNetV2Cifar(nn.Module):
    """MobileNetV2 for 28-32 px inputs: stride-1 stem, inverted residual stages, 1x1 head, classifier."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: float = 1.0, stem: int = 16,
                 head: int = 320, cfg=MBV2_CIFAR):
        super().__init__()
        cin = _divisible(stem * width)
        self.conv_stem = nn.Conv2d(in_chans, cin, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.act1 = nn.ReLU6()
        stages = []
        for t, c, n, s in cfg:
            cout = _divisible(c * width)
            blocks = [InvertedResidual(cin if i == 0 else cout, cout, s if i == 0 else 1, t) for i in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.blocks = nn.Sequential(*stages)
        self.conv_head = nn.Conv2d(cin, head, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(head)
        self.act2 = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x):
        x = self.blocks(self.act1(self.bn1(self.conv_stem(x))))
        x = self.act2(self.bn2(self.conv_head(x)))
        return self.fc(torch.flatten(self.pool(x), 1))
