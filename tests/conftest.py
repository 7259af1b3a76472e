"""Fixtures and helpers shared by the training and parallelism tests."""

import contextlib
import io
import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

EXAMPLES = 260  # images in the `dataset` fixture


def write_image_folder(root: Path, per_class: int = EXAMPLES // 10) -> str:
    """10 class folders of 28x28 grey PNGs whose brightness encodes the class (learnable)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(20 + 22 * c, 20, (28, 28)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return f"image_folder:{root}"


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """Environment of train.py subprocesses, sharing one compilation cache with this process."""
    cache = str(tmp_path_factory.mktemp("jax_cache"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"))


def run_main(argv):
    """(exit code, stdout, stderr) of train.main in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = train.main(argv)
        except SystemExit as e:  # argparse
            code = e.code
    return code, out.getvalue(), err.getvalue()


# Two ways of computing the same training (another device or process count) sum in another
# order, so they differ by float32 rounding, which ReLU/max-pool switches and a few optimizer
# steps amplify. Relative to how far training moved each tensor (the L2 norm of ref - init),
# that difference was 4e-7 on an Intel Xeon and an estimated 1e-3 on an AMD EPYC (the run that made
# the old element-wise check fail: 4.6e-6 on biases that had moved ~3e-3). The bugs these
# comparisons exist for change the update itself; breaking the code once each gave: gradients
# not psum-ed under pmap 0.82, the loss divided by the per-device count 5.6, BatchNorm
# statistics not synchronised 0.92, every process reading the same data shard 0.54.
UPDATE_RTOL = 2e-2


def assert_same_update(ref, got, init, rtol: float = UPDATE_RTOL) -> None:
    """Every leaf of `got` is within `rtol` of `ref`, in L2 norm relative to `ref - init`,
    the change that training made to it; the message names the worst leaf."""
    errors = {}
    leaves = jax.tree_util.tree_leaves_with_path(ref)
    for (path, r), g, i in zip(leaves, jax.tree.leaves(got), jax.tree.leaves(init),
                               strict=True):
        r, g, i = (np.asarray(a, np.float64) for a in (r, g, i))
        moved = np.linalg.norm(r - i)
        assert moved > 0, f"{jax.tree_util.keystr(path)} did not train"
        errors[jax.tree_util.keystr(path)] = np.linalg.norm(g - r) / moved
    worst = max(errors, key=errors.get)
    assert errors[worst] <= rtol, (f"{worst}: |got - ref| is {errors[worst]:.2e} of the update "
                                   f"|ref - init| (allowed {rtol:.0e})")
