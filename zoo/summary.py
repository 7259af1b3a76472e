"""Per-layer model summary: output shape, parameters, FLOPs and receptive field, and on request
the notes' arithmetic of each layer with its numbers filled in.

The model is traced abstractly (`jax.eval_shape`, no weights are allocated), and every leaf
module call is recorded through `flax.linen.intercept_methods`. The receptive field follows the
notes' rule r += (k - 1) * dilation * jump, jump *= stride, carried along the actual data flow:
each array remembers the (rf, jump) of the layer that made it, so branches (Inception) and
shortcuts (ResNet) are followed correctly; a block's output takes its deepest path.

Sizes and parameter counts are written out with `zoo.arithmetic` (the same helper the layers
take their sizes from): '(28 - 3 + 2*1) / 1 + 1 = 28' and '(3*3*1 + 1) * 32 = 320'. A conv or
pool whose windows do not tile its padded input, where the notes would say "impossible" and the
frameworks silently floor and never read the last rows or columns, is marked '!' in every
summary.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.linear import canonicalize_padding
from jax import lax

from zoo import arithmetic, layers
from zoo.registry import create_model, model_info

_TILE_LEGEND = ["! the windows do not tile the padded input (N - F + 2P is not a multiple of S):",
                "  the notes call this impossible; frameworks floor the size and never read the",
                "  last rows/columns"]
_ARITHMETIC_LEGEND = [
    "size: (N - F + 2P) / S + 1 on each spatial axis (N input, F filter, P padding, S stride);",
    "  'H ...; W ...' where the axes differ, 'x -> n' where floored, 'low + high' for uneven",
    "  padding (a ceil_mode pool's extra zeros after the input)",
    "params: (F*F*D + 1) * K for a conv of K filters over D channels (per group when grouped),",
    "  (inputs + 1) * outputs for a dense layer; no '+ 1' without bias"]


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    flops: int
    receptive_field: int | None
    size_arithmetic: str | None = None  # '(28 - 3 + 2*1) / 1 + 1 = 28' for a conv or pool
    param_arithmetic: str | None = None  # '(3*3*1 + 1) * 32 = 320' for a conv or dense layer
    tiles: bool = True  # False where the windows leave the last rows/columns unread


@dataclasses.dataclass(frozen=True)
class Summary:
    """The table `zoo.summary` returns; `str()` prints it Keras-style, with the arithmetic
    columns when `arithmetic` is set."""

    model: str
    input_shape: tuple[int, ...]
    rows: list[Row]
    total_params: int
    non_trainable: int
    total_flops: int
    arithmetic: bool = False

    def __str__(self) -> str:
        mark = not all(r.tiles for r in self.rows)
        head = ["Layer (type)", "Output Shape", "Param #", "FLOPs", "RF"]
        head += ["!"] * mark + ["Size arithmetic", "Param arithmetic"] * self.arithmetic
        body = []
        for r in self.rows:
            line = [f"{r.name} ({r.kind})", str(r.output_shape), f"{r.params:,}", _si(r.flops),
                    "-" if r.receptive_field is None else str(r.receptive_field)]
            line += ["" if r.tiles else "!"] * mark
            line += [r.size_arithmetic or "", r.param_arithmetic or ""] * self.arithmetic
            body.append(line)
        widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
        fmt = lambda line: "  ".join(c.rjust(w) if 2 <= i <= 4 else c.ljust(w)
                                     for i, (c, w) in enumerate(zip(line, widths))).rstrip()
        rule = "=" * max(len(fmt(line)) for line in [head, *body])
        legend = _TILE_LEGEND * mark + _ARITHMETIC_LEGEND * self.arithmetic
        return "\n".join([f'Model: "{self.model}"  input {self.input_shape}', rule, fmt(head),
                          rule, *map(fmt, body), rule,
                          f"Total params: {self.total_params:,}",
                          f"Non-trainable state (BatchNorm statistics): {self.non_trainable:,}",
                          f"FLOPs per image (multiply-adds x 2): {_si(self.total_flops)}",
                          *legend])


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _window(mod: nn.Module, in_shape) -> tuple[int, int, int] | None:
    """(kernel, stride, dilation) of a spatial layer, or None for one that is not."""
    if isinstance(mod, nn.Conv):
        k = mod.kernel_size[0]
        s = mod.strides if isinstance(mod.strides, int) else (mod.strides or (1,))[0]
        d = mod.kernel_dilation if isinstance(mod.kernel_dilation, int) else (
            mod.kernel_dilation or (1,))[0]
        return k, s, d
    if isinstance(mod, layers.Pool):
        return mod.window, mod.stride or mod.window, 1
    if isinstance(mod, layers.AdaptiveAvgPool):
        step = max(in_shape[1] // mod.output_size, 1)
        return step, step, 1
    return None


def _axes(mod: nn.Module, in_shape) -> list[tuple[int, int, int, tuple[int, int], int]] | None:
    """(N, F, S, (low, high) padding, dilation) of each spatial axis of a conv or square pool
    over an NHWC input; None for any other layer or padding mode."""
    if len(in_shape) != 4:
        return None
    sizes = in_shape[1:3]
    if isinstance(mod, layers.Pool):
        s = mod.stride or mod.window
        return [(n, mod.window, s, layers.pool_padding(n, mod.window, s, mod.padding,
                                                       mod.ceil_mode), 1) for n in sizes]
    if not isinstance(mod, nn.Conv) or len(mod.kernel_size) != 2 or any(
            d != 1 for d in layers.pair(mod.input_dilation)):
        return None
    kernel, strides, dilation = tuple(mod.kernel_size), layers.pair(mod.strides), layers.pair(
        mod.kernel_dilation)
    padding = canonicalize_padding(mod.padding, 2)
    if isinstance(padding, str):
        if padding not in ("SAME", "VALID", "CIRCULAR"):  # CIRCULAR wraps around SAME's pads
            return None
        extent = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
        padding = lax.padtype_to_pads(sizes, extent, strides,
                                      "VALID" if padding == "VALID" else "SAME")
    return [(n, k, s, tuple(p), d)
            for n, k, s, p, d in zip(sizes, kernel, strides, padding, dilation)]


def _size_arithmetic(axes) -> tuple[str, bool]:
    """('(28 - 3 + 2*1) / 1 + 1 = 28', tiles): one formula when both axes read the same."""
    text = [arithmetic.conv_formula(*axis) for axis in axes]
    tiles = all(arithmetic.leftover(*axis) == 0 for axis in axes)
    return (text[0] if text[0] == text[1] else f"H {text[0]}; W {text[1]}"), tiles


def _param_arithmetic(mod: nn.Module, in_shape) -> str | None:
    """'(3*3*1 + 1) * 32 = 320' for a conv, '(576 + 1) * 64 = 36,928' for a dense layer."""
    if isinstance(mod, nn.Conv) and len(mod.kernel_size) == 2:
        (fh, fw), d, g = mod.kernel_size, in_shape[-1], mod.feature_group_count
        count = arithmetic.conv_param_count((fh, fw), d, mod.features, mod.use_bias, g)
        weights = f"{fh}*{fw}*{d // g}"
    elif isinstance(mod, nn.Dense):
        count = arithmetic.dense_param_count([in_shape[-1], mod.features], mod.use_bias)
        weights = f"{in_shape[-1]}"
    else:
        return None
    factor = f"({weights} + 1)" if mod.use_bias else weights
    return f"{factor} * {mod.features} = {count:,}"


def _flops(mod: nn.Module, in_shape, out_shape) -> int:
    """Multiply-adds x 2 per image for convolutions and dense layers (the rest is negligible)."""
    if isinstance(mod, nn.Conv):
        k = int(np.prod(mod.kernel_size)) * in_shape[-1] // mod.feature_group_count
        return 2 * int(np.prod(out_shape[1:])) * k
    if isinstance(mod, nn.Dense):
        return 2 * in_shape[-1] * out_shape[-1]
    return 0


def summary(model_or_name: nn.Module | str, input_shape: tuple[int, ...] | None = None, *,
            arithmetic: bool = False, **create_kwargs: Any) -> Summary:
    """Summarises a model layer by layer.

    Args:
      model_or_name: a registered name or a flax Module (a zoo model, any module taking
        `train`, or a single layer such as `nn.Conv(2, (3, 3), strides=2, padding=1)`).
      input_shape: (H, W, C) of one image; defaults to the model's `input_size` for a name.
      arithmetic: print the notes' size and parameter formulas of each layer with their numbers
        (the rows carry them either way).
      **create_kwargs: passed to `create_model` when a name is given (e.g. num_classes=10).
    """
    if isinstance(model_or_name, str):
        name = model_or_name
        model = create_model(name, **create_kwargs)
        input_shape = input_shape or model_info(name).input_size
    else:
        model, name = model_or_name, type(model_or_name).__name__
        if input_shape is None:
            raise ValueError("summary(module) needs input_shape=(H, W, C)")
    image_size = input_shape[0]
    rows: list[Row] = []
    paths: list[tuple[str, ...]] = []  # each row's module path in the params tree
    states: dict[int, tuple[Any, tuple[int, int]]] = {}  # id(array) -> (array, (rf, jump))
    stack: list[dict] = []
    last = [(1, 1)]

    def intercept(next_fun, args, kwargs, ctx):
        if ctx.method_name != "__call__" or not args or not hasattr(args[0], "shape"):
            return next_fun(*args, **kwargs)
        x = args[0]
        if not stack:
            states[id(x)] = (x, (1, 1))
        in_state = states[id(x)][1] if id(x) in states else last[0]
        if stack:
            stack[-1]["children"] += 1
        frame = {"children": 0, "best": None}
        stack.append(frame)
        out = next_fun(*args, **kwargs)
        stack.pop()
        if frame["children"]:
            out_state = frame["best"] or in_state
        else:
            rf, jump = in_state
            window = _window(ctx.module, x.shape)
            if window:
                k, s, d = window
                rf, jump = rf + (k - 1) * d * jump, jump * s
            elif x.ndim == 4 and getattr(out, "ndim", 4) < 4:  # global pooling / flatten
                rf = max(rf, image_size)
            out_state = (rf, jump)
            rows.append(_row(ctx.module, x.shape, out, rf if window or rf > 1 else None))
            paths.append(tuple(ctx.module.path))
        if hasattr(out, "shape"):
            states[id(out)] = (out, out_state)
        last[0] = out_state
        for f in stack:
            if f["best"] is None or out_state[0] >= f["best"][0]:
                f["best"] = out_state
        return out

    def _row(mod, in_shape, out, rf):
        try:
            size, tiles = _size_arithmetic(axes) if (axes := _axes(mod, in_shape)) else (None, True)
        except ValueError:  # a negative padding (lax allows it): outside the notes' formula
            size, tiles = None, True
        # a model that is one layer has no path: its row is named after its type
        return Row("/".join(mod.path) or type(mod).__name__.lower(), type(mod).__name__,
                   tuple(out.shape[1:]), 0, _flops(mod, in_shape, out.shape), rf, size,
                   _param_arithmetic(mod, in_shape), tiles)

    call = {"train": False} if "train" in inspect.signature(model.__call__).parameters else {}
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    with nn.intercept_methods(intercept):
        variables = jax.eval_shape(lambda a: model.init(jax.random.key(0), a, **call), x)
    # parameter counts come from the finished variable tree, by each row's module path
    params = variables.get("params", {})
    rows = [dataclasses.replace(r, params=_count(params, path)) for r, path in zip(rows, paths)]
    count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))
    return Summary(name, tuple(input_shape), rows, count(params),
                   count(variables.get("batch_stats", {})), sum(r.flops for r in rows),
                   arithmetic)


def _count(params, path: tuple[str, ...]) -> int:
    node = params
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return 0
        node = node[part]
    return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(node))
