"""Throughput, compile time and MFU of a zoo model, measured side by side with torchvision.

`python -m zoo bench MODEL [--mode train|infer] [--batch-size N] [--dtype D] [--steps N]
[--image-size S] [--against torch] ...` prints one JSON object (its fields are relied on
outside: keep them).

How it measures (the same for the zoo and for torch):
  * synthetic data made once on the device (images ~ N(0, 1) NHWC float32, random labels), so
    the input pipeline is not measured (`python -m zoo data` measures that);
  * one compiled step function: the zoo's `zoo.training.train_step` (the only train step of the
    project) or `model.apply(..., train=False)` for inference, jitted with the train state
    donated; torch's model eager and under `torch.compile`, channels_last, bf16 autocast on GPU;
  * the first call (trace + compile + one step) gives `compile_s` (minus one steady step);
    `--warmup` more steps are excluded, then `--windows` windows of `--steps` steps each run with
    no host sync inside the window (metrics stay on the device) and one `block_until_ready`
    (torch: `cuda.synchronize`) at its end; `step_ms` is the median window / steps;
  * FLOPs are analytic (`zoo.summary`: multiply-adds x 2 of every conv/dense layer, forward, per
    image), because XLA's cost analysis does not see inside cuDNN convolutions; a train step
    counts 3x the forward (forward + backward w.r.t. activations and weights);
    `tflops = images_per_sec * step_flops_per_image / 1e12` and `mfu = tflops / peak`, the peak
    from `--peak-tflops` or the dense tensor-core table `PEAK_TFLOPS` (None on CPU unless given).

With `--against torch` torchvision's model is built and compiled first, then the zoo's, and
their timed windows are interleaved (zoo, torch eager, torch.compile, zoo, ...), so that a
machine shared with other work slows each alike; `ratio_vs_torch_*` (zoo / torch images/s) is
the median of the per-window ratios. JAX's GPU preallocation is switched off for such a run so
both fit one GPU. On CPU `torch.compile` is skipped unless `--torch-compile on`: Inductor needs
tens of seconds to minutes of C++ compilation per model on a 2-core machine, over the bench's
budget; the JSON says so (`torch.compile_note`). Where the zoo's CPU convolutions are
oneDNN's, torch's windows run in a child process (`torch_timers_apart`; `torch.process`
says which): oneDNN's OpenMP threads would share torch's OpenMP runtime (libgomp, loaded once
per process), whose threads then outnumber the cores, and libgomp then stops spinning between
parallel regions, which slowed torch eager's small ops by up to 40% here.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

# Dense (no sparsity) tensor-core peaks in TFLOP/s, by a substring of `device_kind` (first match
# wins, so the more specific names come first) and compute dtype. float32 on these GPUs runs as
# TF32 (XLA's default precision; torch is set to match with `set_float32_matmul_precision`).
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bfloat16": 989.0, "float16": 989.0, "float32": 494.0}),
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "float32": 378.0}),
    ("H100", {"bfloat16": 989.0, "float16": 989.0, "float32": 494.0}),  # SXM
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0}),
    ("TPU v5p", {"bfloat16": 459.0}),
    ("TPU v5 lite", {"bfloat16": 197.0}),
    ("TPU v4", {"bfloat16": 275.0}),
]

_DTYPES = ("float32", "bfloat16", "float16")


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """The table's dense peak for a device kind and compute dtype, or None when unknown."""
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None


def flops_per_image(name: str, input_shape: tuple[int, int, int] | None = None,
                    num_classes: int | None = None) -> int:
    """Analytic forward FLOPs (multiply-adds x 2) of one image, from `zoo.summary`."""
    from zoo.summary import summary

    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    return summary(name, input_shape, **kwargs).total_flops


# ------------------------------------------------------------------------------- timing


