"""Convolution arithmetic, the classic filters and the small layers the models share.

The arithmetic follows the notes: out = (N - F + 2P) / S + 1, and a conv layer has
(F * F * D + 1) * K parameters. Pooling, flatten and LRN are modules (not bare functions) so that
`zoo.summary` sees them as rows of the table, as Keras' `model.summary()` does.
"""

from __future__ import annotations

import functools
from typing import Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def conv_output_size(n: int, f: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """Output size of a convolution or pooling window along one axis.

    Raises ValueError when (N - F' + 2P) / S + 1 is not a whole number (F' = dilated filter),
    e.g. a 7x7 input with a 3x3 filter at stride 3, where the windows do not fit.
    """
    span = dilation * (f - 1) + 1
    room = n + 2 * padding - span
    if room < 0:
        raise ValueError(f"a {f}x{f} filter (dilation {dilation}) does not fit an input of {n} "
                         f"with padding {padding}")
    if room % stride:
        raise ValueError(f"(N - F + 2P) / S + 1 = ({n} - {span} + 2*{padding}) / {stride} + 1 = "
                         f"{room / stride + 1:g} is not an integer: the filter does not tile the "
                         f"input; change the padding or the stride")
    return room // stride + 1


def conv_param_count(f: int, in_channels: int, out_channels: int, bias: bool = True) -> int:
    """Parameters of an FxF conv with D inputs and K filters: (F*F*D + 1) * K (F*F*D*K unbiased)."""
    return (f * f * in_channels + int(bias)) * out_channels


def receptive_field(layers: Iterable[tuple[int, int] | tuple[int, int, int]]) -> int:
    """Receptive field (in input pixels) of a stack of (kernel, stride[, dilation]) layers.

    r_l = r_{l-1} + (k_l - 1) * d_l * j_{l-1}, where j (the jump) is the product of the strides
    so far: two stacked 3x3 convs see 5x5, three see 7x7.
    """
    rf, jump = 1, 1
    for layer in layers:
        k, s, d = (*layer, 1) if len(layer) == 2 else layer
        rf += (k - 1) * d * jump
        jump *= s
    return rf


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


_NHWC = ("NHWC", "HWIO", "NHWC")


def _matmul_geometry(lhs, rhs, window_strides, padding, dilations, dimension_numbers,
                     feature_group_count, kwargs):
    """(explicit pads, output (H, W)) of a convolution that should run as a patches matmul:
    on CPU, NHWC/HWIO, ungrouped, undilated, with at most 2x2 outputs; else None."""
    if (jax.default_backend() != "cpu" or lhs.ndim != 4 or feature_group_count != 1
            or kwargs.get("preferred_element_type") is not None
            or any(d != 1 for d in dilations)
            or dimension_numbers != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)):
        return None
    kernel = rhs.shape[:2]
    pads = (lax.padtype_to_pads(lhs.shape[1:3], kernel, window_strides, padding)
            if isinstance(padding, str) else padding)
    out = [(n + lo + hi - k) // s + 1
           for n, (lo, hi), k, s in zip(lhs.shape[1:3], pads, kernel, window_strides)]
    if out[0] * out[1] > 4 or min(out) < 1 or min(min(p) for p in pads) < 0:
        return None
    return pads, out


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, **kwargs):
    """`lax.conv_general_dilated`, except for NHWC convolutions with at most 2x2 outputs on CPU,
    which are computed as one matmul over the input's patches (same sum, same parameters).

    XLA:CPU's convolution falls off a cliff on such tiny maps: a 3x3, 512-channel conv on a 2x2
    map of 32 images takes 205 ms forward there against 5 ms as a matmul (see
    benchmarks/cpu_conv.py). They are what ResNet's and VGG's last stage see at 32-64 px inputs.
    """
    geometry = _matmul_geometry(lhs, rhs, window_strides, padding,
                                (lhs_dilation or ()) + (rhs_dilation or ()), dimension_numbers,
                                feature_group_count, kwargs)
    if geometry is None:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                        rhs_dilation, dimension_numbers, feature_group_count,
                                        **kwargs)
    (pads, (ho, wo)), (kh, kw), (sh, sw) = geometry, rhs.shape[:2], window_strides
    x = jnp.pad(lhs, ((0, 0), *pads, (0, 0)))
    patches = jnp.concatenate([  # (N, Ho, Wo, kh*kw*C), in the order of HWIO's reshape
        x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
        for i in range(kh) for j in range(kw)], axis=-1)
    return lax.dot_general(patches, rhs.reshape(-1, rhs.shape[-1]), (((3,), (0,)), ((), ())),
                           precision=kwargs.get("precision"))


