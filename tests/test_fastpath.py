"""The CPU fast paths compute what the plain lax ops compute: max pooling's values and
gradients (ties included) for the windows, strides, paddings, odd sizes and dtypes the models
use, one-channel, paired and cols convolutions what lax's computes, Conv's bias gradient what nn.Conv's
computes, BatchNorm's matmul statistics what flax's
BatchNorm computes, a `fence`d function what the function computes, and the zoo's CPU compiler
options (`zoo.parallel.compiler_options`) the same convolutions and train step as XLA's
defaults; and `zoo.parallel.keep_host_memory` stops XLA:CPU's runs faulting their memory in."""

import platform
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import zoo
from zoo import layers, onednn, parallel, training

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


# (H, kernel, Cin, Cout, stride, padding) of one- and three-channel convolutions: simple_cnn's 3x3 'same',
# LeNet's 5x5 valid, a strided odd-sized one, the CIFAR ResNets' RGB stem, Inception-v3's
# (stride 2, valid)
TAPS = [(28, 3, 1, 32, 1, 1), (32, 5, 1, 6, 1, 0), (9, 5, 1, 4, 2, 2), (10, 3, 3, 16, 1, 1),
        (11, 3, 3, 32, 2, 0)]


def assert_reordered_sum(got, want, terms, count, dtype):
    """`got` and `want` sum the same `count` products per element in other orders: within
    float32 rounding of each partial sum (count * 2^-24 of the largest sum of |products|,
    `terms`), or one bfloat16 rounding (2^-8) of the result either way."""
    eps = count * 2.0 ** -24 if dtype == jnp.float32 else 2.0 ** -7
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=0, atol=float(eps * jnp.max(terms)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("h, k, cin, cout, stride, pad", TAPS)
def test_few_channel_convolution_equals_lax(h, k, cin, cout, stride, pad, dtype):
    """A one- or three-channel input's convolution on CPU sums the kernel's taps over the channels (the
    same terms as lax's convolution, in another order), in inference and under
    differentiation; its gradients are oneDNN's where it runs (float32: the same products in
    other orders), else lax's, exactly."""
    rng = np.random.default_rng(h + k)
    x = jnp.asarray(rng.normal(size=(3, h, h + 1, cin)), dtype)
    w = jnp.asarray(rng.normal(size=(k, k, cin, cout)), dtype)
    args = ((stride, stride), [(pad, pad)] * 2)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    ours = lambda x, w: layers.conv_general_dilated(x, w, *args, dimension_numbers=dn)
    ref = lambda x, w: lax.conv_general_dilated(x, w, *args, dimension_numbers=dn)
    assert ("conv_general_dilated" in str(jax.make_jaxpr(ours)(x, w))) \
        != (jax.default_backend() == "cpu")
    y, y_ref = jax.jit(ours)(x, w), jax.jit(ref)(x, w)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    terms = jax.jit(lambda x, w: ref(jnp.abs(x), jnp.abs(w)))(x.astype(jnp.float32),
                                                               w.astype(jnp.float32))
    (y1, vjp), (y2, vjp_ref) = jax.vjp(ours, x, w), jax.vjp(ref, x, w)
    for a in (y, y1):
        assert_reordered_sum(a, y_ref, terms, k * k * cin, dtype)
    g = jnp.asarray(rng.normal(size=y2.shape), dtype)
    if dtype == jnp.float32 and onednn.available():  # oneDNN's gradients
        assert_gradients_reordered(ref, x, w, g, vjp(g), dtype)
    else:
        for a, b in zip(vjp(g), vjp_ref(g)):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def assert_gradients_reordered(ref, x, w, g, got, dtype):
    """`got` = (dx, dw) of the convolution `ref` at (x, w) with cotangent `g` sums the same
    products as lax's (kh kw K per input-gradient element, N Ho Wo per weight-gradient one) in
    other orders."""
    f32 = lambda a: jnp.abs(a.astype(jnp.float32))
    terms = jax.vjp(ref, f32(x), f32(w))[1](f32(g))
    want = jax.vjp(ref, x, w)[1](g)
    kh, kw, _, k = w.shape
    counts = (kh * kw * k, g.shape[0] * g.shape[1] * g.shape[2])
    for a, b, t, count in zip(got, want, terms, counts):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert_reordered_sum(a, b, t, count, dtype)


@pytest.fixture
def no_onednn(monkeypatch):
    """The CPU convolutions as where `zoo.onednn` cannot run."""
    monkeypatch.setattr(onednn, "available", lambda: False)


def conv_jaxpr(shape, kernel, stride=1, padding="SAME", dtype=jnp.float32) -> str:
    """The jaxpr of `zoo.layers.conv_general_dilated` on zeros of these NHWC / HWIO shapes."""
    x, w = jnp.zeros(shape, dtype), jnp.zeros(kernel, dtype)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    return str(jax.make_jaxpr(lambda x, w: layers.conv_general_dilated(
        x, w, (stride, stride), padding, dimension_numbers=dn))(x, w))


@pytest.mark.parametrize("k, cin, cout, taps", [
    (3, 1, 64, True), (5, 1, 6, True), (3, 3, 16, True), (3, 3, 32, True), (1, 3, 8, True),
    (3, 3, 64, False), (5, 3, 16, False), (3, 4, 16, False), (7, 3, 64, False),
    (1, 16, 16, False), (3, 2, 16, False)])
def test_which_convolutions_sum_taps(k, cin, cout, taps):
    """On CPU, one-channel inputs, and RGB inputs with kernels of at most 3x3 into at most 32
    channels, sum taps; every other convolution (and every one off CPU) is a convolution,
    lax's or oneDNN's."""
    jaxpr = conv_jaxpr((2, 12, 12, cin), (k, k, cin, cout))
    convolves = "conv_general_dilated" in jaxpr or "ZooConvForward" in jaxpr
    assert (not convolves) == (taps and jax.default_backend() == "cpu")


# (N, H, W, Cin, Cout, height padding) of paired convolutions: ResNet-20's first stage, an odd
# height with uneven padding and other channel counts, a valid height
PAIRS = [(2, 8, 8, 16, 16, (1, 1)), (3, 5, 6, 3, 7, (0, 2)), (2, 4, 10, 16, 5, (0, 0))]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n, h, w, cin, cout, pads_h", PAIRS)
def test_paired_convolution_equals_lax(n, h, w, cin, cout, pads_h, dtype):
    """`conv_pairs` sums the same products as lax's convolution (plus zeros, in another
    order), and so does its input gradient; its weight gradient is lax's, exactly."""
    rng = np.random.default_rng(h * w + cin)
    x = jnp.asarray(rng.normal(size=(n, h, w, cin)), dtype)
    k = jnp.asarray(rng.normal(size=(3, 3, cin, cout)), dtype)
    ref = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), [pads_h, (1, 1)],
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ours = lambda x, k: layers.conv_pairs(x, k, pads_h, None)
    (y, vjp), (y_ref, vjp_ref) = jax.vjp(ours, x, k), jax.vjp(ref, x, k)
    g = jnp.asarray(rng.normal(size=y_ref.shape), dtype)
    (dx, dk), (dx_ref, dk_ref) = vjp(g), vjp_ref(g)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype and dx.shape == x.shape
    np.testing.assert_array_equal(np.asarray(dk, np.float32), np.asarray(dk_ref, np.float32))
    # 9 * cin products (9 * cout in the input gradient)
    f32 = lambda a: jnp.abs(a.astype(jnp.float32))
    terms = ref(f32(x), f32(k))
    terms_dx = jax.vjp(lambda x: ref(x, f32(k)), f32(x))[1](f32(g))[0]
    for a, b, t, count in ((y, y_ref, terms, cin), (dx, dx_ref, terms_dx, cout)):
        assert_reordered_sum(a, b, t, 9 * count, dtype)


