"""STUNet: the stand-in's network class, a scalable residual U-Net in the style of STU-Net.

Shipped with the model folder and built by STUNetTrainer.py beside it. Each stage is a stack
of residual blocks (3x3x3 conv, instance norm, leaky ReLU); the first block of a stage
downsamples with its stride; the decoder upsamples by nearest-neighbour interpolation after a
1x1x1 conv, joins the skip by concatenation and returns one segmentation per decoder stage
(highest resolution first) while `decoder.deep_supervision` is on, as nnU-Net's trainer expects.
"""

import torch
from torch import nn
from torch.nn import functional as F


class ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.norm1 = nn.InstanceNorm3d(out_channels, affine=True)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.norm2 = nn.InstanceNorm3d(out_channels, affine=True)
        needs_projection = in_channels != out_channels or any(s != 1 for s in stride)
        self.skip = nn.Conv3d(in_channels, out_channels, 1, stride=stride) if needs_projection else nn.Identity()
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act(y + self.skip(x))


class Upsample(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, scale) -> None:
        super().__init__()
        self.project = nn.Conv3d(in_channels, out_channels, 1)
        self.scale = tuple(float(s) for s in scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.project(x), scale_factor=self.scale, mode="nearest")


class Decoder(nn.Module):
    """Holds the `deep_supervision` switch that nnU-Net's trainer sets."""

    def __init__(self, deep_supervision: bool) -> None:
        super().__init__()
        self.deep_supervision = deep_supervision


class STUNet(nn.Module):
    def __init__(self, input_channels: int, num_classes: int, dims, depths, strides,
                 deep_supervision: bool = True) -> None:
        super().__init__()
        strides = [tuple(s) for s in strides]  # one per stage; stage 0 is (1, 1, 1)
        self.decoder = Decoder(deep_supervision)
        self.encoder = nn.ModuleList()
        in_ch = input_channels
        for dim, depth, stride in zip(dims, depths, strides):
            blocks = [ResidualBlock(in_ch, dim, stride)] + [ResidualBlock(dim, dim, (1, 1, 1)) for _ in range(depth - 1)]
            self.encoder.append(nn.Sequential(*blocks))
            in_ch = dim
        self.upsample = nn.ModuleList()
        self.decode = nn.ModuleList()
        self.seg_heads = nn.ModuleList()
        for level in range(len(dims) - 2, -1, -1):  # deepest decoder stage first
            self.upsample.append(Upsample(dims[level + 1], dims[level], strides[level + 1]))
            self.decode.append(nn.Sequential(*[ResidualBlock(2 * dims[level] if i == 0 else dims[level], dims[level], (1, 1, 1))
                                               for i in range(depths[level])]))
            self.seg_heads.append(nn.Conv3d(dims[level], num_classes, 1))

    def forward(self, x: torch.Tensor):
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        outputs = []
        for upsample, decode, head in zip(self.upsample, self.decode, self.seg_heads):
            x = decode(torch.cat([upsample(x), skips.pop()], dim=1))
            outputs.append(head(x))
        outputs = outputs[::-1]  # highest resolution first
        return outputs if self.decoder.deep_supervision else outputs[0]
