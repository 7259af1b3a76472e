"""The lecture notes' arithmetic: output sizes, parameter counts, receptive fields, steps per
epoch, and the hand-made filters with the convolution that applies them.

Output size along one axis: (N - F + 2P) / S + 1, F being the filter's extent (d * (F - 1) + 1
when dilated). Where N - F + 2P is not a multiple of S the windows do not tile the padded
input: the notes call such a layer impossible (4x4 input, 3x3 filter, stride 2, pad 1: "2.5
(불가능)"), while torch, Keras and XLA floor and never read the last rows or columns.
`conv_output_size(..., rounding="exact")` raises there, `rounding="floor"` returns what the
frameworks compute; `zoo.layers` and `zoo.summary` take their sizes from it.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import jax.numpy as jnp
import numpy as np
from jax import lax

ROUNDINGS = ("exact", "floor")


def _pair(padding) -> tuple[int, int]:
    """(low, high) of one axis' padding given as P (both sides) or a (low, high) pair."""
    if isinstance(padding, (int, np.integer)):
        lo = hi = int(padding)
    else:
        try:
            lo, hi = (int(p) for p in padding)
        except (TypeError, ValueError):
            raise ValueError(f"padding must be an int P or a (low, high) pair, not {padding!r}"
                             ) from None
    if lo < 0 or hi < 0:
        raise ValueError(f"padding must not be negative, got {padding!r}")
    return lo, hi


def _check_positive(values: dict) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, not {value!r}")


def _room(n: int, f: int, stride: int, padding, dilation: int) -> tuple[int, int, int, int]:
    """(N + lo + hi - F', F', lo, hi) after validating the arguments; F' is the dilated extent."""
    _check_positive({"the input size": n, "the filter size": f, "the stride": stride,
                     "the dilation": dilation})
    lo, hi = _pair(padding)
    span = dilation * (f - 1) + 1
    room = n + lo + hi - span
    if room < 0:
        extent = f"{f}" if dilation == 1 else f"{f} at dilation {dilation} (extent {span})"
        raise ValueError(f"a filter of {extent} is larger than the padded input: "
                         f"{n} + {lo} + {hi} = {n + lo + hi} < {span}")
    return room, span, lo, hi


def _formula(n: int, span: int, stride: int, lo: int, hi: int) -> str:
    pad = f"2*{lo}" if lo == hi else f"{lo} + {hi}"
    return f"({n} - {span} + {pad}) / {stride} + 1"


