"""oneDNN's convolutions on CPU, as XLA FFI custom calls (README, Benchmarks: why).

XLA:CPU computes a convolution with Eigen, which ran resnet20's 3x3 convolutions at a third to
a half of oneDNN's speed (the library torch uses on CPU), their weight gradients at a fifth.
`conv` is an NHWC x HWIO float32 convolution whose forward pass and both gradients are oneDNN's
primitives, called from the compiled program through XLA's FFI. Their handlers (`onednn.cc`,
beside this file) are compiled on first use with the system's C++ compiler against jaxlib's FFI
headers and the system's oneDNN (Debian/Ubuntu: `apt-get install libdnnl-dev`; the Makefile
does so where it can), into the zoo's cache folder, once per source and jaxlib version. Where
that cannot be done, the zoo keeps XLA's convolutions and `status()` says why;
`ZOO_ONEDNN=0` turns them off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jaxlib
import numpy as np

from zoo.arithmetic import conv_output_size

SOURCE = Path(__file__).with_name("onednn.cc")
OFF_SWITCH = "ZOO_ONEDNN"
_TARGETS = ("ZooConvForward", "ZooConvInputGrad", "ZooConvWeightGrad")


def cache_dir() -> Path:
    """Where the compiled handlers are kept: $XDG_CACHE_HOME/zoo (default ~/.cache/zoo)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zoo"


def _compile() -> Path:
    """The handlers' shared library, compiled unless this source and jaxlib's already were;
    OSError with the reason where it cannot be."""
    cxx = os.environ.get("CXX", "g++")
    command = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}",
               str(SOURCE), "-ldnnl"]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(
        [jaxlib.__version__, *command]).encode()).hexdigest()[:16]
    path = cache_dir() / f"onednn-{key}.so"
    if path.exists():
        return path
    if shutil.which(cxx) is None:
        raise OSError(f"no C++ compiler ({cxx}) to build oneDNN's convolutions")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / path.name
        done = subprocess.run([*command, "-o", str(out)], capture_output=True, text=True)
        if done.returncode:
            if "dnnl.hpp" in done.stderr:
                raise OSError("oneDNN's headers are not installed (Debian/Ubuntu: "
                              "apt-get install libdnnl-dev)")
            if "-ldnnl" in done.stderr:
                raise OSError("oneDNN's library is not installed (Debian/Ubuntu: "
                              "apt-get install libdnnl-dev)")
            raise OSError(f"compiling {SOURCE.name} failed: {done.stderr.strip()[-500:]}")
        os.replace(out, path)  # atomic: a concurrent build finds a whole file or none
    return path


@functools.cache
def _load() -> tuple[str | None, str]:
    """(oneDNN's version, '') once the handlers are registered with XLA, else (None, why not)."""
    if os.environ.get(OFF_SWITCH, "1") == "0":
        return None, f"turned off ({OFF_SWITCH}=0)"
    try:
        lib = ctypes.CDLL(str(_compile()))
    except OSError as e:
        return None, str(e)
    for name in _TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    lib.zoo_onednn_version.restype = ctypes.c_char_p
    return lib.zoo_onednn_version().decode(), ""


def _why_not() -> str | None:
    """Why the zoo's CPU convolutions are not `conv` in this process, None where they are:
    the handlers must be built, and there must be one host device (with more, each device's
    program would start oneDNN's threads on every core)."""
    version, why = _load()
    if version is None:
        return why
    if jax.local_device_count() > 1:
        return (f"{jax.local_device_count()} host devices (oneDNN's threads would "
                "oversubscribe the cores)")
    return None


def available() -> bool:
    """Whether the zoo's CPU convolutions are `conv` (on CPU, `status()` says why not)."""
    return jax.default_backend() == "cpu" and _why_not() is None


def status() -> str:
    """'oneDNN <version>', or why the CPU convolutions are XLA's."""
    why = _why_not()
    return f"XLA's: {why}" if why else f"oneDNN {_load()[0]}"


def _call(target, shape, a, b, strides, pads):
    version, why = _load()
    if version is None:
        raise RuntimeError(f"oneDNN's convolutions cannot run here: {why}")
    (sh, sw), ((ph0, ph1), (pw0, pw1)) = strides, pads
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, np.float32),
                            vmap_method="sequential")(
        a, b, sh=np.int64(sh), sw=np.int64(sw), ph0=np.int64(ph0), ph1=np.int64(ph1),
        pw0=np.int64(pw0), pw1=np.int64(pw1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x, w, strides: tuple[int, int], pads: tuple[tuple[int, int], tuple[int, int]]):
    """The convolution of float32 NHWC `x` with HWIO `w` (`lax.conv_general_dilated` with these
    strides and explicit pads), forward and both gradients computed by oneDNN, on CPU;
    RuntimeError where `status()` says it cannot run."""
    n, h, wd, _ = x.shape
    kh, kw, _, k = w.shape
    out = [conv_output_size(size, kernel, s, pad, rounding="floor")
           for size, kernel, s, pad in zip((h, wd), (kh, kw), strides, pads)]
    return _call("ZooConvForward", (n, *out, k), x, w, strides, pads)


def _conv_fwd(x, w, strides, pads):
    return conv(x, w, strides, pads), (x, w)


def _conv_bwd(strides, pads, residuals, g):
    x, w = residuals
    return (_call("ZooConvInputGrad", x.shape, g, w, strides, pads),
            _call("ZooConvWeightGrad", w.shape, x, g, strides, pads))


conv.defvjp(_conv_fwd, _conv_bwd)
