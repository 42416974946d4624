"""Model zoo: a name -> constructor registry (timm style), proxy variants, width variants, tiny test models.

Every searchable layer (Conv2d / Linear) keeps the same module name in a model and in its proxy
variant, so that a policy searched on the proxy maps onto the target network by name.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnknownModelError
from .mobilenet_cifar import MobileNetV2Cifar


@dataclass(frozen=True)
class ModelInfo:
    """Registry entry: constructor, default input size and what the model is a proxy of."""

    name: str
    fn: Callable[..., nn.Module]
    input_size: int
    description: str
    proxy_of: str | None = None
    torchvision: str | None = None  # torchvision constructor name, when pretrained weights exist


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str, input_size: int, description: str, proxy_of: str | None = None,
                   torchvision: str | None = None):
    """Decorator: register a constructor `fn(num_classes, in_chans) -> nn.Module` under `name`."""

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelInfo(name, fn, input_size, description, proxy_of, torchvision)
        return fn

    return deco


def list_models() -> list[str]:
    """Return the registered model names, sorted."""
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    """Return the registry entry of a model, or raise UnknownModelError with the closest names."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}{hint} (registered: {', '.join(list_models())}; `asga models` lists them)")
    return _REGISTRY[name]


def create_model(name: str, num_classes: int = 10, in_chans: int = 3, weights: str | None = None) -> nn.Module:
    """Return a registered model with random weights, or torchvision's pretrained ones (weights="torchvision").

    Weights from a file: `checkpoint.load_weights(create_model(...), path)`.
    """
    info = model_info(name)
    if weights == "torchvision":
        return _torchvision_pretrained(info, num_classes, in_chans)
    if weights is not None:
        raise UnknownModelError(f"weights {weights!r}: only 'torchvision' is known (load a file with --float)")
    return info.fn(num_classes=num_classes, in_chans=in_chans)


def _torchvision_pretrained(info: ModelInfo, num_classes: int, in_chans: int) -> nn.Module:
    import torchvision

    if info.torchvision is None:
        raise UnknownModelError(f"model {info.name!r} has no torchvision pretrained weights")
    model = torchvision.models.get_model(info.torchvision, weights="DEFAULT")
    if info.proxy_of is not None:  # same names, small-input stem
        proxy = info.fn(num_classes=1000, in_chans=3)
        _copy_matching(model, proxy)
        model = proxy
    return adapt_head(adapt_stem(model, in_chans), num_classes)


def _copy_matching(src: nn.Module, dst: nn.Module) -> None:
    sd, dd = src.state_dict(), dst.state_dict()
    dst.load_state_dict({k: (sd[k] if k in sd and sd[k].shape == v.shape else v) for k, v in dd.items()})


def adapt_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace the last Linear by a new one with num_classes outputs when the count differs."""
    name, lin = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    if lin.out_features != num_classes:
        set_module(model, name, nn.Linear(lin.in_features, num_classes))
    return model


def adapt_stem(model: nn.Module, in_chans: int) -> nn.Module:
    """Make the first conv take in_chans channels (summing pretrained RGB filters for grayscale)."""
    name, conv = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][0]
    if conv.in_channels != in_chans:
        new = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        bias=conv.bias is not None)
        with torch.no_grad():
            # a grayscale image fed to RGB filters equals the summed filter on one channel
            w = conv.weight.sum(1, keepdim=True)
            new.weight.copy_(w.expand(-1, in_chans, -1, -1) / in_chans)
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        set_module(model, name, new)
    return model


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted `name` by `new` (the one module-surgery helper)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantizable_layers(model: nn.Module) -> list[str]:
    """Return the names of all Conv2d and Linear modules, in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def edge_layers(model: nn.Module) -> list[str]:
    """Return the first conv and the classifier: not searched, not counted in BitOPs (EdMIPS)."""
    names = quantizable_layers(model)
    return [names[0], names[-1]] if len(names) > 1 else names[:1]


# ---------------------------------------------------------------- small models for small inputs

