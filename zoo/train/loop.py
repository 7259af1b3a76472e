"""The training loop: resume, steps, evaluation, checkpoints, metrics and export."""

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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from zoo import arithmetic, parallel
from zoo.registry import abstract_variables, create_model, model_info, param_count
from zoo.train import transfer
from zoo.train.config import TrainConfig, check_resume, resolve
from zoo.train.recipes import make_optimizer, make_schedule, param_labels
from zoo.train.step import (StepConfig, TrainState, create_train_state, evaluate,
                             state_variables, train_step)


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
    remainder_note: str  # what a partial last batch of an epoch becomes, for the log


def build(config: TrainConfig) -> _Setup:
    """Models, optimizer (parameter groups: `param_labels`) and schedule of a resolved config."""
    from zoo import data

    info = model_info(config.model)
    spec = data.dataset_info(config.dataset, config.data_dir, config.skip_bad_images,
                             config.val_fraction)
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
    steps_per_epoch = max(arithmetic.steps_per_epoch(examples, batch), 1) if examples else 1
    total = int(config.steps or math.ceil(config.recipe.epochs * steps_per_epoch))
    schedule = make_schedule(config.recipe, steps_per_epoch, total, batch)
    rest = examples - steps_per_epoch * batch if examples >= batch else 0
    note = (f"; each epoch leaves out {rest} images, a different {rest} each time, as "
            "tf.data's drop_remainder does" if rest else "")
    labels = param_labels(abstract_variables(eval_model, config.image_shape), info.head,
                          config.recipe)
    return _Setup(model, eval_model, info, spec, make_optimizer(config.recipe, schedule, labels),
                  schedule, steps_per_epoch, total, note)


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
    init = None
    if config.init_from:  # a fresh run: its source is read and checked before any file is made
        with TrainCheckpointer(workdir, read_only=True) as existing:
            fresh = not existing.steps()
        if fresh:
            init, note = transfer.load(config, setup.eval_model)
            if note and lead:
                print(note, file=sys.stderr)
    mesh = parallel.make_mesh()
    rep, _ = parallel.shardings(mesh)
    state = jax.jit(lambda: create_train_state(setup.model, setup.tx, config.image_shape,
                                               config.seed), out_shardings=rep)()
    with TrainCheckpointer(workdir, config.max_to_keep) as ckpt:
        restored = ckpt.restore(abstract_like(_state_dict(state), rep), allow_fallback=
                                config.allow_fallback)
        if restored is not None:
            state = state.replace(**restored[1])
        elif init is not None:
            state = transfer.apply(state, init, rep)
        start = int(np.asarray(state.step))
        batches = data.make_dataset(
            config.dataset, "train", info=setup.info, image_size=config.image_shape,
            global_batch_size=config.recipe.batch_size, train=True, data_dir=config.data_dir,
            seed=config.seed, start_step=start, augment=config.recipe.augment,
            skip_bad_images=config.skip_bad_images, val_fraction=config.val_fraction)
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
            what = (f"resuming at step {start}" if restored else
                    f"starting from {config.init_from}" if init is not None else "starting")
            print(f"{what}: {config.model} on {config.dataset} "
                  f"{'x'.join(map(str, config.image_shape))}, {setup.total_steps} steps "
                  f"({setup.total_steps / setup.steps_per_epoch:.3g} epochs of "
                  f"{setup.steps_per_epoch} whole batches{setup.remainder_note}), batch "
                  f"{config.recipe.batch_size} on "
                  f"{jax.device_count()} {jax.devices()[0].platform} device(s) "
                  f"({config.parallel}), recipe {config.recipe_name or 'custom'}, workdir "
                  f"{workdir}", file=sys.stderr)
            if setup.spec.kind == "folder" and setup.spec.eval_split != "val":
                print(f"note: {config.dataset} has no val/ folder: the evaluations use the "
                      "training images (--val-fraction holds some out)", file=sys.stderr)
        if restored and lead:
            print(f"resuming from step {start} in {workdir}", file=sys.stderr)
        with _Stop() as stop:
            return _loop(config, setup, state, batches, ckpt, stop, mesh)