@pytest.mark.parametrize("shape, kernel, stride, padding, paired", [
    ((2, 8, 8, 16), (3, 3, 16, 16), 1, "SAME", True),
    ((2, 7, 8, 8), (3, 3, 8, 12), 1, "SAME", True),
    ((2, 8, 8, 16), (3, 3, 16, 32), 1, "SAME", False),
    ((2, 8, 7, 16), (3, 3, 16, 16), 1, "SAME", False),
    ((2, 8, 8, 16), (3, 3, 16, 16), 2, "SAME", False),
    ((2, 8, 8, 16), (5, 5, 16, 16), 1, "SAME", False),
    ((2, 8, 8, 16), (3, 3, 16, 16), 1, "VALID", False)])
def test_which_convolutions_pair_columns(shape, kernel, stride, padding, paired, no_onednn):
    """On CPU without oneDNN, stride-1 3-wide kernels padded by 1 on even widths with at most
    PAIRS_MAX_CHANNELS channels in and out take the paired convolution (its (3, 2, 2C, 2K)
    kernel); every other convolution does not."""
    jaxpr = conv_jaxpr(shape, kernel, stride, padding)
    pair_kernel = f"f32[3,2,{2 * kernel[2]},{2 * kernel[3]}]"
    assert (pair_kernel in jaxpr) == (paired and jax.default_backend() == "cpu")


