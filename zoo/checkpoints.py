"""Orbax checkpoints behind one small module.

Two layouts:
- a train.py workdir: `config.json` + `checkpoints/<step>/`, the full train state (step, params,
  batch_stats, opt_state, rng) written asynchronously by `TrainCheckpointer`. Orbax writes
  `<step>.orbax-checkpoint-tmp*` first and renames it when complete, so a run killed mid-save
  never leaves a step that looks finished. The newest `max_to_keep` steps are kept, plus the
  step with the best eval top-1 (`load_model(workdir, step="best")`). A write that fails (a
  full disk) raises one CheckpointWriteError naming the step; the tracebacks Orbax and
  TensorStore log of it are dropped. Readers open the directory read-only.
- an exported model: `model_card.json` + `variables/` (params and batch_stats only), written by
  `save_model` for converted torchvision weights, `train.py --export` and `checkpoints/`.

`load_model` reads either, or one step directory `WORKDIR/checkpoints/<step>`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from zoo.errors import first_line
from zoo.registry import ModelInfo, abstract_variables, create_model, model_info

BEST_METRIC = "eval_top1"


class _QuietUnevaluatedSaves(logging.Filter):
    """Orbax warns on every save without metrics once `best_fn` is set; only evaluated steps
    carry an eval top-1 here, by design."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


class _QuietWriteFailures(logging.Filter):
    """Drops the tracebacks Orbax (and asyncio, for its write tasks nobody awaited once one
    failed) log of a failed write (a full disk, a read-only mount): the same error reaches the
    saving thread, which reports it in one line (CheckpointWriteError). Orbax also warns that
    a reader's manager is read-only; that is the point of it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" not in record.pathname and record.name != "asyncio":
            return True
        if record.levelno == logging.WARNING:
            return not record.getMessage().startswith("Given directory is read only")
        exc = record.exc_info[1] if record.exc_info else None
        return record.levelno < logging.ERROR or _os_error(exc or record.getMessage()) is None




def _quiet_late_write_callbacks(previous):
    """sys.unraisablehook without the tracebacks of a failed save's other writes: TensorStore
    completes them after Orbax has closed that save's event loop, and their callbacks find it
    closed (`call_soon_threadsafe`: "Event loop is closed"). Nothing is left to deliver."""
    def hook(unraisable):
        tb, e = unraisable.exc_traceback, unraisable.exc_value
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed" and tb
                is not None and tb.tb_frame.f_code.co_name in ("_check_closed",
                                                                "call_soon_threadsafe")):
            previous(unraisable)
    return hook


_QUIET = (("absl", _QuietUnevaluatedSaves()), ("absl", _QuietWriteFailures()),
          ("asyncio", _QuietWriteFailures()))


def _quiet_orbax() -> None:
    """Installs the filters above, once, when the first checkpointer is made (importing this
    module changes nothing)."""
    if getattr(_quiet_orbax, "done", False):
        return
    _quiet_orbax.done = True
    for name, log_filter in _QUIET:
        logging.getLogger(name).addFilter(log_filter)
    sys.unraisablehook = _quiet_late_write_callbacks(sys.unraisablehook)


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, damaged or of another model."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, a quota, a read-only mount); the message
    names the step, the cause and the newest complete step a rerun resumes from."""


def _os_error(e: BaseException | str | None) -> int | None:
    """The errno of an OS-level write failure: an OSError's, or the one TensorStore puts in its
    messages (`[os_error_code='28']`); None for anything else."""
    if isinstance(e, OSError) and e.errno:
        return e.errno
    found = re.search(r"os_error_code='(\d+)'", str(e)) if e is not None else None
    return int(found.group(1)) if found else None


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def abstract_like(tree: Any, sharding=None) -> Any:
    """ShapeDtypeStructs of a pytree's arrays, placed on `sharding` (default: their own)."""
    def leaf(x):
        s = sharding if sharding is not None else getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s)
    return jax.tree.map(leaf, tree)


