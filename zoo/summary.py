"""Per-layer model summary: output shape, parameters, FLOPs and receptive field.

The model is traced abstractly (`jax.eval_shape`, no weights are allocated), and every leaf
module call is recorded through `flax.linen.intercept_methods`. The receptive field follows the
notes' rule r += (k - 1) * dilation * jump, jump *= stride, carried along the actual data flow:
each array remembers the (rf, jump) of the layer that made it, so branches (Inception) and
shortcuts (ResNet) are followed correctly; a block's output takes its deepest path.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zoo import layers
from zoo.registry import create_model, model_info


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    flops: int
    receptive_field: int | None


@dataclasses.dataclass(frozen=True)
class Summary:
    """The table `zoo.summary` returns; `str()` prints it Keras-style."""

    model: str
    input_shape: tuple[int, ...]
    rows: list[Row]
    total_params: int
    non_trainable: int
    total_flops: int

    def __str__(self) -> str:
        head = ("Layer (type)", "Output Shape", "Param #", "FLOPs", "RF")
        body = [(f"{r.name} ({r.kind})", str(r.output_shape), f"{r.params:,}",
                 _si(r.flops), "-" if r.receptive_field is None else str(r.receptive_field))
                for r in self.rows]
        widths = [max(len(line[i]) for line in [head, *body]) for i in range(5)]
        fmt = lambda line: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                     for i, (c, w) in enumerate(zip(line, widths)))
        rule = "=" * len(fmt(head))
        return "\n".join([f'Model: "{self.model}"  input {self.input_shape}', rule, fmt(head),
                          rule, *map(fmt, body), rule,
                          f"Total params: {self.total_params:,}",
                          f"Non-trainable state (BatchNorm statistics): {self.non_trainable:,}",
                          f"FLOPs per image (multiply-adds x 2): {_si(self.total_flops)}"])


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


def _flops(mod: nn.Module, in_shape, out_shape) -> int:
    """Multiply-adds x 2 per image for convolutions and dense layers (the rest is negligible)."""
    if isinstance(mod, nn.Conv):
        k = int(np.prod(mod.kernel_size)) * in_shape[-1] // mod.feature_group_count
        return 2 * int(np.prod(out_shape[1:])) * k
    if isinstance(mod, nn.Dense):
        return 2 * in_shape[-1] * out_shape[-1]
    return 0


def summary(model_or_name: nn.Module | str, input_shape: tuple[int, ...] | None = None,
            **create_kwargs: Any) -> Summary:
    """Summarises a model layer by layer.

    Args:
      model_or_name: a registered name or a flax Module.
      input_shape: (H, W, C) of one image; defaults to the model's `input_size` for a name.
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
            if stack:
                rows.append(_row(ctx.module, x.shape, out, rf if window or rf > 1 else None))
        if hasattr(out, "shape"):
            states[id(out)] = (out, out_state)
        last[0] = out_state
        for f in stack:
            if f["best"] is None or out_state[0] >= f["best"][0]:
                f["best"] = out_state
        return out

    def _row(mod, in_shape, out, rf):
        return Row("/".join(mod.path), type(mod).__name__, tuple(out.shape[1:]), 0,
                   _flops(mod, in_shape, out.shape), rf)

    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    with nn.intercept_methods(intercept):
        variables = jax.eval_shape(lambda a: model.init(jax.random.key(0), a, train=False), x)
    # parameter counts come from the finished variable tree, by each row's module path
    params = variables.get("params", {})
    rows = [dataclasses.replace(r, params=_count(params, tuple(r.name.split("/")))) for r in rows]
    count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))
    return Summary(name, tuple(input_shape), rows, count(params),
                   count(variables.get("batch_stats", {})), sum(r.flops for r in rows))


def _count(params, path: tuple[str, ...]) -> int:
    node = params
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return 0
        node = node[part]
    return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(node))
