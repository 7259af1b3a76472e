"""Backbones: `create_model(name, features_only=True, out_indices=...)` and `feature_info` for
every registered model, the strict variable subset, bad options, nesting and training.
(Stage parity with torchvision is in tests/test_convert.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util
from flax.core import freeze

import zoo
from zoo.features import BackboneVariablesError, backbone_variables, feature_maps
from zoo.registry import abstract_variables


def _shapes(model, size, channels):
    """The outputs of `model.init` on a (1, size, size, channels) batch, as shapes."""
    x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
    return jax.eval_shape(lambda a: model.init_with_output(jax.random.key(0), a)[0], x)


@pytest.mark.parametrize("name", zoo.list_models())
def test_feature_info_is_what_the_backbone_returns(name):
    """Channels, nominal reductions and names of `feature_info` are the backbone's own: the
    maps grow by exactly D / reduction when the input grows by D (a multiple of every
    stride), and each name is the top-level module (as `zoo.feature_maps` names them) whose
    output has the stage map's size."""
    info = zoo.model_info(name)
    stages, (size, c) = info.feature_info, (info.min_size, info.input_size[2])
    assert stages and len({s.name for s in stages}) == len(stages)
    backbone = zoo.create_model(name, features_only=True)
    tops = {}

    def record(next_fun, args, kwargs, ctx):  # feature_maps' rule, inside the traced init
        out = next_fun(*args, **kwargs)
        if ctx.method_name == "__call__" and len(ctx.module.path) == 1 and out.ndim == 4:
            tops[ctx.module.path[0]] = out.shape
        return out

    with nn.intercept_methods(record):
        small = _shapes(backbone, size, c)
    grow = 2 * max(s.reduction for s in stages)
    large = _shapes(backbone, size + grow, c)
    assert [m.shape[-1] for m in small] == [s.channels for s in stages]
    assert [(b.shape[1] - a.shape[1]) * s.reduction
            for a, b, s in zip(small, large, stages)] == [grow] * len(stages)
    assert all(m.dtype == jnp.float32 for m in small)
    assert [tops[s.name][1:3] for s in stages] == [m.shape[1:3] for m in small]


def test_resnet50_feature_info_and_torch_names():
    assert [(s.name, s.channels, s.reduction, s.torch_module)
            for s in zoo.model_info("resnet50").feature_info] == [
        ("bn1", 64, 2, "relu"), ("layer1_2", 256, 4, "layer1"), ("layer2_3", 512, 8, "layer2"),
        ("layer3_5", 1024, 16, "layer3"), ("layer4_2", 2048, 32, "layer4")]
    assert [s.torch_module for s in zoo.model_info("vgg16_bn").feature_info] == [
        "features.5", "features.12", "features.22", "features.32", "features.42"]
    assert [s.name for s in zoo.model_info("vgg16").feature_info] == [
        "features_2", "features_7", "features_14", "features_21", "features_28"]
    assert [s.name for s in zoo.model_info("googlenet").feature_info] == [
        "conv1", "conv3", "inception3b", "inception4e", "inception5b"]


def test_out_indices_select_order_and_stop_early():
    """Maps come in out_indices order, and nothing after the last one is built."""
    backbone = zoo.create_model("resnet50", features_only=True, out_indices=(3, 1))
    variables = abstract_variables(backbone, (64, 64, 3))
    assert "layer3_5" in variables["params"] and "layer4_0" not in variables["params"]
    assert "fc" not in variables["params"]
    maps = jax.eval_shape(backbone.apply, variables, jax.ShapeDtypeStruct((2, 64, 64, 3),
                                                                          jnp.float32))
    assert [m.shape for m in maps] == [(2, 4, 4, 1024), (2, 16, 16, 256)]
    bf16 = zoo.create_model("vgg11", features_only=True, out_indices=(0,), dtype=jnp.bfloat16)
    assert _shapes(bf16, 32, 3)[0].dtype == jnp.bfloat16  # maps stay in compute dtype


@pytest.mark.parametrize("options,match", [
    (dict(out_indices=(1, 5)), r"has 5 out of range 0-4"),
    (dict(out_indices=(2, 2)), r"repeats 2"),
    (dict(out_indices=()), r"is empty"),
    (dict(out_indices=("layer1",)), r"not a sequence of integers"),
    (dict(out_indices=3), r"not a sequence of integers"),
])
def test_bad_out_indices_name_the_stages(options, match):
    with pytest.raises(ValueError, match=match) as e:
        zoo.create_model("resnet18", features_only=True, **options)
    assert ("its stages are 0 bn1 (64 channels, stride 2), 1 layer1_1 (64 channels, stride 4), "
            "2 layer2_1 (128 channels, stride 8), 3 layer3_1 (256 channels, stride 16), "
            "4 layer4_1 (512 channels, stride 32)") in str(e.value)


def test_other_bad_options(monkeypatch):
    from zoo import registry

    plain = registry._Entry(zoo.create_model("simple_cnn").clone,
                            registry.ModelInfo("plain", "simple", (28, 28, 1), 10, 28))
    monkeypatch.setitem(registry._REGISTRY, "plain", plain)  # a family that declares no stages
    with pytest.raises(ValueError, match="plain declares no feature stages"):
        zoo.create_model("plain", features_only=True)
    with pytest.raises(ValueError, match="need features_only=True"):
        zoo.create_model("resnet18", out_indices=(1,))
    with pytest.raises(ValueError, match="its options are .*out_indices"):
        zoo.create_model("resnet18", features_only=True, out_stride=8)
    with pytest.raises(ValueError, match=r"has 3 out of range 0-2; its stages are 0 conv1"):
        zoo.create_model("simple_cnn", features_only=True, out_indices=(0, 3))
    # a module built by hand (no registry) with a stage it does not have
    with pytest.raises(ValueError, match=r"out_indices \(7,\): the model has 5 stages"):
        _shapes(zoo.create_model("resnet18").clone(features_only=True, out_indices=(7,)), 32, 3)


