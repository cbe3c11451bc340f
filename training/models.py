"""Model registry in the style of timm: ``create_model(name, num_classes=...)``, ``list_models()``.

Every model returned by ``create_model`` takes float images in [0, 1] (B, 3, H, W) and
normalises them itself, so the exported ONNX graph carries its normalisation.
"""

from __future__ import annotations

import fnmatch
from typing import Callable

import torch
from torch import nn

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _REGISTRY[fn.__name__.replace("_", "-")] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """Normalisation followed by a backbone; ``arch`` names the registry entry."""

    def __init__(self, arch: str, backbone: nn.Module, mean, std):
        super().__init__()
        self.arch = arch
        self.normalize = Normalize(mean, std)
        self.backbone = backbone

    def forward(self, x):
        return self.backbone(self.normalize(x))


def create_model(name: str, num_classes: int = 10, mean=CIFAR_MEAN, std=CIFAR_STD, **kwargs) -> Classifier:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return Classifier(name, _REGISTRY[name](num_classes=num_classes, **kwargs), mean, std)


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


# --- fast: a narrow ResNet-9-style network for a 2-core CPU ------------------------------------


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x):
        return x + self.body(x)


@register_model
def fast(num_classes: int = 10, width: int = 16) -> nn.Module:
    """Prep -> (conv, pool, residual) -> (conv, pool) -> (conv, pool, residual) -> max-pool -> linear."""
    w = width
    return nn.Sequential(
        conv_bn(3, w),
        conv_bn(w, 2 * w), nn.MaxPool2d(2), _Residual(2 * w),
        conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),
        conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), _Residual(8 * w),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8 * w, num_classes),
    )


# --- fast-air: airbench-style choices at CPU widths ---------------------------------------------
#
# After Keller Jordan's airbench (github.com/KellerJordan/cifar10-airbench): a frozen 2x2
# patch-whitening stem initialised from the training images, conv -> max-pool -> BN -> GELU
# groups, BN with a frozen unit scale, Dirac-initialised convolutions and a bias-free linear
# head scaled by 1/9. Widths are cut to what a 2-core CPU trains in minutes.

HEADS = ("max", "avg", "flatten")


def _air_bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, momentum=0.4, eps=1e-12)  # airbench's fast-moving statistics
    bn.weight.requires_grad_(False)  # scale frozen at 1; only the shift learns
    return bn


def _air_conv(cin: int, cout: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(cin, cout)])  # the first filters start as identities
    return conv


def _air_group(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        _air_conv(cin, cout), nn.MaxPool2d(2), _air_bn(cout), nn.GELU(),
        _air_conv(cout, cout), _air_bn(cout), nn.GELU(),
    )


class Whitening(nn.Conv2d):
    """2x2 conv whose filters are the +/- eigenvectors of the training patches' covariance,
    scaled to unit variance (``init_from``); the filters stay frozen, the bias learns."""

    def __init__(self, in_channels: int = 3, patch: int = 2):
        super().__init__(in_channels, 2 * in_channels * patch * patch, patch, padding=0, bias=True)
        self.weight.requires_grad_(False)

    @torch.no_grad()
    def init_from(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """``images``: normalised float (N, C, H, W), a few thousand are plenty."""
        c, h, w = self.weight.shape[1:]
        patches = images.unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c * h * w).double()
        cov = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).flip(0).reshape(-1, c, h, w)
        self.weight.copy_(torch.cat([filters, -filters]).to(self.weight.dtype))
        self.bias.zero_()


class _Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


@register_model
def fast_air(num_classes: int = 10, widths: tuple[int, int, int] = (32, 64, 128), head: str = "max") -> nn.Module:
    """Whitening stem -> three (conv, pool, BN, GELU, conv, BN, GELU) groups -> head -> linear / 9.

    ``head``: ``max`` (global max-pool over the final 3x3 map, airbench's), ``avg`` (global
    average) or ``flatten`` (all 3x3 positions, so the head itself keeps where a feature was).
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {', '.join(HEADS)}")
    w1, w2, w3 = widths
    pool = {"max": nn.AdaptiveMaxPool2d(1), "avg": nn.AdaptiveAvgPool2d(1), "flatten": nn.Identity()}[head]
    features = w3 * (9 if head == "flatten" else 1)
    return nn.Sequential(
        Whitening(3, 2), nn.GELU(),
        _air_group(24, w1), _air_group(w1, w2), _air_group(w2, w3),
        pool, nn.Flatten(), nn.Linear(features, num_classes, bias=False), _Scale(1 / 9),
    )


@register_model
def fast_air_flatten(num_classes: int = 10) -> nn.Module:
    """``fast-air`` with the position-keeping flatten head instead of the global max-pool."""
    return fast_air(num_classes, head="flatten")


@register_model
def fast_air_avg(num_classes: int = 10) -> nn.Module:
    """``fast-air`` with a global average-pool head."""
    return fast_air(num_classes, head="avg")


def init_from_data(model: nn.Module, images_uint8: torch.Tensor, count: int = 5000) -> None:
    """Data-dependent initialisation (the whitening stem), from the first ``count`` training images."""
    stems = [m for m in model.modules() if isinstance(m, Whitening)]
    if not stems:
        return
    x = images_uint8[:count].float().div(255)
    if isinstance(model, Classifier):
        x = model.normalize(x.to(model.normalize.mean.device))
    for stem in stems:
        stem.init_from(x.to(stem.weight.device))


@register_model
def tiny(num_classes: int = 10) -> nn.Module:
    """A few thousand parameters: for tests that need a model in seconds."""
    return nn.Sequential(
        conv_bn(3, 16), nn.MaxPool2d(2), conv_bn(16, 32), nn.MaxPool2d(2), conv_bn(32, 64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes),
    )


# --- CIFAR ResNets (3x3 stem, no max-pool) ------------------------------------------------------


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _cifar_resnet(blocks: list[int], num_classes: int) -> nn.Module:
    layers: list[nn.Module] = [conv_bn(3, 64)]
    cin = 64
    for i, n in enumerate(blocks):
        cout = 64 * 2**i
        for j in range(n):
            layers.append(_BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


@register_model
def resnet18(num_classes: int = 10) -> nn.Module:
    return _cifar_resnet([2, 2, 2, 2], num_classes)


@register_model
def resnet34(num_classes: int = 10) -> nn.Module:
    return _cifar_resnet([3, 4, 6, 3], num_classes)


@register_model
def vgg19_bn(num_classes: int = 10) -> nn.Module:
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
    layers: list[nn.Module] = []
    cin = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers.append(conv_bn(cin, v))
            cin = v
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)
