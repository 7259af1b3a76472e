"""torchvision weights -> zoo Flax variables: an explicit name map and a strict merge.

The map is the naming rule of CONTRIBUTING.md: a torch `state_dict` key is split at its dots, a
numeric part (an `nn.Sequential` index) joins the name before it with `_`, the other dots are
module boundaries. So `layer1.0.downsample.0.weight` is `layer1_0/downsample_0/kernel` and
`Mixed_5b.branch1x1.bn.running_mean` is `batch_stats/Mixed_5b/branch1x1/bn/mean`. Each tensor is
converted by its role, decided by the zoo model's own variable tree:

  conv `weight` (O, I, kH, kW)      -> `kernel` (kH, kW, I, O)          (OIHW -> HWIO)
  linear `weight` (out, in)         -> `kernel` (in, out)               (transposed)
  BatchNorm `weight` / `bias`       -> `scale` / `bias`
  BatchNorm `running_mean` / `_var` -> `batch_stats` `mean` / `var`
  BatchNorm `num_batches_tracked`   -> dropped (Flax does not count)

The rest is explicit, per family: the first FC layer after a flatten of a C x H x W map
(AlexNet's `classifier.1` from 6x6x256, VGG's `classifier.0` from 7x7x512, GoogLeNet's auxiliary
`fc1` from 4x4x128) has its input rows permuted once from torch's NCHW flatten order to the zoo's
NHWC order; GoogLeNet and Inception v3 are built with `transform_input=True` (torchvision's
weights expect it); the auxiliary classifiers are dropped only when asked (`drop_aux`). Every
zoo variable must be filled by exactly one tensor of the right shape and every tensor must be
used: anything else is one `ConversionError` listing all the keys that differ.

Files: `.pth`/`.pt`/`.bin` are read with `torch.load(weights_only=True)`, so a pickle that needs
code (a saved `nn.Module`, or anything malicious) is refused before anything runs;
`.safetensors` is read with `safetensors.numpy` and needs no torch at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from zoo.registry import IMAGENET_MEAN, IMAGENET_STD, ModelInfo, create_model, model_info

# ---------------------------------------------------------------- torch / torchvision


def import_torchvision():
    """`import torchvision`, also with a CPU torch wheel whose torchvision C++ ops do not load.

    torchvision's import registers fake kernels for its `nms`/`qnms` operators; with a torch
    build its extension does not match, the schemas are missing and the import fails. Declaring
    the two schemas first makes it work (only the detection ops are lost; the zoo needs none).
    With a matching torchvision install nothing is declared.
    """
    import torch

    if not hasattr(torch.ops.torchvision, "nms"):
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_torchvision._lib = lib  # the registration lives as long as this object
    import torchvision

    return torchvision


class ConversionError(ValueError):
    """A weight file that cannot be read, or whose tensors do not fit the zoo model exactly.

    `missing`, `unexpected` and `mismatched` hold every key that differs (torch names).
    """

    def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), \
            list(mismatched)


# ---------------------------------------------------------------- known torchvision files


@dataclasses.dataclass(frozen=True)
class TorchvisionWeights:
    """One of torchvision's released weight files and what its transforms/meta say."""

    model: str  # zoo (= torchvision) name
    name: str  # torchvision's enum, e.g. ResNet50_Weights.IMAGENET1K_V2
    file: str  # the download's file name; its hash part is the sha256's first 8 hex digits
    resize_size: int = 256
    crop_size: int = 224
    top1: float | None = None
    top5: float | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    note: str = ""

    @property
    def sha256_prefix(self) -> str:
        return self.file.rsplit("-", 1)[1].split(".")[0]


def _w(model, enum, file, top1, top5, resize=256, crop=224, **kw):
    return TorchvisionWeights(model, enum, file, resize, crop, top1, top5, **kw)


