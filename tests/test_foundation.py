"""The foundation: the arithmetic through zoo.layers, pools, the conv fast path, filters, LRN,
parameter counts and the registry (the notes' worked examples are in test_notes.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo import layers


def param_count(name, **kw):
    model = zoo.create_model(name, **kw)
    shape = (1, *zoo.model_info(name).input_size)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))
    return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(variables["params"]))


@pytest.mark.parametrize("n,f,s,p,out", [
    (7, 3, 1, 0, 5), (7, 3, 2, 0, 3),     # the 7x7 input, 3x3 filter cases
    (7, 3, 1, 1, 7), (7, 3, 2, 1, 4),     # ... with padding 1
    (32, 5, 1, 2, 32),                    # 32x32x3, 5x5 filters, pad 2 keeps 32
    (4, 3, 1, 1, 4), (4, 3, 3, 1, 2),     # the 4x4 input, pad 1 table
    (227, 11, 4, 0, 55), (55, 3, 2, 0, 27),  # AlexNet CONV1 and POOL1
])
def test_conv_output_size(n, f, s, p, out):
    assert layers.conv_output_size(n, f, s, p) == out


@pytest.mark.parametrize("n,f,s,p", [(7, 3, 3, 0), (4, 3, 2, 1)])  # 2.33 and 2.5 in the notes
def test_conv_output_size_rejects_non_integer(n, f, s, p):
    with pytest.raises(ValueError, match="not an integer"):
        layers.conv_output_size(n, f, s, p)


def test_conv_output_size_dilation():
    assert layers.conv_output_size(7, 3, dilation=2) == 3


def test_conv_param_count():
    assert layers.conv_param_count(5, 3, 10) == 760          # 10 5x5x3 filters + biases
    assert layers.conv_param_count(3, 3, 10, bias=False) == 270  # the 3x3x3x10 example
    assert layers.conv_param_count(3, 1, 32) == 320           # Keras conv2d_3
    assert layers.conv_param_count(3, 32, 64) == 18_496       # Keras conv2d_4


def test_receptive_field():
    assert layers.receptive_field([(3, 1)]) == 3
    assert layers.receptive_field([(3, 1), (3, 1)]) == 5      # two 3x3 see 5x5
    assert layers.receptive_field([(3, 1)] * 3) == 7
    assert layers.receptive_field([(3, 1, 2)]) == 5           # dilated 3x3
    assert layers.receptive_field([(11, 4), (3, 2)]) == 19    # AlexNet conv1 + pool1


def test_maxpool_ceil_mode_matches_torch_rule():
    x = jnp.arange(7 * 7, dtype=jnp.float32).reshape(1, 7, 7, 1)
    assert layers.MaxPool(3, 2).apply({}, x).shape == (1, 3, 3, 1)
    assert layers.MaxPool(3, 2, ceil_mode=True).apply({}, x).shape == (1, 3, 3, 1)
    y = jnp.zeros((1, 112, 112, 1))  # GoogLeNet's first pool: 112 -> 56 with ceil_mode
    assert layers.MaxPool(3, 2, ceil_mode=True).apply({}, y).shape == (1, 56, 56, 1)
    assert layers.MaxPool(3, 2).apply({}, y).shape == (1, 55, 55, 1)


def test_adaptive_avg_pool_uneven_bins():
    x = jnp.arange(5, dtype=jnp.float32).reshape(1, 5, 1, 1) * jnp.ones((1, 1, 5, 1))
    out = layers.AdaptiveAvgPool(3).apply({}, x)[0, :, 0, 0]
    np.testing.assert_allclose(out, [0.5, 2.0, 3.5])  # bins [0,2), [1,4), [3,5) as in torch


@pytest.mark.parametrize("hw, k, stride, padding", [
    (2, 3, 1, 1), (1, 3, 1, 1), (4, 3, 2, 1), (3, 1, 2, 0), (4, 3, 2, "SAME"), (2, 2, 1, "VALID")])
def test_conv_cpu_fast_path_is_the_same_convolution(hw, k, stride, padding):
    """Tiny maps take the patches-matmul path on CPU; values and gradients equal lax's conv."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, hw, hw, 5)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(k, k, 5, 7)), jnp.float32)
    pad = padding if isinstance(padding, str) else [(padding, padding)] * 2
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

    def loss(conv, x, w):
        return jnp.sum(jnp.sin(conv(x, w, (stride, stride), pad, dimension_numbers=dn)))

    ours = jax.value_and_grad(lambda x, w: loss(layers.conv_general_dilated, x, w), (0, 1))
    ref = jax.value_and_grad(lambda x, w: loss(jax.lax.conv_general_dilated, x, w), (0, 1))
    on_cpu = jax.default_backend() == "cpu"  # elsewhere it is lax's convolution unchanged
    assert ("conv_general_dilated" in str(jax.make_jaxpr(ours)(x, w))) != on_cpu
    for a, b in zip(jax.tree.leaves(ours(x, w)), jax.tree.leaves(ref(x, w))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    big = jnp.zeros((1, 8, 8, 5))  # larger maps stay convolutions (XLA's or oneDNN's)
    jaxpr = str(jax.make_jaxpr(
        lambda x: layers.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn))(big))
    assert "conv_general_dilated" in jaxpr or "ZooConvForward" in jaxpr


