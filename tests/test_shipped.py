"""The shipped checkpoints: each reproduces its model card's test accuracy.

Exactly on the machine that trained it; on another CPU the logits differ in their last bits,
which can move an image across the top-1 (or top-5) boundary only where two logits are that
close, so the count may differ by at most the number of such near ties.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo import checkpoints, data

SHIPPED = sorted(p for p in zoo.CHECKPOINTS.iterdir() if (p / "model_card.json").is_file())


def test_checkpoints_are_shipped():
    assert {p.name for p in SHIPPED} == {
        "simple_cnn_fashion_mnist", "lenet5_fashion_mnist", "resnet20_fashion_mnist"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_evaluation_reproduces_the_model_card(path):
    try:
        data.prepare("fashion_mnist")
    except data.DatasetNotFoundError as e:
        pytest.skip(f"Fashion-MNIST unavailable (install Debian's dataset-fashion-mnist): {e}")
    model, variables, info, card = checkpoints.load_model(path)
    assert card == json.loads((path / "model_card.json").read_text())
    batches = data.make_dataset(card["dataset"], "test", info=info,
                                image_size=tuple(card["image_size"]), global_batch_size=500,
                                train=False)
    logits, labels = [], []
    apply = jax.jit(lambda x: model.apply(variables, x, train=False))
    for b in batches:
        logits.append(np.asarray(apply(jnp.asarray(b["image"])))[b["mask"]])
        labels.append(b["label"][b["mask"]])
    logits, labels = np.concatenate(logits), np.concatenate(labels)
    assert len(labels) == card["test_examples"] == 10_000
    ranked = np.sort(logits, axis=1)[:, ::-1]
    # float32 logits of these small nets agree across CPUs to ~1e-6 of their scale (the
    # torchvision parity table); 1e-4 of it is a generous bound on what rounding can swap
    close = np.abs(ranked[:, :-1] - ranked[:, 1:]) <= 1e-4 * np.abs(ranked).max(axis=1,
                                                                                keepdims=True)
    for k in (1, 5):
        correct = (np.argsort(-logits, axis=1)[:, :k] == labels[:, None]).any(axis=1).sum()
        expected = round(card[f"test_top{k}"] * len(labels) / 100)
        ties = int(close[:, k - 1].sum())  # images whose k-th and (k+1)-th logits nearly tie
        assert abs(int(correct) - expected) <= ties, (k, int(correct), expected, ties)
    assert sum(a.size for a in jax.tree.leaves(variables["params"])) == card["param_count"]
