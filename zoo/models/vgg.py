"""VGG (Simonyan & Zisserman 2015): the paper's configuration table as data and one module.

torchvision's `vgg11/13/16/19` (and `_bn`) are columns A, B, D and E with a 7x7 adaptive
average pool before the classifier (any input >= 32). The paper's `vgg_a` ... `vgg_e` flatten
the 7x7x512 map of a 224x224 input directly; their names are torchvision's too, so `vgg11`
weights load into `vgg_a`. Flax names are the indices of torch's `nn.Sequential`
(`features_<i>`, `classifier_0/3/6`).
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax.numpy as jnp

from zoo.layers import (AdaptiveAvgPool, BatchNorm, Conv, Flatten, LocalResponseNorm,
                        MaxPool)
from zoo.models import ZooModel
from zoo.registry import FeatureInfo, TorchConversion, register_model

# Table 1 of the paper, one column each: a number is a 3x3 conv (pad 1) + ReLU with that many
# filters, (n, 1) a 1x1 conv (C's conv1-n), "M" a 2x2/2 max pool, "LRN" A-LRN's normalisation.
CFGS: dict[str, tuple] = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "A-LRN": (64, "LRN", "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "B": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "C": (64, 64, "M", 128, 128, "M", 256, 256, (256, 1), "M", 512, 512, (512, 1), "M",
          512, 512, (512, 1), "M"),
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
          512, 512, 512, "M"),
    "E": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512, "M"),
}


def _sequence(cfg: tuple, batch_norm: bool):
    """(index, op) of torch's `features` nn.Sequential for a column: a conv is (width, kernel),
    then "BN" (with batch_norm) and "ReLU"; "M" and "LRN" as in the column."""
    i = 0
    for v in cfg:
        if v in ("M", "LRN"):
            ops = (v,)
        else:
            ops = (v if isinstance(v, tuple) else (v, 3), *(("BN",) if batch_norm else ()), "ReLU")
        for op in ops:
            yield i, op
            i += 1


def vgg_stages(cfg: tuple, batch_norm: bool) -> tuple[FeatureInfo, ...]:
    """The stage maps of a VGG: the map right before each max pool (after its ReLU, or A-LRN's
    LRN), named by the last module before it with variables or an op of its own."""
    stages, channels, last, reduction = [], 0, "", 1
    for i, op in _sequence(cfg, batch_norm):
        if op == "M":
            stages.append(FeatureInfo(last, channels, reduction, f"features.{i - 1}"))
            reduction *= 2
        elif op in ("BN", "LRN"):
            last = f"features_{i}"
        elif op != "ReLU":
            channels, last = op[0], f"features_{i}"
    return tuple(stages)


class VGG(ZooModel):
    """Conv [BN] ReLU stacks from `cfg`, then FC 4096, dropout, FC 4096, dropout, FC classes.

    `adaptive_pool=False` is the paper's head: the input must give a 7x7 map (224x224).
    Initialisation is torchvision's (He fan-out convs, N(0, 0.01) dense), so the deep
    variants without BatchNorm train from scratch. `features_only` returns the stage maps
    `out_indices` of `vgg_stages` instead of logits.
    """

    cfg: tuple = CFGS["A"]
    batch_norm: bool = False
    adaptive_pool: bool = True

    @nn.compact
    def __call__(self, x, train: bool | None = None):
        train, stages = self.start(x, train)
        x = x.astype(self.dtype)
        for i, op in _sequence(self.cfg, self.batch_norm):
            name = f"features_{i}"
            if op == "M":
                if stages.add(x):
                    return stages.output()
                x = MaxPool(2, 2, name=name)(x)
            elif op == "LRN":
                x = LocalResponseNorm(name=name)(x)
            elif op == "BN":
                x = BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                              dtype=self.dtype, param_dtype=self.param_dtype,
                              axis_name=self.axis_name, name=name)(x)
            elif op == "ReLU":
                x = nn.relu(x)
            else:
                width, k = op
                x = Conv(width, (k, k), padding=k // 2, dtype=self.dtype,
                         param_dtype=self.param_dtype, name=name,
                         kernel_init=nn.initializers.variance_scaling(2.0, "fan_out",
                                                                      "normal"))(x)
        if self.features_only:
            return stages.output()
        if self.adaptive_pool:
            x = AdaptiveAvgPool(7, name="avgpool")(x)
        elif x.shape[1:3] != (7, 7):
            raise ValueError(f"{self.arch} expects images of shape (N, {self.min_size}, "
                             f"{self.min_size}, {self.in_channels}): its first FC layer takes "
                             f"a 7x7 map, got {x.shape[1]}x{x.shape[2]}")
        x = Flatten(name="flatten")(x)
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype,
                                         kernel_init=nn.initializers.normal(0.01), name=name)
        drop = lambda name: nn.Dropout(0.5, deterministic=not train, name=name)
        x = nn.relu(dense(4096, "classifier_0")(x))
        x = nn.relu(dense(4096, "classifier_3")(drop("classifier_2")(x)))
        if not self.num_classes:
            return x.astype(jnp.float32)
        return dense(self.num_classes, "classifier_6")(drop("classifier_5")(x)).astype(jnp.float32)


_INFO = dict(family="vgg", input_size=(224, 224, 3), num_classes=1000, resize_size=256,
             crop_size=224, paper_top5_error=7.5, head=("classifier_6",),
             paper="Simonyan & Zisserman 2015, Very deep convolutional networks for large-scale "
                   "image recognition")
_TORCHVISION = {  # name: (column, batch norm)
    "vgg11": ("A", False), "vgg11_bn": ("A", True), "vgg13": ("B", False),
    "vgg13_bn": ("B", True), "vgg16": ("D", False), "vgg16_bn": ("D", True),
    "vgg19": ("E", False), "vgg19_bn": ("E", True),
}
_CONVERSION = TorchConversion((("classifier.0", (512, 7, 7)),))
for _name, (_col, _bn) in _TORCHVISION.items():
    register_model(_name, partial(VGG, cfg=CFGS[_col], batch_norm=_bn), min_size=32,
                   torchvision_name=_name, conversion=_CONVERSION,
                   feature_info=vgg_stages(CFGS[_col], _bn), **_INFO)
for _col in CFGS:
    _name = "vgg_" + _col.lower().replace("-", "_")
    register_model(_name, partial(VGG, cfg=CFGS[_col], adaptive_pool=False),
                   min_size=224,
                   feature_info=vgg_stages(CFGS[_col], False), **_INFO)
