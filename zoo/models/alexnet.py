"""AlexNet: torchvision's single-tower `alexnet` and the 2012 network as the notes draw it.

Both variants are one module configured by a layer table (torch `nn.Sequential` order, so the
Flax names `features_<i>` and `classifier_<i>` are torchvision's `state_dict` keys) and a head:
torchvision's 6x6 adaptive average pool (any input >= 63), or the paper's fixed 227x227 input
whose FC6 takes the 6x6x256 map directly.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax.numpy as jnp

from zoo.layers import AdaptiveAvgPool, Conv, Flatten, LocalResponseNorm, MaxPool
from zoo.models import ZooModel
from zoo.registry import FeatureInfo, TorchConversion, register_model

# A tuple is a conv (filters, kernel, stride, padding) followed by a ReLU; "M" is the
# overlapping 3x3/2 max pool; "LRN" is Krizhevsky's normalisation (size 5, 1e-4, 0.75, k=2).
TORCHVISION = ((64, 11, 4, 2), "M", (192, 5, 1, 2), "M", (384, 3, 1, 1), (256, 3, 1, 1),
               (256, 3, 1, 1), "M")
KRIZHEVSKY_2012 = ((96, 11, 4, 0), "M", "LRN", (256, 5, 1, 2), "M", "LRN", (384, 3, 1, 1),
                   (384, 3, 1, 1), (256, 3, 1, 1), "M")


def _sequence(cfg: tuple):
    """(index in torch's `features` nn.Sequential, layer) of a layer table (a conv and its ReLU
    take two indices)."""
    i = 0
    for layer in cfg:
        yield i, layer
        i += 1 if layer in ("M", "LRN") else 2


def alexnet_stages(cfg: tuple) -> tuple[FeatureInfo, ...]:
    """The stage maps of an AlexNet: the map right before each max pool, after its ReLU."""
    stages, channels, last, reduction = [], 0, "", 1
    for i, layer in _sequence(cfg):
        if layer == "M":
            stages.append(FeatureInfo(last, channels, reduction, f"features.{i - 1}"))
            reduction *= 2
        elif layer != "LRN":
            channels, last, reduction = layer[0], f"features_{i}", reduction * layer[2]
    return tuple(stages)


class AlexNet(ZooModel):
    """Conv features from `cfg`, then dropout, FC 4096, dropout, FC 4096, FC classes (ReLUs).

    `adaptive_pool=False` is the paper's head: the input must give a 6x6 map (227x227).
    `features_only` returns the stage maps `out_indices` of `alexnet_stages` instead of logits.
    """

    cfg: tuple = TORCHVISION
    adaptive_pool: bool = True

    @nn.compact
    def __call__(self, x, train: bool | None = None):
        train, stages = self.start(x, train)
        x = x.astype(self.dtype)
        for i, layer in _sequence(self.cfg):
            name = f"features_{i}"
            if layer == "M":
                if stages.add(x):
                    return stages.output()
                x = MaxPool(3, 2, name=name)(x)
            elif layer == "LRN":
                x = LocalResponseNorm(5, 1e-4, 0.75, 2.0, name=name)(x)
            else:
                filters, k, s, p = layer
                x = nn.relu(Conv(filters, (k, k), strides=s, padding=p, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name=name)(x))
        if self.features_only:
            return stages.output()
        if self.adaptive_pool:
            x = AdaptiveAvgPool(6, name="avgpool")(x)
        elif x.shape[1:3] != (6, 6):
            raise ValueError(f"{self.arch} expects images of shape (N, {self.min_size}, "
                             f"{self.min_size}, {self.in_channels}): its FC6 takes a 6x6 map, "
                             f"got {x.shape[1]}x{x.shape[2]}")
        x = Flatten(name="flatten")(x)
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype,
                                         name=name)
        drop = lambda name: nn.Dropout(0.5, deterministic=not train, name=name)
        x = nn.relu(dense(4096, "classifier_1")(drop("classifier_0")(x)))
        x = nn.relu(dense(4096, "classifier_4")(drop("classifier_3")(x)))
        if not self.num_classes:
            return x.astype(jnp.float32)
        return dense(self.num_classes, "classifier_6")(x).astype(jnp.float32)


_INFO = dict(family="alexnet", num_classes=1000, resize_size=256, paper_top5_error=15.3,
             head=("classifier_6",))
register_model("alexnet", AlexNet, input_size=(224, 224, 3), min_size=63, crop_size=224,
               torchvision_name="alexnet", feature_info=alexnet_stages(TORCHVISION),
               conversion=TorchConversion((("classifier.1", (256, 6, 6)),)),
               paper="Krizhevsky 2014, One weird trick for parallelizing convolutional neural "
                     "networks (torchvision's single-tower AlexNet)", **_INFO)
register_model("alexnet_lrn", partial(AlexNet, cfg=KRIZHEVSKY_2012, adaptive_pool=False),
               input_size=(227, 227, 3), min_size=227, crop_size=227,
               feature_info=alexnet_stages(KRIZHEVSKY_2012),
               paper="Krizhevsky, Sutskever & Hinton 2012, ImageNet classification with deep "
                     "convolutional neural networks (one tower, as the notes count it)", **_INFO)
