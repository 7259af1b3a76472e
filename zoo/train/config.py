"""A run's configuration: checked against model, data and devices, and the workdir's
config.json, of which `TrainConfig` is the only reader and writer."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from zoo import parallel
from zoo.registry import abstract_variables, create_model, model_info
from zoo.train.recipes import FREEZE, OPTIMIZERS, SCHEDULES, Recipe


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A run: model, data, recipe and the loop's settings; saved as the workdir's config.json.

    `image_size` (H, W, C), `in_channels` and `num_classes` are filled in by `resolve`, and
    with `init_from` (zoo.train.transfer: used by a fresh workdir only; a resumed run continues
    from its own checkpoint) `model_kwargs`, the model options its weights were built with.
    """

    model: str
    dataset: str
    workdir: str
    recipe: Recipe = Recipe()
    recipe_name: str | None = None
    steps: int | None = None  # total steps; overrides recipe.epochs
    seed: int = 0
    dtype: str = "float32"
    parallel: str = "jit"  # jit | pmap
    image_size: tuple[int, int, int] | None = None
    in_channels: int | None = None
    num_classes: int | None = None
    data_dir: str | None = None
    eval_every: int | None = None  # steps; default once an epoch
    checkpoint_every: int | None = None  # steps; epoch ends are always saved
    log_every: int = 50
    max_to_keep: int = 3
    allow_fallback: bool = False
    progress: bool = True
    export: str | None = None  # also write the final model (save_model + model card) here
    skip_bad_images: bool = False  # an image folder's unreadable files are left out
    val_fraction: float | None = None  # held out of an image folder without val/
    init_from: str | None = None  # the weights a fresh run starts from
    model_kwargs: dict = dataclasses.field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        if self.image_size:
            return tuple(self.image_size)
        size = model_info(self.model).input_size
        return (*size[:2], self.in_channels or size[2])

    def create_kwargs(self) -> dict:
        kw = {"num_classes": self.num_classes, **self.model_kwargs}
        if self.in_channels:
            kw["in_channels"] = self.in_channels
        return kw

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "create_kwargs": self.create_kwargs()}

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def from_json(cls, raw: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        raw = {k: v for k, v in raw.items() if k in names}
        recipe_names = {f.name for f in dataclasses.fields(Recipe)}
        raw["recipe"] = Recipe(**{k: v for k, v in raw.get("recipe", {}).items()
                                  if k in recipe_names})
        if raw.get("image_size"):
            raw["image_size"] = tuple(raw["image_size"])
        return cls(**raw)

    @classmethod
    def load(cls, path) -> "TrainConfig":
        return cls.from_json(json.loads(Path(path).read_text()))


def resolve(config: TrainConfig) -> TrainConfig:
    """Checks a config against the model, the dataset and the devices, and fills in the input
    shape and class count. Touches no files.

    Without `image_size` the model's input size is used with the dataset's channel count;
    the data pipeline zero-pads where `zoo.data.padding_to` allows it (28x28 into 32x32
    models), any other size difference needs an explicit `image_size` (a resize).

    With `init_from`, the source is identified (its metadata read, not its weights), it must
    hold weights of this model, and its input channels are the default.

    Raises:
      ValueError: unknown model/dataset/optimizer/schedule/parallel mode, a batch size the
        devices cannot split, an input the model cannot take, a class count the data
        contradicts, an --init-from that is no source of this model's weights.
    """
    from zoo import data
    from zoo.train import transfer

    info = model_info(config.model)  # ValueError with suggestions for unknown names
    spec = data.dataset_info(config.dataset, config.data_dir, config.skip_bad_images,
                             config.val_fraction)
    r = config.recipe
    if r.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {r.optimizer!r}; use {', '.join(OPTIMIZERS)}")
    if r.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {r.schedule!r}; use {', '.join(SCHEDULES)}")
    if config.parallel not in ("jit", "pmap"):
        raise ValueError(f"unknown parallel mode {config.parallel!r}; use jit or pmap")
    if config.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be float32 or bfloat16, not {config.dtype!r}")
    for name, value in (("--lr", r.lr), ("--epochs", r.epochs), ("--steps", config.steps),
                        ("--eval-every", config.eval_every), ("--log-every", config.log_every),
                        ("--checkpoint-every", config.checkpoint_every),
                        ("--max-to-keep", config.max_to_keep)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be positive, not {value}")
    for name, value in (("--weight-decay", r.weight_decay), ("--warmup-epochs", r.warmup_epochs)):
        if value < 0:
            raise ValueError(f"{name} must not be negative, not {value}")
    if not 0 <= r.label_smoothing < 1:
        raise ValueError(f"--label-smoothing must be in [0, 1), not {r.label_smoothing}")
    if config.skip_bad_images and spec.kind != "folder":
        raise ValueError("--skip-bad-images applies to image_folder: datasets only")
    if config.val_fraction is not None and spec.kind != "folder":
        raise ValueError("--val-fraction applies to image_folder: datasets only")
    if r.freeze not in FREEZE:
        raise ValueError(f"--freeze must be one of {', '.join(FREEZE)}, not {r.freeze!r}")
    if not r.backbone_lr_scale > 0:
        raise ValueError(f"--backbone-lr-scale must be positive, not {r.backbone_lr_scale}")
    if spec.num_classes < 2:
        raise ValueError(f"{config.dataset} has {spec.num_classes} class; a classifier needs "
                         "two or more (one sub-folder of images per class)")
    if config.num_classes is not None and config.num_classes < spec.num_classes:
        raise ValueError(f"--num-classes {config.num_classes} contradicts {config.dataset}, "
                         f"which has {spec.num_classes} classes")
    if config.init_from:
        options = transfer.source_options(transfer.inspect(config.init_from), config.model)
        config = dataclasses.replace(
            config, in_channels=config.in_channels or options.pop("in_channels", None),
            model_kwargs={k: v for k, v in options.items() if k != "in_channels"})
    parallel.check_batch_size(r.batch_size)
    if config.parallel == "pmap":
        parallel.check_batch_size(r.batch_size // jax.process_count(), jax.local_device_count())

    if config.image_size:
        h, w, c = config.image_size
        if config.in_channels and config.in_channels != c:
            raise ValueError(f"--in-channels {config.in_channels} contradicts --image-size "
                             f"{h}x{w}x{c}")
    else:
        h, w, c = info.input_size
        if spec.image_shape is not None:
            h0, w0, c0 = spec.image_shape
            c = config.in_channels or c0
            if (h0, w0) != (h, w) and data.padding_to((h0, w0), (h, w)) is None:
                raise ValueError(
                    f"{config.model} takes {h}x{w} images but {config.dataset}'s are {h0}x{w0}; "
                    f"pass --image-size {h}x{w}x{c} to resize them (or --image-size "
                    f"{h0}x{w0}x{c} to train the model at the dataset's size)")
        else:
            c = config.in_channels or c
    if c not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, not {c}")
    resolved = dataclasses.replace(config, image_size=(h, w, c), in_channels=c,
                                   num_classes=config.num_classes or spec.num_classes)
    model = create_model(resolved.model, dtype=jnp.dtype(resolved.dtype),
                         **resolved.create_kwargs())
    try:  # the model's own input check (channels, smallest size), computing nothing
        abstract = abstract_variables(model, (h, w, c))
    except ValueError as e:
        raise ValueError(f"{config.dataset} images as {h}x{w}x{c} do not fit {config.model}: "
                         f"{e}") from None
    if r.freeze == "bn" and not abstract.get("batch_stats"):
        raise ValueError(f"--freeze bn: {config.model} has no BatchNorm layers")
    return resolved


_SAME_RUN = ("model", "dataset", "image_size", "num_classes", "in_channels")


def _groups(recipe: Recipe) -> tuple:
    """What shapes the optimizer state besides the optimizer: the parameter groups of
    `param_labels`."""
    return recipe.freeze, recipe.freeze != "backbone" and recipe.backbone_lr_scale != 1


def check_resume(config: TrainConfig, workdir: Path) -> TrainConfig | None:
    """The config of the run already in `workdir` (None if none); raises ValueError where
    this config cannot continue it (another model, input or optimizer state)."""
    path = workdir / "config.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        if (raw["model"], raw["dataset"]) != (config.model, config.dataset):
            raise ValueError(f"{workdir} holds a {raw['model']}/{raw['dataset']} run; use "
                             "another --workdir")
        old = TrainConfig.from_json({"workdir": str(workdir), **raw})
    except (TypeError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a train.py config ({type(e).__name__}: {e}); use "
                         "another --workdir") from None
    for name in _SAME_RUN[2:]:
        a, b = getattr(old, name), getattr(config, name)
        if a is not None and tuple(np.atleast_1d(a)) != tuple(np.atleast_1d(b)):
            raise ValueError(f"{workdir} holds a run with {name} {a}, not {b}; use another "
                             "--workdir")
    if old.model_kwargs != config.model_kwargs:
        raise ValueError(f"{workdir} holds a run of {config.model} built with options "
                         f"{old.model_kwargs}, not {config.model_kwargs}; use another --workdir")
    if _groups(old.recipe) != _groups(config.recipe):
        raise ValueError(f"{workdir} holds a run trained with --freeze {old.recipe.freeze} and "
                         f"--backbone-lr-scale {old.recipe.backbone_lr_scale}; its optimizer "
                         f"state does not fit --freeze {config.recipe.freeze} and "
                         f"--backbone-lr-scale {config.recipe.backbone_lr_scale}; use another "
                         "--workdir")
    if (old.recipe.optimizer, bool(old.recipe.weight_decay)) != \
            (config.recipe.optimizer, bool(config.recipe.weight_decay)):
        raise ValueError(f"{workdir} holds a run trained with {old.recipe.optimizer} (weight "
                         f"decay {old.recipe.weight_decay}); its optimizer state does not fit "
                         f"{config.recipe.optimizer} (weight decay "
                         f"{config.recipe.weight_decay}); use another --workdir")
    return old
