"""Training: one pure train step for every model and both parallel paths, optax recipes, the loop.

`train_step(state, batch, *, config, axis_name=None) -> (state, metrics)` is compiled either with
`jax.jit` over a mesh (`parallel.jit_step`) or with `pmap` (`parallel.pmap_step`); the loop in
`train` does not know which model it trains. Everything a run depends on is a TrainConfig, saved
as `config.json` in the workdir, so a run can be resumed and its checkpoints read back.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from zoo import parallel
from zoo.registry import create_model, model_info


# ---------------------------------------------------------------- configuration and recipes

@dataclasses.dataclass(frozen=True)
class Recipe:
    """An optimisation recipe; `lr` is for a global batch of `batch_size` unless `scale_lr`,
    where it is per 256 images (Goyal et al.: lr x global_batch / 256)."""

    optimizer: str = "adam"
    lr: float = 1e-3
    batch_size: int = 128
    epochs: int = 5
    schedule: str = "constant"  # constant | step | cosine | warmup_cosine
    warmup_epochs: float = 0.0
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    momentum: float = 0.9
    scale_lr: bool = False
    augment: bool | None = None  # None: the dataset's standard augmentation


RECIPES: dict[str, Recipe] = {
    # The notes' Keras run: Adam 1e-3, batch 64, 5 epochs.
    "simple_cnn_mnist": Recipe("adam", 1e-3, 64, 5),
    "simple_cnn_fashion_mnist": Recipe("adam", 1e-3, 64, 5, "cosine"),
    "lenet5_mnist": Recipe("adam", 1e-3, 64, 10, "cosine"),
    "lenet5_fashion_mnist": Recipe("adam", 2e-3, 128, 12, "cosine"),
    # He et al. 2016 §4.2: SGD 0.1, momentum 0.9, wd 1e-4, /10 at 50% and 75%, batch 128.
    "resnet20_cifar10": Recipe("momentum", 0.1, 128, 182, "step", weight_decay=1e-4),
    "resnet20_fashion_mnist": Recipe("momentum", 0.1, 128, 12, "warmup_cosine", 1,
                                     weight_decay=5e-4, augment=True),
    # Goyal et al. / torchvision-style ResNet-50 on ImageNet.
    "resnet50_imagenet": Recipe("nesterov", 0.1, 256, 90, "warmup_cosine", 5, 1e-4, 0.1,
                                scale_lr=True),
}
_DEFAULT_RECIPE = Recipe()


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A run: model, data, recipe and the machinery's settings (saved as config.json)."""

    model: str
    dataset: str
    workdir: str
    recipe: Recipe = _DEFAULT_RECIPE
    recipe_name: str | None = None
    steps: int | None = None  # overrides epochs
    seed: int = 0
    dtype: str = "float32"
    parallel: str = "jit"  # jit | pmap
    image_size: tuple[int, int, int] | None = None
    in_channels: int | None = None
    num_classes: int | None = None
    data_dir: str | None = None
    eval_every: int | None = None  # default: once an epoch
    checkpoint_every: int | None = None  # default: once an epoch
    log_every: int = 50
    max_to_keep: int = 3
    allow_fallback: bool = False
    progress: bool = True
    export: str | None = None  # write the final model (save_model + model card) here

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.image_size or model_info(self.model).input_size
        return (*size[:2], self.in_channels or size[2])

    def create_kwargs(self) -> dict:
        kw = {"num_classes": self.num_classes}
        if self.in_channels:
            kw["in_channels"] = self.in_channels
        return kw

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path) -> "TrainConfig":
        raw = json.loads(Path(path).read_text())
        raw["recipe"] = Recipe(**raw["recipe"])
        if raw.get("image_size"):
            raw["image_size"] = tuple(raw["image_size"])
        return cls(**raw)


def default_recipe_name(model: str, dataset: str) -> str | None:
    return f"{model}_{dataset}" if f"{model}_{dataset}" in RECIPES else None


def make_schedule(recipe: Recipe, steps_per_epoch: int, total_steps: int,
                  global_batch: int) -> optax.Schedule:
    """The recipe's learning-rate schedule, linear scaling rule applied."""
    lr = recipe.lr * global_batch / 256 if recipe.scale_lr else recipe.lr
    warmup = int(recipe.warmup_epochs * steps_per_epoch)
    if recipe.schedule == "constant":
        return optax.constant_schedule(lr)
    if recipe.schedule == "step":
        return optax.piecewise_constant_schedule(
            lr, {int(total_steps * 0.5): 0.1, int(total_steps * 0.75): 0.1})
    if recipe.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, total_steps)
    if recipe.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), total_steps)
    raise ValueError(f"unknown schedule {recipe.schedule!r}; use constant, step, cosine or "
                     "warmup_cosine")


OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "lamb")


def make_optimizer(recipe: Recipe, schedule: optax.Schedule) -> optax.GradientTransformation:
    """optax optimizer; weight decay applies to conv/dense kernels only (not BN or biases)."""
    kernels = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    wd = recipe.weight_decay
    if recipe.optimizer in ("adamw", "lamb"):
        make = optax.adamw if recipe.optimizer == "adamw" else optax.lamb
        return make(schedule, weight_decay=wd, mask=kernels)
    base = {
        "sgd": lambda: optax.sgd(schedule),
        "momentum": lambda: optax.sgd(schedule, momentum=recipe.momentum),
        "nesterov": lambda: optax.sgd(schedule, momentum=recipe.momentum, nesterov=True),
        "adam": lambda: optax.adam(schedule),
        "rmsprop": lambda: optax.rmsprop(schedule, decay=0.9, momentum=0.0),
    }
    if recipe.optimizer not in base:
        raise ValueError(f"unknown optimizer {recipe.optimizer!r}; use {', '.join(OPTIMIZERS)}")
    if not wd:
        return base[recipe.optimizer]()
    return optax.chain(optax.add_decayed_weights(wd, mask=kernels), base[recipe.optimizer]())


# ---------------------------------------------------------------- state and steps

class TrainState(train_state.TrainState):
    """flax's TrainState plus BatchNorm statistics and the run's PRNG key."""

    batch_stats: Any = None
    rng: jax.Array = None


@dataclasses.dataclass(frozen=True)
class StepConfig:
    label_smoothing: float = 0.0
    aux_loss_weight: float = 0.0


def create_train_state(model, tx, image_shape, seed: int = 0) -> TrainState:
    """Initialises parameters (float32) for `image_shape` (H, W, C)."""
    rng = jax.random.PRNGKey(seed)
    variables = model.init({"params": jax.random.fold_in(rng, 0)},
                           jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables.get("batch_stats", {}),
                             rng=jax.random.fold_in(rng, 1))


def _cross_entropy(logits, labels, smoothing: float):
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing) \
        if smoothing else jax.nn.one_hot(labels, logits.shape[-1])
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _topk_correct(logits, labels, k: int):
    k = min(k, logits.shape[-1])
    return (jax.lax.top_k(logits, k)[1] == labels[:, None]).any(axis=-1)


def train_step(state: TrainState, batch: dict, *, config: StepConfig = StepConfig(),
               axis_name: str | None = None) -> tuple[TrainState, dict]:
    """One optimisation step on one batch (the global batch under jit, a shard under pmap)."""
    dropout_rng = jax.random.fold_in(state.rng, state.step)
    if axis_name:
        dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))
    mask = batch["mask"].astype(jnp.float32)
    count = jnp.maximum(mask.sum(), 1.0)

    def loss_fn(params):
        variables = {"params": params}
        if state.batch_stats:
            variables["batch_stats"] = state.batch_stats
        out, updates = state.apply_fn(variables, batch["image"], train=True,
                                      mutable=["batch_stats"], rngs={"dropout": dropout_rng})
        logits, aux = out if isinstance(out, tuple) else (out, ())
        loss = (_cross_entropy(logits, batch["label"], config.label_smoothing) * mask).sum()
        for a in aux:  # GoogLeNet/Inception auxiliary classifiers
            loss += config.aux_loss_weight * (
                _cross_entropy(a, batch["label"], config.label_smoothing) * mask).sum()
        return loss / count, (logits, updates.get("batch_stats", {}))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    metrics = {"loss": loss,
               "top1": (_topk_correct(logits, batch["label"], 1) * mask).sum() / count,
               "top5": (_topk_correct(logits, batch["label"], 5) * mask).sum() / count}
    if axis_name:
        grads = jax.lax.pmean(grads, axis_name)
        metrics = jax.lax.pmean(metrics, axis_name)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, metrics


