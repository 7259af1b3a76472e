"""GoogLeNet (Szegedy et al. 2015) and Inception v3 (Szegedy et al. 2016), as torchvision has them.

Every conv is a `BasicConv2d` (conv without bias, BatchNorm eps 1e-3, ReLU), so torchvision's
weights load one-to-one; the Flax names are torchvision's `state_dict` keys (`conv1/conv`,
`inception3a/branch2_0/bn`, `Mixed_5b/branch1x1/conv`). Branch widths are data: one tuple per
GoogLeNet module (the paper's Table 1), one branch table per Inception v3 module (A-E). With
`aux_logits`, `train=True` returns `(logits, aux_logits_tuple)` for a weighted auxiliary loss;
evaluation returns the logits alone.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from zoo.layers import AdaptiveAvgPool, AvgPool, BatchNorm, Conv, Flatten, MaxPool
from zoo.models import ZooModel
from zoo.registry import (IMAGENET_MEAN, IMAGENET_STD, FeatureInfo, TorchConversion,
                          register_model)


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm -> ReLU, torchvision's Inception conv unit.

    `kernel_size`, `strides` and `padding` are an int or an (H, W) pair, as torch's arguments.
    """

    features: int
    kernel_size: int | tuple[int, int]
    strides: int = 1
    padding: int | tuple[int, int] = 0
    bn_epsilon: float = 1e-3
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        k = self.kernel_size if isinstance(self.kernel_size, tuple) else (self.kernel_size,) * 2
        p = self.padding if isinstance(self.padding, tuple) else (self.padding,) * 2
        x = Conv(self.features, k, self.strides, padding=[(p[0], p[0]), (p[1], p[1])],
                 use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="conv")(x)
        x = BatchNorm(use_running_average=not train, momentum=0.9, epsilon=self.bn_epsilon,
                      dtype=self.dtype, param_dtype=self.param_dtype,
                      axis_name=self.axis_name, name="bn")(x)
        return nn.relu(x)