def _random(shapes, seed=0):
    """Random arrays for an abstract variable tree (no compiled init: it costs more than the
    tests); BatchNorm variances positive."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: (rng.uniform(0.5, 1.5, s.shape) if path[-1].key == "var"
                         else rng.normal(0, 0.1, s.shape)).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def resnet18():
    """resnet18 classifier variables (10 classes) and a 32x32 batch."""
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    return _random(abstract_variables(zoo.create_model("resnet18", num_classes=10),
                                      (32, 32, 3))), x


def test_backbone_variables_are_the_classifier_minus_its_head(resnet18):
    variables, x = resnet18
    sub = backbone_variables("resnet18", freeze(variables))
    assert set(variables["params"]) - set(sub["params"]) == {"fc"}
    assert sub["params"]["layer4_1"]["conv2"]["kernel"] is variables["params"]["layer4_1"][
        "conv2"]["kernel"]
    backbone = zoo.create_model("resnet18", features_only=True)
    stages = backbone.apply(sub, x)
    # the classifier's own maps: layer4's output pooled and through fc gives its logits
    logits = zoo.create_model("resnet18", num_classes=10).apply(variables, x)
    head = variables["params"]["fc"]
    np.testing.assert_allclose(stages[-1].mean(axis=(1, 2)) @ head["kernel"] + head["bias"],
                               logits, rtol=1e-5, atol=1e-5)
    # fewer stages: later stages are left out too, strictly
    short = backbone_variables("resnet18", variables, out_indices=(0, 1))
    assert "layer2_0" not in short["params"] and "layer1_1" in short["params"]


def test_backbone_variables_strict_errors(resnet18):
    variables, _ = resnet18
    flat = traverse_util.flatten_dict(variables, sep="/")
    broken = dict(flat)
    del broken["batch_stats/layer2_1/bn2/var"]
    broken["params/conv1/kernel"] = np.zeros((3, 3, 3, 64), np.float32)
    broken["params/layer1_0/conv3/kernel"] = np.zeros((1, 1, 64, 64), np.float32)
    broken["params/neck/kernel"] = np.zeros((1,), np.float32)
    with pytest.raises(BackboneVariablesError) as e:
        backbone_variables("resnet18", traverse_util.unflatten_dict(broken, sep="/"))
    err = e.value
    assert err.missing == ["batch_stats/layer2_1/bn2/var"]
    assert err.mismatched == ["params/conv1/kernel is (3, 3, 3, 64), the backbone needs "
                              "(7, 7, 3, 64)"]
    assert sorted(err.unexpected) == ["params/layer1_0/conv3/kernel", "params/neck/kernel"]
    assert "1 missing: batch_stats/layer2_1/bn2/var" in str(err)
    with pytest.raises(BackboneVariablesError) as e:
        backbone_variables("resnet50", variables)  # another architecture's variables
    assert "params/layer1_0/conv3/kernel" in e.value.missing


class Detector(nn.Module):
    """A toy dense-prediction model: a zoo backbone and one 1x1 conv per stage (an FPN's
    lateral convs)."""

    backbone: nn.Module

    @nn.compact
    def __call__(self, x, train: bool | None = None):
        maps = self.backbone(x, train=train)
        return [nn.Conv(4, (1, 1), name=f"lateral{i}")(m) for i, m in enumerate(maps)]


def test_backbone_nests_trains_and_loads_classifier_weights(resnet18):
    classifier_vars, x = resnet18
    det = Detector(zoo.create_model("resnet18", features_only=True, out_indices=(2, 3, 4)))
    variables = _random(jax.eval_shape(det.init, jax.random.key(2), x), seed=1)
    assert set(variables["params"]) == {"backbone", "lateral0", "lateral1", "lateral2"}
    # the classifier's variables, minus fc, are the backbone's
    sub = backbone_variables("resnet18", classifier_vars, out_indices=(2, 3, 4))
    jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), sub,
                 {k: v["backbone"] for k, v in variables.items()})
    variables = {k: {**v, "backbone": sub[k]} for k, v in variables.items()}
    ref = zoo.create_model("resnet18", features_only=True, out_indices=(2, 3, 4)).apply(sub, x)
    outs = det.apply(variables, x)  # no train and nothing mutable: evaluation
    np.testing.assert_allclose(
        outs[0], nn.Conv(4, (1, 1)).apply({"params": variables["params"]["lateral0"]}, ref[0]),
        rtol=1e-5, atol=1e-5)

    @jax.jit
    def step(variables, x):
        def loss(params):
            outs, updates = det.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                      x, mutable=["batch_stats"])  # Flax's convention: trains
            return sum(jnp.mean(o ** 2) for o in outs), updates
        (value, updates), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        return value, grads, updates

    value, grads, updates = step(variables, x)
    assert np.isfinite(value)
    old, new = variables["batch_stats"]["backbone"], updates["batch_stats"]["backbone"]
    assert not np.allclose(old["bn1"]["mean"], new["bn1"]["mean"])
    assert not np.allclose(old["layer4_1"]["bn2"]["var"], new["layer4_1"]["bn2"]["var"])
    assert np.abs(grads["backbone"]["conv1"]["kernel"]).max() > 0
    assert np.abs(grads["backbone"]["layer4_1"]["conv2"]["kernel"]).max() > 0