# (N, H, W, Cin, kh, kw, Cout) of unpadded stride-1 convolutions with large kernels: LeNet's
# c3, an odd non-square map and kernel, a 7x7 kernel into one channel
COLS = [(2, 14, 14, 6, 5, 5, 16), (3, 9, 12, 4, 5, 7, 3), (2, 10, 9, 3, 7, 7, 1)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n, h, w, cin, kh, kw, cout", COLS)
def test_cols_convolution_equals_lax(n, h, w, cin, kh, kw, cout, dtype):
    """`conv_cols` is lax's convolution and weight gradient, exactly; its input gradient sums
    the same products in another order."""
    rng = np.random.default_rng(h * w + cin)
    x = jnp.asarray(rng.normal(size=(n, h, w, cin)), dtype)
    k = jnp.asarray(rng.normal(size=(kh, kw, cin, cout)), dtype)
    ref = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ours = lambda x, k: layers.conv_cols(x, k, None)
    (y, vjp), (y_ref, vjp_ref) = jax.vjp(ours, x, k), jax.vjp(ref, x, k)
    g = jnp.asarray(rng.normal(size=y_ref.shape), dtype)
    (dx, dk), (dx_ref, dk_ref) = vjp(g), vjp_ref(g)
    assert dx.shape == x.shape and dx.dtype == dx_ref.dtype
    for a, b in ((y, y_ref), (dk, dk_ref)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    f32 = lambda a: jnp.abs(a.astype(jnp.float32))
    terms = jax.vjp(lambda x: ref(x, f32(k)), f32(x))[1](f32(g))[0]
    assert_reordered_sum(dx, dx_ref, terms, kh * kw * cout, dtype)


@pytest.mark.parametrize("shape, kernel, stride, padding, cols", [
    ((2, 14, 14, 6), (5, 5, 6, 16), 1, "VALID", True),
    ((2, 12, 12, 8), (5, 7, 8, 4), 1, "VALID", True),
    ((2, 14, 14, 6), (5, 5, 6, 16), 1, "SAME", False),
    ((2, 14, 14, 6), (5, 5, 6, 16), 2, "VALID", False),
    ((2, 14, 14, 6), (3, 3, 6, 16), 1, "VALID", False),
    ((2, 14, 14, 1), (5, 5, 1, 6), 1, "VALID", False),
    ((2, 5, 5, 16), (5, 5, 16, 120), 1, "VALID", False)])
def test_which_convolutions_take_cols(shape, kernel, stride, padding, cols, no_onednn):
    """On CPU without oneDNN, unpadded stride-1 convolutions with kernels of at least COLS_MIN_TAPS taps
    take `conv_cols`, except where a path above them applies (one input channel: taps; at
    most 2x2 outputs: a matmul); every other convolution does not."""
    jaxpr = conv_jaxpr(shape, kernel, stride, padding)
    assert ("conv_cols" in jaxpr) == (cols and jax.default_backend() == "cpu")


# (N, H, W, C) of BatchNorm inputs: ResNet-20's stages, an odd map, a dense (N, C) input
NORMS = [(8, 8, 8, 16), (4, 7, 5, 32), (2, 3, 3, 64), (16, 24)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", NORMS)
def test_batch_norm_equals_flax(shape, dtype):
    """zoo's BatchNorm (matmul statistics on CPU) against flax's: the same variables, outputs,
    running statistics and gradients of x, scale and bias, in training and evaluation."""
    rng = np.random.default_rng(len(shape) + shape[-1])
    x = jnp.asarray(rng.normal(1.0, 3.0, shape), dtype)
    kw = dict(momentum=0.9, epsilon=1e-5, dtype=dtype)
    ours, flax_bn = layers.BatchNorm(**kw), nn.BatchNorm(**kw)
    variables = flax_bn.init(jax.random.key(0), x, use_running_average=False)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x, use_running_average=False)) \
        == jax.tree.map(jnp.shape, variables)
    variables = jax.tree.map(lambda v: v + jnp.asarray(rng.normal(0, 0.1, v.shape), v.dtype),
                             variables)
    weights = jnp.asarray(rng.normal(size=shape[-1:]), jnp.float32)

    def run(module, train):
        def loss(params, x):
            y, new = module.apply({**variables, "params": params}, x, use_running_average=not train,
                                  mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y.astype(jnp.float32)) * weights), (y, new)
        (_, (y, new)), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
            variables["params"], x)
        return y, new, grads

    count = x.size // shape[-1]
    for train in (True, False):
        got, want = run(ours, train), run(flax_bn, train)
        assert jax.tree.map(lambda a: a.dtype, got) == jax.tree.map(lambda a: a.dtype, want)
        # float32: sums of `count` terms in another order differ by at most count * 2^-24 of
        # their magnitude; bfloat16 outputs may round to neighbouring values (2^-8) and the
        # cotangents built on them move by a few of those steps
        tol = count * 2.0 ** -24 * 16 if dtype == jnp.float32 else 2.0 ** -6
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            np.testing.assert_allclose(a, b, rtol=0, atol=tol * max(np.abs(b).max(), 1e-30))