class InceptionBlock(nn.Module):
    """GoogLeNet's Inception module: 1x1 | 1x1->3x3 | 1x1->5x5 | 3x3 max pool->1x1, concatenated.

    `widths` is a row of the paper's Table 1: (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5,
    pool proj); the output has #1x1 + #3x3 + #5x5 + pool proj channels. `branch3_kernel=5` is
    the paper; torchvision uses 3 there (a known deviation, kept so its weights load).
    `conv_block` builds each conv (inject dtype, axis_name, epsilon with a partial).
    """

    widths: tuple[int, int, int, int, int, int]
    branch3_kernel: int = 5
    conv_block: Callable[..., nn.Module] = BasicConv2d

    @nn.compact
    def __call__(self, x, train: bool = False):
        c1, r3, c3, r5, c5, proj = self.widths
        k, conv = self.branch3_kernel, self.conv_block
        b1 = conv(c1, 1, name="branch1")(x, train)
        b2 = conv(r3, 1, name="branch2_0")(x, train)
        b2 = conv(c3, 3, padding=1, name="branch2_1")(b2, train)
        b3 = conv(r5, 1, name="branch3_0")(x, train)
        b3 = conv(c5, k, padding=k // 2, name="branch3_1")(b3, train)
        b4 = MaxPool(3, 1, 1, ceil_mode=True, name="branch4_0")(x)
        b4 = conv(proj, 1, name="branch4_1")(b4, train)
        return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class GoogLeNetAux(nn.Module):
    """GoogLeNet's auxiliary classifier: 4x4 avg pool, 1x1 conv 128, FC 1024, dropout, FC.

    fc1 reads the 4x4x128 map flattened in NHWC order: converting torch's `aux*.fc1.weight`
    needs the NCHW -> NHWC row permutation of VGG's first FC.
    """

    num_classes: int
    dropout: float = 0.7
    conv_block: Callable[..., nn.Module] = BasicConv2d
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = AdaptiveAvgPool(4, name="pool")(x)
        x = Flatten(name="flatten")(self.conv_block(128, 1, name="conv")(x, train))
        x = nn.relu(nn.Dense(1024, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="fc1")(x))
        x = nn.Dropout(self.dropout, deterministic=not train, name="dropout")(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="fc2")(x).astype(jnp.float32)


def _transform_input(x):
    """torchvision's `transform_input`: ImageNet-normalised input -> the (x - 0.5) / 0.5 scaling
    that Google's ported weights expect."""
    mean, std = jnp.asarray(IMAGENET_MEAN), jnp.asarray(IMAGENET_STD)
    return x * (std / 0.5) + (mean - 0.5) / 0.5


# GoogLeNet (torchvision's names): the stem, where a string is a 3x3/2 ceil-mode max pool and a
# tuple a BasicConv2d (name, features, kernel, stride, padding); then Table 1 of the paper.
GOOGLENET_STEM = (("conv1", 64, 7, 2, 3), "maxpool1", ("conv2", 64, 1), ("conv3", 192, 3, 1, 1),
                  "maxpool2")
GOOGLENET_WIDTHS = {  # (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj)
    "inception3a": (64, 96, 128, 16, 32, 32),
    "inception3b": (128, 128, 192, 32, 96, 64),
    "inception4a": (192, 96, 208, 16, 48, 64),
    "inception4b": (160, 112, 224, 24, 64, 64),
    "inception4c": (128, 128, 256, 24, 64, 64),
    "inception4d": (112, 144, 288, 32, 64, 64),
    "inception4e": (256, 160, 320, 32, 128, 128),
    "inception5a": (256, 160, 320, 32, 128, 128),
    "inception5b": (384, 192, 384, 48, 128, 128),
}
_POOL_AFTER = {"inception3b": ("maxpool3", 3), "inception4e": ("maxpool4", 2)}
_AUX_AFTER = {"inception4a": "aux1", "inception4d": "aux2"}
# The end of each resolution: the map before each max pool, and the last module's.
GOOGLENET_STAGES = tuple(FeatureInfo(n, c, r, n) for n, c, r in (
    ("conv1", 64, 2), ("conv3", 192, 4), ("inception3b", 480, 8), ("inception4e", 832, 16),
    ("inception5b", 1024, 32)))


def _stem(ops, x, train: bool, conv, stages, ceil_mode: bool):
    """The convs and 3x3/2 max pools of a stem table; (x, True) where `stages` has every
    wanted map (each pool's input is a stage boundary)."""
    for op in ops:
        if isinstance(op, str):
            if stages.add(x):
                return x, True
            x = MaxPool(3, 2, ceil_mode=ceil_mode, name=op)(x)
        else:
            x = conv(*op[1:], name=op[0])(x, train)
    return x, False


def _classifier(model, x, train: bool):
    """Global average pool, dropout and the `fc` layer of GoogLeNet and Inception v3 (float32
    logits), or the pooled features when `num_classes` is 0."""
    x = Flatten(name="flatten")(AdaptiveAvgPool(1, name="avgpool")(x))
    if not model.num_classes:
        return x.astype(jnp.float32)
    x = nn.Dropout(model.dropout, deterministic=not train, name="dropout")(x)
    return nn.Dense(model.num_classes, dtype=model.dtype, param_dtype=model.param_dtype,
                    name="fc")(x).astype(jnp.float32)


class GoogLeNet(ZooModel):
    """torchvision's GoogLeNet: stem, nine Inception modules, global average pool, dropout, FC.

    `aux_logits` adds the two auxiliary classifiers (after 4a and 4d; used in training only);
    `transform_input` re-normalises ImageNet-normalised input as torchvision does for the
    ported weights. `branch3_kernel=5` gives the paper's 5x5 convs instead of torchvision's 3x3.
    `features_only` returns the maps `out_indices` of GOOGLENET_STAGES instead of logits.
    """

    aux_logits: bool = True
    transform_input: bool = False
    branch3_kernel: int = 3
    dropout: float = 0.2
    dropout_aux: float = 0.7
    bn_epsilon: float = 1e-3

    @nn.compact
    def __call__(self, x, train: bool | None = None):
        train, stages = self.start(x, train)
        x = (_transform_input(x) if self.transform_input else x).astype(self.dtype)
        conv = partial(BasicConv2d, bn_epsilon=self.bn_epsilon, dtype=self.dtype,
                       param_dtype=self.param_dtype, axis_name=self.axis_name)
        x, done = _stem(GOOGLENET_STEM, x, train, conv, stages, ceil_mode=True)
        if done:
            return stages.output()
        use_aux = (self.aux_logits and self.num_classes and not self.features_only
                   and (train or self.is_initializing()))
        aux = []
        for name, widths in GOOGLENET_WIDTHS.items():
            x = InceptionBlock(widths, self.branch3_kernel, conv, name=name)(x, train)
            if use_aux and name in _AUX_AFTER:
                aux.append(GoogLeNetAux(self.num_classes, self.dropout_aux, conv, self.dtype,
                                        self.param_dtype, name=_AUX_AFTER[name])(x, train))
            if name in _POOL_AFTER:
                if stages.add(x):
                    return stages.output()
                pool, window = _POOL_AFTER[name]
                x = MaxPool(window, 2, ceil_mode=True, name=pool)(x)
        if self.features_only:
            stages.add(x)
            return stages.output()
        x = _classifier(self, x, train)
        return (x, tuple(aux)) if train and aux else x


class MixedBlock(nn.Module):
    """One Inception v3 module (torchvision's InceptionA-E) from a branch table.

    `branches` holds one tuple of ops per branch, applied in order and the branch outputs
    concatenated: a conv (name, features, kernel, stride, padding), "avg" (3x3/1 pad 1 average
    pool), "max" (3x3/2 max pool), or a tuple of convs applied side by side and concatenated
    (InceptionE's 1x3 / 3x1 split).
    """

    branches: tuple
    conv_block: Callable[..., nn.Module] = BasicConv2d

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = lambda spec, y: self.conv_block(*spec[1:], name=spec[0])(y, train)
        outputs = []
        for branch in self.branches:
            y = x
            for op in branch:
                if op == "avg":
                    y = AvgPool(3, 1, 1, name="avgpool")(y)
                elif op == "max":
                    y = MaxPool(3, 2, name="maxpool")(y)
                elif isinstance(op[0], str):
                    y = conv(op, y)
                else:
                    y = jnp.concatenate([conv(spec, y) for spec in op], axis=-1)
            outputs.append(y)
        return jnp.concatenate(outputs, axis=-1)


# Inception v3 (torchvision's names): kernel/stride/padding of the factorised convs, then the stem
# (a string is a 3x3/2 max pool) and the A-E module tables.
_3x3, _5x5, _3x3s2 = (3, 1, 1), (5, 1, 2), (3, 2)
_1x3, _3x1 = ((1, 3), 1, (0, 1)), ((3, 1), 1, (1, 0))
_1x7, _7x1 = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
INCEPTION_V3_STEM = (("Conv2d_1a_3x3", 32, 3, 2), ("Conv2d_2a_3x3", 32, 3),
                     ("Conv2d_2b_3x3", 64, *_3x3), "maxpool1", ("Conv2d_3b_1x1", 80, 1),
                     ("Conv2d_4a_3x3", 192, 3), "maxpool2")


def _inception_a(pool: int) -> tuple:
    return ((("branch1x1", 64, 1),),
            (("branch5x5_1", 48, 1), ("branch5x5_2", 64, *_5x5)),
            (("branch3x3dbl_1", 64, 1), ("branch3x3dbl_2", 96, *_3x3),
             ("branch3x3dbl_3", 96, *_3x3)),
            ("avg", ("branch_pool", pool, 1)))


INCEPTION_B = ((("branch3x3", 384, *_3x3s2),),
               (("branch3x3dbl_1", 64, 1), ("branch3x3dbl_2", 96, *_3x3),
                ("branch3x3dbl_3", 96, *_3x3s2)),
               ("max",))


def _inception_c(c7: int) -> tuple:
    return ((("branch1x1", 192, 1),),
            (("branch7x7_1", c7, 1), ("branch7x7_2", c7, *_1x7), ("branch7x7_3", 192, *_7x1)),
            (("branch7x7dbl_1", c7, 1), ("branch7x7dbl_2", c7, *_7x1),
             ("branch7x7dbl_3", c7, *_1x7), ("branch7x7dbl_4", c7, *_7x1),
             ("branch7x7dbl_5", 192, *_1x7)),
            ("avg", ("branch_pool", 192, 1)))


INCEPTION_D = ((("branch3x3_1", 192, 1), ("branch3x3_2", 320, *_3x3s2)),
               (("branch7x7x3_1", 192, 1), ("branch7x7x3_2", 192, *_1x7),
                ("branch7x7x3_3", 192, *_7x1), ("branch7x7x3_4", 192, *_3x3s2)),
               ("max",))
INCEPTION_E = ((("branch1x1", 320, 1),),
               (("branch3x3_1", 384, 1),
                (("branch3x3_2a", 384, *_1x3), ("branch3x3_2b", 384, *_3x1))),
               (("branch3x3dbl_1", 448, 1), ("branch3x3dbl_2", 384, *_3x3),
                (("branch3x3dbl_3a", 384, *_1x3), ("branch3x3dbl_3b", 384, *_3x1))),
               ("avg", ("branch_pool", 192, 1)))
INCEPTION_V3 = {
    "Mixed_5b": _inception_a(32), "Mixed_5c": _inception_a(64), "Mixed_5d": _inception_a(64),
    "Mixed_6a": INCEPTION_B,
    "Mixed_6b": _inception_c(128), "Mixed_6c": _inception_c(160), "Mixed_6d": _inception_c(160),
    "Mixed_6e": _inception_c(192),
    "Mixed_7a": INCEPTION_D, "Mixed_7b": INCEPTION_E, "Mixed_7c": INCEPTION_E,
}
# The end of each resolution: the map before each max pool and each reduction module (6a, 7a),
# and the last module's (timm's stages).
INCEPTION_V3_STAGES = tuple(FeatureInfo(n, c, r, n) for n, c, r in (
    ("Conv2d_2b_3x3", 64, 2), ("Conv2d_4a_3x3", 192, 4), ("Mixed_5d", 288, 8),
    ("Mixed_6e", 768, 16), ("Mixed_7c", 2048, 32)))


class InceptionV3Aux(nn.Module):
    """Inception v3's auxiliary classifier: 5x5/3 avg pool, 1x1 conv 128, 5x5 conv 768, pool, FC."""

    num_classes: int
    conv_block: Callable[..., nn.Module] = BasicConv2d
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if min(x.shape[1:3]) < 5:
            raise ValueError(f"inception_v3's auxiliary classifier needs a 17x17 map (a "
                             f"299x299 input; at least 107x107), got {x.shape[1]}x{x.shape[2]}; "
                             "use aux_logits=False for smaller training inputs")
        x = AvgPool(5, 3, name="pool")(x)
        x = self.conv_block(128, 1, name="conv0")(x, train)
        x = self.conv_block(768, 5, name="conv1")(x, train)
        x = Flatten(name="flatten")(AdaptiveAvgPool(1, name="avgpool")(x))
        return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="fc")(x).astype(jnp.float32)


