"""zoo.nnx: the same models as NNX modules, with the linen variables and outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import zoo
import zoo.nnx


@pytest.fixture(scope="module")
def shipped():
    """The shipped resnet20 (BatchNorm) as linen model, variables and input shape."""
    model, variables, info = zoo.load_pretrained("resnet20_fashion_mnist")
    return model, variables, (32, 32, 1)


def batch(n=8, shape=(32, 32, 1)):
    x = jax.random.normal(jax.random.key(0), (n, *shape))
    return x, jnp.arange(n) % 2


def test_nnx_outputs_equal_linen_for_the_same_variables(shipped):
    linen, variables, shape = shipped
    model = zoo.nnx.load_pretrained("resnet20_fashion_mnist")
    x, _ = batch()
    np.testing.assert_array_equal(model(x), linen.apply(variables, x, train=False))
    model.train()
    got = model(x)  # batch statistics; the running ones move
    want, updates = linen.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(got, want)
    jax.tree.map(np.testing.assert_array_equal, model.variables()["batch_stats"],
                 updates["batch_stats"])
    # the linen variables come back out unchanged in layout
    assert jax.tree.structure(model.variables()["params"]) == \
        jax.tree.structure(variables["params"])


def test_converted_torchvision_weights_load_into_nnx():
    torch = pytest.importorskip("torch")
    from zoo import convert, parity

    tv = parity.torchvision_model("resnet18", num_classes=3, calibrate=False)
    variables, kwargs, _ = convert.convert_state_dict("resnet18", tv.state_dict())
    linen = zoo.create_model("resnet18", **kwargs)
    model = zoo.nnx.from_linen(linen, variables, (32, 32, 3))
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3), np.float32)
    with torch.no_grad():
        ref = tv(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    out = np.asarray(model(jnp.asarray(x)))
    assert np.abs(out - ref).max() < 1e-4 * np.abs(ref).max()


@nnx.jit
def train_step(model, optimizer, x, y):
    def loss_fn(model):
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, optimizer.wrt))(model)
    optimizer.update(model, grads)
    return loss


def test_nnx_optimizer_step_updates_params_and_batchnorm():
    model = zoo.nnx.create_model("resnet20", num_classes=2, input_shape=(32, 32, 1))
    before = jax.tree.map(np.asarray, model.variables())
    model.train()
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    x, y = batch()
    assert np.isfinite(float(train_step(model, optimizer, x, y)))
    after = model.variables()
    for collection in ("params", "batch_stats"):
        moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), before[collection],
                             after[collection])
        assert all(jax.tree.leaves(moved)), collection  # every tensor changed


def test_frozen_backbone_nnx_step_moves_only_the_head(shipped):
    """A linear probe: the shipped backbone under a new 2-class head, BatchNorm in eval mode
    and only the head's parameters in the optimizer."""
    _, variables, shape = shipped
    model = zoo.nnx.create_model("resnet20", num_classes=2, input_shape=shape)
    model.load(variables, skip=("fc",))
    before = jax.tree.map(np.asarray, model.variables())
    model.eval()
    head = nnx.All(nnx.Param, nnx.PathContains("fc"))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=head)
    x, y = batch()
    for _ in range(3):
        train_step(model, optimizer, x, y)
    after = model.variables()
    for collection, tree in before.items():
        for name, sub in tree.items():
            same = jax.tree.leaves(jax.tree.map(np.array_equal, sub, after[collection][name]))
            assert all(same) == (name != "fc"), (collection, name)


def test_load_refuses_variables_of_another_model(shipped):
    _, variables, _ = shipped
    model = zoo.nnx.create_model("resnet20", num_classes=2, input_shape=(32, 32, 1))
    with pytest.raises(ValueError, match=r"2 mis-shaped: .*params/fc/kernel is \(64, 10\), "
                                         r"the model needs \(64, 2\)"):
        model.load(variables)  # a 10-class head into a 2-class model
    other = zoo.nnx.create_model("simple_cnn")
    with pytest.raises(ValueError, match="missing"):
        other.load(variables)