# From torchvision 0.28's weight enums (url, transforms, meta["_metrics"]).
KNOWN_WEIGHTS: tuple[TorchvisionWeights, ...] = (
    _w("alexnet", "AlexNet_Weights.IMAGENET1K_V1", "alexnet-owt-7be5be79.pth", 56.522, 79.066),
    _w("vgg11", "VGG11_Weights.IMAGENET1K_V1", "vgg11-8a719046.pth", 69.02, 88.628),
    _w("vgg11_bn", "VGG11_BN_Weights.IMAGENET1K_V1", "vgg11_bn-6002323d.pth", 70.37, 89.81),
    _w("vgg13", "VGG13_Weights.IMAGENET1K_V1", "vgg13-19584684.pth", 69.928, 89.246),
    _w("vgg13_bn", "VGG13_BN_Weights.IMAGENET1K_V1", "vgg13_bn-abd245e5.pth", 71.586, 90.374),
    _w("vgg16", "VGG16_Weights.IMAGENET1K_V1", "vgg16-397923af.pth", 71.592, 90.382),
    _w("vgg16", "VGG16_Weights.IMAGENET1K_FEATURES", "vgg16_features-amdegroot-88682ab5.pth",
       None, None, mean=(0.48235, 0.45882, 0.40784), std=(1 / 255, 1 / 255, 1 / 255),
       note="SSD backbone: the classifier holds no trained values (features only), and the "
            "input is 0-255 pixels minus the mean"),
    _w("vgg16_bn", "VGG16_BN_Weights.IMAGENET1K_V1", "vgg16_bn-6c64b313.pth", 73.36, 91.516),
    _w("vgg19", "VGG19_Weights.IMAGENET1K_V1", "vgg19-dcbb9e9d.pth", 72.376, 90.876),
    _w("vgg19_bn", "VGG19_BN_Weights.IMAGENET1K_V1", "vgg19_bn-c79401a0.pth", 74.218, 91.842),
    _w("googlenet", "GoogLeNet_Weights.IMAGENET1K_V1", "googlenet-1378be20.pth", 69.778, 89.53,
       note="the auxiliary classifiers in this file are untrained"),
    _w("inception_v3", "Inception_V3_Weights.IMAGENET1K_V1", "inception_v3_google-0cc3c7bd.pth",
       77.294, 93.45, resize=342, crop=299),
    _w("resnet18", "ResNet18_Weights.IMAGENET1K_V1", "resnet18-f37072fd.pth", 69.758, 89.078),
    _w("resnet34", "ResNet34_Weights.IMAGENET1K_V1", "resnet34-b627a593.pth", 73.314, 91.42),
    _w("resnet50", "ResNet50_Weights.IMAGENET1K_V1", "resnet50-0676ba61.pth", 76.13, 92.862),
    _w("resnet50", "ResNet50_Weights.IMAGENET1K_V2", "resnet50-11ad3fa6.pth", 80.858, 95.434,
       resize=232),
    _w("resnet101", "ResNet101_Weights.IMAGENET1K_V1", "resnet101-63fe2227.pth", 77.374, 93.546),
    _w("resnet101", "ResNet101_Weights.IMAGENET1K_V2", "resnet101-cd907fc2.pth", 81.886, 95.78,
       resize=232),
    _w("resnet152", "ResNet152_Weights.IMAGENET1K_V1", "resnet152-394f9c45.pth", 78.312, 94.046),
    _w("resnet152", "ResNet152_Weights.IMAGENET1K_V2", "resnet152-f82ba261.pth", 82.284, 96.002,
       resize=232),
    _w("wide_resnet50_2", "Wide_ResNet50_2_Weights.IMAGENET1K_V1", "wide_resnet50_2-95faca4d.pth",
       78.468, 94.086),
    _w("wide_resnet50_2", "Wide_ResNet50_2_Weights.IMAGENET1K_V2", "wide_resnet50_2-9ba9bcbe.pth",
       81.602, 95.758, resize=232),
    _w("resnext50_32x4d", "ResNeXt50_32X4D_Weights.IMAGENET1K_V1", "resnext50_32x4d-7cdf4587.pth",
       77.618, 93.698),
    _w("resnext50_32x4d", "ResNeXt50_32X4D_Weights.IMAGENET1K_V2", "resnext50_32x4d-1a0047aa.pth",
       81.198, 95.34, resize=232),
)


def recognise_weights(sha256: str, filename: str = "") -> TorchvisionWeights | None:
    """The torchvision release a file is, by its content hash or, failing that, its name.

    torchvision names each download `<name>-<first 8 hex digits of its sha256>.pth`, so a renamed
    copy is recognised by its hash; a file that only has a release's name (a `.safetensors`
    re-save, a fine-tuned copy) is recognised by its name, and `sha256_verified(w, sha256)` then
    says False (the model card records both).
    """
    for w in KNOWN_WEIGHTS:
        if sha256.startswith(w.sha256_prefix):
            return w
    stem = Path(filename).name.split(".")[0]
    for w in KNOWN_WEIGHTS:
        if stem and stem == w.file.split(".")[0]:
            return w
    return None


