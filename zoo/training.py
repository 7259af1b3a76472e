"""Training: one pure train step for every model and both parallel paths, optax recipes, the loop.

`train_step(state, batch, *, config, axis_name=None) -> (state, metrics)` is compiled either with
`jax.jit` over a device mesh (`parallel.jit_step`, the default) or with `pmap`
(`parallel.pmap_step`); `train` runs it and does not know which model it trains. Everything a
run depends on is a `TrainConfig`, saved as `config.json` in the workdir, so that a run can be
resumed and its checkpoints read back (`zoo.checkpoints.load_model`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from zoo import parallel
from zoo.registry import create_model, model_info


# ---------------------------------------------------------------- recipes

@dataclasses.dataclass(frozen=True)
class Recipe:
    """An optimisation recipe.

    `lr` is the learning rate at `batch_size`; with `scale_lr` it is the rate per 256 images
    and the run uses lr x global_batch / 256 (Goyal et al. 2017's linear scaling rule).
    `schedule`: constant | step (/10 at 50% and 75% of training) | cosine | warmup_cosine
    (linear warm-up over `warmup_epochs`, then cosine to 0). `weight_decay` applies to conv and
    dense kernels only, never to BatchNorm parameters or biases. `augment` None means the
    dataset's standard training augmentation.
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


RECIPES: dict[str, Recipe] = {
    # The notes' Keras run: Adam 1e-3, batch 64, 5 epochs, no augmentation.
    "simple_cnn_mnist": Recipe("adam", 1e-3, 64, 5, augment=False),
    # `python train.py --model simple_cnn --dataset fashion_mnist`: 91.28% test top-1 after 5
    # epochs (epochs 1-4: 87.05, 89.39, 90.79, 91.02; 4 epochs with cosine to 0: 90.77).
    "simple_cnn_fashion_mnist": Recipe("adam", 1e-3, 64, 5, "cosine", augment=False),
    "lenet5_mnist": Recipe("adam", 1e-3, 64, 5, "cosine", augment=False),
    # `python train.py --model lenet5 --dataset fashion_mnist`: 89.69% test top-1 after 5
    # epochs (batch 64, lr 1e-3, label smoothing 0.1: 89.46%).
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
}

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "lamb")
SCHEDULES = ("constant", "step", "cosine", "warmup_cosine")


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


def make_optimizer(recipe: Recipe, schedule: optax.Schedule) -> optax.GradientTransformation:
    """The recipe's optax optimizer; weight decay on kernels only (not BN or biases).

    sgd/momentum/nesterov/adam/rmsprop add `weight_decay * param` to the gradient (L2, as torch's
    `weight_decay`); adamw/lamb decouple it (Loshchilov & Hutter).
    """
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


# ---------------------------------------------------------------- state and steps

