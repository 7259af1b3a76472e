"""Fine-tuning: `train.py --init-from`, --freeze, --backbone-lr-scale, image folders with a
held-out split, and the registry's classifier heads they rely on."""

import json
import shutil

import jax
import numpy as np
import optax
import pytest
from flax import traverse_util

import zoo
from zoo import checkpoints, training
from zoo.registry import abstract_variables

from conftest import run_main


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


# ---------------------------------------------------------------- fixtures

def flags(workdir, dataset, *extra, model="simple_cnn"):
    return ["--model", model, "--dataset", dataset, "--workdir", str(workdir), "--no-progress",
            "--log-every", "5", *extra]


@pytest.fixture(scope="module")
def two_class_folder(tmp_path_factory):
    """pullover/ and coat/ (the pair of classes Fashion-MNIST models confuse most): 150 real
    Fashion-MNIST test images each, as PNGs (the shipped simple_cnn saw the train split)."""
    import tensorflow_datasets as tfds
    from PIL import Image

    from zoo import data

    try:
        data.dataset_info("fashion_mnist")
        data.prepare("fashion_mnist")
    except data.DatasetNotFoundError as e:
        pytest.skip(f"Fashion-MNIST unavailable: {e}")
    ds = tfds.load("fashion_mnist", split="test", as_supervised=True)
    root = tmp_path_factory.mktemp("fm2")
    names, counts = {2: "pullover", 4: "coat"}, {2: 0, 4: 0}
    for image, label in tfds.as_numpy(ds):
        label = int(label)
        if label in names and counts[label] < 150:
            (root / names[label]).mkdir(exist_ok=True)
            Image.fromarray(image[:, :, 0]).save(root / names[label] / f"{counts[label]}.png")
            counts[label] += 1
        if min(counts.values()) == 150:
            return f"image_folder:{root}"


def error_line(code, err):
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in
            traverse_util.flatten_dict(jax.device_get(dict(tree))).items()}


# ---------------------------------------------------------------- train.py --init-from

def test_finetuning_the_shipped_model_beats_training_from_scratch(tmp_path, two_class_folder):
    """The same 20 steps of the finetune recipe on 200 images (100 held out): from the shipped
    Fashion-MNIST simple_cnn, with its head re-initialised for 2 classes, and from scratch."""
    run = ["--val-fraction", "0.33", "--steps", "20", "--recipe", "finetune"]
    code, out, err = run_main(flags(tmp_path / "ft", two_class_folder, *run, "--init-from",
                                    "simple_cnn_fashion_mnist"))
    assert code == 0, err[-3000:]
    notes = [x for x in err.splitlines() if "re-initialised" in x]
    assert notes == ["note: --init-from simple_cnn_fashion_mnist: simple_cnn's head (fc2) "
                     "re-initialised for 2 classes (source had 10)"], err[-3000:]
    assert "(100 val images" in out
    finetuned = float(out.split("test top-1 ")[1].split("%")[0])
    code, out, err = run_main(flags(tmp_path / "scratch", two_class_folder, *run))
    assert code == 0, err[-3000:]
    scratch = float(out.split("test top-1 ")[1].split("%")[0])
    assert finetuned > scratch + 3, (finetuned, scratch)
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert config["init_from"] == "simple_cnn_fashion_mnist" and config["val_fraction"] == 0.33


def test_linear_probe_leaves_the_backbone_bit_identical_and_resumes(tmp_path,
                                                                    two_class_folder):
    """--freeze backbone: only fc2 moves; a rerun resumes from the workdir's own checkpoint
    (the source is not read again)."""
    work = tmp_path / "probe"
    argv = flags(work, two_class_folder, "--val-fraction", "0.33", "--init-from",
                 "simple_cnn_fashion_mnist", "--freeze", "backbone", "--batch-size", "32",
                 "--checkpoint-every", "3", "--eval-every", "100")
    code, _, err = run_main(argv + ["--steps", "3"])
    assert code == 0, err[-3000:]
    code, out, err = run_main(argv + ["--steps", "6"])
    assert code == 0, err[-3000:]
    assert "resuming from step 3" in err and "re-initialised" not in err, err[-3000:]
    source = flat(zoo.load_pretrained("simple_cnn_fashion_mnist")[1]["params"])
    _, variables, _, card = checkpoints.load_model(work)
    trained = flat(variables["params"])
    assert card["step"] == 6 and trained.keys() == source.keys()
    for key, value in trained.items():
        if key.startswith("fc2/"):
            assert value.shape[-1] == 2
        else:
            np.testing.assert_array_equal(value, source[key], err_msg=key)
    before = flat(checkpoints.load_model(work / "checkpoints" / "3")[1]["params"])
    assert not np.array_equal(before["fc2/kernel"], trained["fc2/kernel"])


def test_frozen_parameters_have_no_optimizer_state():
    """Adam keeps two moments of each parameter that trains, none of a frozen one."""
    variables = abstract_variables(zoo.create_model("resnet20", num_classes=2), (8, 8, 3))
    params = traverse_util.flatten_dict(variables["params"])
    norms = {k[:-1] for k in traverse_util.flatten_dict(variables["batch_stats"])}
    count = lambda keys: sum(int(np.prod(params[k].shape)) for k in keys)
    trained = {"backbone": count(k for k in params if k[0] == "fc"),
               "bn": count(k for k in params if k[:-1] not in norms),
               "none": count(params)}
    for freeze, scale in (("backbone", 0.1), ("bn", 1.0), ("none", 0.1)):
        recipe = training.Recipe("adam", freeze=freeze, backbone_lr_scale=scale)
        labels = training.param_labels(variables, zoo.model_info("resnet20").head, recipe)
        tx = training.make_optimizer(recipe, optax.constant_schedule(1e-3), labels)
        moments = sum(int(np.prod(x.shape)) for x in
                      jax.tree.leaves(jax.eval_shape(tx.init, variables["params"])) if x.shape)
        assert moments == 2 * trained[freeze], freeze