def eval_step(variables: dict, batch: dict, *, apply_fn) -> dict:
    """Masked sums (loss, top-1, top-5 correct, count) of one padded eval batch."""
    logits = apply_fn(variables, batch["image"], train=False)
    mask = batch["mask"].astype(jnp.float32)
    return {"loss": (_cross_entropy(logits, batch["label"], 0.0) * mask).sum(),
            "top1": (_topk_correct(logits, batch["label"], 1) * mask).sum(),
            "top5": (_topk_correct(logits, batch["label"], 5) * mask).sum(),
            "count": mask.sum()}


def evaluate(model, variables: dict, batches: Iterator[dict], progress=None) -> dict:
    """Exact top-1/top-5 (%) and mean loss over every real (mask True) example of `batches`."""
    step = jax.jit(functools.partial(eval_step, apply_fn=model.apply))
    totals = None
    for batch in batches:
        sums = step(variables, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        if progress is not None:
            progress.update(int(batch["mask"].sum()))
    if totals is None:
        raise ValueError("no evaluation batches")
    t = jax.device_get(totals)
    n = float(t["count"])
    return {"top1": 100 * float(t["top1"]) / n, "top5": 100 * float(t["top5"]) / n,
            "loss": float(t["loss"]) / n, "num_examples": int(n)}


# ---------------------------------------------------------------- the loop

def _build(config: TrainConfig, num_classes: int):
    """The model and optimizer of a config, and the schedule's step counts."""
    from zoo import data

    info = model_info(config.model)
    spec = data.dataset_info(config.dataset, config.data_dir)
    kwargs = {**config.create_kwargs(), "num_classes": num_classes}
    if config.parallel == "pmap" and _has_field(config.model, "axis_name"):
        kwargs["axis_name"] = parallel.PMAP_AXIS
    model = create_model(config.model, dtype=jnp.dtype(config.dtype), **kwargs)
    batch = config.recipe.batch_size
    steps_per_epoch = max(spec.splits.get("train", 0) // batch, 1)
    total = config.steps or config.recipe.epochs * steps_per_epoch
    schedule = make_schedule(config.recipe, steps_per_epoch, total, batch)
    return model, info, spec, make_optimizer(config.recipe, schedule), schedule, \
        steps_per_epoch, total


def _has_field(name: str, field: str) -> bool:
    module = create_model(name)
    return field in {f.name for f in dataclasses.fields(module)}


def _state_dict(state: TrainState) -> dict:
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state, "rng": state.rng}


def restore_for_eval(config: TrainConfig, workdir) -> tuple[Any, Any, dict]:
    """(model, info, state dict) of a workdir's newest complete checkpoint, for evaluation."""
    from zoo.checkpoints import CheckpointError, TrainCheckpointer

    model, info, spec, tx, *_ = _build(dataclasses.replace(config, parallel="jit"),
                                       config.num_classes)
    state = jax.eval_shape(lambda: create_train_state(model, tx, config.image_shape))
    ckpt = TrainCheckpointer(workdir)
    try:
        restored = ckpt.restore_latest(jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state_dict(state)))
    finally:
        ckpt.close()
    if restored is None:
        raise CheckpointError(f"{workdir} has no complete checkpoint yet")
    return model, info, restored[1]


