"""AlexNet and VGG: exact parameter counts, forward passes at the smallest inputs, BN, bf16, errors."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo


def abstract_init(name, size=None, **kw):
    model = zoo.create_model(name, **kw)
    shape = (1, *(size or zoo.model_info(name).input_size))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


def count(tree):
    return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))


# Conv layers have (F*F*D + 1) * K parameters, dense layers (D + 1) * K.
#   3x3 convs: 3->64 1,792; 64->64 36,928; 64->128 73,856; 128->128 147,584; 128->256 295,168;
#              256->256 590,080; 256->512 1,180,160; 512->512 2,359,808.
#   1x1 convs (C): 256->256 65,792; 512->512 262,656.
#   FC: 7*7*512 -> 4096 102,764,544; 4096 -> 4096 16,781,312; 4096 -> 1000 4,097,000.
# A = 1,792 + 73,856 + 295,168 + 590,080 + 1,180,160 + 3 * 2,359,808 (convs 9,220,480)
#     + 123,642,856 (FCs) = 132,863,336 (= torchvision's vgg11; LRN and pools have none).
# B = A + 36,928 + 147,584 = 133,047,848.
# D = B + 590,080 + 2 * 2,359,808 = 138,357,544;  E = D + 590,080 + 2 * 2,359,808 = 143,667,240.
# C = D with the third conv of stages 3-5 at 1x1: D - 590,080 - 2 * 2,359,808 + 65,792
#     + 2 * 262,656 = 133,638,952 (the paper's "134M").
# alexnet_lrn: conv1 (11*11*3+1)*96 = 34,944; conv2 (5*5*96+1)*256 = 614,656;
#   conv3 (9*256+1)*384 = 885,120; conv4 (9*384+1)*384 = 1,327,488; conv5 (9*384+1)*256 = 884,992;
#   FC6 (6*6*256+1)*4096 = 37,752,832; FC7 16,781,312; FC8 4,097,000; total 62,378,344.
PARAMS = {
    "alexnet": 61_100_840, "alexnet_lrn": 62_378_344,
    "vgg11": 132_863_336, "vgg11_bn": 132_868_840, "vgg13": 133_047_848,
    "vgg13_bn": 133_053_736, "vgg16": 138_357_544, "vgg16_bn": 138_365_992,
    "vgg19": 143_667_240, "vgg19_bn": 143_678_248,
    "vgg_a": 132_863_336, "vgg_a_lrn": 132_863_336, "vgg_b": 133_047_848,
    "vgg_c": 133_638_952, "vgg_d": 138_357_544, "vgg_e": 143_667_240,
}


def test_every_model_is_counted():
    assert sorted(PARAMS) == zoo.list_models("alexnet*") + zoo.list_models("vgg*")


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_param_count(name):
    assert count(abstract_init(name)["params"]) == PARAMS[name]


def test_batch_norm_statistics():
    # vgg11_bn: one BN per conv, 64 + 128 + 2*256 + 4*512 = 2,752 channels, mean and var each
    assert count(abstract_init("vgg11_bn")["batch_stats"]) == 2 * 2_752


@pytest.fixture(scope="module")
def vgg11():
    x = jax.random.normal(jax.random.key(1), (1, 32, 32, 3))
    variables = jax.jit(zoo.create_model("vgg11").init)(jax.random.key(0), x)
    return variables, x


def test_vgg11_forward_at_32(vgg11):
    variables, x = vgg11
    logits = jax.jit(zoo.create_model("vgg11").apply)(variables, x)
    assert logits.shape == (1, 1000) and logits.dtype == jnp.float32
    assert np.isfinite(logits).all()
    features = jax.jit(zoo.create_model("vgg11", num_classes=0).apply)(variables, x)
    assert features.shape == (1, 4096) and (features >= 0).all()  # after FC7's ReLU


def test_bfloat16_matches_float32(vgg11):
    variables, x = vgg11
    f32 = jax.jit(zoo.create_model("vgg11").apply)(variables, x)
    bf16 = jax.jit(zoo.create_model("vgg11", dtype=jnp.bfloat16).apply)(variables, x)
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(bf16, f32, atol=0.05 * float(jnp.abs(f32).max()))


def test_alexnet_lrn_forward_at_227():
    model = zoo.create_model("alexnet_lrn")
    x = jax.random.normal(jax.random.key(1), (1, 227, 227, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    logits = jax.jit(model.apply)(variables, x)
    assert logits.shape == (1, 1000) and np.isfinite(logits).all()


def test_alexnet_lrn_summary_matches_the_notes():
    rows = {r.name: r for r in zoo.summary("alexnet_lrn").rows}
    assert rows["features_0"].output_shape == (55, 55, 96)  # CONV1
    assert rows["features_2"].output_shape == (27, 27, 96)  # POOL1
    assert rows["features_3"].kind == "LocalResponseNorm"  # NORM1
    assert rows["features_14"].output_shape == (6, 6, 256)  # POOL3


def test_vgg11_bn_train_step_updates_batch_stats():
    model = zoo.create_model("vgg11_bn", num_classes=10)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    logits, updates = jax.jit(partial(model.apply, train=True, mutable=["batch_stats"]))(
        variables, x, rngs={"dropout": jax.random.key(2)})
    assert logits.shape == (2, 10) and np.isfinite(logits).all()
    old, new = variables["batch_stats"]["features_1"], updates["batch_stats"]["features_1"]
    assert not np.allclose(old["mean"], new["mean"]) and not np.allclose(old["var"], new["var"])


def test_wrong_input_raises_a_clear_error():
    with pytest.raises(ValueError, match=r"alexnet expects .*\(N, H, W, 3\) with H, W >= 63"):
        abstract_init("alexnet", size=(28, 28, 1))
    with pytest.raises(ValueError, match="too small"):
        abstract_init("alexnet", size=(62, 62, 3))
    abstract_init("alexnet", size=(63, 63, 3))  # torchvision's min_size
    abstract_init("vgg11", size=(32, 32, 3))


@pytest.mark.parametrize("name,size", [("alexnet_lrn", 260), ("vgg_a", 256)])
def test_paper_heads_need_their_input_size(name, size):
    s = zoo.model_info(name).input_size[0]
    with pytest.raises(ValueError, match=rf"{name} expects images of shape \(N, {s}, {s}, 3\)"):
        abstract_init(name, size=(size, size, 3))
