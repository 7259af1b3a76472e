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

The rest is explicit, per family, and registered beside each model (`ModelInfo.conversion`,
a `zoo.registry.TorchConversion`): the first FC layer after a flatten of a C x H x W map
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

import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from zoo.errors import first_line
from zoo.registry import TorchConversion, abstract_variables, create_model, model_info

class ConversionError(ValueError):
    """A weight file that cannot be read, or whose tensors do not fit the zoo model exactly.

    `missing`, `unexpected` and `mismatched` hold every key that differs (torch names).
    """

    def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), \
            list(mismatched)


# ---------------------------------------------------------------- the generic map

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
        raise ConversionError(f"{path} is not a readable safetensors file ("
                              f"{first_line(e)})") from None


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
                                  f"{bad.group(0) if bad else first_line(e, 160)})") from None
        detail = found.group(1)
        raise ConversionError(
            f"{path} is refused: its pickle needs code to load ({detail}), and it was not run. "
            "Only a plain state_dict of tensors is read (torch.load weights_only=True); if you "
            "trust the file, load it yourself and re-save `model.state_dict()` with torch.save, "
            "or as .safetensors") from None
    except Exception as e:  # truncated zip, not a torch file, ...
        raise ConversionError(f"{path} is not a readable torch file ("
                              f"{first_line(e)})") from None
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


def _hints(name: str) -> TorchConversion:
    """The family's conversion hints (ModelInfo.conversion, registered beside the model)."""
    hints = model_info(name).conversion
    if hints is None:
        raise ConversionError(f"{name} has no torchvision counterpart; convertible models: "
                              f"{', '.join(convertible_models())}")
    return hints


def converted_create_kwargs(name: str, state_dict: Mapping | None = None, *,
                            drop_aux: bool = False, transform_input: bool | None = None) -> dict:
    """`create_model` options that make the zoo model compute what torchvision's does.

    num_classes from the file's classifier; `transform_input=True` for GoogLeNet and
    Inception v3 (torchvision's released weights expect it; pass False for weights trained
    without it); `aux_logits=False` with `drop_aux`.
    """
    hints = _hints(name)
    kwargs: dict[str, Any] = {}
    head = torch_key(("params", *model_info(name).head[0].split("/"), "kernel"))
    weight = None if state_dict is None else state_dict.get(head)
    kwargs["num_classes"] = int(weight.shape[0]) if weight is not None and np.ndim(weight) == 2 \
        else model_info(name).num_classes
    if hints.transform_input:
        kwargs["transform_input"] = True if transform_input is None else transform_input
    elif transform_input:
        raise ConversionError(f"{name} has no transform_input option")
    if drop_aux:
        if not hints.aux_prefixes:
            with_aux = [n for n in convertible_models() if _hints(n).aux_prefixes]
            raise ConversionError(f"{name} has no auxiliary classifiers to drop (drop_aux is for "
                                  f"{' and '.join(with_aux)})")
        kwargs["aux_logits"] = False
    return kwargs


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
    hints = _hints(name)
    if hints.bn_epsilon is not None and getattr(model, "bn_epsilon", None) != hints.bn_epsilon:
        raise ConversionError(f"{name} is built with BatchNorm epsilon "
                              f"{getattr(model, 'bn_epsilon', None)}; torchvision's weights "
                              f"need {hints.bn_epsilon}")
    expected = {k: tuple(v.shape) for k, v in
                traverse_util.flatten_dict(abstract_variables(model, info.input_size)).items()}
    flatten_rules = dict(hints.flatten_fc)
    aux = hints.aux_prefixes

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

    flatten_rules = dict(_hints(name).flatten_fc)
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


