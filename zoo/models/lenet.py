"""LeNet-5 (LeCun, Bottou, Bengio & Haffner 1998) on 32x32 inputs.

MNIST-style 28x28 images are zero-padded to 32x32 by the data pipeline (as in the paper, where
the digits sit centred in a 32x32 field), so the model itself has no padding.
"""

from __future__ import annotations


import flax.linen as nn
import jax.numpy as jnp

from zoo.layers import AvgPool, Conv, Flatten, MaxPool
from zoo.models import ZooModel
from zoo.registry import FeatureInfo, register_model


class LeNet5(ZooModel):
    """C1 6@5x5 -> S2 -> C3 16@5x5 -> S4 -> C5 120@5x5 -> F6 84 -> classes (61,706 params).

    `activation="relu", pooling="max"` is the modern default; `activation="tanh",
    pooling="avg"` is the 1998 network (with full C3 connectivity and a linear output layer in
    place of the RBF units). `features_only` returns the maps `out_indices` of C1, C3 (before
    their pools) and C5 (after their activations) instead of logits.
    """

    num_classes: int = 10
    in_channels: int = 1
    activation: str = "relu"
    pooling: str = "max"

    @nn.compact
    def __call__(self, x, train: bool | None = None):
        train, stages = self.start(x, train)
        act = {"relu": nn.relu, "tanh": jnp.tanh}[self.activation]
        pool = {"max": MaxPool, "avg": AvgPool}[self.pooling]
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype,
                                         name=name)
        x = x.astype(self.dtype)
        for name, width in (("c1", 6), ("c3", 16)):
            x = act(Conv(width, (5, 5), padding=0, dtype=self.dtype,
                         param_dtype=self.param_dtype, name=name)(x))
            if stages.add(x):
                return stages.output()
            x = pool(2, name={"c1": "s2", "c3": "s4"}[name])(x)
        x = act(Conv(120, (5, 5), padding=0, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="c5")(x))
        if self.features_only:
            stages.add(x)
            return stages.output()
        x = act(dense(84, "f6")(Flatten(name="flatten")(x)))
        if not self.num_classes:
            return x.astype(jnp.float32)
        return dense(self.num_classes, "output")(x).astype(jnp.float32)


register_model("lenet5", LeNet5, family="lenet", input_size=(32, 32, 1), num_classes=10,
               min_size=32, mean=(0.5,), std=(0.5,), head=("output",),
               feature_info=(FeatureInfo("c1", 6, 1), FeatureInfo("c3", 16, 2),
                             FeatureInfo("c5", 120, 4)),
               paper="LeCun et al. 1998, Gradient-based learning applied to document recognition")