# The convolution every model family builds with (nn.Conv with the CPU fast path above).
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


def _pool_padding(n: int, k: int, s: int, p: int, ceil_mode: bool) -> tuple[int, int]:
    """(low, high) padding that reproduces torch's pooling output size, ceil_mode included."""
    if not ceil_mode:
        return p, p
    out = -(-(n + 2 * p - k) // s) + 1
    if (out - 1) * s >= n + p:  # torch: the last window must start inside the input
        out -= 1
    return p, max((out - 1) * s + k - n - p, p)


class _Pool(nn.Module):
    window: int
    stride: int | None = None
    padding: int = 0
    ceil_mode: bool = False

    def _reduce(self, x, init: float, op):
        # `init` stays a Python scalar: lax then recognises the max/min/add monoid and the
        # pooling is differentiable (a traced init value would not be)
        s = self.stride or self.window
        pads = [(0, 0)] + [_pool_padding(n, self.window, s, self.padding, self.ceil_mode)
                           for n in x.shape[1:3]] + [(0, 0)]
        dims = (1, self.window, self.window, 1)
        return lax.reduce_window(x, init, op, dims, (1, s, s, 1), pads), pads


class MaxPool(_Pool):
    """Max pooling (padding counts as -inf, as in torch); `ceil_mode` as torch's."""

    @nn.compact
    def __call__(self, x):
        return self._reduce(x, -jnp.inf, lax.max)[0]


class MinPool(_Pool):
    """Min pooling, the notes' third pooling: the smallest value of each window."""

    @nn.compact
    def __call__(self, x):
        return self._reduce(x, jnp.inf, lax.min)[0]


class AvgPool(_Pool):
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


# The notes' hand-made filters, 3x3 each (Gaussian blur is the 3x3 binomial kernel).
KERNELS: dict[str, np.ndarray] = {
    "identity": np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]], np.float32),
    "edge": np.array([[1, 0, -1], [0, 0, 0], [-1, 0, 1]], np.float32),
    "edge_laplace": np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32),
    "edge_all": np.array([[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]], np.float32),
    "sharpen": np.array([[0, -1, 0], [-1, 5, -1], [0, -1, 0]], np.float32),
    "box_blur": np.full((3, 3), 1 / 9, np.float32),
    "gaussian_blur": np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 16,
    "sobel_x": np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32),
    "sobel_y": np.array([[-1, -2, -1], [0, 0, 0], [1, 2, 1]], np.float32),
}


def apply_filter(image, kernel: str | Sequence[Sequence[float]], stride: int = 1,
                 padding: int = 0):
    """Slides one 2-D kernel over a 2-D image (cross-correlation, as CNNs compute it).

    Args:
      image: (H, W) array.
      kernel: a name from KERNELS or a (F, F) array.
      stride, padding: as in the notes; the output is (N - F + 2P) / S + 1 on each side.
    Returns:
      (H', W') float32 array.
    """
    k = jnp.asarray(KERNELS[kernel] if isinstance(kernel, str) else kernel, jnp.float32)
    img = jnp.asarray(image, jnp.float32)
    if img.ndim != 2 or k.ndim != 2:
        raise ValueError(f"apply_filter takes a 2-D image and a 2-D kernel; got {img.shape} "
                         f"and {k.shape}")
    for n, f in zip(img.shape, k.shape):
        conv_output_size(n, f, stride, padding)  # raises if the filter does not tile
    out = lax.conv_general_dilated(img[None, None], k[None, None], (stride, stride),
                                   [(padding, padding)] * 2)
    return out[0, 0]