def _loop(config: TrainConfig, setup: _Setup, state, batches, ckpt, stop, mesh) -> dict:
    from tqdm import tqdm

    from zoo import data

    lead = parallel.is_lead()
    workdir = Path(config.workdir)
    step_fn = functools.partial(train_step, config=StepConfig(
        config.recipe.label_smoothing, setup.info.aux_loss_weight,
        frozen_bn=config.recipe.freeze in ("bn", "backbone")))
    run = parallel.compile_step(step_fn, mesh, config.parallel)
    state = run.prepare(state)
    start, total, per_epoch = int(np.asarray(run.local(state).step)), setup.total_steps, \
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
            data_dir=config.data_dir, skip_bad_images=config.skip_bad_images,
            val_fraction=config.val_fraction)
        return evaluate(setup.eval_model, variables, eval_batches, mesh=mesh)

    writer = _Writer(workdir, lead)
    bar = tqdm(total=total, initial=start, disable=not (lead and config.progress),
               file=sys.stderr, desc=f"{config.model}/{config.dataset}", unit="step",
               dynamic_ncols=True, mininterval=1.0)
    pending, t0, last = [], time.perf_counter(), start
    last_eval: dict | None = None
    last_saved = ckpt.steps()[-1] if ckpt.steps() else None
    # exactly the batches the steps take: prefetching past the last one would open (and fill
    # the shuffle buffer of) an epoch no step uses
    stream = parallel.prefetch(itertools.islice(batches, max(total - start, 0)), run.place)
    try:
        for step in range(start + 1, total + 1):
            state, metrics = run.step(state, next(stream))
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
            record = _summarise(jax.device_get([run.local(m) for m in pending]), last, step,
                                setup, t0, config.recipe.batch_size, workdir, last_saved)
            pending, last = [], step
            bar.set_postfix(loss=f"{record['train_loss']:.4f}",
                            top1=f"{record['train_top1']:.1f}",
                            img_s=f"{record['images_per_sec']:.0f}", refresh=False)
            saved_state = run.canonical(state) if (do_save or do_eval) else None
            if do_eval:
                t_eval = time.perf_counter()
                r = evaluate_now(state_variables(saved_state))
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
    final_state = run.canonical(state)
    if last_eval is None or last_eval["step"] != int(np.asarray(final_state.step)):
        last_eval = {"step": int(np.asarray(final_state.step)),
                     **evaluate_now(state_variables(final_state))}
    final = {"step": last_eval["step"], "epoch": round(last_eval["step"] / per_epoch, 3),
             "split": setup.spec.eval_split, "test_top1": last_eval["top1"],
             "test_top5": last_eval["top5"], "test_loss": last_eval["loss"],
             "test_examples": last_eval["num_examples"], "wall_time": time.time()}
    writer = _Writer(workdir, lead)
    writer.write(final)
    writer.close()
    if config.export and lead:
        export(config, setup, state_variables(final_state), final)
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
            "train_top1": float(np.mean([np.asarray(m["top1"]) for m in got])),
            "train_top5": float(np.mean([np.asarray(m["top5"]) for m in got])),
            "images_per_sec": (step - last) * batch / max(elapsed, 1e-9),
            "seconds": elapsed, "wall_time": time.time()}


def train_seconds(records: list[dict]) -> float:
    """Time spent training (evaluations included) from metrics.jsonl's log records."""
    logs = [r for r in records if "train_loss" in r]
    if not logs:
        return 0.0
    if all("seconds" in r for r in logs):
        return round(sum(r["seconds"] + r.get("eval_seconds", 0.0) for r in logs), 1)
    return round(logs[-1]["wall_time"] - logs[0]["wall_time"], 1)  # older records: the span


def export(config: TrainConfig, setup: _Setup, variables: dict, final: dict) -> None:
    """Writes the run's final model with its model card (what `checkpoints/` ships)."""
    from zoo.cards import training_card
    from zoo.checkpoints import save_model

    path = Path(config.workdir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() \
        else []
    variables = jax.device_get(variables)
    card = training_card(config, final, param_count(variables), train_seconds(records))
    save_model(config.export, model_name=config.model, variables=variables, card=card,
               create_kwargs=config.create_kwargs())
    print(f"exported the final model to {config.export}", file=sys.stderr)
