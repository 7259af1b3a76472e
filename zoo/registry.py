"""The model registry: one name -> (factory, ModelInfo) table that every entry point reads.

A model family registers each variant with one call (or decorator) of `register_model`; research
code and the scripts use `create_model`, `list_models` and `model_info` and never import a model
class directly.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib
import pkgutil
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class TorchConversion:
    """What converting torchvision's weights needs beyond the generic name map (zoo.convert).

    Attributes:
      flatten_fc: linear layers that read a flattened C x H x W map, with (C, H, W): their
        input rows are permuted from torch's (c, h, w) flatten order to the zoo's (h, w, c).
      aux_prefixes: key prefixes of auxiliary classifiers (dropped only when asked).
      transform_input: torchvision's released weights expect `transform_input=True`.
      bn_epsilon: the BatchNorm epsilon torchvision uses, where it is not torch's 1e-5.
    """

    flatten_fc: tuple[tuple[str, tuple[int, int, int]], ...] = ()
    aux_prefixes: tuple[str, ...] = ()
    transform_input: bool = False
    bn_epsilon: float | None = None


@dataclasses.dataclass(frozen=True)
class FeatureInfo:
    """One stage map of a `features_only` model (timm's `feature_info` entry).

    Attributes:
      name: the zoo module whose output (after the activation that follows it) is the map, as
        named in the variable tree and by `zoo.feature_maps` ('bn1', 'layer1_2', 'features_22').
      channels: the map's channels.
      reduction: the stride of the map with respect to the input, nominal (unpadded 'valid'
        convolutions shrink the map a little more).
      torch_module: torchvision's module with the same output ('relu', 'layer1', 'features.22'),
        as timm names it; None where the family has no torch counterpart.
    """

    name: str
    channels: int
    reduction: int
    torch_module: str | None = None


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a model expects and what is known about it (timm's PretrainedCfg, in small).

    Attributes:
      name: registry name.
      family: model family (the file under zoo/models/).
      input_size: default input (H, W, C).
      num_classes: default number of classes.
      min_size: the smallest H (= W) the architecture accepts.
      mean, std: per-channel normalisation of [0, 1] pixels.
      resize_size, crop_size: evaluation preprocessing (resize shorter side, then centre crop);
        None where the dataset is already at input size.
      interpolation: resize method for evaluation.
      paper: the reference that defines the architecture.
      paper_top5_error: ImageNet top-5 error (%) the paper or the lecture notes report.
      torchvision_name: the torchvision builder with the same architecture, if any.
      conversion: how its torchvision weights convert (set with torchvision_name).
      timm_name: timm's model of the same architecture and state_dict layout, if any.
      aux_loss_weight: weight of auxiliary classifier losses in training (GoogLeNet: 0.3).
      feature_info: the stage maps `create_model(name, features_only=True)` returns, in order.
      head: the flax module paths ('/' between levels) of the classifier layers whose outputs
        are the class scores, the main one first: what fine-tuning re-initialises for another
        class count and what a linear probe trains (zoo.train.transfer).
    """

    name: str
    family: str
    input_size: tuple[int, int, int]
    num_classes: int
    min_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize_size: int | None = None
    crop_size: int | None = None
    interpolation: str = "bilinear"
    paper: str = ""
    paper_top5_error: float | None = None
    torchvision_name: str | None = None
    conversion: TorchConversion | None = None
    timm_name: str | None = None
    aux_loss_weight: float = 0.0
    feature_info: tuple[FeatureInfo, ...] = ()
    head: tuple[str, ...] = ()

    @property
    def top1(self) -> float | None:
        """ImageNet top-1 (%) of torchvision's first released weights (zoo.weights)."""
        from zoo.weights import default_weights

        return getattr(default_weights(self.name), "top1", None)

    @property
    def top5(self) -> float | None:
        """ImageNet top-5 (%) of torchvision's first released weights (zoo.weights)."""
        from zoo.weights import default_weights

        return getattr(default_weights(self.name), "top5", None)


@dataclasses.dataclass(frozen=True)
class _Entry:
    factory: Callable[..., nn.Module]
    info: ModelInfo


_REGISTRY: dict[str, _Entry] = {}
_loaded = False


def register_model(name: str, factory: Callable[..., nn.Module] | None = None, **info: Any):
    """Registers `factory` under `name`; usable as a call or as a decorator.

    `factory(num_classes=..., dtype=..., **overrides)` must return a flax Module. `info` holds
    the ModelInfo fields other than `name`. A duplicate name raises instead of overwriting.
    """

    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = _Entry(fn, ModelInfo(name=name, **info))
        return fn

    return add if factory is None else add(factory)


def _load_families() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        import zoo.models  # every module in zoo/models/ is a family and registers on import

        for family in pkgutil.iter_modules(zoo.models.__path__):
            importlib.import_module(f"zoo.models.{family.name}")


def _entry(name: str) -> _Entry:
    _load_families()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}{hint} (`python -m zoo list` shows all {len(_REGISTRY)})")
    return _REGISTRY[name]


