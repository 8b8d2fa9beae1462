"""PAN, the Pixel Attention Network (Zhao et al., 2020), exactly as in the authors' code.

Module and parameter names match the original ``PAN_arch.py`` and super-image's ``PanModel`` so that
their state dicts load unchanged (``conv_first``, ``SCPA_trunk.N.PAConv.k2``, ``att1.conv``, and
``upconv2``/``att2``/``HRconv2`` only at x4). With nf=40, unf=24, nb=16 the model has 261,403
parameters at x2/x3 and 272,419 at x4.

Tensor contract: ``forward`` takes N x in_nc x H x W float in [0, 1] (RGB) and returns
N x out_nc x (scale*H) x (scale*W), not clamped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core import SCALES


@dataclass(frozen=True)
class PANConfig:
    """Hyper-parameters of one PAN. Field names follow the original constructor."""

    scale: int = 2
    in_nc: int = 3
    out_nc: int = 3
    nf: int = 40
    unf: int = 24
    nb: int = 16

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"PAN supports scales {SCALES}, not {self.scale}")
        for field in ("in_nc", "out_nc", "nf", "unf", "nb"):
            if getattr(self, field) <= 0:
                raise ValueError(f"PAN {field} must be positive, got {getattr(self, field)}")
        if self.nf % 2:
            raise ValueError(f"PAN nf must be even (SCPA splits it in two), got {self.nf}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PA(nn.Module):
    """Pixel attention: x * sigmoid(conv1x1(x))."""

    def __init__(self, nf: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(nf, nf, 1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmoid(self.conv(x))


class PAConv(nn.Module):
    """Pixel-attention convolution: k4(k3(x) * sigmoid(k2(x)))."""

    def __init__(self, nf: int, k_size: int = 3) -> None:
        super().__init__()
        self.k2 = nn.Conv2d(nf, nf, 1)
        self.sigmoid = nn.Sigmoid()
        self.k3 = nn.Conv2d(nf, nf, k_size, padding=(k_size - 1) // 2, bias=False)
        self.k4 = nn.Conv2d(nf, nf, k_size, padding=(k_size - 1) // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.k4(self.k3(x) * self.sigmoid(self.k2(x)))


class SCPA(nn.Module):
    """Self-calibrated block with pixel attention (two branches, residual)."""

    def __init__(self, nf: int, reduction: int = 2) -> None:
        super().__init__()
        width = nf // reduction
        self.conv1_a = nn.Conv2d(nf, width, 1, bias=False)
        self.conv1_b = nn.Conv2d(nf, width, 1, bias=False)
        # A Sequential of one conv, as in the original: its key is "k1.0.weight".
        self.k1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False))
        self.PAConv = PAConv(width)
        self.conv3 = nn.Conv2d(width * reduction, nf, 1, bias=False)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_a = self.lrelu(self.k1(self.lrelu(self.conv1_a(x))))
        out_b = self.lrelu(self.PAConv(self.lrelu(self.conv1_b(x))))
        return self.conv3(torch.cat([out_a, out_b], dim=1)) + x


class PAN(nn.Module):
    """Pixel Attention Network for x2, x3 or x4 super-resolution.

    Build one with ``PAN(scale=4)`` (random weights); ``pipeline.load_pretrained(source, scale=4)``
    loads published or trained weights (``pipeline.io.weights``).
    """

    def __init__(self, config: PANConfig | None = None, **overrides: int) -> None:
        super().__init__()
        if config is None:
            config = PANConfig(**overrides)
        elif overrides:
            config = PANConfig(**{**config.to_dict(), **overrides})
        self.config = config
        nf, unf = config.nf, config.unf

        self.conv_first = nn.Conv2d(config.in_nc, nf, 3, 1, 1)
        self.SCPA_trunk = nn.Sequential(*(SCPA(nf) for _ in range(config.nb)))
        self.trunk_conv = nn.Conv2d(nf, nf, 3, 1, 1)

        self.upconv1 = nn.Conv2d(nf, unf, 3, 1, 1)
        self.att1 = PA(unf)
        self.HRconv1 = nn.Conv2d(unf, unf, 3, 1, 1)
        if config.scale == 4:
            self.upconv2 = nn.Conv2d(unf, unf, 3, 1, 1)
            self.att2 = PA(unf)
            self.HRconv2 = nn.Conv2d(unf, unf, 3, 1, 1)
        self.conv_last = nn.Conv2d(unf, config.out_nc, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2)

    @property
    def scale(self) -> int:
        return self.config.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.skip(x)

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """The image path: a bilinear upscale of the input, to which ``residual`` adds the detail."""
        return F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The network's detail, added to ``skip`` (split out so that the skip may run in fp32
        while the network runs in reduced precision: see ``pipeline.core.engine``)."""
        fea = self.conv_first(x)
        fea = fea + self.trunk_conv(self.SCPA_trunk(fea))
        # x4 is two x2 stages; x2 and x3 are one stage at the full factor.
        if self.scale == 4:
            stages = [(2, self.upconv1, self.att1, self.HRconv1)]
            stages.append((2, self.upconv2, self.att2, self.HRconv2))
        else:
            stages = [(self.scale, self.upconv1, self.att1, self.HRconv1)]
        for factor, upconv, att, hrconv in stages:
            fea = upconv(F.interpolate(fea, scale_factor=factor, mode="nearest"))
            fea = self.lrelu(att(fea))
            fea = self.lrelu(hrconv(fea))
        return self.conv_last(fea)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