class TrainState(train_state.TrainState):
    """flax's TrainState (step, params, opt_state, apply_fn, tx) plus BatchNorm statistics and
    the run's PRNG key (dropout keys are derived from it and the step)."""

    batch_stats: Any = None
    rng: jax.Array = None


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The loss: label smoothing and the weight of auxiliary classifiers (GoogLeNet 0.3)."""

    label_smoothing: float = 0.0
    aux_loss_weight: float = 0.0


def create_train_state(model, tx, image_shape, seed: int = 0) -> TrainState:
    """Initialises float32 parameters for `image_shape` (H, W, C). Traceable (jit it with
    `out_shardings` to create the state directly where it lives)."""
    rng = jax.random.PRNGKey(seed)
    variables = model.init({"params": jax.random.fold_in(rng, 0),
                            "dropout": jax.random.fold_in(rng, 2)},
                           jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables.get("batch_stats", {}),
                             rng=jax.random.fold_in(rng, 1))


def _cross_entropy(logits, labels, smoothing: float = 0.0):
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if smoothing:
        targets = optax.smooth_labels(targets, smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _correct(logits, labels, k: int):
    k = min(k, logits.shape[-1])
    return (jax.lax.top_k(logits.astype(jnp.float32), k)[1] == labels[:, None]).any(axis=-1)


def _split_outputs(out):
    """logits and a tuple of auxiliary logits from `model.apply(..., train=True)`."""
    if isinstance(out, tuple):
        logits, aux = out
        return logits, tuple(aux) if isinstance(aux, (tuple, list)) else (aux,)
    return out, ()


def train_step(state: TrainState, batch: dict, *, config: StepConfig = StepConfig(),
               axis_name: str | None = None) -> tuple[TrainState, dict]:
    """One optimisation step: the global batch under jit, one device's slice under pmap.

    The loss is the mask-weighted mean cross-entropy over the global batch (plus weighted
    auxiliary losses); gradients and metric sums are `psum`-ed over `axis_name` under pmap, so
    both paths compute the same update. Returns metrics {'loss', 'top1', 'top5'} (fractions).
    """
    rng = jax.random.fold_in(state.rng, state.step)
    if axis_name:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    mask = batch["mask"].astype(jnp.float32)
    count = mask.sum() if not axis_name else jax.lax.psum(mask.sum(), axis_name)
    count = jnp.maximum(count, 1.0)
    labels = batch["label"]

    def loss_fn(params):
        variables = {"params": params}
        if state.batch_stats:
            variables["batch_stats"] = state.batch_stats
        out, updates = state.apply_fn(variables, batch["image"], train=True,
                                      mutable=["batch_stats"], rngs={"dropout": rng})
        logits, aux = _split_outputs(out)
        loss = (_cross_entropy(logits, labels, config.label_smoothing) * mask).sum()
        for a in aux:  # GoogLeNet/Inception auxiliary classifiers
            loss += config.aux_loss_weight * (
                _cross_entropy(a, labels, config.label_smoothing) * mask).sum()
        return loss / count, (logits, updates.get("batch_stats", {}))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    sums = {"top1": (_correct(logits, labels, 1) * mask).sum() / count,
            "top5": (_correct(logits, labels, 5) * mask).sum() / count}
    if axis_name:
        grads = jax.lax.psum(grads, axis_name)
        loss, sums = jax.lax.psum((loss, sums), axis_name)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, {"loss": loss, **sums}


def _eval_sums(apply_fn, variables: dict, batch: dict) -> dict:
    logits = apply_fn(variables, batch["image"], train=False)
    mask = batch["mask"].astype(jnp.float32)
    return {"loss": (_cross_entropy(logits, batch["label"]) * mask).sum(),
            "top1": (_correct(logits, batch["label"], 1) * mask).sum(),
            "top5": (_correct(logits, batch["label"], 5) * mask).sum(),
            "count": mask.sum()}


def eval_step(state: TrainState, batch: dict) -> dict:
    """Masked sums {'loss', 'top1', 'top5', 'count'} of one (padded) evaluation batch."""
    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    return _eval_sums(state.apply_fn, variables, batch)


def evaluate(model, variables: dict, batches: Iterable[dict], progress=None, mesh=None) -> dict:
    """Exact top-1/top-5 (%) and mean loss over every real (mask True) example of `batches`.

    With a `mesh`, each batch is split over its devices (and, multi-host, each process passes
    its own share of the split: the sums are global); without, it runs on the default device.
    """
    fn = functools.partial(_eval_sums, model.apply)
    if mesh is not None:
        rep, split = parallel.shardings(mesh)
        variables = jax.device_put(variables, rep) if jax.process_count() == 1 else \
            parallel.replicated(variables, rep)
        step = jax.jit(fn, in_shardings=(rep, split), out_shardings=rep)
        place = lambda b: parallel.global_batch(b, split)
    else:
        step, place = jax.jit(fn), lambda b: b
    totals = None
    for batch in batches:
        sums = step(variables, place(batch))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        if progress is not None:
            progress.update(int(np.sum(batch["mask"])))
    if totals is None:
        raise ValueError("no evaluation batches")
    t = {k: float(np.asarray(v)) for k, v in jax.device_get(totals).items()}
    n = t["count"]
    if n == 0:
        raise ValueError("the evaluation batches hold no real (mask True) examples")
    return {"top1": 100 * t["top1"] / n, "top5": 100 * t["top5"] / n, "loss": t["loss"] / n,
            "num_examples": int(n)}


# ---------------------------------------------------------------- run configuration

@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A run: model, data, recipe and the loop's settings; saved as the workdir's config.json.

    `image_size` (H, W, C), `in_channels` and `num_classes` are filled in by `resolve`.
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

    @property
    def image_shape(self) -> tuple[int, int, int]:
        if self.image_size:
            return tuple(self.image_size)
        size = model_info(self.model).input_size
        return (*size[:2], self.in_channels or size[2])

    def create_kwargs(self) -> dict:
        kw = {"num_classes": self.num_classes}
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
    28x28 datasets are zero-padded to 32x32 models (LeNet-5's convention), any other size
    difference needs an explicit `image_size` (a resize).

    Raises:
      ValueError: unknown model/dataset/optimizer/schedule/parallel mode, a batch size the
        devices cannot split, or an input the model cannot take.
    """
    from zoo import data

    info = model_info(config.model)  # ValueError with suggestions for unknown names
    spec = data.dataset_info(config.dataset, config.data_dir, config.skip_bad_images)
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
            pad = h - h0
            if (h0, w0) != (h, w) and not (0 < pad == w - w0 <= 8 and pad % 2 == 0):
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
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                       jax.ShapeDtypeStruct((1, h, w, c), jnp.float32))
    except ValueError as e:
        raise ValueError(f"{config.dataset} images as {h}x{w}x{c} do not fit {config.model}: "
                         f"{e}") from None
    return resolved


