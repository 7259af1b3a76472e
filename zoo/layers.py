"""The small layers the models share: pools, flatten, LRN, BatchNorm, the input check and the
Conv, with their CPU fast paths (README, Benchmarks: why each exists and what it gains).

Pooling, flatten and LRN are modules (not bare functions) so that `zoo.summary` sees them as rows
of the table, as Keras' `model.summary()` does. The notes' arithmetic (output sizes, parameter
counts, receptive fields, the hand-made filters) lives in `zoo.arithmetic` and is re-exported
here, where it has always been importable from; the sizes computed here come from its
`conv_output_size`.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding
from jax import lax

from zoo import onednn
from zoo.arithmetic import (  # noqa: F401  (re-exported: zoo.layers.conv_output_size etc.)
    KERNELS, apply_filter, conv_formula, conv_output_size, conv_param_count, dense_param_count,
    leftover, receptive_field, steps_per_epoch)


def check_input(x, model: str, channels: int, min_size: int) -> None:
    """Raises one readable ValueError when `x` is not a float NHWC batch the model accepts."""
    expect = f"{model} expects float images of shape (N, H, W, {channels}) with H, W >= {min_size}"
    if x.ndim != 4:
        raise ValueError(f"{expect}; got an array of shape {tuple(x.shape)} "
                         "(add a batch axis with x[None] for one image)")
    if x.shape[-1] != channels:
        raise ValueError(f"{expect}; got {x.shape[-1]} channels in {tuple(x.shape)} "
                         f"(NCHW input must be transposed to NHWC)")
    if min(x.shape[1:3]) < min_size:
        raise ValueError(f"{expect}; got {tuple(x.shape)}: the input is too small "
                         f"(resize it, or pick a model for small images)")


def train_mode(module: nn.Module, train: bool | None) -> bool:
    """The mode of a model call: `train` where the caller gives it. Without it (a Flax-style
    `model.apply(variables, x, mutable=['batch_stats'])`, as Flax's examples train), the call
    trains exactly when BatchNorm statistics may change: a mutable 'batch_stats' collection
    outside `init` means training, a plain `apply` means evaluation."""
    if train is not None:
        return bool(train)
    return module.is_mutable_collection("batch_stats") and not module.is_initializing()


_NHWC = ("NHWC", "HWIO", "NHWC")


def pair(v, default: int = 1) -> tuple[int, int]:
    """(H, W) of a flax Conv field given as one int, a pair, or None (`default`)."""
    if v is None:
        return default, default
    return (v, v) if isinstance(v, int) else tuple(v)


def _cpu_geometry(lhs, rhs, window_strides, padding, dilations, dimension_numbers,
                  feature_group_count, kwargs):
    """(explicit pads, output (H, W)) of a convolution a CPU fast path may compute: on CPU,
    NHWC/HWIO, ungrouped, undilated, no preferred element type; else None."""
    if (jax.default_backend() != "cpu" or lhs.ndim != 4 or feature_group_count != 1
            or kwargs.get("preferred_element_type") is not None
            or any(d != 1 for d in dilations)
            or dimension_numbers != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)):
        return None
    kernel = rhs.shape[:2]
    pads = (lax.padtype_to_pads(lhs.shape[1:3], kernel, window_strides, padding)
            if isinstance(padding, str) else tuple(map(tuple, padding)))
    try:
        out = [conv_output_size(n, k, s, pad, rounding="floor")
               for n, pad, k, s in zip(lhs.shape[1:3], pads, kernel, window_strides)]
    except ValueError:  # negative padding or a kernel larger than the input: lax's business
        return None
    return pads, out


def _views(x, kernel, strides, out):
    """The (i, j) strided views of padded NHWC `x`, row-major: view (i, j) holds element (i, j)
    of every output's window (the input that kernel tap (i, j) multiplies)."""
    (kh, kw), (sh, sw), (ho, wo) = kernel, strides, out
    return [x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
            for i in range(kh) for j in range(kw)]


def _takes_onednn(x, w) -> bool:
    """Whether a CPU convolution of `x` with `w` is oneDNN's (`zoo.onednn`): float32, where
    `onednn.available()` (built, one host device)."""
    return x.dtype == w.dtype == jnp.float32 and x.size > 0 and onednn.available()


# The RGB convolutions that take `conv_taps` on CPU: kernels of at most 3x3 (the CIFAR ResNets'
# and Inception-v3's stems) into at most 32 channels (VGG's 64-channel stem at 224 px lost in
# training).
TAPS_RGB_MAX_TAPS, TAPS_RGB_MAX_FEATURES = 9, 32


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_taps(x, w, strides: tuple[int, int], pads: tuple[tuple[int, int], ...], precision):
    """An NHWC x HWIO convolution of a one- or three-channel input as the sum over its kernel
    taps (i, j) and input channels c of the shifted strided input's channel c times that tap's
    row of weights: elementwise work XLA fuses into one loop, several times faster than
    XLA:CPU's convolution for such inputs.

    The sum is computed once (`fence`) wherever XLA would otherwise recompute it inside each
    consumer: always under differentiation (the backward pass adds consumers), and in inference
    above 9 taps (LeNet's 5x5 feeds a 2x2 pool, which re-read all 25 taps per window element).
    The gradients are oneDNN's convolution's (`zoo.onednn`) where it runs, else lax's.
    """
    if w.shape[0] * w.shape[1] > 9:
        return _fenced_taps(x, w, strides, pads)
    return _taps_sum(x, w, strides, pads)


def _fenced_taps(x, w, strides, pads):
    return fence(lambda x, w: _taps_sum(x, w, strides, pads), x, w)


def _taps_sum(x, w, strides, pads):
    kh, kw, cin, _ = w.shape
    acc = jnp.promote_types(x.dtype, jnp.float32)
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0))).astype(acc)
    out = [conv_output_size(n, k, s, 0, rounding="floor")
           for n, k, s in zip(xp.shape[1:3], (kh, kw), strides)]
    taps = [view[..., c:c + 1] * w[k // kw, k % kw, c].astype(acc)
            for k, view in enumerate(_views(xp, (kh, kw), strides, out)) for c in range(cin)]
    return functools.reduce(jnp.add, taps).astype(jnp.result_type(x, w))


def _lax_conv(strides, pads, precision):
    return functools.partial(lax.conv_general_dilated, window_strides=strides, padding=pads,
                             dimension_numbers=_NHWC, precision=precision)


def _conv_taps_fwd(x, w, strides, pads, precision):
    return _fenced_taps(x, w, strides, pads), (x, w)


def _conv_taps_bwd(strides, pads, precision, residuals, g):
    x, w = residuals
    if _takes_onednn(x, w):
        return jax.vjp(lambda x, w: onednn.conv(x, w, strides, pads), x, w)[1](g)
    return jax.vjp(_lax_conv(strides, pads, precision), x, w)[1](g)


conv_taps.defvjp(_conv_taps_fwd, _conv_taps_bwd)


# The widest convolutions (input and output channels) that `conv_pairs` computes on CPU: the
# CIFAR ResNets' first stage (16); at 32 channels on 16x16 maps the pairs were slower.
PAIRS_MAX_CHANNELS = 16


def _pairs_kernel(w):
    """The (kh, 2, 2C, 2K) kernel of `conv_pairs`: from pixel p of input pair a to output
    pixel q, `w`'s column 2a + p - q (zeros outside the kernel)."""
    kh, _, c, k = w.shape
    paired = jnp.zeros((kh, 2, 2, c, 2, k), w.dtype)  # (i, a, p, c, q, k)
    for a, p, q in itertools.product((0, 1), repeat=3):
        if 0 <= 2 * a + p - q <= 2:
            paired = paired.at[:, a, p, :, q].set(w[:, 2 * a + p - q])
    return paired.reshape(kh, 2, 2 * c, 2 * k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_pairs(x, w, pads_h: tuple[int, int], precision=None):
    """A stride-1 NHWC x HWIO convolution with a 3-wide kernel padded by 1 left and right, of
    an even-width input, over pairs of adjacent columns: the input reshaped to (N, H, W/2, 2C),
    a (kh, 2) kernel from 2C to 2K channels whose output pairs are the columns (2m - 1, 2m),
    reshaped to W + 2 columns of which the first and the last are dropped.

    XLA:CPU's convolution runs far from its peak on 16-channel maps, where each input patch it
    packs feeds 16 outputs; the paired one does 4/3 of the multiplications (the kernel's zeros)
    on twice the channels, faster. The reshape is `fence`d, or XLA fuses it into the producer,
    whose loop in the paired shape was several times slower. The input gradient is the same
    paired convolution of the cotangent (the kernel flipped and transposed); the weight
    gradient is lax's (as a paired convolution XLA:CPU ran it off its fast path)."""
    n, h, wd, c = x.shape
    x = fence(lambda x: x.reshape(n, h, wd // 2, 2 * c), x)
    y = lax.conv_general_dilated(x, _pairs_kernel(w), (1, 1), (pads_h, (1, 1)),
                                 dimension_numbers=_NHWC, precision=precision)
    return y.reshape(*y.shape[:2], wd + 2, w.shape[-1])[:, :, 1:-1]


def _conv_pairs_fwd(x, w, pads_h, precision):
    return conv_pairs(x, w, pads_h, precision), (x, w)


def _conv_pairs_bwd(pads_h, precision, residuals, g):
    x, w = residuals
    conv = _lax_conv((1, 1), (pads_h, (1, 1)), precision)
    kh = w.shape[0]
    dx = conv_pairs(g, jnp.flip(w, (0, 1)).swapaxes(2, 3),
                    (kh - 1 - pads_h[0], kh - 1 - pads_h[1]), precision)
    return dx, jax.vjp(lambda w: conv(x, w), w)[1](g)[0]


conv_pairs.defvjp(_conv_pairs_fwd, _conv_pairs_bwd)


# The smallest kernel (taps) of a stride-1 unpadded convolution that `conv_cols` computes on
# CPU: LeNet's 5x5 c3.
COLS_MIN_TAPS = 25


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_cols(x, w, precision=None):
    """lax's stride-1 unpadded ('VALID') NHWC x HWIO convolution, whose input gradient is one
    matmul of the cotangent with the kernel, (N, Ho, Wo, K) x (K, kh*kw*C), each output pixel's
    contributions to its kh x kw input window then added into place (col2im), in float32.

    XLA:CPU computes that gradient as a convolution of the cotangent padded by the kernel size
    less one on every side: on LeNet's c3 (10x10 outputs of a 5x5 kernel into 6 channels) it
    multiplied about twice as many terms, most of them padding zeros, at a few GFLOP/s, and
    was the largest op of lenet5's train step. The weight gradient is lax's."""
    return _lax_conv((1, 1), ((0, 0), (0, 0)), precision)(x, w)


def _conv_cols_fwd(x, w, precision):
    return conv_cols(x, w, precision), (x, w)


def _conv_cols_bwd(precision, residuals, g):
    x, w = residuals
    kh, kw, c, k = w.shape
    cols = lax.dot_general(g, w.reshape(kh * kw * c, k), (((3,), (1,)), ((), ())),
                           precision=precision, preferred_element_type=jnp.float32)
    cols = cols.reshape(*g.shape[:3], kh, kw, c)
    dx = functools.reduce(jnp.add, [
        jnp.pad(cols[:, :, :, i, j], ((0, 0), (i, kh - 1 - i), (j, kw - 1 - j), (0, 0)))
        for i in range(kh) for j in range(kw)])
    conv = _lax_conv((1, 1), ((0, 0), (0, 0)), precision)
    return dx.astype(x.dtype), jax.vjp(lambda w: conv(x, w), w)[1](g)[0]


conv_cols.defvjp(_conv_cols_fwd, _conv_cols_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, **kwargs):
    """`lax.conv_general_dilated`, except for these kinds of NHWC convolution on CPU, where
    XLA:CPU's convolution (or its input gradient) is slower than the same sum computed another
    way (README, Benchmarks; `benchmarks/cpu_conv.py` times the first three):

    - at most 2x2 outputs (ResNet's and VGG's last stage at 32-64 px inputs): one matmul over
      the input's patches;
    - one input channel (MNIST-like images' first convolution), or RGB with a kernel of at
      most 3x3 into at most 32 channels (`TAPS_RGB_MAX_TAPS`, `TAPS_RGB_MAX_FEATURES`: the
      CIFAR ResNets' stem): `conv_taps`, a fused sum of shifted views;
    - every other float32 convolution, where `zoo.onednn` runs: oneDNN's, forward and both
      gradients;
    - without oneDNN: stride 1, a 3-wide kernel padded by 1 on both sides of an even width, at
      most 16 channels in and out (`PAIRS_MAX_CHANNELS`: the CIFAR ResNets' first stage):
      `conv_pairs`; stride 1, no padding, a kernel of at least `COLS_MIN_TAPS` taps (LeNet's
      c3): `conv_cols`, whose input gradient is a matmul.

    Same sum, same parameters.
    """
    geometry = _cpu_geometry(lhs, rhs, window_strides, padding,
                             (lhs_dilation or ()) + (rhs_dilation or ()), dimension_numbers,
                             feature_group_count, kwargs)
    if geometry is None:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                        rhs_dilation, dimension_numbers, feature_group_count,
                                        **kwargs)
    pads, (ho, wo) = geometry
    kh, kw, cin, cout = rhs.shape
    if ho * wo <= 4:
        x = jnp.pad(lhs, ((0, 0), *pads, (0, 0)))
        patches = jnp.concatenate(  # (N, Ho, Wo, kh*kw*C), in the order of HWIO's reshape
            _views(x, rhs.shape[:2], window_strides, (ho, wo)), axis=-1)
        return lax.dot_general(patches, rhs.reshape(-1, rhs.shape[-1]),
                               (((3,), (0,)), ((), ())), precision=kwargs.get("precision"))
    if cin == 1 or (cin == 3 and kh * kw <= TAPS_RGB_MAX_TAPS
                    and cout <= TAPS_RGB_MAX_FEATURES):
        return conv_taps(lhs, rhs, tuple(window_strides), pads, kwargs.get("precision"))
    if _takes_onednn(lhs, rhs):
        return onednn.conv(lhs, rhs, tuple(window_strides), tuple(map(tuple, pads)))
    if (kw == 3 and pads[1] == (1, 1) and all(0 <= p < kh for p in pads[0])
            and tuple(window_strides) == (1, 1) and lhs.shape[2] % 2 == 0
            and max(cin, cout) <= PAIRS_MAX_CHANNELS):
        return conv_pairs(lhs, rhs, tuple(pads[0]), kwargs.get("precision"))
    if (tuple(window_strides) == (1, 1) and all(tuple(p) == (0, 0) for p in pads)
            and kh * kw >= COLS_MIN_TAPS):
        return conv_cols(lhs, rhs, kwargs.get("precision"))
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    **kwargs)


@jax.custom_vjp
def add_bias(y, bias):
    """`y + bias` over the last axis, whose bias gradient is the `channel_sums` matmul of the
    cotangent. XLA:CPU reduces a cotangent over (N, H, W) in a loop that walks the array once
    per channel, several times slower than that matmul at 32 channels and more
    (`benchmarks/cpu_norm.py`): a convolution's bias gradient had been the largest single op
    of simple_cnn's train step."""
    return y + bias


def _add_bias_fwd(y, bias):
    return y + bias, None


def _add_bias_bwd(_, g):  # y and bias share a dtype (Conv promotes them); bfloat16 sums in float32
    return g, channel_sums(g.astype(jnp.promote_types(g.dtype, jnp.float32))).astype(g.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


# The output channels and map pixels from which a Conv's bias is `add_bias`' on CPU: on fewer
# channels (LeNet's 6 and 16) or smaller maps the reduction is cheap and the matmul lost (README).
MATMUL_BIAS_MIN_FEATURES, MATMUL_BIAS_MIN_PIXELS = 32, 7 * 7


class Conv(nn.Conv):
    """`nn.Conv` (same fields, variables and results) whose convolution is
    `conv_general_dilated` above and whose bias, on CPU, is added by `add_bias` where the
    output has at least `MATMUL_BIAS_MIN_FEATURES` channels and `MATMUL_BIAS_MIN_PIXELS` pixels.

    That path covers what the models build: NHWC input, one kernel shared over the image, no
    mask, zero padding ('SAME', 'VALID', or explicit); every other call is flax's.
    """

    conv_general_dilated: Any = conv_general_dilated

    @nn.compact
    def __call__(self, inputs):
        kernel_size = ((self.kernel_size,) if isinstance(self.kernel_size, int)
                       else tuple(self.kernel_size))
        padding = canonicalize_padding(self.padding, len(kernel_size))
        if (jax.default_backend() != "cpu" or not self.use_bias or not self.shared_weights
                or self.features < MATMUL_BIAS_MIN_FEATURES or self.mask is not None
                or self.conv_general_dilated_cls is not None or inputs.ndim != 4
                or len(kernel_size) != 2 or padding in ("CIRCULAR", "REFLECT", "CAUSAL")):
            return super().__call__(inputs)
        kernel = self.param("kernel", self.kernel_init, (
            *kernel_size, inputs.shape[-1] // self.feature_group_count, self.features),
            self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = self.conv_general_dilated(
            inputs, kernel, pair(self.strides), padding, lhs_dilation=pair(self.input_dilation),
            rhs_dilation=pair(self.kernel_dilation),
            dimension_numbers=lax.conv_dimension_numbers(inputs.shape, kernel.shape, _NHWC),
            feature_group_count=self.feature_group_count, precision=self.precision)
        if y.shape[1] * y.shape[2] < MATMUL_BIAS_MIN_PIXELS:
            return y + bias
        return add_bias(y, bias)


def fence(f, *args):
    """`f(*args)`, on CPU computed inside a conditional both of whose branches are `f`, so that
    it is computed once, stored and read by every consumer.

    XLA:CPU's fusion duplicates cheap elementwise work into each of its consumers rather than
    read a result it has stored: in a ResNet's train step every weight-gradient transpose
    recomputed the stage's whole residual chain (every block's BatchNorm, add and ReLU) from
    the convolution outputs. A conditional is opaque to fusion. Its predicate reads the data
    only so that XLA cannot fold it away; both branches are `f`, so its value does not matter.
    """
    if jax.default_backend() != "cpu":
        return f(*args)
    leaf = jnp.ravel(args[0])[0]
    return lax.cond(leaf == leaf, f, f, *args)


def pool_padding(n: int, k: int, s: int, p: int, ceil_mode: bool) -> tuple[int, int]:
    """(low, high) padding of one axis that reproduces torch's pooling output size.

    Without `ceil_mode` that is P on both sides (the size floors). With it the size is
    ceil((N - F + 2P) / S) + 1 (the floored size of an input S - 1 longer), and the last,
    partial window gets zeros after the input, except that, as in torch, it must start inside
    the input.
    """
    if not ceil_mode:
        return p, p
    try:
        out = conv_output_size(n + s - 1, k, s, p, rounding="floor")
    except ValueError:
        raise ValueError(f"a {k}x{k} pooling window at stride {s} leaves no output on an input "
                         f"of {n} padded by {p}, even with ceil_mode") from None
    if (out - 1) * s >= n + p:
        out -= 1
    return p, max((out - 1) * s + k - n - p, p)


class Pool(nn.Module):
    """Base of the square pools: a `window` x `window` window every `stride` (default: the
    window) with `padding` on every side; `ceil_mode` as torch's."""

    window: int
    stride: int | None = None
    padding: int = 0
    ceil_mode: bool = False

    def _reduce(self, x, init: float, op):
        # `init` stays a Python scalar: lax then recognises the max/min/add monoid and the
        # pooling is differentiable (a traced init value would not be)
        s = self.stride or self.window
        pads = [(0, 0)] + [pool_padding(n, self.window, s, self.padding, self.ceil_mode)
                           for n in x.shape[1:3]] + [(0, 0)]
        dims = (1, self.window, self.window, 1)
        return lax.reduce_window(x, init, op, dims, (1, s, s, 1), pads), pads


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x, window: int, stride: int, pads: tuple[tuple[int, int], ...]):
    """Max pooling of an NHWC batch as elementwise work: the maximum of the window's k*k
    strided views of the input padded with -inf by `pads` ((low, high) of H and W).

    The values of lax's reduce-window max, and the gradient of its transpose,
    `select_and_scatter_add`: each window's cotangent goes to its first maximum in row-major
    order (ties included: ReLU zeros tie all the time), summed where windows overlap. XLA:CPU
    expands `select_and_scatter` into iotas, a variadic reduce-window and a scatter, which
    dominates a small CNN's train step. Here the forward pass also keeps, per window, the
    position of that first maximum (one int8 per output; under differentiation maxima and
    positions are `fence`d: XLA had recomputed them, and the input's producer, for every
    element of every window in the backward pass), and the backward pass only compares
    positions: for windows that tile the input (stride = window) it is one broadcast select
    reshaped to the input, otherwise one strided pad per window position, all fused into loops
    (benchmarks/cpu_pool.py).
    """
    return _max_and_first(x, window, stride, pads)[0]


def _max_pool_fwd(x, window, stride, pads):
    y, first = fence(lambda x: _max_and_first(x, window, stride, pads), x)
    return y, (first, x.shape)


def _max_and_first(x, window, stride, pads):
    """The pooled maxima and each window's position of its first maximum."""
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
    out = [conv_output_size(n, window, stride, 0, rounding="floor") for n in xp.shape[1:3]]
    positions = window * window
    index = jnp.int8 if positions < 128 else jnp.int32
    views = _views(xp, (window, window), (stride, stride), out)
    y = functools.reduce(jnp.maximum, views)
    first = jnp.full(y.shape, positions, index)
    for k in reversed(range(positions)):  # no match (a NaN window) leaves `positions`: no grad
        first = jnp.where(views[k] == y, jnp.asarray(k, first.dtype), first)
    return y, first


def _max_pool_bwd(window, stride, pads, residuals, g):
    first, (n, h, w, c) = residuals
    (top, bottom), (left, right) = pads
    hp, wp = h + top + bottom, w + left + right
    ho, wo = first.shape[1:3]
    if stride == window:  # the windows tile the padded input: no overlap, no sums
        k = jnp.arange(window * window, dtype=first.dtype).reshape(window, window)
        picked = first[:, :, None, :, None] == k[None, None, :, None, :, None]
        dxp = jnp.where(picked, g[:, :, None, :, None], jnp.zeros((), g.dtype))
        dxp = jnp.pad(dxp.reshape(n, ho * window, wo * window, c),
                      ((0, 0), (0, hp - ho * window), (0, wp - wo * window), (0, 0)))
    else:
        acc = jnp.promote_types(g.dtype, jnp.float32)  # overlapping windows' sums round once
        zero = jnp.zeros((), acc)
        dxp = jnp.zeros((n, hp, wp, c), acc)
        for k in range(window * window):
            i, j = divmod(k, window)
            dxp = dxp + lax.pad(jnp.where(first == k, g.astype(acc), zero), zero, (
                (0, 0, 0),
                (i, hp - i - stride * (ho - 1) - 1, stride - 1),
                (j, wp - j - stride * (wo - 1) - 1, stride - 1),
                (0, 0, 0)))
    return (dxp[:, top:top + h, left:left + w].astype(g.dtype),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


class MaxPool(Pool):
    """Max pooling (padding counts as -inf, as in torch); `ceil_mode` as torch's.

    On CPU it is `max_pool` (the same values and gradients, computed elementwise); elsewhere
    lax's reduce-window and select-and-scatter.
    """

    @nn.compact
    def __call__(self, x):
        if jax.default_backend() != "cpu" or x.ndim != 4:
            return self._reduce(x, -jnp.inf, lax.max)[0]
        s = self.stride or self.window
        pads = tuple(pool_padding(n, self.window, s, self.padding, self.ceil_mode)
                     for n in x.shape[1:3])
        return max_pool(x, self.window, s, pads)


class MinPool(Pool):
    """Min pooling, the notes' third pooling: the smallest value of each window."""

    @nn.compact
    def __call__(self, x):
        return self._reduce(x, jnp.inf, lax.min)[0]


class AvgPool(Pool):
    """Average pooling; with `count_include_pad` (torch's default) padded zeros count."""

    count_include_pad: bool = True

    @nn.compact
    def __call__(self, x):
        total, pads = self._reduce(x, 0.0, lax.add)
        if self.count_include_pad and not self.ceil_mode:
            return total / (self.window * self.window)
        ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
        s = self.stride or self.window
        count = lax.reduce_window(ones, 0.0, lax.add,
                                  (1, self.window, self.window, 1), (1, s, s, 1), pads)
        return total / count


class AdaptiveAvgPool(nn.Module):
    """torch's AdaptiveAvgPool2d: bins [floor(i*H/o), ceil((i+1)*H/o)) for any input size."""

    output_size: int

    @nn.compact
    def __call__(self, x):
        h, w = x.shape[1:3]
        o = self.output_size
        if h % o == 0 and w % o == 0:  # the common case: a plain average pool
            return x.reshape(x.shape[0], o, h // o, o, w // o, x.shape[-1]).mean(axis=(2, 4))
        rows = [x[:, (i * h) // o: -(-((i + 1) * h) // o)].mean(axis=1, keepdims=True)
                for i in range(o)]
        x = jnp.concatenate(rows, axis=1)
        cols = [x[:, :, (j * w) // o: -(-((j + 1) * w) // o)].mean(axis=2, keepdims=True)
                for j in range(o)]
        return jnp.concatenate(cols, axis=2)


class GlobalAvgPool(nn.Module):
    """Mean over H and W: (N, H, W, C) -> (N, C)."""

    @nn.compact
    def __call__(self, x):
        return x.mean(axis=(1, 2))


class Flatten(nn.Module):
    """(N, ...) -> (N, -1) in NHWC order (converted torch weights are permuted to match)."""

    @nn.compact
    def __call__(self, x):
        return x.reshape(x.shape[0], -1)


def channel_sums(x):
    """Sums of an (..., C) array over all but its last axis, as a (1, M) x (M, C) matmul.

    XLA:CPU rewrites such a reduction into a reduce-window whose loop is several times slower
    than the matmul (`benchmarks/cpu_norm.py`); the matmul sums the same terms in
    another order."""
    x2 = x.reshape(-1, x.shape[-1])
    ones = jnp.ones((1, x2.shape[0]), x2.dtype)
    return lax.dot(ones, x2, precision=lax.Precision.HIGHEST)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, scale, bias, epsilon: float):
    """(y, mean, var) of training-mode BatchNorm over every axis but the last of float32 `x`:
    flax's `nn.BatchNorm` statistics (the fast variance E[x^2] - E[x]^2, clipped at 0) and
    normalisation, with every reduction, forward and backward, a `channel_sums` matmul."""
    return _batch_norm_fwd(x, scale, bias, epsilon)[0]


def _batch_norm_fwd(x, scale, bias, epsilon):
    count = x.size // x.shape[-1]
    mean = channel_sums(x) / count
    var = jnp.maximum(0.0, channel_sums(x * x) / count - mean * mean)
    inv = lax.rsqrt(var + epsilon)
    y = (x - mean) * (inv * scale) + bias
    return (y, mean, var), (x, mean, inv, scale)


def _batch_norm_bwd(epsilon, residuals, cotangents):
    x, mean, inv, scale = residuals
    dy, dmean, dvar = cotangents
    count = x.size // x.shape[-1]
    xhat = (x - mean) * inv
    dbias, dscale = channel_sums(dy), channel_sums(dy * xhat)
    dx = ((scale * inv / count) * (count * dy - dbias - xhat * dscale)
          + (dmean + 2 * dvar * (x - mean)) / count)
    return dx, dscale, dbias


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


class BatchNorm(nn.BatchNorm):
    """`nn.BatchNorm` (same fields, variables and results) whose training-mode statistics
    and their gradients are `batch_norm_train`'s matmuls on CPU.

    Only where the result is flax's own: CPU, training, statistics of this device's batch
    (no `axis_name`: the sharded jit path sees the global batch as one array; pmap keeps
    flax's named-axis means), features last, scale and bias, fast variance, float32
    reductions. Every other call is flax's.
    """

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        running = nn.merge_param("use_running_average", self.use_running_average,
                                 use_running_average)
        if (jax.default_backend() != "cpu" or running or mask is not None
                or self.is_initializing() or self.axis_name is not None
                or self.axis not in (-1, x.ndim - 1) or not (self.use_bias and self.use_scale)
                or not (self.use_fast_variance and self.force_float32_reductions)):
            return super().__call__(x, use_running_average, mask=mask)
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        scale = self.param("scale", self.scale_init, features, self.param_dtype)
        bias = self.param("bias", self.bias_init, features, self.param_dtype)
        dtype = self.dtype or jnp.result_type(x, scale, bias)
        up = lambda a: jnp.asarray(a, jnp.promote_types(a.dtype, jnp.float32))
        y, mean, var = batch_norm_train(up(x), up(scale), up(bias), self.epsilon)
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y.astype(dtype)


class LocalResponseNorm(nn.Module):
    """Cross-channel LRN with torch.nn.LocalResponseNorm's semantics (AlexNet: 5, 1e-4, 0.75, 2).

    b_c = a_c / (k + alpha / n * sum_{c' in window(c)} a_{c'}^2) ** beta, the window running from
    c - n // 2 to c + (n - 1) // 2, zero-padded at the edges.
    """

    size: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 2.0

    @nn.compact
    def __call__(self, x):
        sq = jnp.square(x.astype(jnp.float32))
        pad = [(0, 0)] * (x.ndim - 1) + [(self.size // 2, (self.size - 1) // 2)]
        window = (1,) * (x.ndim - 1) + (self.size,)
        summed = lax.reduce_window(sq, 0.0, lax.add, window, (1,) * x.ndim, pad)
        div = (self.k + self.alpha / self.size * summed) ** self.beta
        return (x / div).astype(x.dtype)
