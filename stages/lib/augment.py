"""Batch augmentation: every image of a (B, C, H, W) batch gets its own random geometry and
intensity, in a handful of tensor operations on the training device (the GPU when there is
one), instead of a Python call per image in the data loader.

One affine warp per image does what torchvision's RandomResizedCrop (area share in
[crop_scale, 1], aspect 0.9-1.1, uniform position), RandomRotation (±rotation degrees) and
RandomHorizontalFlip do; then brightness and contrast factors (ColorJitter), and, with their
probabilities, autocontrast and sharpness; then what models another scanner: a detector
curve (gamma), blur and pixel noise, each image with its own strength. Rotated corners are
filled from the surrounding image where the crop has some, else black. The random numbers
are drawn on the CPU from the loader's generator, so a run is the same on any device and a
resumed run continues exactly.
The automatic policies (TrivialAugment, RandAugment, AutoAugment) have no batched form: they
stay per image in the loader (`train.build_transform`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2 import functional as TF

from stages.lib.params import AugmentParams

ASPECT = (0.9, 1.1)  # RandomResizedCrop's aspect-ratio range in train.build_transform
SHARPNESS = 2.0  # the factor of RandomAdjustSharpness in train.build_transform


def uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


class BatchAugment(nn.Module):
    """Random per-image augmentation of float batches in [0, 1]; identity in eval mode."""

    def __init__(self, aug: AugmentParams, generator: torch.Generator):
        super().__init__()
        self.aug, self.generator = aug, generator

    @property
    def geometric(self) -> bool:
        return self.aug.crop_scale < 1 or self.aug.rotation > 0 or self.aug.hflip > 0

    def thetas(self, n: int) -> torch.Tensor:
        """(n, 2, 3) affine maps from output to input coordinates (both in [-1, 1])."""
        aug, g = self.aug, self.generator
        area = uniform(n, aug.crop_scale, 1.0, g)
        aspect = ASPECT if aug.crop_scale < 1 else (1.0, 1.0)  # crop_scale 1: no crop at all
        log_ratio = uniform(n, math.log(aspect[0]), math.log(aspect[1]), g)
        sx = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
        sy = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
        tx = (1 - sx) * uniform(n, -1.0, 1.0, g)
        ty = (1 - sy) * uniform(n, -1.0, 1.0, g)
        angle = torch.deg2rad(uniform(n, -aug.rotation, aug.rotation, g))
        flip = torch.where(torch.rand(n, generator=g) < aug.hflip, -1.0, 1.0)
        cos, sin = angle.cos(), angle.sin()
        # input = t + diag(sx, sy) @ rotation @ diag(flip, 1) @ output
        row_x = torch.stack([sx * cos * flip, -sx * sin, tx], dim=1)
        row_y = torch.stack([sy * sin * flip, sy * cos, ty], dim=1)
        return torch.stack([row_x, row_y], dim=1)

    def factors(self, n: int, amount: float) -> torch.Tensor:
        return uniform(n, 1 - amount, 1 + amount, self.generator).view(n, 1, 1, 1)

    def chosen(self, n: int, probability: float) -> torch.Tensor:
        return (torch.rand(n, generator=self.generator) < probability).view(n, 1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        n, aug, device = len(x), self.aug, x.device
        if self.geometric:
            grid = F.affine_grid(self.thetas(n).to(device), list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if aug.brightness > 0:
            x = (x * self.factors(n, aug.brightness).to(device)).clamp(0, 1)
        if aug.contrast > 0:
            gray = x.mean(dim=1, keepdim=True) if x.shape[1] == 1 else TF.rgb_to_grayscale(x)
            mean = gray.mean(dim=(1, 2, 3), keepdim=True)
            x = ((x - mean) * self.factors(n, aug.contrast).to(device) + mean).clamp(0, 1)
        if aug.autocontrast > 0:
            x = torch.where(self.chosen(n, aug.autocontrast).to(device), TF.autocontrast(x), x)
        if aug.sharpness > 0:
            sharp = TF.adjust_sharpness(x, SHARPNESS)
            x = torch.where(self.chosen(n, aug.sharpness).to(device), sharp, x)
        if aug.gamma > 0:
            gamma = uniform(n, -aug.gamma, aug.gamma, self.generator).exp().view(n, 1, 1, 1)
            x = x.clamp(min=1e-6) ** gamma.to(device)
        if aug.blur > 0:
            sigma = uniform(n, 0.0, aug.blur, self.generator)
            sigma = torch.where(torch.rand(n, generator=self.generator) < aug.blur_prob, sigma, 0)
            x = gaussian_blur(x, sigma.to(device), aug.blur)
        if aug.noise > 0:
            sd = uniform(n, 0.0, aug.noise, self.generator).view(n, 1, 1, 1)
            noise = torch.randn(x.shape, generator=self.generator)
            x = (x + (sd * noise).to(device)).clamp(0, 1)
        return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Blur each image of (B, C, H, W) with its own sigma (B,) in pixels (0 = unchanged):
    a separable Gaussian of radius 3 x max_sigma, as one grouped convolution per axis."""
    n, c, h, w = x.shape
    radius = max(1, math.ceil(3 * max_sigma))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    safe = sigma.clamp(min=1e-3).to(x.dtype)[:, None]
    kernel = torch.exp(-0.5 * (t[None] / safe) ** 2)
    kernel = torch.where(sigma[:, None] > 0.05, kernel, (t == 0).to(x.dtype)[None])
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
    flat = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(flat, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return flat.reshape(n, c, h, w)