def test_batch_norm_statistics_on_cpu_are_matmuls():
    """On CPU the training forward and backward reduce only through matmuls; evaluation and a
    pmap axis (flax's named-axis means) keep flax's BatchNorm."""
    x = jnp.ones((4, 8, 8, 16))

    def ops(module, train, axis_name=None):
        variables = module.init(jax.random.key(0), x, use_running_average=True)

        def forward_backward(x):
            y, vjp = jax.vjp(lambda x: module.apply(variables, x, use_running_average=not train,
                                                    mutable=["batch_stats"])[0], x)
            return vjp(y)
        if axis_name:
            return str(jax.make_jaxpr(jax.pmap(forward_backward, axis_name))(x[None]))
        return str(jax.make_jaxpr(forward_backward)(x))

    cpu = jax.default_backend() == "cpu"
    train = ops(layers.BatchNorm(), True)
    assert ("reduce_sum" not in train and "dot_general" in train) == cpu
    assert "reduce_sum" in ops(nn.BatchNorm(), True)
    assert "dot_general" not in ops(layers.BatchNorm(), False)
    assert "psum" in ops(layers.BatchNorm(axis_name="b"), True, "b")


@pytest.mark.parametrize("fill", [0.5, np.nan])
def test_fence_computes_the_function_once(fill):
    """`fence(f, *args)` is f's values and gradients, whichever branch the data selects (a NaN
    makes the predicate false); on CPU the compiled step holds it as one conditional."""
    rng = np.random.default_rng(0)
    y, x = (jnp.asarray(rng.normal(size=(2, 5, 5, 3)), jnp.float32) for _ in range(2))
    y = y.at[0, 0, 0, 0].set(fill)
    f = lambda y, x: nn.relu(y + x)
    loss = lambda g: lambda y, x: jnp.sum(g(y, x) ** 2)
    fenced = jax.jit(jax.value_and_grad(loss(lambda *a: layers.fence(f, *a)), (0, 1)))
    for a, b in zip(jax.tree.leaves(fenced(y, x)),
                    jax.tree.leaves(jax.jit(jax.value_and_grad(loss(f), (0, 1)))(y, x))):
        np.testing.assert_array_equal(a, b)
    hlo = fenced.lower(y, x).compile().as_text()
    assert ("conditional(" in hlo) == (jax.default_backend() == "cpu")


# nn.Conv fields of the convolutions the models build: simple_cnn's one-channel 3x3 and its
# 3x3s, AlexNet's 11x11/4, 'SAME' at stride 2, explicit uneven pads with dilation, grouped
# 1x1; and flax's own bias add: LeNet's 6-channel 5x5 (fewer than MATMUL_BIAS_MIN_FEATURES),
# a 2x2-output map (the matmul convolution; fewer than MATMUL_BIAS_MIN_PIXELS), no bias,
# circular padding
CONV_LAYERS = [((28, 1), dict(features=32, kernel_size=(3, 3), padding=1)),
               ((14, 8), dict(features=64, kernel_size=(3, 3), padding=1)),
               ((35, 3), dict(features=32, kernel_size=(11, 11), strides=4, padding=2)),
               ((16, 4), dict(features=32, kernel_size=(3, 3), strides=2, padding="SAME")),
               ((12, 4), dict(features=32, kernel_size=(3, 3), padding=((1, 2), (0, 1)),
                              kernel_dilation=2)),
               ((7, 8), dict(features=32, kernel_size=(1, 1), feature_group_count=2)),
               ((32, 1), dict(features=6, kernel_size=(5, 5), padding=0)),
               ((4, 8), dict(features=32, kernel_size=(3, 3), padding=1, strides=2)),
               ((9, 4), dict(features=32, kernel_size=(3, 3), use_bias=False)),
               ((9, 4), dict(features=32, kernel_size=(3, 3), padding="CIRCULAR"))]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("size, fields", CONV_LAYERS)
