"""The source notes' own CNNs: the Keras MNIST CNN (`simple_cnn`) and the PyTorch encoder
(`strided_cnn`) built from a reusable conv-then-strided-conv block."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from zoo.layers import Conv, Flatten, GlobalAvgPool, MaxPool
from zoo.models import ZooModel
from zoo.registry import FeatureInfo, register_model

_MNIST = dict(mean=(0.5,), std=(0.5,), min_size=28)


class SimpleCNN(ZooModel):
    """Conv32 -> pool -> conv64 -> pool -> conv64 -> pool -> dense64 -> dense10 (93,322 params).

    The notes' Keras model, layer for layer: 3x3 'same' convs with ReLU, 2x2 max pools
    (28 -> 14 -> 7 -> 3), flatten to 576, then two dense layers. `features_only` returns the
    maps `out_indices` of the three convs (after their ReLU, before their pool) instead.
    """

    num_classes: int = 10
    in_channels: int = 1

    @nn.compact
    def __call__(self, x, train: bool | None = None):
        train, stages = self.start(x, train)
        x = x.astype(self.dtype)
        for i, width in enumerate((32, 64, 64), start=1):
            x = nn.relu(Conv(width, (3, 3), padding=1, dtype=self.dtype,
                             param_dtype=self.param_dtype, name=f"conv{i}")(x))
            if stages.add(x):
                return stages.output()
            x = MaxPool(2, name=f"pool{i}")(x)
        if self.features_only:
            return stages.output()
        x = Flatten(name="flatten")(x)
        x = nn.relu(nn.Dense(64, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x))
        if not self.num_classes:
            return x.astype(jnp.float32)
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="fc2")(x)
        return x.astype(jnp.float32)


class StridedConvBlock(nn.Module):
    """The notes' `BatchedCNNLayer`: 3x3 conv + ReLU, then a 3x3 stride-2 conv + ReLU (halves H, W)."""

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda s, name: Conv(self.features, (3, 3), strides=s, padding=1,
                                    dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        x = nn.relu(conv(1, "conv1")(x))
        return nn.relu(conv(2, "conv2")(x))


class StridedCNN(ZooModel):
    """Five StridedConvBlocks (32..512 channels; 28 -> 1) and a 512 -> 200 -> classes classifier.

    `features_only` returns the blocks' outputs `out_indices` (strides 2 ... 32) instead.
    """

    num_classes: int = 10
    in_channels: int = 1
    widths: tuple[int, ...] = (32, 64, 128, 256, 512)

    @nn.compact
    def __call__(self, x, train: bool | None = None):
        train, stages = self.start(x, train)
        x = x.astype(self.dtype)
        for i, width in enumerate(self.widths):
            x = StridedConvBlock(width, self.dtype, self.param_dtype, name=f"cnn_encoder_{i}")(x)
            if stages.add(x):
                return stages.output()
        if self.features_only:
            return stages.output()
        x = GlobalAvgPool(name="pool")(x)  # 1x1 at 28x28; any larger input works too
        x = nn.relu(nn.Dense(200, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="classifier_0")(x))
        if not self.num_classes:
            return x.astype(jnp.float32)
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="classifier_2")(x)
        return x.astype(jnp.float32)


register_model("simple_cnn", SimpleCNN, family="simple", input_size=(28, 28, 1), num_classes=10,
               paper="Keras MNIST CNN of the source notes (002)", head=("fc2",),
               feature_info=(FeatureInfo("conv1", 32, 1), FeatureInfo("conv2", 64, 2),
                             FeatureInfo("conv3", 64, 4)), **_MNIST)
register_model("strided_cnn", StridedCNN, family="simple", input_size=(28, 28, 1),
               num_classes=10, paper="PyTorch CNN encoder of the source notes (000)",
               head=("classifier_2",),
               feature_info=tuple(FeatureInfo(f"cnn_encoder_{i}", w, 2 ** (i + 1))
                                  for i, w in enumerate(StridedCNN.widths)),
               **{**_MNIST, "min_size": 2 ** (len(StridedCNN.widths) - 1)})  # five stride-2 blocks