def sha256_verified(weights: TorchvisionWeights | None, sha256: str) -> bool:
    """Whether a file's hash is that of torchvision's release `weights`."""
    return weights is not None and sha256.startswith(weights.sha256_prefix)


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- the explicit part of the map

# Linear layers that read a flattened C x H x W map: their input rows are permuted from torch's
# (c, h, w) flatten order to the zoo's (h, w, c) order, once, here.
FLATTEN_FC: dict[str, dict[str, tuple[int, int, int]]] = {
    "alexnet": {"classifier.1": (256, 6, 6)},
    "vgg": {"classifier.0": (512, 7, 7)},
    "inception": {"aux1.fc1": (128, 4, 4), "aux2.fc1": (128, 4, 4)},  # GoogLeNet's aux heads
}
# Torch key prefixes of auxiliary classifiers (dropped only with drop_aux=True).
AUX_PREFIXES: dict[str, tuple[str, ...]] = {
    "googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}
# The classifier whose rows give the class count.
HEAD: dict[str, str] = {"alexnet": "classifier.6", "vgg": "classifier.6", "resnet": "fc",
                        "inception": "fc"}
# torchvision's weights for these models are used with transform_input=True.
TRANSFORM_INPUT = ("googlenet", "inception_v3")
# BatchNorm epsilon torchvision uses where it is not torch's default 1e-5.
BN_EPSILON = {"googlenet": 1e-3, "inception_v3": 1e-3}

_LEAF = {  # torch leaf name -> (collection, flax leaf) candidates, tried in order
    "weight": (("params", "kernel"), ("params", "scale")),
    "bias": (("params", "bias"),),
    "running_mean": (("batch_stats", "mean"),),
    "running_var": (("batch_stats", "var"),),
}
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}
# torchvision module names that are nn.Sequential (for naming missing keys in messages only)
_SEQUENTIAL = re.compile(r"^(features|classifier|layer\d+|downsample|branch\d)_(\d+)$")


def convertible_models() -> list[str]:
    """Zoo models with a torchvision counterpart (their weights convert one-to-one)."""
    from zoo.registry import list_models

    return [n for n in list_models() if model_info(n).torchvision_name]


def flax_module_path(torch_key: str) -> tuple[tuple[str, ...], str]:
    """('layer1_0', 'downsample_0'), 'weight' for 'layer1.0.downsample.0.weight'."""
    *parts, leaf = torch_key.split(".")
    modules: list[str] = []
    for p in parts:
        if p.isdigit() and modules:
            modules[-1] += f"_{p}"
        else:
            modules.append(p)
    return tuple(modules), leaf


def torch_key(flax_path: tuple[str, ...]) -> str:
    """The torch key a zoo variable comes from, e.g. 'layer1.0.conv1.weight' (for messages)."""
    *modules, leaf = flax_path[1:]
    return ".".join([_SEQUENTIAL.sub(r"\1.\2", m) for m in modules] + [_TORCH_LEAF.get(leaf, leaf)])