def test_sobel_on_step_image():
    step = np.zeros((5, 6), np.float32)
    step[:, 3:] = 1.0  # a vertical edge between columns 2 and 3
    gx = np.asarray(layers.apply_filter(step, "sobel_x"))
    gy = np.asarray(layers.apply_filter(step, "sobel_y"))
    np.testing.assert_array_equal(gx, np.tile([0, 4, 4, 0], (3, 1)))
    np.testing.assert_array_equal(gy, np.zeros((3, 4)))


def test_apply_filter_identity_stride_and_error():
    img = np.arange(49, dtype=np.float32).reshape(7, 7)
    np.testing.assert_array_equal(layers.apply_filter(img, "identity", padding=1), img)
    assert layers.apply_filter(img, "box_blur", stride=2).shape == (3, 3)
    with pytest.raises(ValueError, match="not an integer"):
        layers.apply_filter(img, "sharpen", stride=3)


def lrn_reference(x, size=5, alpha=1e-4, beta=0.75, k=2.0):
    c = x.shape[-1]
    out = np.empty_like(x)
    for i in range(c):
        lo, hi = max(0, i - size // 2), min(c, i + (size - 1) // 2 + 1)
        out[..., i] = x[..., i] / (k + alpha / size * (x[..., lo:hi] ** 2).sum(-1)) ** beta
    return out


def test_local_response_norm_matches_reference():
    x = np.random.default_rng(0).normal(0, 30, (2, 3, 3, 8)).astype(np.float32)
    for size in (5, 4):
        got = layers.LocalResponseNorm(size=size).apply({}, jnp.asarray(x))
        np.testing.assert_allclose(got, lrn_reference(x, size), rtol=1e-5)


@pytest.mark.parametrize("name", ["googlenet", "inception_v3", "resnext50_32x4d", "alexnet"])
def test_summary_arithmetic_agrees_with_the_traced_model(name):
    """Every size formula ends in the row's traced H and W, every parameter formula in its
    count from the variable tree (ceil_mode pools, 1x7 kernels, groups and floored sizes)."""
    s = zoo.summary(name, arithmetic=True)
    sized = [r for r in s.rows if r.size_arithmetic]
    assert len(sized) > 5
    for r in sized:
        axes = r.size_arithmetic.split("; W ") if "; W " in r.size_arithmetic else [
            r.size_arithmetic] * 2
        assert [int(a.rsplit(" ", 1)[1]) for a in axes] == list(r.output_shape[:2]), r
        assert r.tiles == ("->" not in r.size_arithmetic), r
    for r in s.rows:
        if r.param_arithmetic:
            assert int(r.param_arithmetic.rsplit("= ", 1)[1].replace(",", "")) == r.params, r
    assert sum(r.params for r in s.rows if r.param_arithmetic) == s.total_params - sum(
        r.params for r in s.rows if r.kind == "BatchNorm")


@pytest.mark.parametrize("name,count", [("simple_cnn", 93_322), ("lenet5", 61_706),
                                        ("strided_cnn", 4_816_258)])
def test_param_counts(name, count):
    assert param_count(name) == count
    assert zoo.summary(name).total_params == count


def test_lenet5_1998_variant_and_features():
    assert param_count("lenet5", activation="tanh", pooling="avg") == 61_706
    model = zoo.create_model("lenet5", num_classes=0)
    x = jnp.ones((2, 32, 32, 1))
    feats = model.apply(model.init(jax.random.key(0), x), x)
    assert feats.shape == (2, 84)


def test_strided_cnn_block_is_public_and_halves():
    from zoo.models.simple import StridedConvBlock
    x = jnp.ones((1, 28, 28, 3))
    block = StridedConvBlock(16)
    assert block.apply(block.init(jax.random.key(0), x), x).shape == (1, 14, 14, 16)


def test_registry():
    names = zoo.list_models()
    assert names == sorted(names) and {"lenet5", "simple_cnn", "strided_cnn"} <= set(names)
    assert zoo.list_models("lenet*") == ["lenet5"]
    info = zoo.model_info("lenet5")
    assert info.input_size == (32, 32, 1) and info.num_classes == 10
    with pytest.raises(ValueError, match="did you mean 'simple_cnn'"):
        zoo.create_model("simple_cnm")
    with pytest.raises(ValueError, match="options are"):
        zoo.create_model("lenet5", depth=3)
    with pytest.raises(ValueError, match="already registered"):
        zoo.register_model("lenet5", zoo.registry._entry("lenet5").factory, **{
            k: v for k, v in vars(info).items() if k != "name"})


@pytest.mark.parametrize("shape,match", [((2, 28, 28), "batch axis"),
                                          ((2, 28, 28, 3), "got 3 channels"),
                                          ((2, 16, 16, 1), "too small")])
def test_wrong_input_is_one_clear_error(shape, match):
    model = zoo.create_model("simple_cnn")
    with pytest.raises(ValueError, match=match) as e:
        model.init(jax.random.key(0), jnp.zeros(shape))
    assert "simple_cnn expects float images of shape (N, H, W, 1)" in str(e.value)


def test_bf16_forward_close_to_f32():
    x = jax.random.normal(jax.random.key(1), (4, 28, 28, 1))
    f32 = zoo.create_model("simple_cnn")
    variables = f32.init(jax.random.key(0), x)
    ref = f32.apply(variables, x)
    out = zoo.create_model("simple_cnn", dtype=jnp.bfloat16).apply(variables, x)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, atol=0.05 * float(jnp.abs(ref).max()) + 1e-3)