def _cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """A VGG-style CNN for 28x28/32x32 inputs: the default model (fast on 2 CPU cores)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, widths=(16, 32, 64)):
        super().__init__()
        w1, w2, w3 = widths
        self.conv1 = nn.Conv2d(in_chans, w1, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.relu = nn.ReLU(inplace=True)
        self.block1 = _cbr(w1, w1)
        self.block2 = nn.Sequential(_cbr(w1, w2, 2), _cbr(w2, w2))
        self.block3 = nn.Sequential(_cbr(w2, w3, 2), _cbr(w3, w3))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.block3(self.block2(self.block1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:  # projection shortcut (option B) keeps it a plain conv
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, 6n+2 layers) with torchvision-like module names."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, width: int = 16):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        layers, cin = [], width
        for i, w in enumerate((width, 2 * width, 4 * width)):
            blocks = [_BasicBlock(cin if j == 0 else w, w, (1 if i == 0 else 2) if j == 0 else 1) for j in range(n)]
            layers.append(nn.Sequential(*blocks))
            cin = w
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TinyNet(nn.Module):
    """Three convs and a classifier: for tests (milliseconds per step)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class TinyResNet(nn.Module):
    """A stem, two residual blocks (one with a projection) and a classifier: for residual-path tests."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(_BasicBlock(width, width, 1), _BasicBlock(width, 2 * width, 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TinyDWNet(nn.Module):
    """A depthwise-separable block (MobileNet style): for grouped-conv tests."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.dw = nn.Conv2d(width, width, 3, 1, 1, groups=width, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.pw = nn.Conv2d(width, 2 * width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.relu = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.dw(x)))
        x = self.bn3(self.pw(x))  # linear bottleneck: signed input to fc's pooling
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model("smallcnn", 28, "5 searched 3x3 convs (16/32/64 ch): the default model for Fashion-MNIST")
def smallcnn(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    return SmallCNN(num_classes, in_chans)


@register_model("resnet20", 32, "CIFAR-style ResNet-20 (20 searched: 18 3x3 convs + 2 projections)")
def resnet20(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return CifarResNet(20, num_classes, in_chans)


@register_model("resnet20-w0.5", 32,
                "ResNet-20 at half width (8/16/32 ch, 10.3M MACs at 3x32); resnet20's layer names")
def resnet20_w050(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return CifarResNet(20, num_classes, in_chans, width=8)


@register_model("resnet20-w0.25", 32,
                "ResNet-20 at quarter width (4/8/16 ch, 2.6M MACs at 3x32); resnet20's layer names")
def resnet20_w025(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return CifarResNet(20, num_classes, in_chans, width=4)


@register_model("mobilenetv2-cifar", 32,
                "MobileNetV2 for 28-32 px: 34 convs (11 depthwise, 22 1x1), 16-96 ch, 14.1M MACs at 3x32")
def mobilenetv2_cifar(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return MobileNetV2Cifar(num_classes, in_chans)


@register_model("mobilenetv2-cifar-w0.5", 32,
                "mobilenetv2-cifar at half width (8-48 ch, 4.7M MACs at 3x32); the same layer names")
def mobilenetv2_cifar_w050(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return MobileNetV2Cifar(num_classes, in_chans, width=0.5)


@register_model("resnet32", 32, "CIFAR-style ResNet-32")
def resnet32(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return CifarResNet(32, num_classes, in_chans)


@register_model("tinynet", 28, "test model: 3 convs + fc")
def tinynet(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    return TinyNet(num_classes, in_chans)


@register_model("tinyresnet", 28, "test model: stem + 2 residual blocks + fc")
def tinyresnet(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    return TinyResNet(num_classes, in_chans)


@register_model("tinydw", 28, "test model: depthwise-separable block")
def tinydw(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    return TinyDWNet(num_classes, in_chans)


def _tv(name: str, num_classes: int, in_chans: int) -> nn.Module:
    import torchvision

    return adapt_stem(torchvision.models.get_model(name, weights=None, num_classes=num_classes), in_chans)


def _small_stem(model: nn.Module) -> nn.Module:
    """Turn an ImageNet stem into a small-input stem, keeping every module name."""
    if hasattr(model, "maxpool"):  # resnets: 3x3 stride-1 conv1, no max-pool
        c = model.conv1
        model.conv1 = nn.Conv2d(c.in_channels, c.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    else:  # mobilenet_v2: stride-1 first conv
        c = model.features[0][0]
        model.features[0][0] = nn.Conv2d(c.in_channels, c.out_channels, 3, 1, 1, bias=False)
    return model


for _name, _size in (("resnet18", 224), ("resnet34", 224), ("resnet50", 224), ("mobilenet_v2", 224)):
    register_model(_name, _size, f"torchvision {_name} (ImageNet stem)", torchvision=_name)(
        lambda num_classes=1000, in_chans=3, _n=_name: _tv(_n, num_classes, in_chans))
    register_model(f"{_name}-proxy", 32, f"{_name} with a small-input stem; same searched-layer names",
                   proxy_of=_name, torchvision=_name)(
        lambda num_classes=10, in_chans=3, _n=_name: _small_stem(_tv(_n, num_classes, in_chans)))
