"""The CPU fast paths of zoo.layers compute what the plain lax ops compute: max pooling's
values and gradients (ties included) for the windows, strides, paddings, odd sizes and dtypes
the models use."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from zoo import layers

# (H, W, window, stride, padding, ceil_mode): simple_cnn/VGG/LeNet 2x2 (even and odd maps,
# 7 -> 3 drops a row), AlexNet's and ResNet's 3x3/2 (pad 0 and 1), GoogLeNet's ceil_mode pools
POOLS = [(28, 28, 2, 2, 0, False), (7, 7, 2, 2, 0, False), (10, 9, 2, 2, 0, False),
         (55, 55, 3, 2, 0, False), (32, 31, 3, 2, 1, False), (112, 112, 3, 2, 0, True),
         (14, 14, 3, 1, 1, True), (13, 13, 2, 2, 0, True)]


def reference(x, window, stride, padding, ceil_mode):
    pads = [(0, 0)] + [layers.pool_padding(n, window, stride, padding, ceil_mode)
                       for n in x.shape[1:3]] + [(0, 0)]
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1),
                             (1, stride, stride, 1), pads)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("inputs", ["relu_ties", "normal"])
@pytest.mark.parametrize("h, w, window, stride, padding, ceil_mode", POOLS)
def test_max_pool_values_and_gradients_equal_lax(h, w, window, stride, padding, ceil_mode,
                                                  inputs, dtype):
    rng = np.random.default_rng(h * w + window)
    x = (np.maximum(rng.integers(-2, 3, size=(2, h, w, 3)), 0) if inputs == "relu_ties"
         else rng.normal(size=(2, h, w, 3)))  # integers after a ReLU: most windows tie
    x = jnp.asarray(x, dtype)
    pool = layers.MaxPool(window, stride, padding, ceil_mode)
    y, vjp = jax.vjp(lambda x: pool.apply({}, x), x)
    y_ref, vjp_ref = jax.vjp(lambda x: reference(x, window, stride, padding, ceil_mode), x)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    # the same element of every window gets its cotangent: with cotangents of 1 the gradient
    # counts the windows that pick each element (exact in every dtype)
    ones = jnp.ones(y.shape, dtype)
    np.testing.assert_array_equal(np.asarray(vjp(ones)[0], np.float32),
                                  np.asarray(vjp_ref(ones)[0], np.float32))
    g = jnp.asarray(rng.normal(size=y.shape), dtype)
    (dx,), (dx_ref,) = vjp(g), vjp_ref(g)
    assert dx.dtype == dx_ref.dtype
    dx, dx_ref = np.asarray(dx, np.float32), np.asarray(dx_ref, np.float32)
    if window <= stride or dtype == jnp.float32:  # f32 overlap sums may round differently
        np.testing.assert_allclose(dx, dx_ref, rtol=0 if window <= stride else 1e-6,
                                   atol=0 if window <= stride else 1e-6)
    else:  # bf16 overlap sums are rounded once: the float32 sum of the same cotangents
        up = lambda a: jnp.asarray(a, jnp.float32)
        _, vjp_f32 = jax.vjp(lambda x: reference(x, window, stride, padding, ceil_mode), up(x))
        np.testing.assert_allclose(dx, vjp_f32(up(g))[0], rtol=2 ** -8, atol=1e-6)

def test_max_pool_on_cpu_has_no_select_and_scatter():
    x = jnp.zeros((2, 8, 8, 3))
    grad = jax.grad(lambda x: layers.MaxPool(2).apply({}, x).sum())
    jaxpr = str(jax.make_jaxpr(grad)(x))
    assert ("select_and_scatter" in jaxpr) != (jax.default_backend() == "cpu")
