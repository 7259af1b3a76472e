"""One module per model family; importing a family registers its models in `zoo.registry`.

`ZooModel` holds what every family's top-level module shares: the options `create_model`
passes to any model, and the first step of its `__call__`.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from zoo.features import StageMaps
from zoo.layers import check_input, train_mode


class ZooModel(nn.Module):
    """The fields every zoo model has.

    num_classes: classifier size; 0 returns the pooled features instead of logits.
    in_channels: input channels (checked). dtype: compute dtype; param_dtype: parameters'.
    axis_name: BatchNorm statistics are averaged over this pmap axis (the pmap path sets it).
    features_only, out_indices: return the stage maps (ModelInfo.feature_info) instead.
    arch, min_size: the registry name and smallest input (H = W) the input check names;
      `create_model` sets both from the registry, their one owner.
    """

    num_classes: int = 1000
    in_channels: int = 3
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axis_name: str | None = None
    features_only: bool = False
    out_indices: tuple[int, ...] | None = None
    arch: str = ""
    min_size: int = 1

    def start(self, x, train: bool | None):
        """The first line of every `__call__`: checks `x` (one readable ValueError), and
        returns the call's mode (`zoo.layers.train_mode`) and its StageMaps."""
        check_input(x, self.arch or type(self).__name__, self.in_channels, self.min_size)
        return train_mode(self, train), StageMaps(self.features_only, self.out_indices)
