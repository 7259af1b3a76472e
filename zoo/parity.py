"""Parity with torchvision: its models with random, informative weights, and the logit
difference of the zoo's conversion of them (the tests and benchmarks/parity.py use these)."""

from __future__ import annotations

from typing import Any

import numpy as np

from zoo.convert import convert_state_dict
from zoo.registry import create_model, model_info


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


def torchvision_model(name: str, *, seed: int = 0, num_classes: int | None = None,
                      aux_logits: bool = True, calibrate: bool = True,
                      calibration_input: np.ndarray | None = None):
    """torchvision's `name` with random weights, in eval mode, every tensor informative.

    The weights are made `informative`. GoogLeNet/Inception v3 have `transform_input=True`, as with torchvision's released weights.
    """
    import torch

    tv = import_torchvision()
    info = model_info(name)
    kwargs: dict[str, Any] = {"num_classes": num_classes or info.num_classes}
    if info.conversion.transform_input:
        kwargs.update(aux_logits=aux_logits, transform_input=True, init_weights=True)
    torch.manual_seed(seed)
    model = tv.models.get_model(info.torchvision_name, weights=None, **kwargs).eval()
    return informative(model, info.min_size, seed=seed, calibrate=calibrate,
                       calibration_input=calibration_input)


def timm_model(name: str, *, seed: int = 0, num_classes: int | None = None,
               calibrate: bool = True, calibration_input: np.ndarray | None = None):
    """timm's architecture `ModelInfo.timm_name` with random weights, made informative as
    `torchvision_model`'s (timm's ResNets share torchvision's state_dict layout)."""
    import torch

    import_torchvision()  # timm imports torchvision
    import timm

    info = model_info(name)
    if info.timm_name is None:
        raise ValueError(f"{name} has no timm twin of the same architecture")
    torch.manual_seed(seed)
    model = timm.create_model(info.timm_name, pretrained=False,
                              num_classes=num_classes or info.num_classes).eval()
    return informative(model, info.min_size, seed=seed, calibrate=calibrate,
                       calibration_input=calibration_input)


def informative(model, min_size: int, *, seed: int = 0, calibrate: bool = True,
                calibration_input: np.ndarray | None = None):
    """`model` (a torch module in eval mode) with random BatchNorm scale/bias/running
    statistics and biases, so that a parity check tests their conversion too (torch's init
    leaves them 1/0 and identity); with `calibrate`, the running statistics of the BatchNorms
    on the main path are then set from their inputs on `calibration_input` (NHWC; default a
    random batch of `min_size` images), which keeps every layer's output of order one."""
    import torch

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
                x = torch.randn((4, 3, min_size, min_size), generator=g)
            else:
                x = torch.from_numpy(np.ascontiguousarray(calibration_input.transpose(0, 3, 1, 2)))
            hooks = [m.register_forward_pre_hook(set_stats) for m in norms]
            model(x)
            for h in hooks:
                h.remove()
    return model


def logits_parity(name: str, *, size: int | None = None, batch: int = 2, seed: int = 0,
                  tv_model=None, source: str = "torchvision") -> dict:
    """Max abs difference of the zoo's and torchvision's (or timm's) float32 eval logits on one
    random batch.

    The torch model (random, see `torchvision_model` / `timm_model` for `source` 'timm',
    BatchNorm statistics calibrated on the input) is converted through `convert_state_dict`; the input is N(0, 1) NHWC of `size`
    (default: the smallest the model accepts). Returns {'model', 'input', 'max_abs_diff', 'logit_scale', 'relative'} where
    relative = max_abs_diff / max |torch logit|.
    """
    import jax
    import torch

    size = size or model_info(name).min_size
    x = np.random.default_rng(seed).standard_normal((batch, size, size, 3), np.float32)
    if tv_model is None:
        build = {"torchvision": torchvision_model, "timm": timm_model}[source]
        tv_model = build(name, seed=seed, calibration_input=x)
    variables, kwargs, _ = convert_state_dict(name, tv_model.state_dict())
    with torch.no_grad():
        ref = tv_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    model = create_model(name, **kwargs)
    from zoo import parallel

    out = np.asarray(parallel.jit(lambda v, a: model.apply(v, a, train=False),
                                  jax.devices()[:1])(variables, x))
    diff = float(np.abs(out - ref).max())
    scale = float(np.abs(ref).max())
    return {"model": name, "input": [batch, size, size, 3], "max_abs_diff": diff,
            "logit_scale": scale, "relative": diff / scale}