class _Stop:
    """Remembers a SIGTERM/SIGINT so the loop can save before exiting."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum


def train(config: TrainConfig) -> dict:
    """Trains (resuming from the newest checkpoint in the workdir) and evaluates on the test split.

    Returns the final metrics record. Raises ValueError for bad configurations before touching
    the workdir, and FloatingPointError when the loss becomes NaN/inf.
    """
    from tqdm import tqdm

    from zoo import data
    from zoo.checkpoints import TrainCheckpointer, save_model

    spec = data.dataset_info(config.dataset, config.data_dir)
    num_classes = config.num_classes or spec.num_classes
    config = dataclasses.replace(config, num_classes=num_classes)
    devices = jax.devices()
    local = jax.local_device_count()
    if config.recipe.batch_size % len(devices):
        raise ValueError(f"batch size {config.recipe.batch_size} is not divisible by the "
                         f"{len(devices)} devices")
    model, info, spec, tx, schedule, steps_per_epoch, total = _build(config, num_classes)
    _check_fits(config, spec)
    workdir = Path(config.workdir)
    lead = jax.process_index() == 0
    _check_workdir(workdir, config)
    if lead:
        workdir.mkdir(parents=True, exist_ok=True)
        config.save(workdir / "config.json")

    state = create_train_state(model, tx, config.image_shape, config.seed)
    ckpt = TrainCheckpointer(workdir, config.max_to_keep)
    restored = ckpt.restore_latest(_state_dict(state), config.allow_fallback)
    if restored:
        state = state.replace(**restored[1])
        print(f"resuming from step {restored[0]} in {workdir}", file=sys.stderr)
    start = int(state.step)
    step_cfg = StepConfig(config.recipe.label_smoothing, info.aux_loss_weight)
    step_fn = functools.partial(train_step, config=step_cfg)
    mesh = parallel.make_mesh(devices)
    replicated, split = parallel.shardings(mesh)
    if config.parallel == "pmap":
        compiled = parallel.pmap_step(step_fn)
        state = parallel.replicate(state, local)
        place = lambda b: parallel.split_for_pmap(b, local)
        host_state = parallel.unreplicate
    else:
        compiled = parallel.jit_step(step_fn, mesh)
        state = jax.device_put(state, replicated)
        place = lambda b: parallel.global_batch(b, split)
        host_state = lambda s: s

    batches = data.make_dataset(config.dataset, "train", info=info,
                                image_size=config.image_shape,
                                global_batch_size=config.recipe.batch_size, train=True,
                                data_dir=config.data_dir, seed=config.seed, start_step=start,
                                augment=config.recipe.augment)
    eval_every = config.eval_every or steps_per_epoch
    ckpt_every = config.checkpoint_every or steps_per_epoch
    writer = _Writer(workdir, lead)
    stop = _Stop()
    pending, t0, last_log = [], time.perf_counter(), start
    best = _best_top1(workdir)
    bar = tqdm(total=total, initial=start, disable=not (lead and config.progress),
               file=sys.stderr, desc=f"{config.model}/{config.dataset}", dynamic_ncols=True)
    record: dict = {}
    try:
        for step in range(start + 1, total + 1):
            state, metrics = compiled(state, place(next(batches)))
            pending.append(metrics)
            bar.update(1)
            boundary = step % eval_every == 0 or step == total
            if step % config.log_every == 0 or boundary or step % ckpt_every == 0 or stop.signal:
                record = _log(pending, step, steps_per_epoch, schedule, t0, last_log,
                              config.recipe.batch_size)
                pending, t0, last_log = [], time.perf_counter(), step
                if not math.isfinite(record["train_loss"]):
                    raise FloatingPointError(
                        f"loss is {record['train_loss']} at step {step}; stopped. The last good "
                        f"checkpoint in {workdir / 'checkpoints'} is kept; lower --lr or use "
                        "another recipe")
                bar.set_postfix(loss=f"{record['train_loss']:.4f}",
                                top1=f"{record['train_top1']:.1f}",
                                img_s=f"{record['images_per_sec']:.0f}")
                if boundary:
                    variables = _variables(host_state(state))
                    record.update(_eval(model, info, config, variables, "eval"))
                    if record["eval_top1"] > best and lead:
                        best = record["eval_top1"]
                        save_model(workdir / "best", model_name=config.model,
                                   variables=jax.device_get(variables),
                                   create_kwargs=config.create_kwargs(),
                                   card=_card(config, record))
                writer.write(record)
            if step % ckpt_every == 0 or step == total or stop.signal:
                ckpt.save(step, _state_dict(host_state(state)))
            if stop.signal:
                ckpt.wait()
                raise KeyboardInterrupt(f"signal {stop.signal}: saved step {step} in "
                                        f"{workdir / 'checkpoints'}; rerun to resume")
    finally:
        bar.close()
        ckpt.close()
        writer.close()
    final = _eval(model, info, config, _variables(host_state(state)), "test")
    final.update(step=int(host_state(state).step), epoch=int(host_state(state).step)
                 / steps_per_epoch)
    writer = _Writer(workdir, lead)
    writer.write(final)
    writer.close()
    if config.export and lead:
        _export(config, model, _variables(host_state(state)), final)
    return final


def _export(config: TrainConfig, model, variables, final: dict) -> None:
    """Writes the run's final model with a model card (what `checkpoints/` ships)."""
    import platform

    import flax as flax_pkg

    from zoo.checkpoints import save_model

    records = [json.loads(line) for line in
               (Path(config.workdir) / "metrics.jsonl").read_text().splitlines()]
    params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables["params"]))
    card = {"dataset": config.dataset, "image_size": list(config.image_shape),
            "recipe": config.recipe_name, "recipe_config": dataclasses.asdict(config.recipe),
            "epochs": final["epoch"], "steps": final["step"], "seed": config.seed,
            "test_top1": final["test_top1"], "test_top5": final["test_top5"],
            "test_loss": final["test_loss"], "test_examples": final["test_examples"],
            "param_count": params, "jax": jax.__version__, "flax": flax_pkg.__version__,
            "train_seconds": _train_seconds(records),
            "machine": f"{platform.machine()}, {jax.device_count()} x "
                       f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores",
            "command": f"python train.py --model {config.model} --dataset {config.dataset}"
                       + (f" --image-size {'x'.join(map(str, config.image_shape))}"
                          if config.image_size else "") + f" --export {config.export}"}
    save_model(config.export, model_name=config.model, variables=jax.device_get(variables),
               card=card, create_kwargs=config.create_kwargs())
    print(f"exported the final model to {config.export}", file=sys.stderr)


