"""Optimisation recipes as data, and the optax optimizer and schedule each one builds."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util


@dataclasses.dataclass(frozen=True)
class Recipe:
    """An optimisation recipe.

    `lr` is the learning rate at `batch_size`; with `scale_lr` it is the rate per 256 images
    and the run uses lr x global_batch / 256 (Goyal et al. 2017's linear scaling rule).
    `schedule`: constant | step (/10 at 50% and 75% of training) | cosine | warmup_cosine
    (linear warm-up over `warmup_epochs`, then cosine to 0). `weight_decay` applies to conv and
    dense kernels only, never to BatchNorm parameters or biases. `augment` None means the
    dataset's standard training augmentation.

    Fine-tuning (see `param_labels`): `freeze` 'bn' keeps every BatchNorm as it is (running
    statistics used and kept, scale and bias not updated), 'backbone' trains the classifier
    head alone (a linear probe; BatchNorm frozen too); `backbone_lr_scale` multiplies the
    learning rate of the parameters outside the head.
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    batch_size: int = 128
    epochs: float = 5
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    momentum: float = 0.9
    scale_lr: bool = False
    augment: bool | None = None
    freeze: str = "none"
    backbone_lr_scale: float = 1.0


RECIPES: dict[str, Recipe] = {
    # The lecture notes' Keras MNIST run: Adam 1e-3, batch 64, 5 epochs, no augmentation.
    "simple_cnn_mnist": Recipe("adam", 1e-3, 64, 5, augment=False),
    # The default job (`make train`); its results are in the README.
    "simple_cnn_fashion_mnist": Recipe("adam", 1e-3, 64, 5, "cosine", augment=False),
    "lenet5_mnist": Recipe("adam", 1e-3, 64, 5, "cosine", augment=False),
    # checkpoints/lenet5_fashion_mnist was trained with this one.
    "lenet5_fashion_mnist": Recipe("adam", 2e-3, 128, 5, "cosine", augment=False),
    # He et al. 2016 §4.2: SGD 0.1, momentum 0.9, wd 1e-4, /10 at 50% and 75% (32k and 48k of
    # 64k iterations), batch 128, 4-px crop + flip: 91.25% (ResNet-20, CIFAR-10).
    "resnet20_cifar10": Recipe("momentum", 0.1, 128, 182, "step", weight_decay=1e-4,
                               augment=True),
    # `python train.py --model resnet20 --dataset fashion_mnist`: short warm-up + cosine,
    # 2-px crop augmentation.
    "resnet20_fashion_mnist": Recipe("nesterov", 0.1, 128, 12, "warmup_cosine", 0.5,
                                     weight_decay=5e-4, augment=True),
    # Goyal et al. 2017 / torchvision's recipe: nesterov 0.9, lr 0.1 per 256 images, 5 warm-up
    # epochs then cosine, wd 1e-4 (not on BN/bias), label smoothing 0.1, 90 epochs.
    "resnet50_imagenet": Recipe("nesterov", 0.1, 256, 90, "warmup_cosine", 5, 1e-4, 0.1,
                                scale_lr=True),
    # `train.py --init-from`'s default: the new head at Adam's usual rate, the pretrained
    # backbone at a tenth of it, cosine decay, the dataset's augmentation.
    "finetune": Recipe("adam", 3e-3, 32, 10, "cosine", backbone_lr_scale=0.1),
}

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "lamb")
SCHEDULES = ("constant", "step", "cosine", "warmup_cosine")
FREEZE = ("none", "bn", "backbone")


def default_recipe_name(model: str, dataset: str) -> str | None:
    """`MODEL_DATASET` where such a recipe exists."""
    return f"{model}_{dataset}" if f"{model}_{dataset}" in RECIPES else None


def peak_lr(recipe: Recipe, global_batch: int) -> float:
    return recipe.lr * global_batch / 256 if recipe.scale_lr else recipe.lr


