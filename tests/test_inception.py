"""GoogLeNet and Inception v3: exact parameter counts, the Inception block, train/eval outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.models.inception import InceptionBlock


def count(tree):
    return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))


def abstract_init(name, size=None, **kw):
    model = zoo.create_model(name, **kw)
    shape = (1, *(size or zoo.model_info(name).input_size))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


# torchvision's counts (its `meta["num_params"]` is the count without the auxiliary heads).
@pytest.mark.parametrize("name,aux,params", [
    ("googlenet", True, 13_004_888), ("googlenet", False, 6_624_904),
    ("inception_v3", True, 27_161_264), ("inception_v3", False, 23_834_568)])
def test_param_count(name, aux, params):
    assert count(abstract_init(name, aux_logits=aux)["params"]) == params


def test_features_only():
    variables = abstract_init("googlenet", num_classes=0)
    assert jax.eval_shape(zoo.create_model("googlenet", num_classes=0).apply, variables,
                          jnp.zeros((1, 224, 224, 3))).shape == (1, 1024)
    variables = abstract_init("inception_v3", num_classes=0)
    assert "AuxLogits" not in variables["params"]  # no head, no auxiliary head
    assert jax.eval_shape(zoo.create_model("inception_v3", num_classes=0).apply, variables,
                          jnp.zeros((1, 299, 299, 3))).shape == (1, 2048)


@pytest.mark.parametrize("kernel", [3, 5])
def test_inception_block(kernel):
    # inception3a: 64 + 128 + 32 + 32 = 256 channels; the 5x5 branch has (k*k*16)*32 conv weights
    block = InceptionBlock((64, 96, 128, 16, 32, 32), branch3_kernel=kernel)
    x = jnp.ones((1, 7, 7, 192))
    variables, y = jax.eval_shape(lambda: block.init_with_output(jax.random.key(0), x)[::-1])
    assert y.shape == (1, 7, 7, 256)
    assert variables["params"]["branch3_1"]["conv"]["kernel"].shape == (kernel, kernel, 16, 32)


def test_googlenet_forward_and_train_step():
    model = zoo.create_model("googlenet")
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 15, 15, 3)), jnp.float32)
    # random weights from the abstract tree: `model.init`'s compiled random init would cost
    # ~30 s of CPU; BatchNorm statistics start at mean 1, var 1
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    rng = np.random.default_rng(0)
    variables = {"params": jax.tree_util.tree_map(
                     lambda s: rng.normal(0, 0.05, s.shape).astype(np.float32), shapes["params"]),
                 "batch_stats": jax.tree_util.tree_map(
                     lambda s: np.ones(s.shape, np.float32), shapes["batch_stats"])}

    @jax.jit  # one compilation for both modes
    def run(variables, x):
        return model.apply(variables, x), model.apply(
            variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)})

    logits, ((train_logits, aux), updates) = run(variables, x)  # 15x15: the smallest input
    assert logits.shape == (1, 1000) and logits.dtype == jnp.float32
    assert np.isfinite(logits).all()
    assert train_logits.shape == (1, 1000) and len(aux) == 2
    assert all(a.shape == (1, 1000) and a.dtype == jnp.float32 for a in aux)
    stats = updates["batch_stats"]
    assert not np.allclose(stats["conv1"]["bn"]["mean"], 1.0)
    assert not np.allclose(stats["aux1"]["conv"]["bn"]["mean"], 1.0)  # aux heads ran in train mode


def test_input_size():
    abstract_init("inception_v3", size=(75, 75, 3))  # torchvision's min_size, aux head included
    model = zoo.create_model("inception_v3")
    with pytest.raises(ValueError, match=r"inception_v3 expects .* >= 75"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
