"""Backbones and feature maps.

A backbone is a model built with `create_model(name, features_only=True, out_indices=...)`:
the family's own module, which collects its stage maps at its stage boundaries (`StageMaps`),
returns them as a list and builds no head, so its variables are the classifier's under the
same names (`backbone_variables` takes them strictly). `ModelInfo.feature_info` describes the
stages. `feature_maps` is the older, generic view: every top-level module's output, by
intercepting a classifier's calls.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from typing import Any

import flax.linen as nn
import jax

from zoo.registry import (abstract_variables, create_model, describe_differences, model_info,
                          variable_differences)


def _stage_listing(name: str) -> str:
    return ", ".join(f"{i} {s.name} ({s.channels} channels, stride {s.reduction})"
                     for i, s in enumerate(model_info(name).feature_info))


def check_out_indices(name: str, out_indices) -> tuple[int, ...]:
    """`out_indices` of model `name` as a tuple (None: every stage), or one ValueError naming
    the valid indices and their stages."""
    n = len(model_info(name).feature_info)
    if not n:
        raise ValueError(f"{name} declares no feature stages (its registration has no "
                         "feature_info), so it has no features_only backbone")
    if out_indices is None:
        return tuple(range(n))
    try:
        indices = tuple(operator.index(i) for i in out_indices)
    except TypeError:
        problem = "is not a sequence of integers"
    else:
        out = [i for i in indices if not 0 <= i < n]
        repeated = sorted({i for i in indices if indices.count(i) > 1})
        problem = ("is empty" if not indices else
                   f"has {', '.join(map(str, out))} out of range 0-{n - 1}" if out else
                   f"repeats {', '.join(map(str, repeated))}" if repeated else None)
        if problem is None:
            return indices
    raise ValueError(f"{name}: out_indices={out_indices!r} {problem}; its stages are "
                     f"{_stage_listing(name)}")


class StageMaps:
    """What a model's `__call__` uses to return its stage maps when `features_only`.

    The model calls `add(x)` at each of its stage boundaries, in the order of its
    `feature_info`; when `add` returns True every wanted map is in and the model returns
    `output()` there, building nothing after it (so no head, and no later stages). A
    classifier (`features_only=False`) records nothing and is never done.
    """

    def __init__(self, features_only: bool, out_indices: tuple[int, ...] | None):
        self.features_only = features_only
        self.wanted = out_indices
        self.maps: dict[int, jax.Array] = {}
        self.count = 0

    def add(self, x) -> bool:
        if self.features_only and (self.wanted is None or self.count in self.wanted):
            self.maps[self.count] = x
        self.count += 1
        return (self.features_only and self.wanted is not None
                and all(i in self.maps for i in self.wanted))

    def output(self) -> list[jax.Array]:
        """The wanted maps in `out_indices` order (all stages when out_indices is None)."""
        indices = range(self.count) if self.wanted is None else self.wanted
        missing = [i for i in indices if i not in self.maps]
        if missing:
            raise ValueError(f"out_indices {tuple(indices)}: the model has {self.count} stages "
                             f"(indices 0-{self.count - 1})")
        return [self.maps[i] for i in indices]


class BackboneVariablesError(ValueError):
    """Variables that do not fit a backbone; `missing`, `unexpected` and `mismatched` hold
    every variable path (e.g. 'params/layer1_0/conv1/kernel') that differs."""

    def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), \
            list(mismatched)


def backbone_variables(name: str, variables, *, out_indices=None, **overrides) -> dict:
    """The part of a classifier's `variables` (converted, shipped, trained) that the backbone
    `create_model(name, features_only=True, out_indices=out_indices, **overrides)` uses.

    Strict: every backbone variable must be there with its shape, and everything left out must
    be a variable of the classifier after the backbone's last stage (its head, auxiliary
    heads, later stages). Returns a new {'params', 'batch_stats'} dict of the same arrays.

    Raises:
      BackboneVariablesError (a ValueError): listing every missing, mis-shaped and unexpected
        variable.
    """
    from flax import traverse_util
    from flax.core import unfreeze

    backbone = create_model(name, features_only=True, out_indices=out_indices, **overrides)
    classifier = create_model(name, **overrides)
    h, w, c = model_info(name).input_size
    shape = (h, w, overrides.get("in_channels", c))
    expected = abstract_variables(backbone, shape)
    missing, unexpected, mismatched = variable_differences(expected, variables,
                                                           "the backbone needs")
    head = set(variable_differences(expected, abstract_variables(classifier, shape))[1])
    unexpected = [k for k in unexpected if k not in head]
    if missing or mismatched or unexpected:
        raise BackboneVariablesError(
            f"these variables do not fit the {name} backbone: "
            + describe_differences(missing, unexpected, mismatched), missing, unexpected,
            mismatched)
    given = traverse_util.flatten_dict(unfreeze(variables), sep="/")
    return traverse_util.unflatten_dict(
        {k: given[k] for k in traverse_util.flatten_dict(unfreeze(expected), sep="/")},
        sep="/")


def feature_maps(model: nn.Module, variables, x, *, train: bool = False,
                 rngs: dict[str, Any] | None = None) -> dict[str, jax.Array]:
    """The NHWC outputs of the model's top-level submodules, in call order.

    Returns an OrderedDict. The rule: every direct child module of `model` whose `__call__`
    returns a 4-D array is one entry, named as in the variable tree; 2-D outputs (pooled
    features, logits) are left out, and functions between modules (ReLU) are not applied.
    resnet18 gives conv1, bn1, maxpool, layer1_0, layer1_1, ..., layer4_1 (the last block of
    each stage is that stage's output); simple_cnn gives conv1, pool1, conv2, pool2, conv3,
    pool3. A child called twice keeps its last output. With `train=True` BatchNorm uses batch
    statistics (the updates are dropped) and `rngs` feeds dropout. For a backbone's stage maps
    (after the activations, the stages of `feature_info`) use `features_only=True` instead.
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