def list_models(pattern: str = "*") -> list[str]:
    """Sorted registered names, optionally filtered by a shell pattern such as 'resnet*'."""
    _load_families()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def model_info(name: str) -> ModelInfo:
    """The ModelInfo of a registered model."""
    return _entry(name).info


def create_model(name: str, num_classes: int | None = None, *, dtype: Any = jnp.float32,
                 features_only: bool = False, out_indices=None, **overrides: Any) -> nn.Module:
    """Builds a registered model.

    Args:
      name: a name from `list_models()`.
      num_classes: size of the classifier; None for the model's default, 0 for no head (the
        model then returns pooled features).
      dtype: compute dtype (parameters stay float32; logits are float32).
      features_only: a backbone: the model returns the list of its NHWC stage maps
        (`model_info(name).feature_info`, in compute dtype) and has no head.
      out_indices: with `features_only`, the indices of the stages to return (default: all);
        the model stops after the last one.
      **overrides: architecture options of the model's module (e.g. `in_channels=1`).

    Raises:
      ValueError: unknown name, unknown option, or out_indices that name no stage.
    """
    entry = _entry(name)
    module_cls = getattr(entry.factory, "func", entry.factory)
    fields = {f.name for f in dataclasses.fields(module_cls)} \
        if dataclasses.is_dataclass(module_cls) else set()
    # the registry owns a model's name and smallest input; its input check reads them
    known = {k: v for k, v in (("arch", name), ("min_size", entry.info.min_size)) if k in fields}
    kwargs = dict(known, num_classes=entry.info.num_classes if num_classes is None
                  else num_classes, dtype=dtype, **overrides)
    if features_only:
        from zoo.features import check_out_indices

        kwargs.update(features_only=True, out_indices=check_out_indices(name, out_indices))
    elif out_indices is not None:
        raise ValueError(f"{name}: out_indices selects stage maps, which need features_only=True")
    try:
        return entry.factory(**kwargs)
    except TypeError as e:  # an unknown keyword: name the options the model has
        options = sorted(fields - {"parent", "name", "arch", "min_size"})
        raise ValueError(f"{name}: {e}; its options are {', '.join(options)}") from None


def abstract_variables(model: nn.Module, input_shape) -> dict:
    """The variable tree `model.init` makes for (1, H, W, C) float inputs, as shapes only
    (`jax.eval_shape`: nothing is computed or allocated). Runs the model's input check, so an
    input it cannot take raises its ValueError."""
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    return jax.eval_shape(lambda a: model.init(jax.random.key(0), a, train=False), x)


def param_count(variables: Any) -> int:
    """Number of parameters in `variables['params']` (arrays or shapes)."""
    return sum(int(np.prod(np.shape(a))) for a in jax.tree_util.tree_leaves(variables["params"]))


def variable_differences(want: Any, have: Any, needs: str = "the model needs"
                         ) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mis-shaped) of the variables `have` against the tree `want`
    (arrays or shapes), as '/'-joined paths, `want`'s order first; each mis-shaped entry gives
    both shapes ('params/fc/kernel is (64, 10), the model needs (64, 2)'). What every strict
    load reports."""
    from flax import traverse_util
    from flax.core import unfreeze

    flat = lambda tree: traverse_util.flatten_dict(unfreeze(tree), sep="/")
    want, have = flat(want), flat(have)
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    mismatched = [f"{k} is {tuple(np.shape(have[k]))}, {needs} {tuple(np.shape(w))}"
                  for k, w in want.items() if k in have and np.shape(have[k]) != np.shape(w)]
    return missing, unexpected, mismatched


def describe_differences(missing, unexpected, mismatched, limit: int = 10) -> str:
    """'1 missing: a; 2 unexpected: b, c' (the first `limit` of each kind)."""
    return "; ".join(f"{len(keys)} {kind}: {', '.join(keys[:limit])}"
                     + (", ..." if len(keys) > limit else "")
                     for kind, keys in (("missing", missing), ("unexpected", unexpected),
                                        ("mis-shaped", mismatched)) if keys)
