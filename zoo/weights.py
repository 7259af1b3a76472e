"""torchvision's released ImageNet weight files: what each is, and how to recognise one."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from zoo.registry import IMAGENET_MEAN, IMAGENET_STD


@dataclasses.dataclass(frozen=True)
class TorchvisionWeights:
    """One of torchvision's released weight files and what its transforms/meta say."""

    model: str  # zoo (= torchvision) name
    name: str  # torchvision's enum, e.g. ResNet50_Weights.IMAGENET1K_V2
    file: str  # the download's file name; its hash part is the sha256's first 8 hex digits
    resize_size: int = 256
    crop_size: int = 224
    top1: float | None = None
    top5: float | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    note: str = ""

    @property
    def sha256_prefix(self) -> str:
        return self.file.rsplit("-", 1)[1].split(".")[0]


def _w(model, enum, file, top1, top5, resize=256, crop=224, **kw):
    return TorchvisionWeights(model, enum, file, resize, crop, top1, top5, **kw)


# From torchvision 0.28's weight enums (url, transforms, meta["_metrics"]).
KNOWN_WEIGHTS: tuple[TorchvisionWeights, ...] = (
    _w("alexnet", "AlexNet_Weights.IMAGENET1K_V1", "alexnet-owt-7be5be79.pth", 56.522, 79.066),
    _w("vgg11", "VGG11_Weights.IMAGENET1K_V1", "vgg11-8a719046.pth", 69.02, 88.628),
    _w("vgg11_bn", "VGG11_BN_Weights.IMAGENET1K_V1", "vgg11_bn-6002323d.pth", 70.37, 89.81),
    _w("vgg13", "VGG13_Weights.IMAGENET1K_V1", "vgg13-19584684.pth", 69.928, 89.246),
    _w("vgg13_bn", "VGG13_BN_Weights.IMAGENET1K_V1", "vgg13_bn-abd245e5.pth", 71.586, 90.374),
    _w("vgg16", "VGG16_Weights.IMAGENET1K_V1", "vgg16-397923af.pth", 71.592, 90.382),
    _w("vgg16", "VGG16_Weights.IMAGENET1K_FEATURES", "vgg16_features-amdegroot-88682ab5.pth",
       None, None, mean=(0.48235, 0.45882, 0.40784), std=(1 / 255, 1 / 255, 1 / 255),
       note="SSD backbone: the classifier holds no trained values (features only), and the "
            "input is 0-255 pixels minus the mean"),
    _w("vgg16_bn", "VGG16_BN_Weights.IMAGENET1K_V1", "vgg16_bn-6c64b313.pth", 73.36, 91.516),
    _w("vgg19", "VGG19_Weights.IMAGENET1K_V1", "vgg19-dcbb9e9d.pth", 72.376, 90.876),
    _w("vgg19_bn", "VGG19_BN_Weights.IMAGENET1K_V1", "vgg19_bn-c79401a0.pth", 74.218, 91.842),
    _w("googlenet", "GoogLeNet_Weights.IMAGENET1K_V1", "googlenet-1378be20.pth", 69.778, 89.53,
       note="the auxiliary classifiers in this file are untrained"),
    _w("inception_v3", "Inception_V3_Weights.IMAGENET1K_V1", "inception_v3_google-0cc3c7bd.pth",
       77.294, 93.45, resize=342, crop=299),
    _w("resnet18", "ResNet18_Weights.IMAGENET1K_V1", "resnet18-f37072fd.pth", 69.758, 89.078),
    _w("resnet34", "ResNet34_Weights.IMAGENET1K_V1", "resnet34-b627a593.pth", 73.314, 91.42),
    _w("resnet50", "ResNet50_Weights.IMAGENET1K_V1", "resnet50-0676ba61.pth", 76.13, 92.862),
    _w("resnet50", "ResNet50_Weights.IMAGENET1K_V2", "resnet50-11ad3fa6.pth", 80.858, 95.434,
       resize=232),
    _w("resnet101", "ResNet101_Weights.IMAGENET1K_V1", "resnet101-63fe2227.pth", 77.374, 93.546),
    _w("resnet101", "ResNet101_Weights.IMAGENET1K_V2", "resnet101-cd907fc2.pth", 81.886, 95.78,
       resize=232),
    _w("resnet152", "ResNet152_Weights.IMAGENET1K_V1", "resnet152-394f9c45.pth", 78.312, 94.046),
    _w("resnet152", "ResNet152_Weights.IMAGENET1K_V2", "resnet152-f82ba261.pth", 82.284, 96.002,
       resize=232),
    _w("wide_resnet50_2", "Wide_ResNet50_2_Weights.IMAGENET1K_V1", "wide_resnet50_2-95faca4d.pth",
       78.468, 94.086),
    _w("wide_resnet50_2", "Wide_ResNet50_2_Weights.IMAGENET1K_V2", "wide_resnet50_2-9ba9bcbe.pth",
       81.602, 95.758, resize=232),
    _w("resnext50_32x4d", "ResNeXt50_32X4D_Weights.IMAGENET1K_V1", "resnext50_32x4d-7cdf4587.pth",
       77.618, 93.698),
    _w("resnext50_32x4d", "ResNeXt50_32X4D_Weights.IMAGENET1K_V2", "resnext50_32x4d-1a0047aa.pth",
       81.198, 95.34, resize=232),
)


def recognise_weights(sha256: str, filename: str = "") -> TorchvisionWeights | None:
    """The torchvision release a file is, by its content hash or, failing that, its name.

    torchvision names each download `<name>-<first 8 hex digits of its sha256>.pth`, so a renamed
    copy is recognised by its hash; a file that only has a release's name (a `.safetensors`
    re-save, a fine-tuned copy) is recognised by its name, and `sha256_verified(w, sha256)` then
    says False (the model card records both).
    """
    for w in KNOWN_WEIGHTS:
        if sha256.startswith(w.sha256_prefix):
            return w
    stem = Path(filename).name.split(".")[0]
    for w in KNOWN_WEIGHTS:
        if stem and stem == w.file.split(".")[0]:
            return w
    return None


def sha256_verified(weights: TorchvisionWeights | None, sha256: str) -> bool:
    """Whether a file's hash is that of torchvision's release `weights`."""
    return weights is not None and sha256.startswith(weights.sha256_prefix)


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def default_weights(model: str) -> TorchvisionWeights | None:
    """The first release listed for `model` (torchvision's IMAGENET1K_V1), if any."""
    return next((w for w in KNOWN_WEIGHTS if w.model == model), None)
