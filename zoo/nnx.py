"""Flax NNX: every registered zoo model as an `nnx.Module`.

Built on `flax.nnx.bridge.ToNNX` around the linen model, so there is one definition of each
architecture, the variables are the linen ones (shipped checkpoints and converted torchvision
weights load unchanged), and the outputs are the linen model's bit for bit. The NNX side adds
what NNX code expects: state held by the module, `model.train()` / `model.eval()` to switch
BatchNorm and dropout, and `nnx.Optimizer` / `nnx.jit` / `nnx.grad` working on it directly.

    model = zoo.nnx.load_pretrained("resnet20_fashion_mnist")   # or zoo.nnx.create_model(name)
    model.eval(); logits = model(x)
    model.train(); optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.bridge import variables as bridge_variables

from zoo.registry import create_model as create_linen_model
from zoo.registry import describe_differences, model_info, variable_differences


class Model(nnx.Module):
    """A zoo (linen) model as an NNX module.

    Starts in evaluation mode, as NNX modules do; `train()` switches to batch statistics (which
    then update the running ones in place) and active dropout, `eval()` back. A call's `train=`
    overrides the mode for that call.
    """

    def __init__(self, linen_model, input_shape: tuple[int, int, int], *, rngs: nnx.Rngs):
        self.input_shape = tuple(input_shape)
        self.linen = nnx.bridge.ToNNX(linen_model, rngs=rngs).lazy_init(
            jnp.zeros((1, *self.input_shape), jnp.float32), train=False)
        self.use_running_average = True  # what `train()` / `eval()` set, as on nnx.BatchNorm

    def __call__(self, x, *, train: bool | None = None):
        if (not self.use_running_average) if train is None else train:
            return self.linen(x, train=True, mutable=["batch_stats"])
        return self.linen(x, train=False)

    def variables(self) -> dict:
        """The linen variables {'params', 'batch_stats'} (for `checkpoints.save_model`, or the
        linen model's `apply`)."""
        attrs = {k: v for k, v in vars(self.linen).items()
                 if not k.startswith(("to_nnx__", "_pytree__"))}
        return bridge_variables.nnx_attrs_to_linen_vars(attrs)

    def load(self, variables: dict, *, skip: tuple[str, ...] = ()) -> None:
        """Replaces the state with linen `variables` of this architecture, strictly: any
        missing, unexpected or mis-shaped leaf is a ValueError listing them. Top-level modules
        named in `skip` (a classifier to re-train, e.g. ('fc',)) keep their current values."""
        kept = lambda tree: {c: {m: t for m, t in dict(sub).items() if m not in skip}
                             for c, sub in dict(tree).items()}
        new = kept(variables)
        differences = variable_differences(kept(self.variables()), new)
        if any(differences):
            raise ValueError("the variables do not fit this model ("
                             + describe_differences(*differences, limit=5) + ")")
        nnx.update(self.linen, nnx.State(bridge_variables.linen_vars_to_nnx_attrs(
            jax.tree.map(jnp.asarray, new))))


def create_model(name: str, num_classes: int | None = None, *, seed: int = 0,
                 input_shape: tuple[int, int, int] | None = None, **kwargs: Any) -> Model:
    """`zoo.create_model(name, num_classes, **kwargs)` as an NNX module, initialised from
    `seed` for inputs of `input_shape` (default: the model's; another channel count builds
    the model for it, as `in_channels`)."""
    shape = tuple(input_shape or model_info(name).input_size)
    if shape[2] != model_info(name).input_size[2]:
        kwargs.setdefault("in_channels", shape[2])
    linen_model = create_linen_model(name, num_classes, **kwargs)
    return Model(linen_model, shape, rngs=nnx.Rngs(params=seed, dropout=seed + 1))


def from_linen(linen_model, variables: dict, input_shape: tuple[int, int, int], *,
               seed: int = 0) -> Model:
    """An NNX module holding a linen zoo model and its `variables` (strictly checked)."""
    model = Model(linen_model, input_shape, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
    model.load(variables)
    return model


def load_pretrained(name_or_path: str, *, seed: int = 0) -> Model:
    """`zoo.load_pretrained` (a shipped checkpoint name, an exported or converted model, a
    train.py workdir) as an NNX module."""
    from zoo import pretrained_path
    from zoo.checkpoints import load_model

    linen_model, variables, info, card = load_model(pretrained_path(name_or_path))
    return from_linen(linen_model, variables, tuple(card.get("image_size") or info.input_size),
                      seed=seed)