def _variables(state: TrainState) -> dict:
    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    return variables


def _eval(model, info, config: TrainConfig, variables, prefix: str) -> dict:
    from zoo import data

    model = create_model(config.model, dtype=jnp.dtype(config.dtype), **config.create_kwargs())
    spec = data.dataset_info(config.dataset, config.data_dir)
    batches = data.make_dataset(config.dataset, spec.eval_split, info=info,
                                image_size=config.image_shape, global_batch_size=max(
                                    config.recipe.batch_size, 256), train=False,
                                data_dir=config.data_dir)
    r = evaluate(model, jax.device_get(variables), batches)
    return {f"{prefix}_top1": r["top1"], f"{prefix}_top5": r["top5"],
            f"{prefix}_loss": r["loss"], f"{prefix}_examples": r["num_examples"]}


def _log(pending, step, steps_per_epoch, schedule, t0, last, batch) -> dict:
    got = jax.device_get(pending)
    mean = {k: float(np.mean([float(np.asarray(m[k]).mean()) for m in got])) for k in got[0]}
    elapsed = time.perf_counter() - t0
    return {"step": step, "epoch": round(step / steps_per_epoch, 3),
            "lr": float(schedule(step - 1)), "train_loss": mean["loss"],
            "train_top1": 100 * mean["top1"], "train_top5": 100 * mean["top5"],
            "images_per_sec": (step - last) * batch / max(elapsed, 1e-9),
            "seconds": elapsed, "wall_time": time.time()}


def _train_seconds(records: list[dict]) -> float:
    """Time spent training (evaluations included) from metrics.jsonl's log records."""
    logs = [r for r in records if "train_loss" in r]
    if all("seconds" in r for r in logs):
        return round(sum(r["seconds"] for r in logs), 1)
    return round(logs[-1]["wall_time"] - logs[0]["wall_time"], 1)  # older records: the span


def _card(config: TrainConfig, record: dict) -> dict:
    return {"dataset": config.dataset, "image_size": list(config.image_shape),
            "recipe": config.recipe_name, "config": dataclasses.asdict(config),
            "step": record["step"], "eval_top1": record["eval_top1"],
            "eval_top5": record["eval_top5"]}


def _best_top1(workdir: Path) -> float:
    card = workdir / "best" / "model_card.json"
    return json.loads(card.read_text())["eval_top1"] if card.is_file() else -1.0


def _check_fits(config: TrainConfig, spec) -> None:
    """The model's input must be producible from the dataset (channels, size)."""
    h, w, c = config.image_shape
    info = model_info(config.model)
    if min(h, w) < info.min_size:
        raise ValueError(f"{config.model} needs images of at least {info.min_size}x"
                         f"{info.min_size}; --image-size {h}x{w}x{c} is smaller")


def _check_workdir(workdir: Path, config: TrainConfig) -> None:
    """A workdir belongs to one model and dataset: never overwrite another run's checkpoints."""
    path = workdir / "config.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if (old["model"], old["dataset"]) != (config.model, config.dataset):
            raise ValueError(f"{workdir} holds a {old['model']}/{old['dataset']} run; use "
                             "another --workdir")


class _Writer:
    """metrics.jsonl (one JSON object a line) and TensorBoard events, on process 0 only."""

    def __init__(self, workdir: Path, enabled: bool):
        self.file = (workdir / "metrics.jsonl").open("a") if enabled else None
        self.tb = None
        if enabled:
            from flax.metrics.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.file:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for k, v in record.items():
            if k not in ("step", "wall_time") and isinstance(v, (int, float)):
                self.tb.scalar(k, v, record["step"])
        self.tb.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.tb.close()


flax.config.update("flax_use_orbax_checkpointing", True)