def _torch_shape(flax_leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape the torch tensor of a zoo variable has."""
    if flax_leaf == "kernel" and len(shape) == 4:
        h, w, i, o = shape
        return (o, i, h, w)
    if flax_leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def _to_flax(key: str, flax_leaf: str, value: np.ndarray, flatten: tuple[int, int, int] | None):
    value = np.asarray(value, np.float32)
    if flax_leaf != "kernel":
        return value
    if value.ndim == 4:  # OIHW -> HWIO
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    if flatten is not None:  # rows in torch's (c, h, w) order -> the zoo's (h, w, c) order
        c, h, w = flatten
        out = value.shape[0]
        if value.shape[1] != c * h * w:
            raise ConversionError(f"{key}: expected {c}x{h}x{w} = {c * h * w} inputs, "
                                  f"the file has {value.shape[1]}")
        return np.ascontiguousarray(value.reshape(out, c, h, w).transpose(2, 3, 1, 0)
                                    .reshape(h * w * c, out))
    return np.ascontiguousarray(value.T)


def _listing(kind: str, keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit]) + (f", ... and {len(keys) - limit} more" if len(keys) > limit
                                       else "")
    return f"{len(keys)} {kind} key{'s' if len(keys) != 1 else ''}: {shown}"


# ---------------------------------------------------------------- reading files


def read_state_dict(path) -> dict[str, np.ndarray]:
    """Tensors of a `.pth`/`.pt`/`.bin` (torch, weights_only) or `.safetensors` file as numpy.

    A torch file may hold the state_dict itself or a dict with it under 'state_dict' or 'model'
    (a training checkpoint). Raises ConversionError for unreadable files and for pickles that
    would need to run code, which are never executed.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"weight file {path} does not exist")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        return _read_torch(path)
    raise ConversionError(f"{path}: unknown weight format {path.suffix!r}; use a torch state_dict "
                          "(.pth, .pt) or a .safetensors file")


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise ConversionError(f"{path} is not a readable safetensors file ({type(e).__name__}: "
                              f"{_first_line(e)})") from None


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    import pickle

    try:
        import torch
    except ImportError:
        raise ConversionError(f"reading {path.name} needs torch (pip install 'zoo[torch]'); a "
                              ".safetensors copy of the weights needs no torch") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler stops at the first global it does not allow; nothing
        # of the file has run. Its message names that global. Other unpickling errors (an
        # unknown opcode, a truncated stream) mean the file is not a torch file at all.
        found = re.search(r"(Unsupported global: GLOBAL [\w.]+|Trying to [^\n.]*)", str(e))
        if not found:
            bad = re.search(r"Unsupported operand \d+", str(e))
            raise ConversionError(f"{path} is not a readable torch file (unpickling failed: "
                                  f"{bad.group(0) if bad else _first_line(e, 160)})") from None
        detail = found.group(1)
        raise ConversionError(
            f"{path} is refused: its pickle needs code to load ({detail}), and it was not run. "
            "Only a plain state_dict of tensors is read (torch.load weights_only=True); if you "
            "trust the file, load it yourself and re-save `model.state_dict()` with torch.save, "
            "or as .safetensors") from None
    except Exception as e:  # truncated zip, not a torch file, ...
        raise ConversionError(f"{path} is not a readable torch file ({type(e).__name__}: "
                              f"{_first_line(e)})") from None
    return state_dict_to_numpy(_unwrap(obj, path))


def _unwrap(obj: Any, path) -> Mapping:
    import torch

    def tensors(d):
        return isinstance(d, Mapping) and d and all(isinstance(v, torch.Tensor) for v in d.values())

    if tensors(obj):
        return obj
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if tensors(obj.get(key)):
                return obj[key]
        raise ConversionError(f"{path} holds a dict that is not a state_dict (top-level keys: "
                              f"{', '.join(map(str, list(obj)[:8]))})")
    raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state_dict")


def state_dict_to_numpy(state_dict: Mapping) -> dict[str, np.ndarray]:
    """{key: numpy array} from torch tensors (floats as float32) or arrays."""
    out = {}
    for k, v in state_dict.items():
        if hasattr(v, "detach"):  # a torch tensor
            v = v.detach().cpu()
            v = (v.float() if v.is_floating_point() else v).numpy()
        out[k] = np.asarray(v)
    return out


# ---------------------------------------------------------------- conversion


def converted_create_kwargs(name: str, state_dict: Mapping | None = None, *,
                            drop_aux: bool = False, transform_input: bool | None = None) -> dict:
    """`create_model` options that make the zoo model compute what torchvision's does.

    num_classes from the file's classifier; `transform_input=True` for GoogLeNet and
    Inception v3 (torchvision's released weights expect it; pass False for weights trained
    without it); `aux_logits=False` with `drop_aux`.
    """
    info = model_info(name)
    kwargs: dict[str, Any] = {}
    head = HEAD.get(info.family)
    weight = None if state_dict is None or head is None else state_dict.get(f"{head}.weight")
    kwargs["num_classes"] = int(weight.shape[0]) if weight is not None and np.ndim(weight) == 2 \
        else info.num_classes
    if name in TRANSFORM_INPUT:
        kwargs["transform_input"] = True if transform_input is None else transform_input
    elif transform_input:
        raise ConversionError(f"{name} has no transform_input option")
    if drop_aux:
        if name not in AUX_PREFIXES:
            raise ConversionError(f"{name} has no auxiliary classifiers to drop (drop_aux is for "
                                  f"{' and '.join(AUX_PREFIXES)})")
        kwargs["aux_logits"] = False
    return kwargs