class TrainCheckpointer:
    """Async full-state checkpoints of a run: the newest `max_to_keep` plus the best by
    eval top-1 (steps saved with `metrics={'eval_top1': ...}`).

    Every process of a multi-host run makes the same calls (saving is collective).
    """

    def __init__(self, workdir, max_to_keep: int = 3, read_only: bool = False):
        """`read_only`: a reader of a workdir another process may be training (evaluate.py,
        `load_model`): it never creates, saves or deletes anything."""
        if max_to_keep < 1:
            raise ValueError(f"--max-to-keep must be at least 1, not {max_to_keep}")
        _quiet_orbax()
        self.directory = Path(workdir).absolute() / "checkpoints"
        self.max_to_keep = max_to_keep
        self._writing: int | None = None  # the step whose background write may still fail
        policies = [cm.LatestN(n=max_to_keep),
                    cm.BestN(get_metric_fn=_best_metric, n=1,
                             keep_checkpoints_without_metrics=False)]
        try:
            self.manager = ocp.CheckpointManager(
                self.directory, item_handlers=ocp.StandardCheckpointHandler(),
                options=ocp.CheckpointManagerOptions(
                    best_fn=_best_metric, best_mode="max",
                    preservation_policy=cm.AnyPreservationPolicy(policies),
                    enable_async_checkpointing=True, read_only=read_only,
                    create=not read_only, save_interval_steps=0 if read_only else 1))
        except Exception as e:  # a damaged step's metadata, an unreadable directory
            raise CheckpointError(f"cannot read the checkpoints in {self.directory} "
                                  f"({first_line(e)})") from None

    def steps(self) -> list[int]:
        """Complete steps, oldest first (partially written ones are never listed)."""
        return sorted(self.manager.all_steps())

    def best_step(self) -> int | None:
        steps = self.steps()
        best = self.manager.best_step()
        return best if best in steps else None

    def save(self, step: int, state: dict, metrics: dict | None = None) -> None:
        """Starts saving `state` (a pytree of arrays) as `step`; returns once it is copied off
        the devices, while the files are written in the background."""
        if step in self.manager.all_steps():
            return
        self.wait()  # a failure of the previous step's write surfaces here, with its step
        metrics = {k: float(v) for k, v in (metrics or {}).items()} or None
        self._writing = step
        try:
            self.manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics,
                              force=True)
        except (OSError, ValueError) as e:
            raise self._write_error(step, e) from None

    def _write_error(self, step: int, e: BaseException) -> CheckpointWriteError:
        """The one-line report of a failed write of `step`; removes its partial directory
        (never listed as a step, but it holds the space a rerun needs)."""
        self._writing = None
        if jax.process_index() == 0:
            for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)
        code = _os_error(e)
        if code == errno.ENOSPC:
            why = (f"no space left on the device holding it "
                   f"({_mib(shutil.disk_usage(self.directory).free)} free)")
        else:
            why = os.strerror(code).lower() if code else first_line(e)
        done = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit()) \
            if self.directory.is_dir() else []
        then = (f"the newest complete checkpoint is step {done[-1]}; rerunning the same command "
                "resumes from it" if done else
                "no checkpoint is complete; rerunning the same command starts over")
        if code == errno.ENOSPC:
            then += " once space is freed"
        return CheckpointWriteError(f"could not write checkpoint step {step} to "
                                    f"{self.directory}: {why}; {then}")

    def check_space(self, state: Any) -> None:
        """Warns when the disk cannot hold `max_to_keep` + 1 checkpoints of `state`'s size (the
        kept steps plus the one being written), counting the steps already there as held."""
        size = sum(x.nbytes for x in jax.tree.leaves(state))
        need = (self.max_to_keep + 1 - len(self.steps())) * size
        free = shutil.disk_usage(self.directory).free
        if free < need:
            print(f"warning: {_mib(free)} free on the device holding {self.directory}, less "
                  f"than the {self.max_to_keep + 1} checkpoints of {_mib(size)} that "
                  f"--max-to-keep {self.max_to_keep} needs (those kept + the one being "
                  "written); a save will fail when the disk is full", file=sys.stderr)

    def restore(self, abstract_state: Any, step: int | None = None, allow_fallback: bool = False
                ) -> tuple[int, Any] | None:
        """(step, state) of `step`, or of the newest readable step; None for a fresh workdir.

        `abstract_state` gives the tree structure, shapes, dtypes and target shardings (any
        device count: Orbax reshards). A damaged newest step raises CheckpointError naming it,
        unless `allow_fallback`, which goes back to the previous readable step and says so.
        """
        steps = sorted(self.steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"no complete checkpoint of step {step} in "
                                      f"{self.directory} (steps: {sorted(steps) or 'none'})")
            steps = [step]
        for i, s in enumerate(steps):
            try:
                return s, self.manager.restore(s, args=ocp.args.StandardRestore(abstract_state))
            except Exception as e:  # Orbax/TensorStore raise many types for damaged files
                older = steps[i + 1] if i + 1 < len(steps) else None
                if not allow_fallback or older is None:
                    hint = ("no older checkpoint exists; move it away to start over"
                            if older is None else
                            f"pass --allow-fallback to resume from step {older} instead")
                    raise CheckpointError(f"checkpoint step {s} in {self.directory} cannot be "
                                          f"read ({first_line(e)}); {hint}") from None
                print(f"warning: checkpoint step {s} is unreadable ({first_line(e)}); falling "
                      f"back to step {older} (--allow-fallback)", file=sys.stderr)
        return None

    def item_metadata(self, step: int) -> Any:
        """The stored tree of `step` (shapes and dtypes, no data)."""
        try:
            meta = self.manager.item_metadata(step)
        except Exception as e:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} cannot be read "
                                  f"({first_line(e)})") from None
        return getattr(meta, "tree", meta)

    def wait(self) -> None:
        """Blocks until every started save is on disk; CheckpointWriteError if one failed."""
        try:
            self.manager.wait_until_finished()
        except (OSError, ValueError) as e:
            if self._writing is None:
                raise
            raise self._write_error(self._writing, e) from None
        self._writing = None

    def close(self) -> None:
        self.wait()
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
            return
        try:  # already failing: that error is the one to report
            self.close()
        except Exception:
            pass