def conv_output_size(n: int, f: int, stride: int = 1, padding: int | tuple[int, int] = 0,
                     dilation: int = 1, rounding: str = "exact") -> int:
    """Output size of a convolution or pooling window along one axis: (N - F + 2P) / S + 1.

    Args:
      n, f, stride, dilation: input size, filter size, stride and dilation of the axis.
      padding: P zeros on both sides, or a (low, high) pair.
      rounding: "exact" raises ValueError when the windows do not tile the padded input (the
        notes' 7x7 input, 3x3 filter, stride 3: 2.33); "floor" returns what torch, Keras and
        XLA compute there (2), leaving the last `leftover(...)` rows unread.
    Raises:
      ValueError: a non-tiling size under "exact", a filter larger than the padded input, a
        negative padding, a non-positive size/stride/dilation, or an unknown rounding.
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, not {rounding!r}")
    room, span, lo, hi = _room(n, f, stride, padding, dilation)
    if room % stride and rounding == "exact":
        raise ValueError(
            f"(N - F + 2P) / S + 1 = {_formula(n, span, stride, lo, hi)} = "
            f"{room / stride + 1:g} is not an integer: the filter does not tile the input; "
            f"change the padding or the stride (frameworks floor it to {room // stride + 1}: "
            f"rounding='floor')")
    return room // stride + 1


def leftover(n: int, f: int, stride: int = 1, padding: int | tuple[int, int] = 0,
             dilation: int = 1) -> int:
    """Rows (or columns) at the end of the padded input that no window reaches when the
    output size is floored: (N - F + 2P) mod S, 0 exactly when the windows tile."""
    room, *_ = _room(n, f, stride, padding, dilation)
    return room % stride


def conv_formula(n: int, f: int, stride: int = 1, padding: int | tuple[int, int] = 0,
                 dilation: int = 1) -> str:
    """The notes' formula with the numbers filled in, as `zoo.summary` prints it.

    '(28 - 3 + 2*1) / 1 + 1 = 28'; where the windows do not tile, the exact value and the
    floored size the frameworks use: '(7 - 2 + 2*0) / 2 + 1 = 3.5 -> 3'. A (low, high) padding
    prints as 'low + high'; a dilated filter as its extent d * (F - 1) + 1.
    """
    room, span, lo, hi = _room(n, f, stride, padding, dilation)
    out = room // stride + 1
    exact = f"{room / stride + 1:g} -> {out}" if room % stride else str(out)
    return f"{_formula(n, span, stride, lo, hi)} = {exact}"


def conv_param_count(f: int | tuple[int, int], in_channels: int, out_channels: int,
                     bias: bool = True, groups: int = 1) -> int:
    """Parameters of an FxF conv with D inputs and K filters: (F*F*D + 1) * K, F*F*D*K unbiased.

    `f` may be an (FH, FW) pair; with `groups` each filter sees D / groups input channels.
    """
    fh, fw = (f, f) if isinstance(f, (int, np.integer)) else f
    _check_positive({"the filter height": fh, "the filter width": fw, "in_channels": in_channels,
                     "out_channels": out_channels, "groups": groups})
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"groups={groups} must divide in_channels={in_channels} and "
                         f"out_channels={out_channels}")
    return (fh * fw * (in_channels // groups) + int(bias)) * out_channels


def dense_param_count(widths: Sequence[int], bias: bool = True) -> int:
    """Parameters of fully connected layers of the given widths, input first.

    [16, 4, 2] without biases: 16 * 4 + 4 * 2 = 72; each layer adds one bias per output.
    """
    widths = list(widths)
    if len(widths) < 2:
        raise ValueError(f"dense_param_count needs the input width and at least one layer's, "
                         f"got {widths}")
    _check_positive({f"width {i}": w for i, w in enumerate(widths)})
    return sum(a * b + b * int(bias) for a, b in zip(widths, widths[1:]))


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


def steps_per_epoch(num_examples: int, batch_size: int, drop_remainder: bool = True) -> int:
    """Batches in one pass over `num_examples`: 60,000 / 64 gives 937 full batches, 938 when
    the last, partial batch counts (what Keras' progress bar shows). 0 full batches when
    there are fewer examples than one batch."""
    _check_positive({"num_examples": num_examples, "batch_size": batch_size})
    full, rest = divmod(num_examples, batch_size)
    return full if drop_remainder or not rest else full + 1


def _k(rows, scale: float = 1.0) -> np.ndarray:
    return np.asarray(rows, np.float32) * np.float32(scale)


# The notes' hand-made filters. Lecture slides 000, "Intuition of Filter": Sobel (edge finding by
# central differences) and the filter table; slides 004, "Filter?" (cs231n's bike pictures):
# the blurs and the quarter-scaled sharpen.
KERNELS: dict[str, np.ndarray] = {
    # 000, Sobel G_x. (Its drawn "x filter" table is the same matrix.)
    "sobel_x": _k([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]),
    # 000, Sobel G_y as the formula prints it; the drawn "y filter" table is its negation
    # (+1 +2 +1 on top), which finds the same edges with the opposite sign.
    "sobel_y": _k([[-1, -2, -1], [0, 0, 0], [1, 2, 1]]),
    # 000, the filter table: Identity, the three Edge detection rows, Sharpen.
    "identity": _k([[0, 0, 0], [0, 1, 0], [0, 0, 0]]),
    "edge": _k([[1, 0, -1], [0, 0, 0], [-1, 0, 1]]),
    "edge_laplace": _k([[0, 1, 0], [1, -4, 1], [0, 1, 0]]),
    "edge_all": _k([[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]]),
    "sharpen": _k([[0, -1, 0], [-1, 5, -1], [0, -1, 0]]),
    # 004, "Bike sharpened": 1/4 (0 -1 0; -1 [8] -1; 0 -1 0); its entries sum to 1.
    "sharpen_quarter": _k([[0, -1, 0], [-1, 8, -1], [0, -1, 0]], 1 / 4),
    # 004, "Bike blurred horizontally": 1/5 (1 1 [1] 1 1), one row of five.
    "blur_horizontal": _k([[1, 1, 1, 1, 1]], 1 / 5),
    # 004, "Bike blurred vertically": 1/5 (1 1 [1] 1 1) as a column.
    "blur_vertical": _k([[1], [1], [1], [1], [1]], 1 / 5),
    # 004, "Bike blurred by convolution", the "box filter": 1/25 of a 5x5 block of ones.
    "box_blur_5x5": _k(np.ones((5, 5)), 1 / 25),
    # Not from the notes: the common 3x3 box blur (1/9) and 3x3 binomial Gaussian blur (1/16),
    # kept for code that uses them.
    "box_blur": _k(np.ones((3, 3)), 1 / 9),
    "gaussian_blur": _k([[1, 2, 1], [2, 4, 2], [1, 2, 1]], 1 / 16),
}


def _axis_pads(padding, kernel_shape) -> list[tuple[int, int]]:
    """[(top, bottom), (left, right)] from P, (PH, PW), ((top, bottom), (left, right)), 'same'
    (output size = input size at stride 1, the extra zero after for even kernels) or 'valid'."""
    if isinstance(padding, str):
        if padding.lower() == "valid":
            return [(0, 0), (0, 0)]
        if padding.lower() == "same":
            return [((f - 1) // 2, f - 1 - (f - 1) // 2) for f in kernel_shape]
        raise ValueError(f"padding must be 'same', 'valid', P, (PH, PW) or ((top, bottom), "
                         f"(left, right)), not {padding!r}")
    if isinstance(padding, (int, np.integer)):
        return [_pair(padding)] * 2
    padding = tuple(padding)
    if len(padding) != 2:
        raise ValueError(f"padding must be P, (PH, PW) or ((top, bottom), (left, right)), not "
                         f"{padding!r}")
    try:
        return [_pair(p) for p in padding]
    except ValueError as e:
        raise ValueError(f"{e} (in padding={padding!r})") from None


def apply_filter(image, kernel: str | Sequence[Sequence[float]], stride: int | tuple[int, int] = 1,
                 padding=0, bias: float = 0.0):
    """Slides one 2-D kernel over a 2-D image and adds a bias (cross-correlation, as CNNs
    compute it): out = sum(window * kernel) + bias.

    Args:
      image: (H, W) array.
      kernel: a name from KERNELS or an (FH, FW) array.
      stride: S, or (SH, SW).
      padding: zeros around the image: P on every side, (PH, PW) per axis, ((top, bottom),
        (left, right)), 'same' (keeps the size at stride 1, for any kernel shape) or 'valid'
        (none, as 0).
      bias: added to every output, e.g. -1 before the ReLU of the notes' MNIST "2" example.
    Returns:
      (H', W') float32 array, H' = (H - FH + PH_top + PH_bottom) / SH + 1 and likewise W'.
    Raises:
      ValueError: an unknown kernel name, a kernel larger than the padded image, a negative
        padding, or a stride at which the kernel does not tile the padded image.
    """
    if isinstance(kernel, str):
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; KERNELS has {', '.join(KERNELS)}")
        kernel = KERNELS[kernel]
    k = jnp.asarray(kernel, jnp.float32)
    img = jnp.asarray(image, jnp.float32)
    if img.ndim != 2 or k.ndim != 2:
        raise ValueError(f"apply_filter takes a 2-D image and a 2-D kernel; got {img.shape} "
                         f"and {k.shape}")
    strides = (stride, stride) if isinstance(stride, (int, np.integer)) else tuple(stride)
    pads = _axis_pads(padding, k.shape)
    padded = [n + lo + hi for n, (lo, hi) in zip(img.shape, pads)]
    if any(f > p for f, p in zip(k.shape, padded)):
        raise ValueError(f"a {k.shape[0]}x{k.shape[1]} kernel is larger than the "
                         f"{img.shape[0]}x{img.shape[1]} image padded to "
                         f"{padded[0]}x{padded[1]}")
    for n, f, s, pad in zip(img.shape, k.shape, strides, pads):
        conv_output_size(n, f, s, pad)  # raises where the kernel does not tile
    out = lax.conv_general_dilated(img[None, None], k[None, None], strides, pads,
                                   precision=lax.Precision.HIGHEST)
    return out[0, 0] + jnp.float32(bias)


__all__ = ["KERNELS", "ROUNDINGS", "apply_filter", "conv_formula", "conv_output_size",
           "conv_param_count", "dense_param_count", "leftover", "receptive_field",
           "steps_per_epoch"]
