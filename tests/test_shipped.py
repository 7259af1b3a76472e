"""The shipped checkpoints: each reproduces its model card's test accuracy exactly."""

import json

import jax
import pytest

import zoo
from zoo import checkpoints, data, training

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
    result = training.evaluate(model, variables, batches)
    assert result["num_examples"] == card["test_examples"] == 10_000
    assert round(result["top1"], 2) == card["test_top1"]
    assert round(result["top5"], 2) == card["test_top5"]
    assert sum(a.size for a in jax.tree.leaves(variables["params"])) == card["param_count"]