class Timer:
    """Times one compiled step function that carries its own state.

    `start()` makes the first call (trace + compile + one step: `compile_s` is that minus one
    steady step), then `warmup` synced calls, the last of which estimates the step time, from
    which `steps=None` picks the steps per window that fill about `target_window_s`. Each
    `window()` then runs `steps` calls with no host sync among them and one `sync` at the end.
    Several Timers' windows are interleaved by `run` so that a machine shared with other work
    slows every contender alike, instead of whichever ran during a busy spell.
    """

    def __init__(self, label: str, step: Callable[[], Any], sync: Callable[[Any], Any]):
        self.label, self.step, self.sync = label, step, sync
        self.times: list[float] = []
        self.first_s = self.steps = None

    def start(self, steps: int | None, warmup: int, target_window_s: float) -> "Timer":
        t0 = time.perf_counter()
        self.sync(self.step())
        self.first_s = est = time.perf_counter() - t0
        for _ in range(max(warmup, 1 if steps is None else 0)):
            t0 = time.perf_counter()
            self.sync(self.step())
            est = time.perf_counter() - t0
        self.steps = steps or int(min(max(round(target_window_s / max(est, 1e-6)), 1), 1000))
        return self

    def window(self) -> float:
        t0 = time.perf_counter()
        out = None
        for _ in range(self.steps):
            out = self.step()
        self.sync(out)
        self.times.append((time.perf_counter() - t0) / self.steps)
        return self.times[-1]

    @property
    def step_s(self) -> float:
        return statistics.median(self.times)

    def summary(self, batch_size: int, step_flops: float | None,
                peak: float | None) -> dict[str, Any]:
        return dict(**_rates(batch_size, self.step_s, step_flops, peak),
                    best_step_ms=round(min(self.times) * 1e3, 4),
                    compile_s=round(max(self.first_s - self.step_s, 0.0), 3),
                    steps_per_window=self.steps, windows=len(self.times),
                    window_step_ms=[round(t * 1e3, 4) for t in self.times])


def emit(record: dict, output: str | None = None) -> None:
    """Prints `record` as one JSON line, and appends it to the JSONL file `output` if given."""
    line = json.dumps(record)
    print(line, flush=True)
    if output:
        with open(output, "a") as f:
            f.write(line + "\n")


def interleave(timers: list[Timer], windows: int) -> None:
    """Runs `windows` rounds of one window of each started Timer in turn (a, b, a, b, ...)."""
    for _ in range(windows):
        for t in timers:
            t.window()


def speed_ratio(base: Timer, other: Timer) -> float:
    """Median of the per-window `other` / `base` speeds of interleaved windows: robust to a
    busy spell, which slows the two windows of a round alike."""
    return round(statistics.median(b / o for b, o in zip(base.times, other.times)), 4)


def _rates(batch_size: int, step_s: float, step_flops: float | None,
           peak: float | None) -> dict[str, Any]:
    ips = batch_size / step_s
    tflops = None if step_flops is None else ips * step_flops / 1e12
    sig = lambda v: float(f"{v:.5g}")
    return dict(images_per_sec=round(ips, 2), step_ms=round(step_s * 1e3, 4),
                tflops=None if tflops is None else sig(tflops),
                mfu=None if tflops is None or not peak else sig(tflops / peak))


# ------------------------------------------------------------------------------- zoo / JAX


