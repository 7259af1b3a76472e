"""`zoo.onednn`: oneDNN's convolutions compute lax's sums (values and both gradients, for the
strides, paddings, kernels and odd sizes the models use), `zoo.layers` routes the CPU's float32
convolutions to them, and where they cannot be built the zoo says why and keeps XLA's."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from test_fastpath import assert_gradients_reordered, assert_reordered_sum, conv_jaxpr
from zoo import onednn

needs_onednn = pytest.mark.skipif(not onednn.available(), reason=onednn.status())
NHWC = ("NHWC", "HWIO", "NHWC")

# (N, H, W, Cin, kh, kw, Cout, stride, pads): ResNet-20's stages and its stride-2 'SAME'
# (uneven pads), LeNet's c3, ResNet-18's 7x7/2 RGB stem, ResNet-50's 1x1/2 downsample,
# AlexNet's 11x11/4, odd maps and kernels
CONVS = [(2, 8, 8, 16, 3, 3, 16, 1, ((1, 1), (1, 1))),
         (2, 8, 8, 16, 3, 3, 32, 2, ((0, 1), (0, 1))),
         (3, 14, 14, 6, 5, 5, 16, 1, ((0, 0), (0, 0))),
         (2, 15, 13, 3, 7, 7, 8, 2, ((3, 3), (3, 3))),
         (2, 9, 9, 8, 1, 1, 16, 2, ((0, 0), (0, 0))),
         (1, 27, 27, 3, 11, 11, 4, 4, ((2, 2), (2, 2))),
         (3, 7, 5, 5, 3, 2, 6, 1, ((1, 0), (0, 1)))]


@needs_onednn
@pytest.mark.parametrize("n, h, w, cin, kh, kw, cout, stride, pads", CONVS)
def test_onednn_convolution_equals_lax(n, h, w, cin, kh, kw, cout, stride, pads):
    """oneDNN's forward, input gradient and weight gradient sum lax's products in other
    orders."""
    rng = np.random.default_rng(h * w + cin)
    x = jnp.asarray(rng.normal(size=(n, h, w, cin)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(kh, kw, cin, cout)), jnp.float32)
    strides = (stride, stride)
    ref = lambda x, k: lax.conv_general_dilated(x, k, strides, pads, dimension_numbers=NHWC)
    y, vjp = jax.vjp(jax.jit(lambda x, k: onednn.conv(x, k, strides, pads)), x, k)
    y_ref = ref(x, k)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    assert_reordered_sum(y, y_ref, ref(jnp.abs(x), jnp.abs(k)), kh * kw * cin, jnp.float32)
    g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    assert_gradients_reordered(ref, x, k, g, vjp(g), jnp.float32)


@needs_onednn
def test_onednn_convolution_under_vmap():
    """Mapped over a leading axis (one call per element), each element's convolution."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 2, 6, 6, 4)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 3, 4, 5)), jnp.float32)
    pads = ((1, 1), (1, 1))
    got = jax.vmap(lambda x, k: onednn.conv(x, k, (1, 1), pads))(x, k)
    for i in range(3):
        want = lax.conv_general_dilated(x[i], k[i], (1, 1), pads, dimension_numbers=NHWC)
        assert_reordered_sum(got[i], want, lax.conv_general_dilated(
            jnp.abs(x[i]), jnp.abs(k[i]), (1, 1), pads, dimension_numbers=NHWC), 36, jnp.float32)


@pytest.mark.parametrize("shape, kernel, stride, dtype, takes", [
    ((2, 8, 8, 16), (3, 3, 16, 16), 1, jnp.float32, True),
    ((2, 8, 8, 16), (3, 3, 16, 32), 2, jnp.float32, True),
    ((2, 14, 14, 6), (5, 5, 6, 16), 1, jnp.float32, True),
    ((2, 8, 8, 16), (3, 3, 16, 16), 1, jnp.bfloat16, False),
    ((2, 8, 8, 1), (3, 3, 1, 16), 1, jnp.float32, False),
    ((2, 4, 4, 16), (3, 3, 16, 16), 2, jnp.float32, False)])
def test_which_convolutions_are_onednns(shape, kernel, stride, dtype, takes):
    """Where oneDNN runs, every float32 CPU convolution is its, except the taps' (one- and
    three-channel inputs, whose gradients are) and at most 2x2 outputs (a matmul)."""
    jaxpr = conv_jaxpr(shape, kernel, stride, dtype=dtype)
    assert ("ZooConvForward" in jaxpr) == (takes and onednn.available())


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="CI installs oneDNN (Makefile)")
def test_ci_runs_onednn():
    """CI's machine builds the handlers, so that the tests above run there."""
    assert onednn.available(), onednn.status()


@pytest.mark.parametrize("env, why", [
    ({"ZOO_ONEDNN": "0"}, "turned off (ZOO_ONEDNN=0)"),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
     "2 host devices (oneDNN's threads would oversubscribe the cores)")])
def test_turned_off_or_unbuildable_says_why(env, why, tmp_path, monkeypatch):
    """Turned off, or with several host devices, the zoo keeps XLA's convolutions and says
    why; without a compiler, the reason is the missing compiler."""
    code = ("from zoo import onednn; print(onednn.status()); print(onednn.available())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True).stdout.split("\n")
    if "XLA_FLAGS" in env and not onednn.available():  # unbuilt here: that reason comes first
        why = onednn.status().removeprefix("XLA's: ")
    assert out[:2] == [f"XLA's: {why}", "False"]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(OSError, match="no C.. compiler"):
        onednn._compile()
    assert not list(tmp_path.iterdir())


CONCURRENT = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from zoo import onednn
pads = ((1, 1), (1, 1))
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(4, 8, 16, 16, 32)), jnp.float32)
k = jnp.asarray(rng.normal(size=(4, 3, 3, 32, 32)), jnp.float32)
def grads(conv):
    return jax.pmap(lambda x, k: jax.grad(lambda x, k: (conv(x, k) ** 2).sum(), (0, 1))(x, k))
ours = grads(lambda x, k: onednn.conv(x, k, (1, 1), pads))
ref = grads(lambda x, k: lax.conv_general_dilated(x, k, (1, 1), pads,
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC")))
want = ref(x, k)
for _ in range(5):
    for a, b in zip(ours(x, k), want):
        err = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
        assert err < 1e-4, err
print("ok")
"""


@needs_onednn
def test_concurrent_convolutions_do_not_share_memory():
    """Four devices' convolutions run at once (as XLA runs independent ones) and each gets its
    own result: oneDNN's shared scratchpad had mixed them up."""
    out = subprocess.run([sys.executable, "-c", CONCURRENT], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
