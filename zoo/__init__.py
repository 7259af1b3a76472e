"""zoo: the classic convolutional networks in JAX/Flax, with their training and weights."""

from pathlib import Path

from zoo.features import backbone_variables, feature_maps
from zoo.registry import (FeatureInfo, ModelInfo, create_model, list_models, model_info,
                          register_model)
from zoo.summary import summary

# The shipped checkpoints: the repository's checkpoints/ in a checkout or an editable install,
# zoo/shipped inside an installed wheel (pyproject.toml maps one to the other).
_HERE = Path(__file__).resolve().parent
CHECKPOINTS = next((p for p in (_HERE / "shipped", _HERE.parent / "checkpoints") if p.is_dir()),
                   _HERE / "shipped")


def pretrained_path(name_or_path: str) -> Path:
    """The directory of a shipped checkpoint name ('simple_cnn_fashion_mnist') or of a path
    (`python -m zoo convert` output, a train.py `--export` or workdir)."""
    from zoo.checkpoints import CheckpointError

    path = Path(name_or_path)
    if not path.exists() and (CHECKPOINTS / name_or_path).exists():
        path = CHECKPOINTS / name_or_path
    if not path.exists():
        shipped = sorted(p.name for p in CHECKPOINTS.glob("*") if p.is_dir())
        raise CheckpointError(f"no checkpoint {name_or_path!r}: not a directory, and not one "
                              f"of the shipped checkpoints ({', '.join(shipped) or 'none'})")
    return path


def load_pretrained(name_or_path: str):
    """(model, variables, info) of a shipped checkpoint name, an exported model or a workdir
    (see `pretrained_path`)."""
    from zoo.checkpoints import load_model

    model, variables, info, _ = load_model(pretrained_path(name_or_path))
    return model, variables, info


__all__ = ["CHECKPOINTS", "FeatureInfo", "ModelInfo", "backbone_variables", "create_model",
           "feature_maps", "list_models", "load_pretrained", "model_info", "pretrained_path",
           "register_model", "summary"]