def test_conv_equals_flax_conv(size, fields, dtype):
    """zoo's Conv (bias added by `add_bias` on CPU) against nn.Conv on the same convolution:
    the same variables, outputs and kernel and input gradients exactly; the bias gradient is
    the sum of the same cotangents in another order (float32; bfloat16 cotangents are summed
    in float32 and rounded once, where XLA's bfloat16 reduction may round more often)."""
    h, cin = size
    rng = np.random.default_rng(h * cin)
    x = jnp.asarray(rng.normal(size=(2, h, h, cin)), dtype)
    ours = layers.Conv(**fields, dtype=dtype)
    ref = nn.Conv(**fields, dtype=dtype, conv_general_dilated=layers.conv_general_dilated)
    variables = ref.init(jax.random.key(0), x)
    got_init = ours.init(jax.random.key(0), x)
    assert jax.tree.all(jax.tree.map(lambda a, b: a.shape == b.shape and bool(jnp.all(a == b)),
                                     got_init, variables))
    variables = jax.tree.map(lambda v: v + jnp.asarray(rng.normal(0, 0.5, v.shape), v.dtype),
                             variables)
    y, vjp = jax.vjp(lambda v, x: ours.apply(v, x), variables, x)
    y_ref, vjp_ref = jax.vjp(lambda v, x: ref.apply(v, x), variables, x)
    assert y.dtype == y_ref.dtype
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    g = jnp.asarray(rng.normal(size=y.shape), dtype)
    (grads, dx), (grads_ref, dx_ref) = vjp(g), vjp_ref(g)
    np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(dx_ref, np.float32))
    np.testing.assert_array_equal(grads["params"]["kernel"], grads_ref["params"]["kernel"])
    if "bias" not in grads["params"]:
        return
    bias, bias_ref = grads["params"]["bias"], grads_ref["params"]["bias"]
    flax_bias = (fields["features"] < layers.MATMUL_BIAS_MIN_FEATURES
                 or y.shape[1] * y.shape[2] < layers.MATMUL_BIAS_MIN_PIXELS)
    if flax_bias or fields.get("padding") == "CIRCULAR":
        np.testing.assert_array_equal(bias, bias_ref)  # flax's own bias add
        return
    terms = np.asarray(g, np.float64).reshape(-1, y.shape[-1])
    exact, magnitude = terms.sum(0), np.abs(terms).sum(0)
    # a float32 sum of n terms in any order is within n * 2^-24 * sum|terms| of the exact sum;
    # bfloat16 adds one rounding of the result (2^-8 of it)
    bound = len(terms) * 2.0 ** -24 * magnitude + (
        2.0 ** -8 * np.abs(exact) if dtype == jnp.bfloat16 else 0)
    assert np.all(np.abs(np.asarray(bias, np.float64) - exact) <= bound)
    if dtype == jnp.float32:
        assert np.all(np.abs(np.asarray(bias_ref, np.float64) - exact) <= bound)


def test_conv_bias_gradient_on_cpu_is_a_matmul():
    """On CPU a Conv's bias gradient is a matmul, not a reduction over (N, H, W); elsewhere it
    is flax's Conv."""
    x = jnp.ones((2, 8, 8, 4))
    conv = layers.Conv(layers.MATMUL_BIAS_MIN_FEATURES, (3, 3), padding=1)
    variables = conv.init(jax.random.key(0), x)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda v: jnp.sum(conv.apply(v, x) ** 2)))(variables))
    cpu = jax.default_backend() == "cpu"
    assert ("reduce_sum[axes=(0, 1, 2)" not in jaxpr and "dot_general" in jaxpr) == cpu


# (H, Cin, Cout, kernel, stride, padding) of the convolutions the models run: simple_cnn's
# one-channel 3x3, LeNet's 5x5 valid, ResNet's 7x7/2 stem, 3x3/2, 1x1 projections
CONVS = [(28, 1, 8, 3, 1, 1), (32, 1, 6, 5, 1, 0), (32, 3, 8, 7, 2, 3), (15, 8, 16, 3, 2, 1),
         (9, 16, 8, 1, 1, 0)]