def zoo_timer(name: str, mode: str, batch_size: int, dtype: str, input_shape, num_classes,
              donate: bool = True, remat: bool = False, seed: int = 0, devices=None):
    """A Timer of the zoo's compiled train step or forward pass on synthetic on-device data.

    Train mode compiles the project's one `zoo.training.train_step` exactly as the training loop
    does (`parallel.jit_step`: state replicated and donated, batch split over the mesh axis
    'data'), with SGD + momentum 0.9 (as the torch side) and the model's aux-loss weight.
    `remat` wraps the state's `apply_fn` in `jax.checkpoint` (the whole forward is recomputed
    in the backward pass: activation memory for compute), since the train step has no such
    option of its own. `devices` (default: all) are the mesh's. Returns (timer, devices).
    """
    import jax
    import jax.numpy as jnp
    import optax

    import zoo
    from zoo import parallel

    devices = list(devices or jax.devices())
    if batch_size % len(devices):
        raise ValueError(f"--batch-size {batch_size} is not divisible by the {len(devices)} "
                         "devices")
    mesh = parallel.make_mesh(devices)
    replicated, split = parallel.shardings(mesh)
    model = zoo.create_model(name, num_classes=num_classes, dtype=jnp.dtype(dtype))

    def synthetic_batch():
        k_img, k_lab = jax.random.split(jax.random.key(seed))
        return {"image": jax.random.normal(k_img, (batch_size, *input_shape), jnp.float32),
                "label": jax.random.randint(k_lab, (batch_size,), 0, max(num_classes, 1)),
                "mask": jnp.ones((batch_size,), bool)}

    # batch and state are made by one compiled program (every extra compile costs seconds on
    # a busy 2-core machine)
    if mode == "train":
        from zoo import training

        recipe = training.Recipe("momentum", lr=0.1)
        tx = training.make_optimizer(recipe, optax.constant_schedule(recipe.lr))
        batch, state = jax.jit(
            lambda: (synthetic_batch(), training.create_train_state(model, tx, input_shape, seed)),
            out_shardings=(split, replicated))()
        if remat:
            state = state.replace(apply_fn=_remat(model.apply))
        step_cfg = training.StepConfig(aux_loss_weight=zoo.model_info(name).aux_loss_weight)
        jitted = parallel.jit_step(functools.partial(training.train_step, config=step_cfg),
                                   mesh, donate=donate)
        carry = {"state": state}

        def step():  # metrics stay on the device: no host sync inside a window
            carry["state"], metrics = jitted(carry["state"], batch)
            return carry["state"], metrics
    else:
        sample = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
        batch, variables = jax.jit(lambda: (synthetic_batch(), model.init(
            jax.random.key(seed + 1), jnp.zeros(sample.shape, sample.dtype), train=False)),
            out_shardings=(split, replicated))()
        jitted = parallel.jit(lambda v, x: model.apply(v, x, train=False), devices,
                              in_shardings=(replicated, split), out_shardings=split)

        def step():
            return jitted(variables, batch["image"])

    return Timer("zoo", step, jax.block_until_ready), devices


def _remat(apply: Callable) -> Callable:
    """`apply` with its forward pass under `jax.checkpoint` (only the inputs are saved)."""
    import jax

    def remat_apply(variables, x, **kwargs):
        return jax.checkpoint(lambda v, a: apply(v, a, **kwargs))(variables, x)

    return remat_apply


def _jax_peak_memory(devices) -> int | None:
    """Largest `peak_bytes_in_use` over the devices, where the backend reports it."""
    stats = [d.memory_stats() or {} for d in devices]
    peaks = [s["peak_bytes_in_use"] for s in stats if "peak_bytes_in_use" in s]
    return max(peaks) if peaks else None


# ------------------------------------------------------------------------------- torch


