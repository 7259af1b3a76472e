"""Fine-tuning: `train.py --init-from`, --freeze, --backbone-lr-scale, image folders with a
held-out split, and the registry's classifier heads they rely on."""

import pytest

import zoo
from zoo.registry import abstract_variables


def _module(params, path):
    for name in path.split("/"):
        params = params[name]
    return params


def test_every_model_declares_its_classifier_head():
    """ModelInfo.head names the layers whose outputs are the class scores, for every model."""
    for name in zoo.list_models():
        info = zoo.model_info(name)
        assert info.head, f"{name} declares no head"
        size = (info.min_size, info.min_size, info.input_size[2])
        params = abstract_variables(zoo.create_model(name, num_classes=7), size)["params"]
        for path in info.head:
            layer = _module(params, path)
            assert layer["kernel"].shape[-1] == 7 and layer["bias"].shape == (7,), (name, path)
