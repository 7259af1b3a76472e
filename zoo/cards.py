"""Model cards: the `model_card.json` beside exported variables, and the evaluation transform
they record. Two producers write them (`train.py --export` with test accuracies, `python -m zoo
convert` with the source file and the release's reference accuracy); everything that reads one
goes through here."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

from zoo.registry import ModelInfo, model_info
from zoo.weights import TorchvisionWeights, recognise_weights, sha256_verified


def training_card(config, final: Mapping, param_count: int, train_seconds: float) -> dict:
    """The card `train.py --export` writes: the run's recipe, its final test evaluation
    `final` (train's result), the machine, and the one command that reproduces it."""
    import os
    import platform

    import flax
    import jax

    from zoo.train.recipes import default_recipe_name

    size = "x".join(map(str, config.image_shape))
    command = f"python train.py --model {config.model} --dataset {config.dataset}"
    if config.recipe_name and config.recipe_name != default_recipe_name(config.model,
                                                                        config.dataset):
        command += f" --recipe {config.recipe_name}"
    if tuple(config.image_shape) != tuple(model_info(config.model).input_size):
        command += f" --image-size {size}"
    return {"dataset": config.dataset, "image_size": list(config.image_shape),
            "recipe": config.recipe_name, "recipe_config": dataclasses.asdict(config.recipe),
            "epochs": final["epoch"], "steps": final["step"], "seed": config.seed,
            "dtype": config.dtype, "test_top1": final["test_top1"],
            "test_top5": final["test_top5"], "test_loss": final["test_loss"],
            "test_examples": final["test_examples"], "param_count": param_count,
            "jax": jax.__version__, "flax": flax.__version__, "train_seconds": train_seconds,
            "machine": f"{platform.machine()}, {jax.device_count()} x "
                       f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores",
            "command": command + f" --export {config.export}"}


def reference_top1(card: Mapping) -> float | None:
    """The top-1 (%) a card promises: the release's for converted weights, the measured test
    top-1 for a trained export."""
    return card.get("reference_top1", card.get("test_top1"))


def preprocessing(info: ModelInfo, weights: TorchvisionWeights | None = None) -> dict:
    """The evaluation transform the weights expect (torchvision's release if known, else the
    model's ModelInfo): resize the shorter side, centre crop, normalise."""
    src = weights or info
    return {"resize_size": src.resize_size, "crop_size": src.crop_size,
            "interpolation": info.interpolation, "antialias": True, "mean": list(src.mean),
            "std": list(src.std)}


def apply_preprocessing(info: ModelInfo, prep: Mapping | None) -> ModelInfo:
    """`info` with a model card's preprocessing (resize, crop, mean, std) in place."""
    if not prep:
        return info
    fields = {k: prep[k] for k in ("resize_size", "crop_size", "interpolation") if k in prep}
    fields.update({k: tuple(prep[k]) for k in ("mean", "std") if k in prep})
    return dataclasses.replace(info, **fields)


def timm_preprocessing(name: str, tag: str) -> dict:
    """The evaluation transform of timm's pretrained weights `tag` ('resnet50.a1_in1k') for
    zoo model `name`, from timm's own pretrained config: input size, crop_pct (resize =
    crop / crop_pct), interpolation, mean/std. ValueError for a tag of another architecture."""
    from zoo.parity import import_torchvision

    info = model_info(name)
    if info.timm_name is None or tag.split(".")[0] != info.timm_name:
        raise ValueError(f"timm weights {tag!r} are not of {name}'s architecture "
                         f"(timm twin: {info.timm_name or 'none'}); use {info.timm_name}.<tag>"
                         if info.timm_name else f"{name} has no timm twin")
    import_torchvision()  # timm imports torchvision
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(tag)
    if cfg is None:
        raise ValueError(f"timm knows no pretrained weights {tag!r}")
    crop = cfg.input_size[-1]
    return {"resize_size": round(crop / cfg.crop_pct), "crop_size": crop,
            "interpolation": cfg.interpolation, "antialias": True, "mean": list(cfg.mean),
            "std": list(cfg.std), "timm_weights": tag}


def conversion_card(name: str, path, sha256: str, kwargs: dict, dropped: list[str],
                    param_count: int, timm: str | None = None) -> dict:
    """The card `python -m zoo convert` writes next to the variables; `timm` names timm's
    pretrained tag the file holds, whose preprocessing it records."""
    import flax
    import jax

    info = model_info(name)
    weights = None if timm else recognise_weights(sha256, Path(path).name)
    prep = timm_preprocessing(name, timm) if timm else preprocessing(info, weights)
    card = {
        "source": {"file": Path(path).name, "path": str(Path(path).absolute()),
                   "sha256": sha256, "format": Path(path).suffix.lstrip("."),
                   "torchvision_model": info.torchvision_name,
                   "torchvision_weights": weights.name if weights else None,
                   "sha256_matches_release": sha256_verified(weights, sha256),
                   "timm_weights": timm},
        "image_size": [prep["crop_size"], prep["crop_size"], info.input_size[2]]
        if prep["crop_size"] else list(info.input_size),
        "preprocessing": prep,
        "param_count": param_count,
        "dropped_keys": [k for k in dropped if not k.endswith("num_batches_tracked")],
        "reference_top1": weights.top1 if weights else None,
        "reference_top5": weights.top5 if weights else None,
        "converted_with": {"zoo.convert": "strict", "jax": jax.__version__,
                           "flax": flax.__version__},
    }
    if weights and weights.note:
        card["note"] = weights.note
    return card
