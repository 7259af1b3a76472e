"""Orbax checkpoints behind one small module.

Two layouts:
- a train.py workdir: `config.json` + `checkpoints/<step>/`, the full train state (step, params,
  batch_stats, opt_state, rng) written asynchronously by `TrainCheckpointer`. Orbax writes
  `<step>.orbax-checkpoint-tmp*` first and renames it when complete, so a run killed mid-save
  never leaves a step that looks finished. The newest `max_to_keep` steps are kept, plus the
  step with the best eval top-1 (`load_model(workdir, step="best")`).
- an exported model: `model_card.json` + `variables/` (params and batch_stats only), written by
  `save_model` for converted torchvision weights, `train.py --export` and `checkpoints/`.

`load_model` reads either, or one step directory `WORKDIR/checkpoints/<step>`.
"""

from __future__ import annotations

import json
import logging
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



class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, damaged or of another model."""


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

    _quiet = _QuietUnevaluatedSaves()

    def __init__(self, workdir, max_to_keep: int = 3):
        if max_to_keep < 1:
            raise ValueError(f"--max-to-keep must be at least 1, not {max_to_keep}")
        logging.getLogger("absl").addFilter(self._quiet)  # once: a filter is added only once
        self.directory = Path(workdir).absolute() / "checkpoints"
        policies = [cm.LatestN(n=max_to_keep),
                    cm.BestN(get_metric_fn=_best_metric, n=1,
                             keep_checkpoints_without_metrics=False)]
        try:
            self.manager = ocp.CheckpointManager(
                self.directory, item_handlers=ocp.StandardCheckpointHandler(),
                options=ocp.CheckpointManagerOptions(
                    best_fn=_best_metric, best_mode="max",
                    preservation_policy=cm.AnyPreservationPolicy(policies),
                    enable_async_checkpointing=True))
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
        metrics = {k: float(v) for k, v in (metrics or {}).items()} or None
        self.manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)

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
        """Blocks until every started save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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
    ckpt = TrainCheckpointer(directory)
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