_SAME_RUN = ("model", "dataset", "image_size", "num_classes", "in_channels")


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
    if (old.recipe.optimizer, bool(old.recipe.weight_decay)) != \
            (config.recipe.optimizer, bool(config.recipe.weight_decay)):
        raise ValueError(f"{workdir} holds a run trained with {old.recipe.optimizer} (weight "
                         f"decay {old.recipe.weight_decay}); its optimizer state does not fit "
                         f"{config.recipe.optimizer} (weight decay "
                         f"{config.recipe.weight_decay}); use another --workdir")
    return old


# ---------------------------------------------------------------- the loop

class Interrupted(Exception):
    """SIGTERM/SIGINT arrived; the state was saved. `signum` says which."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class _Stop:
    """Records SIGTERM/SIGINT so the loop can save before exiting; a second signal acts at once
    (the previous handlers are back in place after the first)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum
        self._restore()

    def _restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc):
        self._restore()


class _Writer:
    """metrics.jsonl (one JSON object a line) and TensorBoard events, on process 0 only."""

    def __init__(self, workdir: Path, enabled: bool):
        self.file = self.tb = None
        if enabled:
            self.file = (workdir / "metrics.jsonl").open("a")
            try:  # flax's writer needs TensorFlow, which the input pipeline installs anyway
                from flax.metrics.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(workdir / "tensorboard"))
            except ImportError as e:
                print(f"warning: no TensorBoard events ({e})", file=sys.stderr)

    def write(self, record: dict) -> None:
        if not self.file:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "wall_time") and isinstance(v, (int, float)):
                    self.tb.scalar(k, v, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _state_dict(state: TrainState) -> dict:
    """What a checkpoint holds."""
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state, "rng": state.rng}


def _variables(state) -> dict:
    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    return variables


@dataclasses.dataclass
class _Setup:
    """What a resolved config builds: the models, optimizer, schedule and step counts."""

    model: Any  # trains (axis_name set under pmap)
    eval_model: Any
    info: Any
    spec: Any
    tx: Any
    schedule: Any
    steps_per_epoch: int
    total_steps: int