def make_schedule(recipe: Recipe, steps_per_epoch: int, total_steps: int,
                  global_batch: int) -> optax.Schedule:
    """The recipe's learning-rate schedule over `total_steps`, linear scaling rule applied."""
    lr = peak_lr(recipe, global_batch)
    total = max(int(total_steps), 1)
    if recipe.schedule == "constant":
        return optax.constant_schedule(lr)
    if recipe.schedule == "step":
        b1, b2 = int(total * 0.5), int(total * 0.75)
        return lambda step: lr * jnp.where(step >= b2, 0.01, jnp.where(step >= b1, 0.1, 1.0))
    warmup = min(int(round(recipe.warmup_epochs * steps_per_epoch)), total - 1)
    if recipe.schedule == "cosine" or (recipe.schedule == "warmup_cosine" and warmup == 0):
        return optax.cosine_decay_schedule(lr, total)
    if recipe.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total)
    raise ValueError(f"unknown schedule {recipe.schedule!r}; use {', '.join(SCHEDULES)}")


def decay_mask(params) -> Any:
    """True for conv/dense kernels (ndim > 1); BatchNorm scales/biases and biases are 1-D."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def param_labels(variables: dict, head: tuple[str, ...], recipe: Recipe) -> Any | None:
    """The optimizer of each parameter: 'train' (the recipe's), 'backbone' (its rate times
    `backbone_lr_scale`, for every parameter outside the `head` module paths) or 'frozen' (no
    update and no optimizer state: the whole backbone with freeze 'backbone', the BatchNorm
    scales and biases with 'bn'). None where every parameter trains alike.

    `variables` are the model's (arrays or shapes); a BatchNorm is a module with batch_stats.
    """
    if recipe.freeze == "none" and recipe.backbone_lr_scale == 1:
        return None
    if not head:
        raise ValueError("the model declares no classifier head (ModelInfo.head) to tell the "
                         "backbone by")
    flat = traverse_util.flatten_dict(dict(variables["params"]))
    norms = {path[:-1] for path in traverse_util.flatten_dict(
        dict(variables.get("batch_stats") or {}))}
    heads = [tuple(h.split("/")) for h in head]
    rest = "train" if recipe.backbone_lr_scale == 1 else "backbone"

    def label(path):
        if any(path[:len(h)] == h for h in heads):
            return "train"
        if recipe.freeze == "backbone" or (recipe.freeze == "bn" and path[:-1] in norms):
            return "frozen"
        return rest

    return traverse_util.unflatten_dict({p: label(p) for p in flat})


def make_optimizer(recipe: Recipe, schedule: optax.Schedule, labels: Any | None = None
                   ) -> optax.GradientTransformation:
    """The recipe's optax optimizer; weight decay on kernels only (not BN or biases).

    sgd/momentum/nesterov/adam/rmsprop add `weight_decay * param` to the gradient (L2, as torch's
    `weight_decay`); adamw/lamb decouple it (Loshchilov & Hutter). With `labels`
    (`param_labels`), each group gets its own (optax.multi_transform): the frozen one
    `set_to_zero`, which keeps no state.
    """
    if labels is None:
        return _optimizer(recipe, schedule)
    scaled = lambda step: recipe.backbone_lr_scale * schedule(step)
    build = {"train": lambda: _optimizer(recipe, schedule),
             "backbone": lambda: _optimizer(recipe, scaled), "frozen": optax.set_to_zero}
    return optax.multi_transform({k: build[k]() for k in sorted(set(jax.tree.leaves(labels)))},
                                 labels)


def _optimizer(recipe: Recipe, schedule: optax.Schedule) -> optax.GradientTransformation:
    wd = recipe.weight_decay
    if recipe.optimizer == "adamw":
        return optax.adamw(schedule, weight_decay=wd, mask=decay_mask)
    if recipe.optimizer == "lamb":
        return optax.lamb(schedule, weight_decay=wd, mask=decay_mask)
    base = {
        "sgd": lambda: optax.sgd(schedule),
        "momentum": lambda: optax.sgd(schedule, momentum=recipe.momentum),
        "nesterov": lambda: optax.sgd(schedule, momentum=recipe.momentum, nesterov=True),
        "adam": lambda: optax.adam(schedule),
        "rmsprop": lambda: optax.rmsprop(schedule, decay=0.9, eps=1e-3),
    }
    if recipe.optimizer not in base:
        raise ValueError(f"unknown optimizer {recipe.optimizer!r}; use {', '.join(OPTIMIZERS)}")
    if not wd:
        return base[recipe.optimizer]()
    return optax.chain(optax.add_decayed_weights(wd, mask=decay_mask), base[recipe.optimizer]())
