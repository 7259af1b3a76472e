"""ResNets (He et al. 2016): torchvision's ImageNet ResNets, wide ResNet, ResNeXt, and the paper's
CIFAR ResNets, all from one `ResNet` module and two public residual blocks.

Blocks are torchvision's v1.5 (the stride sits on the 3x3 conv of a Bottleneck) and the Flax
names are torchvision's `state_dict` keys (`layer1_0/conv1`, `layer2_0/downsample_0`), so its
weights load one-to-one. A variant is a row (block, stage sizes, width per group, groups).
The CIFAR nets (resnet20 ... resnet110) are the paper's §4.2; its Table 6 reports 8.75%
CIFAR-10 test error for resnet20 (7.51, 7.17, 6.97 and 6.43% for 32, 44, 56 and 110 layers).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.layers import BatchNorm, Conv, GlobalAvgPool, MaxPool, fence
from zoo.models import ZooModel
from zoo.registry import FeatureInfo, TorchConversion, register_model

_HE = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # torchvision's conv init


class _Block(nn.Module):
    """What both blocks share: options, conv/BN factories and the shortcut.

    `features` is torchvision's `planes`; the block outputs `features * expansion` channels.
    `shortcut` applies where the shape changes: "B" is a 1x1 conv + BN projection (torchvision's
    `downsample`), "A" the CIFAR paper's parameter-free stride-2 subsampling with the new
    channels zero-padded at the end.
    """

    features: int
    strides: int = 1
    groups: int = 1
    base_width: int = 64
    shortcut: str = "B"
    zero_init_residual: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axis_name: str | None = None
    expansion: ClassVar[int] = 1

    def conv(self, features, k, strides=1, groups=1, name=None):
        return Conv(features, (k, k), strides, padding=k // 2, feature_group_count=groups,
                    use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=_HE, name=name)

    def norm(self, train, name, last=False):
        zero = last and self.zero_init_residual
        return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         dtype=self.dtype, param_dtype=self.param_dtype,
                         axis_name=self.axis_name, name=name,
                         scale_init=nn.initializers.zeros if zero else nn.initializers.ones)

    def residual(self, x, y, train):
        """relu(y + shortcut(x)), computed once (`fence`: the block output is what the next
        blocks' backward passes read)."""
        out = self.features * self.expansion
        if self.strides != 1 or x.shape[-1] != out:
            if self.shortcut == "A":
                x = x[:, ::self.strides, ::self.strides]
                x = jnp.pad(x, [(0, 0)] * 3 + [(0, out - x.shape[-1])])
            else:
                x = self.conv(out, 1, self.strides, name="downsample_0")(x)
                x = self.norm(train, "downsample_1")(x)
        return fence(lambda y, x: nn.relu(y + x), y, x)


class BasicBlock(_Block):
    """3x3 conv, BN, ReLU, 3x3 conv, BN, + shortcut, ReLU (ResNet-18/34 and the CIFAR nets)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.groups != 1 or self.base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and base_width=64")
        y = nn.relu(self.norm(train, "bn1")(self.conv(self.features, 3, self.strides,
                                                      name="conv1")(x)))
        y = self.norm(train, "bn2", last=True)(self.conv(self.features, 3, name="conv2")(y))
        return self.residual(x, y, train)


class Bottleneck(_Block):
    """1x1 conv (width), 3x3 grouped conv with the stride, 1x1 conv (4 * features), + shortcut.

    width = features * base_width / 64 * groups: ResNeXt 32x4d is groups=32, base_width=4;
    wide ResNet-50-2 is base_width=128.
    """

    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        width = int(self.features * (self.base_width / 64.0)) * self.groups
        y = nn.relu(self.norm(train, "bn1")(self.conv(width, 1, name="conv1")(x)))
        y = self.conv(width, 3, self.strides, self.groups, name="conv2")(y)
        y = nn.relu(self.norm(train, "bn2")(y))
        y = self.norm(train, "bn3", last=True)(self.conv(self.features * 4, 1, name="conv3")(y))
        return self.residual(x, y, train)


class ResNet(ZooModel):
    """Stem, stages of residual blocks (stride 2 at the start of every stage but the first),
    global average pool, FC.

    `stem="imagenet"` is conv 7x7/2 + BN + ReLU + max pool 3x3/2; `stem="cifar"` a 3x3 conv +
    BN + ReLU at full resolution. `widths` are the stages' `features` (the stem has widths[0]).
    `features_only` returns the stage maps `out_indices` of `resnet_stages` instead of logits.
    """

    block: type[_Block] = BasicBlock
    stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
    widths: tuple[int, ...] = (64, 128, 256, 512)
    groups: int = 1
    width_per_group: int = 64
    stem: str = "imagenet"
    shortcut: str = "B"
    zero_init_residual: bool = False

    @nn.compact
    def __call__(self, x, train: bool | None = None):
        train, stages = self.start(x, train)
        x = x.astype(self.dtype)
        k, s = (3, 1) if self.stem == "cifar" else (7, 2)
        x = Conv(self.widths[0], (k, k), s, padding=k // 2, use_bias=False, dtype=self.dtype,
                 param_dtype=self.param_dtype, kernel_init=_HE, name="conv1")(x)
        x = BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      dtype=self.dtype, param_dtype=self.param_dtype,
                      axis_name=self.axis_name, name="bn1")(x)
        x = nn.relu(x)
        if self.stem != "cifar":
            if stages.add(x):
                return stages.output()
            x = MaxPool(3, 2, padding=1, name="maxpool")(x)
        block = partial(self.block, groups=self.groups, base_width=self.width_per_group,
                        shortcut=self.shortcut, zero_init_residual=self.zero_init_residual,
                        dtype=self.dtype, param_dtype=self.param_dtype, axis_name=self.axis_name)
        for i, (n, features) in enumerate(zip(self.stage_sizes, self.widths)):
            for j in range(n):
                x = block(features, strides=2 if i and not j else 1,
                          name=f"layer{i + 1}_{j}")(x, train)
            if stages.add(x):
                return stages.output()
        if self.features_only:
            return stages.output()
        x = GlobalAvgPool(name="avgpool")(x)
        if not self.num_classes:
            return x.astype(jnp.float32)
        bound = 1 / math.sqrt(x.shape[-1])  # torch's nn.Linear default init
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                     bias_init=lambda key, shape, dtype: jax.random.uniform(
                         key, shape, dtype, -bound, bound), name="fc")(x)
        return x.astype(jnp.float32)


def resnet_stages(block: type[_Block], stage_sizes: tuple[int, ...], widths: tuple[int, ...],
                  stem: str = "imagenet") -> tuple[FeatureInfo, ...]:
    """The stage maps of a ResNet: the stem after its ReLU (timm's act1; the ImageNet stem
    only, as the CIFAR stem keeps the input's resolution), then each layer's last block."""
    first = 1 if stem == "cifar" else 4
    head = () if stem == "cifar" else (FeatureInfo("bn1", widths[0], 2, "relu"),)
    return head + tuple(
        FeatureInfo(f"layer{i + 1}_{n - 1}", w * block.expansion, first * 2 ** i, f"layer{i + 1}")
        for i, (n, w) in enumerate(zip(stage_sizes, widths)))


_HE_2016 = "He et al. 2016, Deep residual learning for image recognition"
_TORCHVISION = {  # name: (block, stage sizes, width per group, groups, paper)
    "resnet18": (BasicBlock, (2, 2, 2, 2), 64, 1, _HE_2016),
    "resnet34": (BasicBlock, (3, 4, 6, 3), 64, 1, _HE_2016),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 64, 1, _HE_2016),
    "resnet101": (Bottleneck, (3, 4, 23, 3), 64, 1, _HE_2016),
    "resnet152": (Bottleneck, (3, 8, 36, 3), 64, 1, _HE_2016),
    "wide_resnet50_2": (Bottleneck, (3, 4, 6, 3), 128, 1,
                        "Zagoruyko & Komodakis 2016, Wide residual networks"),
    "resnext50_32x4d": (Bottleneck, (3, 4, 6, 3), 4, 32,
                        "Xie et al. 2017, Aggregated residual transformations for deep neural "
                        "networks"),
}
for _name, (_block, _sizes, _wpg, _groups, _paper) in _TORCHVISION.items():
    register_model(_name, partial(ResNet, block=_block, stage_sizes=_sizes, width_per_group=_wpg,
                                  groups=_groups),
                   family="resnet", input_size=(224, 224, 3), num_classes=1000, min_size=32,
                   resize_size=256, crop_size=224, paper=_paper,
                   paper_top5_error=3.57 if _paper == _HE_2016 else None,
                   torchvision_name=_name, conversion=TorchConversion(), timm_name=_name,
                   head=("fc",),
                   feature_info=resnet_stages(_block, _sizes, (64, 128, 256, 512)))

# He et al. 2016 §4.2: 6n + 2 layers, n BasicBlocks per stage at 16/32/64 channels, option A.
for _depth in (20, 32, 44, 56, 110):
    _name = f"resnet{_depth}"
    _sizes = ((_depth - 2) // 6,) * 3
    register_model(_name, partial(ResNet, stage_sizes=_sizes, widths=(16, 32, 64), stem="cifar",
                                  shortcut="A"),
                   feature_info=resnet_stages(BasicBlock, _sizes, (16, 32, 64), "cifar"),
                   family="resnet", input_size=(32, 32, 3), num_classes=10, min_size=8,
                   mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
                   paper=f"{_HE_2016}, §4.2 (CIFAR-10)", head=("fc",))