def torch_lenet5(num_classes: int = 10, in_channels: int = 1):
    """The torch twin of `zoo.models.lenet.LeNet5` (relu, max pooling), which torchvision lacks."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 120, 5), nn.ReLU(), nn.Flatten(),
        nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes))


def torch_simple_cnn(num_classes: int = 10, in_channels: int = 1):
    """The torch twin of `zoo.models.simple.SimpleCNN`: three 3x3 'same' convs with 2x2 max
    pools (28 -> 14 -> 7 -> 3), dense 64, dense classes."""
    from torch import nn

    layers, c = [], in_channels
    for width in (32, 64, 64):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c = width
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(3 * 3 * c, 64), nn.ReLU(),
                         nn.Linear(64, num_classes))


def torch_strided_cnn(num_classes: int = 10, in_channels: int = 1):
    """The torch twin of `zoo.models.simple.StridedCNN`: five blocks of a 3x3 conv and a 3x3
    stride-2 conv (ReLUs), global average pool, dense 200, dense classes."""
    from torch import nn

    layers, c = [], in_channels
    for width in (32, 64, 128, 256, 512):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(),
                   nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU()]
        c = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 200),
                         nn.ReLU(), nn.Linear(200, num_classes))


def torch_alexnet_lrn(num_classes: int = 1000, in_channels: int = 3):
    """The torch twin of the zoo's `alexnet_lrn` (Krizhevsky 2012, one tower, LRN after the
    first two pools, 227x227 input, FC6 on the 6x6x256 map)."""
    from torch import nn

    conv = lambda i, o, k, s, p: [nn.Conv2d(i, o, k, s, p), nn.ReLU()]
    lrn = lambda: nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0)
    return nn.Sequential(
        *conv(in_channels, 96, 11, 4, 0), nn.MaxPool2d(3, 2), lrn(),
        *conv(96, 256, 5, 1, 2), nn.MaxPool2d(3, 2), lrn(),
        *conv(256, 384, 3, 1, 1), *conv(384, 384, 3, 1, 1), *conv(384, 256, 3, 1, 1),
        nn.MaxPool2d(3, 2), nn.Flatten(),
        nn.Dropout(0.5), nn.Linear(6 * 6 * 256, 4096), nn.ReLU(),
        nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, num_classes))


def torch_cifar_resnet(depth: int, num_classes: int = 10, in_channels: int = 3):
    """The torch twin of the zoo's CIFAR ResNets (He et al. 2016 §4.2, resnet20 ... resnet110):
    a 3x3 16-channel stem, three stages of (depth - 2) / 6 BasicBlocks at 16/32/64 channels,
    and option-A shortcuts exactly as `zoo.models.resnet._Block.residual` (stride-2
    subsampling, the new channels zero-padded after the old ones)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.stride, self.extra = stride, c_out - c_in
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(c_out)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c_out)

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            if self.stride != 1 or self.extra:
                x = nn.functional.pad(x[:, :, ::self.stride, ::self.stride],
                                      (0, 0, 0, 0, 0, self.extra))
            return torch.relu(y + x)

    n = (depth - 2) // 6
    layers, c = [nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                 nn.ReLU()], 16
    for i, width in enumerate((16, 32, 64)):
        for j in range(n):
            layers.append(Block(c, width, 2 if i and not j else 1))
            c = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(c, num_classes))


# Twins of the zoo models torchvision lacks that run on a CPU at their native size.
_TORCH_TWINS: dict[str, Callable] = {
    "lenet5": torch_lenet5, "simple_cnn": torch_simple_cnn, "strided_cnn": torch_strided_cnn,
    "alexnet_lrn": torch_alexnet_lrn,
    **{f"resnet{d}": functools.partial(torch_cifar_resnet, d) for d in (20, 32, 44, 56, 110)}}


def torch_model(name: str, num_classes: int, in_channels: int, aux: bool):
    """The torchvision model with the zoo model's architecture (or a twin defined here)."""
    if name in _TORCH_TWINS:
        return _TORCH_TWINS[name](num_classes, in_channels)
    import zoo

    tv_name = zoo.model_info(name).torchvision_name
    if not tv_name:
        raise ValueError(f"{name} has no torchvision twin to bench against")
    if in_channels != 3:
        raise ValueError(f"torchvision's {tv_name} takes 3 channels, not {in_channels}")
    from zoo.parity import import_torchvision

    tv = import_torchvision()
    kwargs: dict[str, Any] = dict(weights=None, num_classes=num_classes)
    if tv_name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=aux, init_weights=False)
    return getattr(tv.models, tv_name)(**kwargs)