class Inception3(ZooModel):
    """torchvision's Inception v3: stem, Mixed_5b ... Mixed_7c, global average pool, dropout, FC.

    `aux_logits` adds the auxiliary classifier after Mixed_6e (training only); `transform_input`
    as in GoogLeNet. `features_only` returns the maps `out_indices` of INCEPTION_V3_STAGES.
    """

    aux_logits: bool = True
    transform_input: bool = False
    dropout: float = 0.5
    bn_epsilon: float = 1e-3

    @nn.compact
    def __call__(self, x, train: bool | None = None):
        train, stages = self.start(x, train)
        x = (_transform_input(x) if self.transform_input else x).astype(self.dtype)
        conv = partial(BasicConv2d, bn_epsilon=self.bn_epsilon, dtype=self.dtype,
                       param_dtype=self.param_dtype, axis_name=self.axis_name)
        x, done = _stem(INCEPTION_V3_STEM, x, train, conv, stages, ceil_mode=False)
        if done:
            return stages.output()
        use_aux = (self.aux_logits and self.num_classes and not self.features_only
                   and (train or self.is_initializing()))
        aux = None
        for name, branches in INCEPTION_V3.items():
            if ("max",) in branches and stages.add(x):  # a reduction module (6a, 7a) follows
                return stages.output()
            x = MixedBlock(branches, conv, name=name)(x, train)
            if use_aux and name == "Mixed_6e":  # eval-mode init only creates the head's
                # variables: a 17x17 dummy map keeps inputs down to 75x75 valid there
                aux_x = x if train else jnp.zeros((1, 17, 17, x.shape[-1]), x.dtype)
                aux = InceptionV3Aux(self.num_classes, conv, self.dtype, self.param_dtype,
                                     name="AuxLogits")(aux_x, train)
        if self.features_only:
            stages.add(x)
            return stages.output()
        x = _classifier(self, x, train)
        return (x, (aux,)) if train and aux is not None else x


register_model("googlenet", GoogLeNet, family="inception", input_size=(224, 224, 3),
               num_classes=1000, min_size=15, resize_size=256, crop_size=224,
               paper="Szegedy et al. 2015, Going deeper with convolutions",
               paper_top5_error=6.7, torchvision_name="googlenet", aux_loss_weight=0.3,
               feature_info=GOOGLENET_STAGES,
               head=("fc", "aux1/fc2", "aux2/fc2"),
               conversion=TorchConversion(
                   (("aux1.fc1", (128, 4, 4)), ("aux2.fc1", (128, 4, 4))),
                   aux_prefixes=("aux1.", "aux2."), transform_input=True, bn_epsilon=1e-3))
register_model("inception_v3", Inception3, family="inception", input_size=(299, 299, 3),
               num_classes=1000, min_size=75, resize_size=342, crop_size=299,
               paper="Szegedy et al. 2016, Rethinking the Inception architecture for computer "
                     "vision",
               torchvision_name="inception_v3", aux_loss_weight=0.4,
               feature_info=INCEPTION_V3_STAGES, head=("fc", "AuxLogits/fc"),
               conversion=TorchConversion(aux_prefixes=("AuxLogits.",),
                                          transform_input=True, bn_epsilon=1e-3))
