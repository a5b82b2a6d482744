"""A small plain CNN for CPU inference and training: 3x3 conv + BN + ReLU stages, global average
pooling and a linear head.

Plain 3x3 convolutions with few channels run faster on CPU (oneDNN) than depthwise-separable blocks
of the same accuracy here (measured on the 2-core build machine: ~2-3x training throughput), so
this is a narrow VGG-style network. The last stage uses dilated convolutions instead of a fifth
downsampling, so the class activation map keeps a stride of 16 (12 x 12 at 192 px input).

GAP + linear head makes the class activation map free of gradients: ``cam = w . features + b`` per
position, and the logit is exactly the spatial mean of the CAM. The exported graph returns both.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch
from torch import nn


def conv_bn(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class Residual(nn.Module):
    """relu(x + bn(conv(x))): the second 3x3 conv of a stage as a residual block (same cost)."""

    def __init__(self, c: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.bn(self.conv(x)))


@dataclass(frozen=True)
class NetConfig:
    channels: tuple[int, ...] = (16, 32, 64, 96, 128)
    dropout: float = 0.2
    residual: bool = False  # v1: False (plain); the second conv of each stage as a residual block
    members: int = 1  # v3: an ensemble of this many networks (seeds), logits and CAMs averaged

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> NetConfig:
        return cls(
            channels=tuple(d["channels"]),
            dropout=float(d["dropout"]),
            residual=bool(d.get("residual", False)),
            members=int(d.get("members", 1)),
        )

    def member(self) -> NetConfig:
        return NetConfig(channels=self.channels, dropout=self.dropout, residual=self.residual)


class PneumoniaNet(nn.Module):
    """Input [N, 1, S, S] -> (logit [N], cam [N, S/16, S/16])."""

    def __init__(self, config: NetConfig | None = None) -> None:
        super().__init__()
        self.config = config or NetConfig()
        c = self.config.channels
        layers: list[nn.Module] = [conv_bn(1, c[0], stride=2)]  # /2
        res = self.config.residual
        for cin, cout in itertools.pairwise(c[:-1]):  # /4, /8, /16
            layers += [conv_bn(cin, cout, stride=2), Residual(cout) if res else conv_bn(cout, cout)]
        layers += [
            conv_bn(c[-2], c[-1], dilation=2),
            Residual(c[-1], dilation=2) if res else conv_bn(c[-1], c[-1], dilation=2),
        ]
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(self.config.dropout)
        self.head = nn.Linear(c[-1], 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)  # [N, C, h, w]
        logit = self.head(self.dropout(f.mean(dim=(2, 3)))).squeeze(1)
        cam = torch.einsum("nchw,c->nhw", f, self.head.weight[0]) + self.head.bias[0]
        return logit, cam

    def shift_logit(self, offset: float) -> None:
        with torch.no_grad():
            self.head.bias += offset


class PneumoniaEnsemble(nn.Module):
    """Members trained with different seeds, served as one graph: logit = mean of the members'
    logits, cam = mean of their CAMs, so mean(cam) == logit still holds. The calibration offset is
    folded into every member's head bias (a shift of the mean by the same amount)."""

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        self.config = config
        self.members = nn.ModuleList(PneumoniaNet(config.member()) for _ in range(config.members))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = [m(x) for m in self.members]
        logit = torch.stack([o[0] for o in outs]).mean(dim=0)
        cam = torch.stack([o[1] for o in outs]).mean(dim=0)
        return logit, cam

    def shift_logit(self, offset: float) -> None:
        with torch.no_grad():
            for m in self.members:
                m.head.bias += offset


def build_network(config: NetConfig) -> PneumoniaNet | PneumoniaEnsemble:
    return PneumoniaEnsemble(config) if config.members > 1 else PneumoniaNet(config)