def torch_timers(name: str, mode: str, batch_size: int, dtype: str, input_shape, num_classes,
                 compile_mode: str, aux_loss_weight: float = 0.0, seed: int = 0,
                 start: Callable[[Timer], Timer] = lambda t: t):
    """Timers of torchvision's model, eager and (where asked and where it works) compiled.

    Channels-last model and input, autocast to `dtype` when it is a 16-bit type, SGD with
    momentum (torch's default foreach implementation), `zero_grad(set_to_none=True)`.
    `start` is applied to each Timer as it is made (the compile happens there, so a
    torch.compile failure is caught and reported instead of ending the bench).
    Returns (timers, info dict).
    """
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")  # TF32, as XLA's default precision on GPU
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(seed)
    h, w, c = input_shape
    x = torch.randn(batch_size, c, h, w, device=device).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, max(num_classes, 1), (batch_size,), device=device)
    autocast_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    aux = mode == "train" and aux_loss_weight > 0
    sync = (lambda out: torch.cuda.synchronize()) if cuda else (lambda out: None)

    def autocast():
        return torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype \
            else contextlib.nullcontext()

    def make(compiled: bool) -> Timer:
        model = torch_model(name, num_classes, c, aux).to(device).to(
            memory_format=torch.channels_last)
        net = torch.compile(model, mode=None if compile_mode in ("auto", "on", "default")
                            else compile_mode) if compiled else model
        if mode == "train":
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            ce = torch.nn.functional.cross_entropy

            def loss_fn(out):
                if isinstance(out, tuple):  # googlenet/inception aux heads in training
                    main, *extra = out
                    return ce(main, y) + aux_loss_weight * sum(
                        ce(e, y) for e in extra if e is not None)
                return ce(out, y)

            def step():
                with autocast():
                    loss = loss_fn(net(x))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss.detach()  # no .item(): no host sync inside a window
        else:
            model.eval()

            def step():
                with torch.inference_mode(), autocast():
                    return net(x)

        return start(Timer("torch.compile" if compiled else "torch eager", step, sync))

    info: dict[str, Any] = dict(
        version=torch.__version__, device=str(device),
        device_name=torch.cuda.get_device_name() if cuda else platform.machine(),
        threads=torch.get_num_threads(), channels_last=True,
        autocast=str(autocast_dtype).replace("torch.", "") if autocast_dtype else None)
    timers = [make(False)]
    if compile_mode == "off":
        info["compile_note"] = "skipped: --torch-compile off"
    elif compile_mode == "auto" and not cuda:
        info["compile_note"] = ("skipped on CPU: torch.compile (Inductor C++ codegen) needs "
                                "tens of seconds to minutes per model here, over the bench's "
                                "budget; --torch-compile on forces it")
    else:
        try:
            timers.append(make(True))
            info["compile_mode"] = "default" if compile_mode in ("auto", "on") else compile_mode
        except Exception as e:  # report eager and why compile failed, rather than nothing
            info["compile_note"] = f"torch.compile failed: {type(e).__name__}: {str(e)[:300]}"
    info["peak_memory_fn"] = (lambda: torch.cuda.max_memory_allocated()) if cuda else None
    return timers, info


class _ChildTimer(Timer):
    """A started Timer whose windows run in the child process of `torch_timers_apart`."""

    def __init__(self, label: str, first_s: float, steps: int, child: subprocess.Popen):
        super().__init__(label, step=None, sync=None)
        self.first_s, self.steps, self.child = first_s, steps, child

    def window(self) -> float:
        self.child.stdin.write(self.label + "\n")
        self.child.stdin.flush()
        self.times.append(_child_reply(self.child))
        return self.times[-1]


def _child_reply(child: subprocess.Popen):
    line = child.stdout.readline()
    if not line:
        raise RuntimeError(f"the torch bench process ended (exit status {child.wait()}; "
                           "its error is above)")
    reply = json.loads(line)
    if isinstance(reply, dict) and "error" in reply:  # a ValueError of torch_timers, for people
        raise ValueError(reply["error"])
    return reply


def torch_timers_apart(start_args: tuple, **kwargs) -> tuple[list[Timer], dict]:
    """`torch_timers(**kwargs)` (on CPU), started with `Timer.start(*start_args)` in a child
    process whose windows run when the returned Timers' `window()` asks: torch measured with
    an OpenMP runtime of its own (module docstring). The child ends with the parent."""
    request = json.dumps({"start_args": start_args, **kwargs})
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; from zoo import bench; "
         "bench.serve_torch_timers(sys.argv[1])", request],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ready = _child_reply(child)
    info = {**ready["info"], "peak_memory_fn": None, "process": "separate"}
    return [_ChildTimer(t["label"], t["first_s"], t["steps"], child)
            for t in ready["timers"]], info