def _best_metric(metrics) -> float:
    return float(metrics.get(BEST_METRIC, float("-inf"))) if metrics else float("-inf")


# ---------------------------------------------------------------- exported models

def save_model(directory, *, model_name: str, variables: dict, card: dict,
               create_kwargs: dict | None = None) -> None:
    """Exports a model: `variables/` (Orbax) and `model_card.json`, replacing the directory whole.

    The card records everything needed to rebuild the module: {'model': name, 'create_kwargs':
    {...}} plus the caller's fields (dataset, accuracy, source, ...). Runs on the calling
    process alone (in a multi-host run, call it from process 0 only).
    """
    directory = Path(directory).absolute()
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    variables = {k: jax.tree.map(np.asarray, jax.device_get(v)) for k, v in variables.items()
                 if k in ("params", "batch_stats") and v}
    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    with ocp.StandardCheckpointer(multiprocessing_options=alone) as ckptr:
        ckptr.save(tmp / "variables", variables)
    full_card = {"model": model_name, "create_kwargs": create_kwargs or {}, **card}
    (tmp / "model_card.json").write_text(json.dumps(full_card, indent=2) + "\n")
    if directory.exists():
        old = directory.with_name(directory.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old)
    else:
        tmp.rename(directory)


def load_model(directory, step: int | str | None = None
               ) -> tuple[nn.Module, dict, ModelInfo, dict]:
    """(model, variables, info, card) from an exported model dir or a train.py workdir.

    Args:
      directory: an exported model (model_card.json), a train.py workdir (config.json; its
        newest complete step) or one of its step directories (`WORKDIR/checkpoints/<step>`).
      step: for a workdir, a step number or "best" (the best eval top-1) instead of the newest.
    Raises:
      CheckpointError: missing directory, no complete checkpoint, damaged files (the step is
        named), or variables that do not fit the model the card names.
    """
    directory = Path(directory).absolute()  # Orbax reads relative paths' metadata as empty
    if (directory / "model_card.json").is_file():
        if step is not None:
            raise CheckpointError(f"{directory} is an exported model (one set of weights); a "
                                  "step can only be chosen in a train.py workdir")
        card = json.loads((directory / "model_card.json").read_text())
        model = create_model(card["model"], **card.get("create_kwargs", {}))
        info = model_info(card["model"])
        abstract = abstract_variables(model, card.get("image_size") or info.input_size)
        variables = _restore(directory / "variables", abstract, card["model"])
        return model, variables, info, card
    if (directory.parent.name == "checkpoints" and directory.name.isdigit()
            and (directory.parent.parent / "config.json").is_file()):
        return load_model(directory.parent.parent, int(directory.name))
    if (directory / "config.json").is_file():
        return _load_workdir(directory, step)
    if not directory.exists():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    raise CheckpointError(f"{directory} is neither an exported model (model_card.json) nor a "
                          "train.py workdir (config.json)")


