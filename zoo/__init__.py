"""zoo: the classic convolutional networks in JAX/Flax, with their training and weights."""

from pathlib import Path

from zoo.features import backbone_variables, feature_maps
from zoo.registry import (FeatureInfo, ModelInfo, create_model, list_models, model_info,
                          register_model)
from zoo.summary import summary

CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"


def load_pretrained(name_or_path: str):
    """(model, variables, info) of a shipped checkpoint name, an exported model or a workdir.

    `name_or_path` is a directory (`python -m zoo convert` output, a train.py `--export` or
    workdir) or the name of one in the repository's checkpoints/ ('simple_cnn_fashion_mnist').
    """
    from zoo.checkpoints import CheckpointError, load_model

    path = Path(name_or_path)
    if not path.exists() and (CHECKPOINTS / name_or_path).exists():
        path = CHECKPOINTS / name_or_path
    if not path.exists():
        shipped = sorted(p.name for p in CHECKPOINTS.glob("*") if p.is_dir())
        raise CheckpointError(f"no checkpoint {name_or_path!r}: not a directory, and not one "
                              f"of the shipped checkpoints ({', '.join(shipped) or 'none'})")
    model, variables, info, _ = load_model(path)
    return model, variables, info


__all__ = ["FeatureInfo", "ModelInfo", "backbone_variables", "create_model", "feature_maps",
           "list_models", "load_pretrained", "model_info", "register_model", "summary"]