def build(config: TrainConfig) -> _Setup:
    """Models, optimizer and schedule of a resolved config."""
    from zoo import data

    info = model_info(config.model)
    spec = data.dataset_info(config.dataset, config.data_dir, config.skip_bad_images)
    kwargs = config.create_kwargs()
    dtype = jnp.dtype(config.dtype)
    eval_model = create_model(config.model, dtype=dtype, **kwargs)
    model = eval_model
    if config.parallel == "pmap" and "axis_name" in {f.name for f in
                                                     dataclasses.fields(eval_model)}:
        model = create_model(config.model, dtype=dtype, axis_name=parallel.PMAP_AXIS, **kwargs)
    batch = config.recipe.batch_size
    # an image folder serves its one set of files under any split name
    examples = spec.splits.get("train") or (max(spec.splits.values(), default=0)
                                            if config.dataset.startswith("image_folder:") else 0)
    steps_per_epoch = max(examples // batch, 1)
    total = int(config.steps or math.ceil(config.recipe.epochs * steps_per_epoch))
    schedule = make_schedule(config.recipe, steps_per_epoch, total, batch)
    return _Setup(model, eval_model, info, spec, make_optimizer(config.recipe, schedule),
                  schedule, steps_per_epoch, total)


def train(config: TrainConfig) -> dict:
    """Trains (resuming from the newest complete checkpoint in the workdir), evaluating every
    `eval_every` steps, and returns the final evaluation {'step', 'epoch', 'test_top1', ...}.

    Raises:
      ValueError (CheckpointError, DatasetNotFoundError, DatasetCorruptError, WorkdirLocked):
        a bad configuration, an unreadable checkpoint, missing or damaged data, or a workdir
        in use by another run, before anything in the workdir is changed; a checkpoint that
        could not be written (CheckpointWriteError: the complete ones are kept).
      FloatingPointError: the loss became NaN/inf (the message names the step; the last
        good checkpoint is kept).
      Interrupted: SIGTERM/SIGINT; the state was saved first.
    """
    from zoo.lock import workdir_lock

    config = resolve(config)
    with workdir_lock(config.workdir):  # one run per workdir (zoo/lock.py)
        return _train(config)


def _train(config: TrainConfig) -> dict:
    """`train` of a resolved config, the workdir locked."""
    from zoo import data
    from zoo.checkpoints import TrainCheckpointer, abstract_like

    setup = build(config)
    workdir = Path(config.workdir)
    previous = check_resume(config, workdir)
    lead = parallel.is_lead()
    mesh = parallel.make_mesh()
    rep, split = parallel.shardings(mesh)
    state = jax.jit(lambda: create_train_state(setup.model, setup.tx, config.image_shape,
                                               config.seed), out_shardings=rep)()
    with TrainCheckpointer(workdir, config.max_to_keep) as ckpt:
        restored = ckpt.restore(abstract_like(_state_dict(state), rep), allow_fallback=
                                config.allow_fallback)
        if restored is not None:
            state = state.replace(**restored[1])
        start = int(np.asarray(state.step))
        batches = data.make_dataset(
            config.dataset, "train", info=setup.info, image_size=config.image_shape,
            global_batch_size=config.recipe.batch_size, train=True, data_dir=config.data_dir,
            seed=config.seed, start_step=start, augment=config.recipe.augment,
            skip_bad_images=config.skip_bad_images)
        if start < setup.total_steps:  # damaged data fails here, before the workdir is written
            batches = itertools.chain([next(batches)], batches)
        # from here on the run owns the workdir
        if lead:
            workdir.mkdir(parents=True, exist_ok=True)
            if previous is not None and previous != config:
                changed = [f.name for f in dataclasses.fields(config)
                           if getattr(previous, f.name) != getattr(config, f.name)]
                print(f"note: settings changed since the last run ({', '.join(changed)}); "
                      "the new ones apply from here", file=sys.stderr)
            config.save(workdir / "config.json")
            ckpt.check_space(_state_dict(state))
            what = (f"resuming at step {start}" if restored else "starting")
            print(f"{what}: {config.model} on {config.dataset} "
                  f"{'x'.join(map(str, config.image_shape))}, {setup.total_steps} steps "
                  f"({setup.total_steps / setup.steps_per_epoch:.3g} epochs of "
                  f"{setup.steps_per_epoch}), batch {config.recipe.batch_size} on "
                  f"{jax.device_count()} {jax.devices()[0].platform} device(s) "
                  f"({config.parallel}), recipe {config.recipe_name or 'custom'}, workdir "
                  f"{workdir}", file=sys.stderr)
        if restored and lead:
            print(f"resuming from step {start} in {workdir}", file=sys.stderr)
        with _Stop() as stop:
            return _loop(config, setup, state, batches, ckpt, stop, mesh)


def _loop(config: TrainConfig, setup: _Setup, state, batches, ckpt, stop, mesh) -> dict:
    from tqdm import tqdm

    from zoo import data

    rep, split = parallel.shardings(mesh)
    lead = parallel.is_lead()
    workdir = Path(config.workdir)
    step_fn = functools.partial(train_step, config=StepConfig(
        config.recipe.label_smoothing, setup.info.aux_loss_weight))
    if config.parallel == "pmap":
        compiled = parallel.pmap_step(step_fn)
        state = parallel.replicate(jax.device_get(state))
        place = parallel.split_for_pmap
        canonical = lambda s: parallel.replicated(jax.device_get(parallel.unreplicate(s)), rep)
        first = lambda m: jax.tree.map(lambda x: x[0], m)
    else:
        compiled = parallel.jit_step(step_fn, mesh)
        place = functools.partial(parallel.global_batch, sharding=split)
        canonical = first = lambda s: s
    start, total, per_epoch = int(np.asarray(first(state).step)), setup.total_steps, \
        setup.steps_per_epoch
    eval_every = config.eval_every or per_epoch
    ckpt_every = config.checkpoint_every or per_epoch
    multi = jax.process_count() > 1
    eval_batch = -(-max(config.recipe.batch_size, 256) // jax.device_count()) * \
        jax.device_count()

    def evaluate_now(variables) -> dict:
        eval_batches = data.make_dataset(
            config.dataset, setup.spec.eval_split, info=setup.info,
            image_size=config.image_shape, global_batch_size=eval_batch, train=False,
            data_dir=config.data_dir, skip_bad_images=config.skip_bad_images)
        return evaluate(setup.eval_model, variables, eval_batches, mesh=mesh)

    writer = _Writer(workdir, lead)
    bar = tqdm(total=total, initial=start, disable=not (lead and config.progress),
               file=sys.stderr, desc=f"{config.model}/{config.dataset}", unit="step",
               dynamic_ncols=True, mininterval=1.0)
    pending, t0, last = [], time.perf_counter(), start
    last_eval: dict | None = None
    last_saved = ckpt.steps()[-1] if ckpt.steps() else None
    stream = parallel.prefetch(batches, place) if start < total else iter(())
    try:
        for step in range(start + 1, total + 1):
            state, metrics = compiled(state, next(stream))
            pending.append(metrics)
            bar.update(1)
            stopping = stop.signal is not None
            if multi and (step % 10 == 0 or step == total):
                stopping = parallel.any_process(stopping)  # every process stops at one step
            elif multi:
                stopping = False
            do_eval = step % eval_every == 0 or step == total
            do_save = (step % ckpt_every == 0 or step % per_epoch == 0 or do_eval or stopping)
            if not (do_save or step % config.log_every == 0):
                continue
            record = _summarise(jax.device_get([first(m) for m in pending]), last, step,
                                setup, t0, config.recipe.batch_size, workdir, last_saved)
            pending, last = [], step
            bar.set_postfix(loss=f"{record['train_loss']:.4f}",
                            top1=f"{record['train_top1']:.1f}",
                            img_s=f"{record['images_per_sec']:.0f}", refresh=False)
            saved_state = canonical(state) if (do_save or do_eval) else None
            if do_eval:
                t_eval = time.perf_counter()
                r = evaluate_now(_variables(saved_state))
                record.update(eval_loss=r["loss"], eval_top1=r["top1"], eval_top5=r["top5"],
                              eval_examples=r["num_examples"],
                              eval_seconds=time.perf_counter() - t_eval)
                last_eval = {"step": step, **r}
                if lead:
                    bar.write(f"step {step} (epoch {record['epoch']:.2f}): eval top-1 "
                              f"{r['top1']:.2f}%, loss {r['loss']:.4f}", file=sys.stderr)
            writer.write(record)
            if do_save:
                metrics_for_best = {"eval_top1": record["eval_top1"]} if do_eval else None
                ckpt.save(step, _state_dict(saved_state), metrics_for_best)
                last_saved = step
            t0 = time.perf_counter()
            if stopping:
                ckpt.wait()
                signum = stop.signal or signal.SIGTERM
                raise Interrupted(f"{signal.Signals(signum).name}: saved step {step} in "
                                  f"{ckpt.directory}; rerun the same command to resume", signum)
    finally:
        bar.close()
        writer.close()
    # the final evaluation: the one at the last step, or (a finished run resumed) a new one
    final_state = canonical(state)
    if last_eval is None or last_eval["step"] != int(np.asarray(final_state.step)):
        last_eval = {"step": int(np.asarray(final_state.step)),
                     **evaluate_now(_variables(final_state))}
    final = {"step": last_eval["step"], "epoch": round(last_eval["step"] / per_epoch, 3),
             "split": setup.spec.eval_split, "test_top1": last_eval["top1"],
             "test_top5": last_eval["top5"], "test_loss": last_eval["loss"],
             "test_examples": last_eval["num_examples"], "wall_time": time.time()}
    writer = _Writer(workdir, lead)
    writer.write(final)
    writer.close()
    if config.export and lead:
        export(config, setup, _variables(final_state), final)
    return final


def _summarise(got: list, last: int, step: int, setup: _Setup, t0: float, batch: int,
               workdir: Path, last_saved: int | None) -> dict:
    """The metrics record of steps (last, step]; raises FloatingPointError on a NaN/inf loss."""
    losses = np.asarray([float(np.asarray(m["loss"])) for m in got])
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        at = last + int(bad[0]) + 1
        kept = (f"the last good checkpoint (step {last_saved}) in {workdir / 'checkpoints'} is "
                "kept" if last_saved is not None else "no checkpoint was written")
        raise FloatingPointError(f"loss is {losses[bad[0]]} at step {at}; stopped ({kept}). "
                                 "Lower --lr or use another recipe")
    elapsed = time.perf_counter() - t0
    return {"step": step, "epoch": round(step / setup.steps_per_epoch, 4),
            "lr": float(setup.schedule(step - 1)), "train_loss": float(losses.mean()),
            "train_top1": 100 * float(np.mean([np.asarray(m["top1"]) for m in got])),
            "train_top5": 100 * float(np.mean([np.asarray(m["top5"]) for m in got])),
            "images_per_sec": (step - last) * batch / max(elapsed, 1e-9),
            "seconds": elapsed, "wall_time": time.time()}


def _train_seconds(records: list[dict]) -> float:
    """Time spent training (evaluations included) from metrics.jsonl's log records."""
    logs = [r for r in records if "train_loss" in r]
    if not logs:
        return 0.0
    if all("seconds" in r for r in logs):
        return round(sum(r["seconds"] + r.get("eval_seconds", 0.0) for r in logs), 1)
    return round(logs[-1]["wall_time"] - logs[0]["wall_time"], 1)  # older records: the span


def export(config: TrainConfig, setup: _Setup, variables: dict, final: dict) -> None:
    """Writes the run's final model with a model card (what `checkpoints/` ships)."""
    import os
    import platform

    import flax

    from zoo.checkpoints import save_model

    path = Path(config.workdir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() \
        else []
    variables = jax.device_get(variables)
    params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables["params"]))
    size = "x".join(map(str, config.image_shape))
    card = {"dataset": config.dataset, "image_size": list(config.image_shape),
            "recipe": config.recipe_name, "recipe_config": dataclasses.asdict(config.recipe),
            "epochs": final["epoch"], "steps": final["step"], "seed": config.seed,
            "dtype": config.dtype, "test_top1": final["test_top1"],
            "test_top5": final["test_top5"], "test_loss": final["test_loss"],
            "test_examples": final["test_examples"], "param_count": params,
            "jax": jax.__version__, "flax": flax.__version__,
            "train_seconds": _train_seconds(records),
            "machine": f"{platform.machine()}, {jax.device_count()} x "
                       f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores",
            "command": f"python train.py --model {config.model} --dataset {config.dataset}"
                       + (f" --recipe {config.recipe_name}" if config.recipe_name and
                          config.recipe_name != default_recipe_name(config.model,
                                                                    config.dataset) else "")
                       + (f" --image-size {size}" if tuple(config.image_shape) !=
                          tuple(model_info(config.model).input_size) else "")
                       + f" --export {config.export}"}
    save_model(config.export, model_name=config.model, variables=variables, card=card,
               create_kwargs=config.create_kwargs())
    print(f"exported the final model to {config.export}", file=sys.stderr)