def _abstract_variables(model, info: ModelInfo) -> dict:
    import jax

    x = jax.ShapeDtypeStruct((1, *info.input_size), np.float32)
    return jax.eval_shape(lambda a: model.init(jax.random.key(0), a, train=False), x)


def convert_state_dict(name: str, state_dict: Mapping[str, Any], *, drop_aux: bool = False,
                       transform_input: bool | None = None) -> tuple[dict, dict, list[str]]:
    """Converts a torchvision state_dict (numpy arrays or tensors) for zoo model `name`.

    Returns:
      (variables, create_kwargs, dropped): {'params', 'batch_stats'} of numpy float32 arrays,
      the `create_model` options they are for, and the source keys left out on purpose
      (auxiliary classifiers with drop_aux, num_batches_tracked).
    Raises:
      ConversionError: listing every missing, unexpected and mis-shaped key.
    """
    from flax import traverse_util

    state_dict = state_dict_to_numpy(state_dict)
    kwargs = converted_create_kwargs(name, state_dict, drop_aux=drop_aux,
                                     transform_input=transform_input)
    model = create_model(name, **kwargs)
    info = model_info(name)
    if name in BN_EPSILON and getattr(model, "bn_epsilon", None) != BN_EPSILON[name]:
        raise ConversionError(f"{name} is built with BatchNorm epsilon "
                              f"{getattr(model, 'bn_epsilon', None)}; torchvision's weights "
                              f"need {BN_EPSILON[name]}")
    expected = {k: tuple(v.shape) for k, v in
                traverse_util.flatten_dict(_abstract_variables(model, info)).items()}
    flatten_rules = FLATTEN_FC.get(info.family, {})
    aux = AUX_PREFIXES.get(name, ())

    filled: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, mismatched, dropped = [], [], []
    for key, value in state_dict.items():
        if drop_aux and key.startswith(aux):
            dropped.append(key)
            continue
        modules, leaf = flax_module_path(key)
        if leaf == "num_batches_tracked" and ("batch_stats", *modules, "mean") in expected:
            dropped.append(key)
            continue
        target = next((p for c, fl in _LEAF.get(leaf, ()) if (p := (c, *modules, fl)) in expected),
                      None)
        if target is None:
            unexpected.append(key)
            continue
        want = _torch_shape(target[-1], expected[target])
        if tuple(value.shape) != want:
            mismatched.append(f"{key} is {tuple(value.shape)}, {name} needs {want}")
            continue
        filled[target] = _to_flax(key, target[-1], value, flatten_rules.get(key.rsplit(".", 1)[0]))
    missing = [torch_key(p) for p in expected if p not in filled]
    if missing or unexpected or mismatched:
        parts = [_listing(kind, keys) for kind, keys in
                 (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched))
                 if keys]
        hints = []
        if missing and aux and all(k.startswith(aux) for k in missing) and not unexpected:
            hints.append(f"the file has no auxiliary-classifier weights: pass drop_aux=True "
                         f"(--drop-aux) to build {name} without them")
        if unexpected and all(k.startswith("module.") for k in unexpected):
            hints.append("the keys start with 'module.' (saved from DataParallel): save "
                         "`model.module.state_dict()` instead")
        elif missing and unexpected and len(unexpected) > len(state_dict) // 2:
            hints.append(f"is this a state_dict of another model than {name}?")
        if aux and not drop_aux and unexpected and all(k.startswith(aux) for k in unexpected):
            hints.append("the file has auxiliary classifiers the model lacks")
        raise ConversionError(
            f"{name}: the weights do not fit (strict conversion): " + "; ".join(parts)
            + "".join(f" ({h})" for h in hints), missing, unexpected, mismatched)
    return traverse_util.unflatten_dict(filled), kwargs, dropped


def load_torchvision(name: str, path, *, drop_aux: bool = False) -> dict:
    """Flax variables of zoo model `name` from a torchvision `.pth`/`.pt`/`.safetensors` file.

    The variables are for `zoo.create_model(name, **converted_create_kwargs(...))`:
    GoogLeNet and Inception v3 must be built with `transform_input=True` to reproduce
    torchvision's logits (`load_torchvision_model` builds the model for you).

    Args:
      name: a zoo model with a torchvision counterpart (`convertible_models()`).
      path: the weight file.
      drop_aux: leave out the auxiliary classifiers of googlenet/inception_v3 (the model is then
        built with `aux_logits=False`); without it, aux weights are required.
    Returns:
      {'params': ..., 'batch_stats': ...} (numpy float32 arrays).
    Raises:
      ConversionError (a ValueError): unreadable or refused file, or any missing, unexpected or
        mis-shaped key (all listed).
    """
    return load_torchvision_model(name, path, drop_aux=drop_aux)[1]


