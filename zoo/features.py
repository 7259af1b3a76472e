"""Feature maps of any zoo model, as timm's `features_only` gives them."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import flax.linen as nn
import jax


def feature_maps(model: nn.Module, variables, x, *, train: bool = False,
                 rngs: dict[str, Any] | None = None) -> dict[str, jax.Array]:
    """The NHWC outputs of the model's top-level submodules, in call order.

    Returns an OrderedDict. The rule: every direct child module of `model` whose `__call__`
    returns a 4-D array is one entry, named as in the variable tree; 2-D outputs (pooled
    features, logits) are left out, and functions between modules (ReLU) are not applied.
    resnet18 gives conv1, bn1, maxpool, layer1_0, layer1_1, ..., layer4_1 (the last block of
    each stage is that stage's output); simple_cnn gives conv1, pool1, conv2, pool2, conv3,
    pool3. A child called twice keeps its last output. With `train=True` BatchNorm uses batch
    statistics (the updates are dropped) and `rngs` feeds dropout.
    """
    maps: OrderedDict[str, jax.Array] = OrderedDict()  # keeps its order through jit, too

    def intercept(next_fun, args, kwargs, ctx):
        out = next_fun(*args, **kwargs)
        if (ctx.method_name == "__call__" and len(ctx.module.path) == 1
                and getattr(out, "ndim", 0) == 4):
            maps.pop(ctx.module.path[0], None)  # a repeated call moves to its latest position
            maps[ctx.module.path[0]] = out
        return out

    with nn.intercept_methods(intercept):
        if train:
            model.apply(variables, x, train=True, mutable=["batch_stats"], rngs=rngs)
        else:
            model.apply(variables, x, train=False, rngs=rngs)
    return maps