def _load_workdir(directory: Path, step: int | str | None):
    """The params/batch_stats of one step of a train.py workdir, on the default device."""
    from zoo.train.config import TrainConfig

    try:
        config = TrainConfig.load(directory / "config.json")
    except (TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{directory / 'config.json'} is not a train.py config "
                              f"({first_line(e)})") from None
    create_kwargs = config.create_kwargs()
    model = create_model(config.model, **create_kwargs)
    info = model_info(config.model)
    ckpt = TrainCheckpointer(directory, read_only=True)  # a run may be training it
    try:
        steps = ckpt.steps()
        if not steps:
            raise CheckpointError(f"{directory} has no complete checkpoint yet")
        if step == "best":
            step = ckpt.best_step()
            if step is None:
                raise CheckpointError(f"{directory} has no checkpoint with an eval top-1")
        if step is not None and not str(step).isdigit():
            raise CheckpointError(f"step must be a number or 'best', got {step!r}")
        step = steps[-1] if step is None else int(step)
        stored = ckpt.item_metadata(step) if step in steps else None
        if stored is None:
            raise CheckpointError(f"no complete checkpoint of step {step} in {directory} "
                                  f"(steps: {steps})")
        # the stored tree gives every leaf's shape; opt_state is read too (tuples come back as
        # lists without the optimizer, which evaluation does not need)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype,
                                                               sharding=device), dict(stored))
        _, state = ckpt.restore(abstract, step=step)
    finally:
        ckpt.close()
    variables = {"params": state["params"]}
    if state.get("batch_stats"):
        variables["batch_stats"] = state["batch_stats"]
    image_size = config.image_size or info.input_size
    want = abstract_variables(model, image_size)
    _check_tree(want, variables, directory / "checkpoints" / str(step), config.model)
    card = {"model": config.model, "dataset": config.dataset,
            "image_size": list(image_size), "step": int(np.asarray(state["step"])),
            "create_kwargs": create_kwargs, "recipe": config.recipe_name}
    return model, variables, info, card


def _shape(x) -> tuple:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def _check_tree(want: dict, have: dict, path: Path, model_name: str) -> None:
    want_leaves = jax.tree_util.tree_flatten_with_path(want)[0]
    have_leaves = dict(jax.tree_util.tree_flatten_with_path(have)[0])
    wrong = [jax.tree_util.keystr(k) for k, v in want_leaves
             if k not in have_leaves or _shape(have_leaves[k]) != tuple(v.shape)]
    extra = set(have_leaves) - {k for k, _ in want_leaves}
    if wrong or extra:
        names = sorted(wrong) + sorted(jax.tree_util.keystr(k) for k in extra)
        raise CheckpointError(
            f"{path} does not hold {model_name} variables: {len(names)} keys differ (e.g. "
            f"{', '.join(names[:5])}); was it saved for another model or class count?")


def _restore(path: Path, abstract: dict, model_name: str) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    with ocp.StandardCheckpointer() as ckptr:
        try:
            stored = ckptr.metadata(path)
        except Exception as e:
            raise CheckpointError(f"cannot read {path} ({first_line(e)}); the checkpoint is "
                                  "damaged") from None
        stored_tree = getattr(stored, "item_metadata", stored)
        stored_tree = getattr(stored_tree, "tree", stored_tree)
        if not stored_tree:  # e.g. a zeroed _METADATA file
            raise CheckpointError(f"cannot read the variable tree of {path}; the checkpoint is "
                                  "damaged")
        _check_tree(abstract, dict(stored_tree), path, model_name)
        try:
            return ckptr.restore(path, abstract)
        except Exception as e:
            raise CheckpointError(f"cannot restore {path} ({first_line(e)}); the checkpoint "
                                  "is damaged") from None
