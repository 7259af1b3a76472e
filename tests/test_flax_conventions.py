"""Zoo models applied the way other Flax code applies them: a call without `train` trains
exactly when BatchNorm statistics may change, so neither convention is silently wrong."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import zoo


class TrainState(train_state.TrainState):
    batch_stats: dict


def flax_examples_train_step(state, batch):
    """Flax's examples/imagenet train step (weight decay and lr schedule left out): no `train`
    argument, `mutable=['batch_stats']`."""
    def loss_fn(params):
        logits, new_model_state = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, batch["image"],
            mutable=["batch_stats"])
        one_hot = jax.nn.one_hot(batch["label"], logits.shape[-1])
        loss = optax.softmax_cross_entropy(logits=logits, labels=one_hot).mean()
        return loss, (new_model_state, logits)

    (loss, (new_model_state, logits)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads=grads,
                                      batch_stats=new_model_state["batch_stats"])
    return new_state, loss, logits


@pytest.fixture(scope="module")
def resnet():
    model = zoo.create_model("resnet20")
    x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
    variables = model.init(jax.random.key(1), x)  # init without `train`: evaluation mode
    return model, variables, {"image": x, "label": jnp.arange(8) % 10}


def test_flax_examples_train_step_trains_batchnorm(resnet):
    model, variables, batch = resnet
    state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                              batch_stats=variables["batch_stats"], tx=optax.sgd(0.1))
    new, loss, logits = jax.jit(flax_examples_train_step)(state, batch)
    # the same as the zoo's explicit training call: batch statistics, updated running ones. Up
    # to float32 rounding: on CPU the stem's sum of taps is one compiled loop in the step, where
    # XLA may fuse multiply-adds, and separate operations in this op-by-op call (~1e-6 in the
    # logits); evaluation-mode statistics would differ by O(1).
    want, updates = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"])
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
    close(logits, want)
    jax.tree.map(close, new.batch_stats, updates["batch_stats"])
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new.batch_stats,
                         variables["batch_stats"])
    assert min(jax.tree.leaves(moved)) > 0  # every running statistic changed
    assert np.isfinite(float(loss))


def test_a_plain_apply_evaluates(resnet):
    model, variables, batch = resnet
    plain = model.apply(variables, batch["image"])
    np.testing.assert_array_equal(plain, model.apply(variables, batch["image"], train=False))
    assert not np.array_equal(plain, model.apply(variables, batch["image"], train=True,
                                                 mutable=["batch_stats"])[0])
    # Flax's eval step passes train=False and mutable=False: the same
    np.testing.assert_array_equal(
        plain, model.apply(variables, batch["image"], train=False, mutable=False))


def test_explicit_train_wins_over_mutability(resnet):
    """`train=False` with a mutable collection (e.g. a frozen-BatchNorm fine-tune that still
    threads batch_stats through) keeps the running statistics."""
    model, variables, batch = resnet
    out, updates = model.apply(variables, batch["image"], train=False, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])
    np.testing.assert_array_equal(out, model.apply(variables, batch["image"], train=False))


@pytest.mark.parametrize("name", ["simple_cnn", "lenet5", "strided_cnn", "vgg11_bn", "alexnet",
                                  "googlenet", "inception_v3", "resnet18"])
def test_every_family_follows_the_rule(name):
    """Each family's top-level call takes `train=None`: init and plain apply evaluate."""
    model = zoo.create_model(name, num_classes=4)
    info = zoo.model_info(name)
    size = (info.min_size, info.min_size, info.input_size[2])
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                               jax.ShapeDtypeStruct((1, *size), jnp.float32))
    assert jax.tree.leaves(variables["params"])
    out = jax.eval_shape(lambda v, x: model.apply(v, x), variables,
                         jax.ShapeDtypeStruct((2, *size), jnp.float32))
    assert out.shape == (2, 4)  # evaluation: no auxiliary outputs, no dropout rng needed