def load_torchvision_model(name: str, path, *, drop_aux: bool = False,
                           transform_input: bool | None = None):
    """(model, variables, create_kwargs, dropped_keys) of a torchvision weight file."""
    variables, kwargs, dropped = convert_state_dict(name, read_state_dict(path),
                                                    drop_aux=drop_aux,
                                                    transform_input=transform_input)
    return create_model(name, **kwargs), variables, kwargs, dropped


def torchvision_state_dict(name: str, variables: Mapping) -> dict[str, np.ndarray]:
    """The inverse of `convert_state_dict`: zoo variables -> torchvision's state_dict (numpy).

    HWIO -> OIHW, Dense kernels transposed back, the flatten permutations undone, and a
    `num_batches_tracked` (0) added per BatchNorm, so that torchvision's
    `model.load_state_dict({k: torch.from_numpy(v) ...})` accepts it strictly.
    """
    from flax import traverse_util

    info = model_info(name)
    flatten_rules = FLATTEN_FC.get(info.family, {})
    out: dict[str, np.ndarray] = {}
    for path, value in traverse_util.flatten_dict(dict(variables)).items():
        key, leaf = torch_key(path), path[-1]
        value = np.asarray(value, np.float32)
        if leaf == "kernel" and value.ndim == 4:  # HWIO -> OIHW
            value = value.transpose(3, 2, 0, 1)
        elif leaf == "kernel":
            flatten = flatten_rules.get(key.rsplit(".", 1)[0])
            if flatten is not None:  # rows in (h, w, c) order -> torch's (c, h, w)
                c, h, w = flatten
                value = value.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(-1, c * h * w)
            else:
                value = value.T
        out[key] = np.ascontiguousarray(value)
        if leaf == "mean":
            out[key.rsplit(".", 1)[0] + ".num_batches_tracked"] = np.zeros((), np.int64)
    return out


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