@pytest.mark.parametrize("h, cin, cout, k, stride, pad", CONVS)
def test_cpu_compiler_options_compute_the_same_convolutions(h, cin, cout, k, stride, pad):
    """Values and both gradients of a convolution compiled with the zoo's CPU options equal
    XLA's defaults exactly: small integers keep every sum exact in float32 whatever the
    kernel's summation order."""
    rng = np.random.default_rng(h + k)
    x = jnp.asarray(rng.integers(-3, 4, (2, h, h, cin)), jnp.float32)
    w = jnp.asarray(rng.integers(-3, 4, (k, k, cin, cout)), jnp.float32)
    conv = lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), [(pad, pad)] * 2,
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def value_and_grads(x, w):
        y, vjp = jax.vjp(conv, x, w)
        return (y, *vjp(jnp.round(y / 16)))  # integer cotangents

    opts = parallel.compiler_options()
    fast = jax.jit(value_and_grads, compiler_options=opts)
    assert "ynn_fusion" not in fast.lower(x, w).compile().as_text()
    for a, b in zip(fast(x, w), jax.jit(value_and_grads)(x, w)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_compiler_options_are_cpu_only_and_yield_to_xla_flags(monkeypatch):
    accepted = parallel._cpu_options_accepted()
    assert parallel.compiler_options() == (parallel.CPU_COMPILER_OPTIONS if accepted else None)

    class Gpu:
        platform = "gpu"

    assert parallel.compiler_options([Gpu()]) is None
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    assert parallel.compiler_options() is None  # the user's explicit choice wins


def test_compiler_options_fall_back_where_jaxlib_rejects_them(monkeypatch):
    """An older (or newer) jaxlib that does not know the option compiles with its defaults."""
    monkeypatch.setattr(parallel, "CPU_COMPILER_OPTIONS", {"xla_cpu_no_such_option": True})
    parallel._cpu_options_accepted.cache_clear()
    try:
        assert parallel.compiler_options() is None
    finally:
        parallel._cpu_options_accepted.cache_clear()


# A 64 MiB temporary (the fenced exp is stored, then summed): prints keep_host_memory's result
# (None: not called) and the median page faults of eight runs after two (a kept heap can take
# one more fresh block in its first runs)
_FAULTS_OF_A_RUN = """
import resource, statistics, sys
import jax, jax.numpy as jnp
from zoo import layers, parallel
kept = parallel.keep_host_memory() if sys.argv[1] == "keep" else None
run = jax.jit(lambda x: layers.fence(jnp.exp, x).sum())
x = jnp.ones((4096, 4096))
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(run(x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, int(statistics.median(faults[2:])))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="tunes glibc's malloc")
def test_keep_host_memory_stops_every_run_faulting_its_temporaries_in(env):
    """Without it, each run of a program with a 64 MiB temporary takes a page fault per 4 KiB
    page of it (16,384); with it, the runs reuse the memory of the first ones."""
    runs = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", _FAULTS_OF_A_RUN, mode], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        kept, faults = out.stdout.split()
        runs[mode] = (kept, int(faults))
    assert runs["keep"][0] == "True" and runs["keep"][1] < 1024, runs
    assert runs["default"][1] > runs["keep"][1], runs


def test_train_step_under_cpu_options_updates_as_under_xla_defaults():
    """One simple_cnn step through `parallel.jit_step` (the loop's and the bench's) and through
    a plain `jax.jit`: the same loss and parameters up to float32 summation order."""
    model = zoo.create_model("simple_cnn")
    tx = training.make_optimizer(training.Recipe("momentum", lr=0.1),
                                 optax.constant_schedule(0.1))
    state = training.create_train_state(model, tx, (28, 28, 1))
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(8, 28, 28, 1)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, 8)), "mask": jnp.ones((8,), bool)}
    mesh = parallel.make_mesh(jax.devices()[:1])
    fast = parallel.jit_step(training.train_step, mesh, donate=False)
    assert "ynn_fusion" not in fast.lower(state, batch).compile().as_text()
    (s1, m1), (s2, m2) = fast(state, batch), jax.jit(training.train_step)(state, batch)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    # p - lr * g: the gradients' rounding differences are far below float32's 1e-5 of p
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 s1.params, s2.params)
