"""Orbax checkpoints behind one small module.

Two layouts:
- a train.py workdir: `config.json` + `checkpoints/<step>/` (the full TrainState, written
  asynchronously by `TrainCheckpointer`; Orbax writes `<step>.orbax-checkpoint-tmp-*` first and
  renames it when complete, so a run killed mid-save never leaves a step that looks finished);
- an exported model: `model_card.json` + `variables/` (params and batch_stats only), written by
  `save_model` for converted torchvision weights, the best model of a run and `checkpoints/`.
`load_model` reads either.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from zoo.registry import ModelInfo, create_model, model_info


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, damaged or of another model."""


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=getattr(x, "sharding", None)),
                        tree)


class TrainCheckpointer:
    """Async full-state checkpoints of a run, newest `max_to_keep` kept."""

    def __init__(self, workdir, max_to_keep: int = 3):
        self.directory = Path(workdir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=True))

    def save(self, step: int, state: dict) -> None:
        """Starts saving `state` (a dict of arrays) as `step`; returns once it is copied off."""
        if step not in self.manager.all_steps():
            self.manager.save(step, args=ocp.args.StandardSave(state))

    def restore_latest(self, abstract_state: dict, allow_fallback: bool = False
                       ) -> tuple[int, dict] | None:
        """(step, state) of the newest readable step, or None for a fresh workdir.

        A damaged newest step raises CheckpointError naming it, unless `allow_fallback`, which
        goes back to the previous readable step (and says so on stderr).
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            try:
                return step, self.manager.restore(
                    step, args=ocp.args.StandardRestore(abstract_state))
            except Exception as e:  # Orbax/TensorStore raise many types for damaged files
                older = steps[i + 1] if i + 1 < len(steps) else None
                if not allow_fallback:
                    hint = (f"pass --allow-fallback to resume from step {older}" if older is not None
                            else "no older checkpoint exists; delete it to start over")
                    raise CheckpointError(
                        f"checkpoint step {step} in {self.directory} cannot be read "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); {hint}") from None
                print(f"warning: checkpoint step {step} is unreadable; falling back to step "
                      f"{older}", file=sys.stderr)
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def save_model(directory, *, model_name: str, variables: dict, card: dict,
               create_kwargs: dict | None = None) -> None:
    """Exports a model: `variables/` (Orbax) and `model_card.json`, replacing the directory whole.

    The card records everything needed to rebuild the module: {'model': name, 'create_kwargs':
    {...}} plus the caller's fields (dataset, accuracy, source, ...).
    """
    directory = Path(directory).absolute()
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
    with ocp.StandardCheckpointer() as ckptr:
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


def _abstract_variables(model: nn.Module, image_size) -> dict:
    x = jax.ShapeDtypeStruct((1, *image_size), jax.numpy.float32)
    return jax.eval_shape(lambda a: model.init(jax.random.key(0), a, train=False), x)


def load_model(directory) -> tuple[nn.Module, dict, ModelInfo, dict]:
    """(model, variables, info, card) from an exported model dir or a train.py workdir.

    Raises:
      CheckpointError: missing directory, no complete checkpoint, damaged files, or variables
        that do not fit the model the card names.
    """
    directory = Path(directory).absolute()  # Orbax reads relative paths' metadata as empty
    if (directory / "model_card.json").is_file():
        card = json.loads((directory / "model_card.json").read_text())
        model = create_model(card["model"], **card.get("create_kwargs", {}))
        info = model_info(card["model"])
        abstract = _abstract_variables(model, card.get("image_size") or info.input_size)
        variables = _restore(directory / "variables", abstract, card["model"])
        return model, variables, info, card
    if (directory / "config.json").is_file():
        from zoo import training

        config = training.TrainConfig.load(directory / "config.json")
        model, info, state = training.restore_for_eval(config, directory)
        card = {"model": config.model, "dataset": config.dataset,
                "image_size": list(config.image_shape), "step": int(state["step"]),
                "create_kwargs": config.create_kwargs()}
        variables = {"params": state["params"]}
        if state.get("batch_stats"):
            variables["batch_stats"] = state["batch_stats"]
        return model, variables, info, card
    if not directory.exists():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    raise CheckpointError(f"{directory} is neither an exported model (model_card.json) nor a "
                          "train.py workdir (config.json)")


def _restore(path: Path, abstract: dict, model_name: str) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    try:
        stored = ocp.StandardCheckpointer().metadata(path)
    except Exception as e:
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}); the checkpoint is "
                              "damaged") from None
    stored_tree = getattr(stored, "item_metadata", stored)
    stored_tree = getattr(stored_tree, "tree", stored_tree)
    if not stored_tree:  # e.g. a zeroed _METADATA file
        raise CheckpointError(f"cannot read the variable tree of {path}; the checkpoint is "
                              "damaged")
    want = jax.tree_util.tree_flatten_with_path(abstract)[0]
    have = dict(jax.tree_util.tree_flatten_with_path(dict(stored_tree))[0])
    wrong = [jax.tree_util.keystr(k) for k, v in want
             if k not in have or tuple(have[k].shape) != tuple(v.shape)]
    extra = set(have) - {k for k, _ in want}
    if wrong or extra:
        names = sorted(wrong) + sorted(jax.tree_util.keystr(k) for k in extra)
        raise CheckpointError(
            f"{path} does not hold {model_name} variables: {len(names)} keys differ (e.g. "
            f"{', '.join(names[:5])}); was it saved for another model or class count?")
    try:
        return ocp.StandardCheckpointer().restore(path, abstract)
    except Exception as e:
        raise CheckpointError(f"cannot restore {path} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); the checkpoint is damaged") from None