def serve_torch_timers(request: str) -> None:
    """The child of `torch_timers_apart`: makes and starts the Timers, answers with their
    labels, first-call times and steps per window, then runs one window of the Timer named by
    each line of stdin and answers with its step time, until stdin closes."""
    from zoo import parallel

    parallel.keep_host_memory()  # the malloc settings of the parent, which torch ran under
    kwargs = json.loads(request)
    start_args = kwargs.pop("start_args")
    try:
        timers, info = torch_timers(start=lambda t: t.start(*start_args), **kwargs)
    except ValueError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        return
    info.pop("peak_memory_fn")
    by_label = {t.label: t for t in timers}
    print(json.dumps({"info": info, "timers": [
        {"label": t.label, "first_s": t.first_s, "steps": t.steps} for t in timers]}),
        flush=True)
    for line in sys.stdin:
        print(json.dumps(by_label[line.strip()].window()), flush=True)


# ------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zoo bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--mode", choices=("train", "infer"), default="train")
    p.add_argument("--batch-size", type=int, help="global batch (default 256 on an "
                   "accelerator, 32 on CPU)")
    p.add_argument("--dtype", choices=("auto", *_DTYPES), default="auto",
                   help="compute dtype; params stay float32 (auto: bfloat16 on an accelerator, "
                   "float32 on CPU)")
    p.add_argument("--steps", type=int, help="steps per timed window (default: as many as "
                   "fill --window-s)")
    p.add_argument("--windows", type=int, help="timed windows; the median counts (default 5 "
                   "on an accelerator, 3 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps after the compile (default 2 on "
                   "an accelerator, 1 on CPU)")
    p.add_argument("--window-s", type=float, default=1.0,
                   help="target window length when --steps is not given")
    p.add_argument("--image-size", type=int, help="square input side (default: the model's)")
    p.add_argument("--num-classes", type=int, help="classifier size (default: the model's)")
    p.add_argument("--peak-tflops", type=float,
                   help="peak TFLOP/s of one device for MFU (default: table by chip)")
    p.add_argument("--no-donate", action="store_true", help="do not donate the train state")
    p.add_argument("--remat", action="store_true",
                   help="recompute the forward in the backward pass (jax.checkpoint)")
    p.add_argument("--against", choices=("torch",), help="also run torchvision's model")
    p.add_argument("--torch-compile", default="auto",
                   help="auto (on for CUDA, off on CPU) | on | off | an Inductor mode such as "
                   "max-autotune-no-cudagraphs")
    p.add_argument("--torch-only", action="store_true",
                   help="with --against torch: measure torch alone, without starting JAX (for "
                   "when both cannot share a process; benchmarks/run_all.py --separate)")
    p.add_argument("--trace", metavar="DIR", help="write a jax.profiler trace of one window")
    p.add_argument("--output", metavar="FILE", help="also append the JSON line to FILE")
    p.add_argument("--seed", type=int, default=0)
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the bench of parsed arguments; returns the JSON object."""
    import zoo
    from zoo import onednn

    if args.torch_only and args.against != "torch":
        raise ValueError("--torch-only needs --against torch")

    info = zoo.model_info(args.model)
    h, w, c = info.input_size
    if args.image_size:
        if args.image_size < info.min_size:
            raise ValueError(f"{args.model} needs --image-size >= {info.min_size}")
        h = w = args.image_size
    input_shape = (h, w, c)
    num_classes = info.num_classes if args.num_classes is None else args.num_classes
    if args.torch_only:  # JAX is never started
        import torch

        jax, backend = None, "cuda" if torch.cuda.is_available() else "cpu"
        kind, n_devices = torch.cuda.get_device_name() if backend == "cuda" else "cpu", 1
    else:
        import jax

        backend, kind, n_devices = (jax.default_backend(), jax.devices()[0].device_kind,
                                    jax.device_count())
    accel = backend != "cpu"
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if accel else "float32")
    # CPU defaults keep `bench resnet18 --image-size 64 --against torch` under a minute on 2 cores
    batch_size = args.batch_size or (256 if accel else 32)
    windows = args.windows or (5 if accel else 3)
    warmup = (2 if accel else 1) if args.warmup is None else args.warmup
    if batch_size <= 0 or windows <= 0:
        raise ValueError("--batch-size and --windows must be positive")
    fwd = flops_per_image(args.model, input_shape, num_classes)
    step_flops = fwd * (3 if args.mode == "train" else 1)
    per_device_peak = args.peak_tflops or peak_tflops(kind, dtype)
    peak = per_device_peak and per_device_peak * n_devices
    common = dict(mode=args.mode, batch_size=batch_size, dtype=dtype, input_shape=input_shape,
                  num_classes=num_classes, seed=args.seed)
    start = lambda t: t.start(args.steps, warmup, args.window_s)

    timers, torch_info = [], None
    if args.against == "torch" and not args.torch_only and backend == "cpu" \
            and onednn.available():
        timers, torch_info = torch_timers_apart(
            (args.steps, warmup, args.window_s), name=args.model,
            compile_mode=args.torch_compile, aux_loss_weight=info.aux_loss_weight, **common)
    elif args.against == "torch":
        timers, torch_info = torch_timers(args.model, compile_mode=args.torch_compile,
                                          aux_loss_weight=info.aux_loss_weight, start=start,
                                          **common)
        torch_info["process"] = "same"
    zoo_t = devices = None
    if not args.torch_only:
        zoo_t, devices = zoo_timer(args.model, donate=not args.no_donate, remat=args.remat,
                                   **common)
        start(zoo_t)
    interleave(([zoo_t] if zoo_t else []) + timers, windows)  # zoo, eager, compile, zoo, ...
    for child in {t.child for t in timers if isinstance(t, _ChildTimer)}:
        child.stdin.close()  # the child's loop ends
        child.wait()
    if args.trace and zoo_t:  # one more window under the profiler, outside the timed ones
        with jax.profiler.trace(args.trace):
            zoo_t.window()
        zoo_t.times.pop()

    result: dict[str, Any] = dict(
        model=args.model, mode=args.mode, batch_size=batch_size, dtype=dtype,
        image_size=list(input_shape), devices=n_devices, device_kind=kind, backend=backend)
    if zoo_t:
        result.update(
            **zoo_t.summary(batch_size, step_flops, peak), flops_per_image=fwd,
            step_flops_per_image=step_flops, peak_tflops=peak,
            peak_memory_bytes=_jax_peak_memory(devices), donate=not args.no_donate,
            remat=args.remat, jax_version=jax.__version__,
            compiler_options=zoo.parallel.compiler_options(devices),
            cpu_convolutions=onednn.status() if backend == "cpu" else None)
    else:
        result.update(flops_per_image=fwd, step_flops_per_image=step_flops)
    if torch_info is not None:
        torch_peak = per_device_peak  # torch runs on one device
        mem = torch_info.pop("peak_memory_fn")
        torch_info["peak_memory_bytes"] = mem() if mem else None
        by_label = {t.label: t for t in timers}
        for key, label in (("eager", "torch eager"), ("compile", "torch.compile")):
            t = by_label.get(label)
            torch_info[key] = t and t.summary(batch_size, step_flops, torch_peak)
            if not zoo_t:
                continue
            result[f"ratio_vs_torch_{key}"] = t and speed_ratio(t, zoo_t)
            # the same from each side's fastest window (the least disturbed one)
            result[f"best_ratio_vs_torch_{key}"] = t and round(
                min(t.times) / min(zoo_t.times), 4)
        result["torch"] = torch_info
        if not zoo_t:
            return result
        best = "compile" if torch_info["compile"] else "eager"
        result["ratio"] = result[f"ratio_vs_torch_{best}"]
        result["ratio_against"] = "torch.compile" if best == "compile" else "torch eager"
    return result


def cli(argv: list[str] | None = None) -> int:
    """`python -m zoo bench ...`; prints one JSON line, returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    if args.against == "torch":
        # JAX would otherwise take 75% of the GPU at start-up and leave torch too little; must be
        # set before JAX's backend starts (import is fine, first use is not).
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        result = run(args)
    except (ValueError, ImportError) as e:
        from zoo.cli import error

        return error(e)
    emit(result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
