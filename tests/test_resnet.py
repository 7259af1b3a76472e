"""ResNets: exact parameter counts, forward passes at the smallest inputs, BN, bf16, features."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.features import feature_maps
from zoo.models.resnet import Bottleneck, ResNet


def abstract_init(name, size=None, **kw):
    model = zoo.create_model(name, **kw)
    shape = (1, *(size or zoo.model_info(name).input_size))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


def key(seed=0):
    """An rbg key: on CPU its random ops compile far faster than threefry's (init dominates)."""
    return jax.random.key(seed, impl="rbg")


def count(tree):
    return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))


# CIFAR ResNets (He et al. 2016 §4.2, 6n + 2 layers): 3x3 convs without bias, BN 2 * C each,
# option-A shortcuts parameter-free.
#   stem conv 3->16 432 + BN 32 = 464
#   stage 1: 2n convs 16->16 (2,304 + BN 32)                    = 4,672 n
#   stage 2: conv 16->32 (4,608 + 64) + (2n-1) convs 32->32 (9,216 + 64)
#   stage 3: conv 32->64 (18,432 + 128) + (2n-1) convs 64->64 (36,864 + 128)
#   fc 64 * 10 + 10 = 650
#   total = 464 + 4,672 + 18,560 + 650 + 4,672 n + (2n - 1) * 46,272 = 97,216 n - 21,926:
#   resnet20 (n=3) 269,722; resnet32 464,154; resnet44 658,586; resnet56 853,018;
#   resnet110 (n=18) 1,727,962 (the paper's 0.27M and 1.7M).
PARAMS = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
    "resnet101": 44_549_160, "resnet152": 60_192_808, "wide_resnet50_2": 68_883_240,
    "resnext50_32x4d": 25_028_904,
    "resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586, "resnet56": 853_018,
    "resnet110": 1_727_962,
}


def test_every_model_is_counted():
    assert sorted(PARAMS) == sorted(n for n in zoo.list_models()
                                    if zoo.model_info(n).family == "resnet")


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_param_count(name):
    assert count(abstract_init(name)["params"]) == PARAMS[name]


def test_grayscale_cifar_resnet():
    # in_channels=1 only changes the stem conv: 3*3*1*16 = 144 instead of 432
    assert count(abstract_init("resnet20", (32, 32, 1), in_channels=1)["params"]) == 269_434


@pytest.mark.parametrize("name,dim", [("resnet18", 512), ("resnet50", 2048), ("resnet20", 64)])
def test_pooled_features(name, dim):
    model = zoo.create_model(name, num_classes=0)
    v = abstract_init(name, num_classes=0)
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 32, 32, 3))), v)
    assert out.shape == (2, dim) and out.dtype == jnp.float32
    assert "fc" not in v["params"]


@pytest.fixture(scope="module")
def resnet18():
    model = zoo.create_model("resnet18", num_classes=10)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 32, 32, 3)), jnp.float32)
    return model, model.init(key(), x), x


@pytest.fixture(scope="module")
def resnet20():
    model = zoo.create_model("resnet20")
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
    return model, model.init(key(), x), x


def test_resnet18_forward(resnet18):
    model, variables, x = resnet18
    y = model.apply(variables, x)
    assert y.shape == (1, 10) and y.dtype == jnp.float32 and np.isfinite(y).all()


def test_resnet20_forward(resnet20):
    model, variables, x = resnet20
    y = model.apply(variables, x)
    assert y.shape == (2, 10) and y.dtype == jnp.float32 and np.isfinite(y).all()


def test_bf16_matches_f32(resnet20):
    model, variables, x = resnet20
    y16 = zoo.create_model("resnet20", dtype=jnp.bfloat16).apply(variables, x)
    assert y16.dtype == jnp.float32
    np.testing.assert_allclose(y16, model.apply(variables, x), atol=0.1, rtol=0.1)


def test_train_mode_updates_batch_stats(resnet20):
    model, variables, x = resnet20
    y, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert np.isfinite(y).all()
    old, new = variables["batch_stats"], updates["batch_stats"]
    assert jax.tree_util.tree_structure(old) == jax.tree_util.tree_structure(new)
    assert not np.allclose(old["layer3_2"]["bn2"]["mean"], new["layer3_2"]["bn2"]["mean"])


def test_option_a_shortcut_has_no_params():
    params = abstract_init("resnet20")["params"]
    assert set(params["layer2_0"]) == {"conv1", "bn1", "conv2", "bn2"}
    assert "downsample_0" in abstract_init("resnet18")["params"]["layer2_0"]


def test_zero_init_residual():
    # a two-stage ResNet of small BasicBlocks: the option reaches every block (and only bn2)
    model = ResNet(num_classes=2, stage_sizes=(1, 2), widths=(8, 16), zero_init_residual=True)
    params = model.init(key(), jnp.zeros((1, 32, 32, 3)))["params"]
    blocks = [v for k, v in params.items() if k.startswith("layer")]
    assert len(blocks) == 3 and params["bn1"]["scale"].all()
    for block in blocks:
        assert not block["bn2"]["scale"].any() and block["bn1"]["scale"].all()
    assert params["layer2_0"]["downsample_1"]["scale"].all()
    params = Bottleneck(16, zero_init_residual=True).init(key(), jnp.zeros((1, 4, 4, 64)))["params"]
    assert not params["bn3"]["scale"].any() and params["bn2"]["scale"].all()


def test_feature_maps_resnet18(resnet18):
    model, variables, _ = resnet18
    x = jnp.zeros((1, 64, 64, 3))
    maps = feature_maps(model, variables, x)
    blocks = {f"layer{i}_{j}": (64 // 2 ** (i + 1), 64 * 2 ** (i - 1))
              for i in range(1, 5) for j in range(2)}
    expected = {"conv1": (32, 64), "bn1": (32, 64), "maxpool": (16, 64), **blocks}
    assert list(maps) == list(expected)
    assert {k: (m.shape[1], m.shape[3]) for k, m in maps.items()} == expected
    assert all(m.shape[0] == 1 and m.shape[1] == m.shape[2] for m in maps.values())
    # call order survives jax transformations (a plain dict would come back sorted)
    assert list(jax.eval_shape(lambda v: feature_maps(model, v, x), variables)) == list(expected)


def test_feature_maps_simple_cnn():
    model = zoo.create_model("simple_cnn")
    x = jnp.zeros((1, 28, 28, 1))
    maps = feature_maps(model, model.init(key(), x), x)
    assert {k: m.shape for k, m in maps.items()} == {
        "conv1": (1, 28, 28, 32), "pool1": (1, 14, 14, 32), "conv2": (1, 14, 14, 64),
        "pool2": (1, 7, 7, 64), "conv3": (1, 7, 7, 64), "pool3": (1, 3, 3, 64)}
    assert list(maps)[:2] == ["conv1", "pool1"]


@pytest.mark.parametrize("name,shape,match", [
    ("resnet18", (1, 16, 16, 3), "too small"),
    ("resnet18", (1, 3, 64, 64), "channels"),
    ("resnet20", (32, 32, 3), "batch axis"),
    ("resnet20", (1, 4, 4, 3), "too small"),
])
def test_wrong_input_raises(name, shape, match):
    model = zoo.create_model(name)
    with pytest.raises(ValueError, match=match):
        model.init(jax.random.key(0), jnp.zeros(shape))