def model_card(name: str, path, sha256: str, kwargs: dict, dropped: list[str],
               param_count: int) -> dict:
    """The card `python -m zoo convert` writes next to the variables."""
    import flax
    import jax

    info = model_info(name)
    weights = recognise_weights(sha256, Path(path).name)
    card = {
        "source": {"file": Path(path).name, "path": str(Path(path).absolute()),
                   "sha256": sha256, "format": Path(path).suffix.lstrip("."),
                   "torchvision_model": info.torchvision_name,
                   "torchvision_weights": weights.name if weights else None,
                   "sha256_matches_release": sha256_verified(weights, sha256)},
        "image_size": list(info.input_size),
        "preprocessing": preprocessing(info, weights),
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


def param_count(variables: Mapping) -> int:
    import jax

    return sum(int(np.prod(np.shape(a))) for a in jax.tree_util.tree_leaves(variables["params"]))


def cli(argv: list[str]) -> int:
    """`python -m zoo convert NAME --from FILE --out DIR [--drop-aux]`"""
    parser = argparse.ArgumentParser(
        prog="python -m zoo convert",
        description="Convert a torchvision state_dict (.pth/.pt/.safetensors) to an exported zoo "
                    "checkpoint (Orbax variables/ + model_card.json), strictly.")
    parser.add_argument("model", help="zoo model name, e.g. resnet50")
    parser.add_argument("--from", dest="source", required=True, help="torchvision weight file")
    parser.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    parser.add_argument("--drop-aux", action="store_true",
                        help="leave out googlenet/inception_v3's auxiliary classifiers")
    parser.add_argument("--no-transform-input", action="store_true",
                        help="googlenet/inception_v3 weights trained without transform_input")
    args = parser.parse_args(argv)
    try:
        from zoo.checkpoints import save_model

        model, variables, kwargs, dropped = load_torchvision_model(
            args.model, args.source, drop_aux=args.drop_aux,
            transform_input=False if args.no_transform_input else None)
        count = param_count(variables)
        card = model_card(args.model, args.source, file_sha256(args.source), kwargs, dropped,
                          count)
        save_model(args.out, model_name=args.model, variables=variables, card=card,
                   create_kwargs=kwargs)
    except (ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    known = card["source"]["torchvision_weights"]
    print(json.dumps({"model": args.model, "out": str(Path(args.out).absolute()),
                      "param_count": count, "torchvision_weights": known,
                      "create_kwargs": kwargs}))
    return 0


# ---------------------------------------------------------------- parity with torchvision


def torchvision_model(name: str, *, seed: int = 0, num_classes: int | None = None,
                      aux_logits: bool = True, calibrate: bool = True,
                      calibration_input: np.ndarray | None = None):
    """torchvision's `name` with random weights, in eval mode, every tensor informative.

    Beyond torchvision's init, BatchNorm scale/bias/running stats and every bias are random, so
    a parity check tests their conversion too (torch's init leaves them 1/0 and identity); with
    `calibrate`, the running statistics of the BatchNorms on the main path are then set from
    their inputs on `calibration_input` (NHWC; default a random batch), which keeps every
    layer's output of order one, as in a trained network.
    GoogLeNet/Inception v3 have `transform_input=True`, as with torchvision's released weights.
    """
    import torch

    tv = import_torchvision()
    info = model_info(name)
    kwargs: dict[str, Any] = {"num_classes": num_classes or info.num_classes}
    if name in TRANSFORM_INPUT:
        kwargs.update(aux_logits=aux_logits, transform_input=True, init_weights=True)
    torch.manual_seed(seed)
    model = tv.models.get_model(info.torchvision_name, weights=None, **kwargs).eval()
    g = torch.Generator().manual_seed(seed + 1)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in norms:
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
                m.bias.copy_(0.05 * torch.randn(m.bias.shape, generator=g))
        if calibrate and norms:
            # each BN's running stats from its actual input on one batch: var := the per-channel
            # second moment plus the layer's mean second moment, mean := small noise on that
            # scale. Outputs are then of order one, with no cancellation and no channel
            # amplified: batch mean/var would divide near-constant channels by ~0, random stats
            # let deep nets' logits reach 1e9, and a small floor leaves the channels of a
            # 1x1 map (2 samples) amplifying float32 rounding ~2x a layer (resnet152: torch
            # float32 vs float64 differ by 2e-3 relative with a 0.1 floor, 2e-5 with this one).
            # The aux heads do not run in eval mode and keep the random stats above.
            def set_stats(m, inputs):
                second = inputs[0].double().square().mean(dim=(0, 2, 3))
                typical = second.mean()
                m.running_var.copy_(second + typical + 1e-3)
                m.running_mean.copy_(0.1 * typical.sqrt() * torch.randn(
                    m.running_mean.shape, generator=g, dtype=torch.float64))

            if calibration_input is None:
                x = torch.randn((4, 3, info.min_size, info.min_size), generator=g)
            else:
                x = torch.from_numpy(np.ascontiguousarray(calibration_input.transpose(0, 3, 1, 2)))
            hooks = [m.register_forward_pre_hook(set_stats) for m in norms]
            model(x)
            for h in hooks:
                h.remove()
    return model


def logits_parity(name: str, *, size: int | None = None, batch: int = 2, seed: int = 0,
                  tv_model=None) -> dict:
    """Max abs difference of the zoo's and torchvision's float32 eval logits on one random batch.

    The torchvision model (random, see `torchvision_model`, BatchNorm statistics calibrated on
    the input) is converted through `convert_state_dict`; the input is N(0, 1) NHWC of `size`
    (default: the smallest the model accepts). Returns {'model', 'input', 'max_abs_diff', 'logit_scale', 'relative'} where
    relative = max_abs_diff / max |torch logit|.
    """
    import jax
    import torch

    size = size or model_info(name).min_size
    x = np.random.default_rng(seed).standard_normal((batch, size, size, 3), np.float32)
    if tv_model is None:
        tv_model = torchvision_model(name, seed=seed, calibration_input=x)
    variables, kwargs, _ = convert_state_dict(name, tv_model.state_dict())
    with torch.no_grad():
        ref = tv_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    model = create_model(name, **kwargs)
    out = np.asarray(jax.jit(lambda v, a: model.apply(v, a, train=False))(variables, x))
    diff = float(np.abs(out - ref).max())
    scale = float(np.abs(ref).max())
    return {"model": name, "input": [batch, size, size, 3], "max_abs_diff": diff,
            "logit_scale": scale, "relative": diff / scale}
