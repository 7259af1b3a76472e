"""Fine-tuning's starting point: the `--init-from` source, its weights loaded strictly into the
run's model, and the classifier head (`ModelInfo.head`) re-initialised where the class count
differs.

A source is a shipped checkpoint name (zoo.CHECKPOINTS), an exported or converted model
directory, a train.py workdir (or one of its step directories), or a torchvision
`.pth`/`.pt`/`.bin`/`.safetensors` file, which goes through `zoo.convert`'s strict conversion.
`inspect` reads metadata only (for `resolve`); `load` reads the weights.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from flax import traverse_util

from zoo import parallel
from zoo.registry import (abstract_variables, describe_differences, model_info,
                          variable_differences)

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


@dataclasses.dataclass(frozen=True)
class Source:
    """An --init-from source: `kind` 'zoo' (its `model` and the `create_kwargs` its weights
    were built with) or 'torchvision' (a weight file, for whichever model converts it)."""

    name: str
    path: Path
    kind: str
    model: str | None = None
    create_kwargs: dict = dataclasses.field(default_factory=dict)


def inspect(name: str) -> Source:
    """The source `name` names, from its metadata alone; ValueError where it is none."""
    from zoo import CHECKPOINTS, pretrained_path
    from zoo.checkpoints import CheckpointError

    try:
        path = pretrained_path(name)  # a path, or the name of a shipped checkpoint
    except CheckpointError:
        path = Path(name)
    if path.is_file() and path.suffix in TORCH_SUFFIXES:
        return Source(name, path, "torchvision")
    meta = None
    if path.is_dir():
        step_of = path.parent.parent / "config.json"
        meta = next((p for p in (path / "model_card.json", path / "config.json") if p.is_file()),
                    step_of if path.name.isdigit() and path.parent.name == "checkpoints"
                    and step_of.is_file() else None)
    if meta is None:
        shipped = ", ".join(sorted(p.name for p in CHECKPOINTS.glob("*") if p.is_dir()))
        raise ValueError(f"--init-from {name} is not a checkpoint or weights file: give a "
                         f"shipped checkpoint ({shipped}), an exported model or train.py "
                         "workdir directory, or a torchvision .pth/.pt/.safetensors file")
    try:
        if meta.name == "config.json":  # a workdir: TrainConfig reads its config
            from zoo.train.config import TrainConfig

            config = TrainConfig.load(meta)
            return Source(name, path, "zoo", config.model, config.create_kwargs())
        card = json.loads(meta.read_text())
        return Source(name, path, "zoo", card["model"], dict(card.get("create_kwargs") or {}))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--init-from {name}: {meta} is not readable ({type(e).__name__}: "
                         f"{e})") from None


def source_options(source: Source, model: str) -> dict:
    """The create_model options (beyond num_classes) the source's weights need `model` built
    with: a zoo source's own (in_channels, transform_input, ...), a torchvision file's those
    of its conversion (GoogLeNet's transform_input). Raises ValueError for weights of another
    model, or a torchvision file for a model without a torchvision counterpart."""
    if source.kind == "zoo":
        if source.model != model:
            raise ValueError(f"--init-from {source.name} holds {source.model} weights, not "
                             f"{model}'s; train --model {source.model}, or start {model} from "
                             "its own weights")
        options = source.create_kwargs
    else:
        from zoo.convert import converted_create_kwargs

        options = {"in_channels": model_info(model).input_size[2],
                   **converted_create_kwargs(model)}
    return {k: v for k, v in options.items() if k != "num_classes"}


def load(config, model) -> tuple[dict, str | None]:
    """The source's variables for `model` as `config` builds it, and the line to log where
    the head was left out (another class count: the run keeps its freshly initialised one).

    Every other variable must be there with the run's shape, and nothing else: anything else
    is one ValueError listing the keys that differ.
    """
    source = inspect(config.init_from)
    if source.kind == "zoo":
        from zoo.checkpoints import load_model

        have = load_model(source.path)[1]
    else:
        from zoo.convert import load_torchvision_model

        have = load_torchvision_model(config.model, source.path,
                                      transform_input=config.model_kwargs.get(
                                          "transform_input"))[1]
    have = traverse_util.flatten_dict({c: dict(v) for c, v in have.items() if v})
    want = traverse_util.flatten_dict({c: dict(v) for c, v in abstract_variables(
        model, config.image_shape).items() if v})
    head = [("params", *h.split("/")) for h in model_info(config.model).head]
    in_head = lambda path: any(path[:len(h)] == h for h in head)
    bias = head[0] + ("bias",)
    classes = int(np.shape(have[bias])[-1]) if bias in have else None
    note = None
    if classes is not None and classes != config.num_classes:
        have = {k: v for k, v in have.items() if not in_head(k)}
        want = {k: v for k, v in want.items() if not in_head(k)}
        note = (f"note: --init-from {source.name}: {config.model}'s head "
                f"({', '.join(model_info(config.model).head)}) "
                f"re-initialised for {config.num_classes} classes (source had {classes})")
    have, want = traverse_util.unflatten_dict(have), traverse_util.unflatten_dict(want)
    differences = variable_differences(want, have, "the run needs")
    if any(differences):
        size = "x".join(map(str, config.image_shape))
        raise ValueError(f"--init-from {source.name} does not fit {config.model} as this run "
                         f"builds it ({size} input, {config.num_classes} classes): "
                         + describe_differences(*(sorted(d) for d in differences), limit=8))
    return have, note


def apply(state, variables: dict, sharding):
    """`state` with the loaded `variables` in place of its fresh ones (a left-out head stays
    as initialised), placed on `sharding`."""
    def merged(tree, loaded):
        flat = traverse_util.flatten_dict(dict(tree))
        flat.update(parallel.replicated(traverse_util.flatten_dict(dict(loaded)), sharding))
        return traverse_util.unflatten_dict(flat)

    return state.replace(params=merged(state.params, variables["params"]),
                         batch_stats=merged(state.batch_stats, variables.get("batch_stats", {}))
                         if state.batch_stats else state.batch_stats)
