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


def test_frozen_batch_norm_uses_and_keeps_its_running_statistics():
    """The shipped resnet20, --freeze bn's step: the loss is the evaluation-mode loss,
    batch_stats and BN scales/biases stay bit-identical, the convolutions train."""
    model, variables, info = zoo.load_pretrained("resnet20_fashion_mnist")
    recipe = training.Recipe("adam", 1e-2, freeze="bn")
    tx = training.make_optimizer(recipe, optax.constant_schedule(1e-2),
                                 training.param_labels(variables, info.head, recipe))
    state = training.create_train_state(model, tx, (8, 8, 1)).replace(**variables)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(8, 8, 8, 1)).astype(np.float32),
             "label": rng.integers(0, 10, 8).astype(np.int32), "mask": np.ones(8, bool)}
    step = jax.jit(lambda s, b: training.train_step(
        s, b, config=training.StepConfig(frozen_bn=True)))
    after, metrics = step(state, batch)
    after, _ = step(after, batch)
    logits = model.apply(variables, batch["image"], train=False)
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    np.testing.assert_allclose(float(metrics["loss"]), float(expected), rtol=1e-5)
    for key, value in flat(variables["batch_stats"]).items():
        np.testing.assert_array_equal(flat(after.batch_stats)[key], value, err_msg=key)
    params, trained = flat(variables["params"]), flat(after.params)
    norms = {k.rsplit("/", 1)[0] for k in flat(variables["batch_stats"])}
    for key, value in params.items():
        if key.rsplit("/", 1)[0] in norms:
            np.testing.assert_array_equal(trained[key], value, err_msg=key)
    assert not np.array_equal(trained["conv1/kernel"], params["conv1/kernel"])


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """torchvision's resnet18 with random weights as .safetensors."""
    pytest.importorskip("torch")
    from safetensors.numpy import save_file

    from zoo import parity

    state = {k: v.detach().numpy() for k, v in
             parity.torchvision_model("resnet18", num_classes=10).state_dict().items()}
    path = tmp_path_factory.mktemp("tv") / "resnet18.safetensors"
    save_file(state, str(path))
    return path, state


def test_init_from_a_torchvision_file_is_converted_strictly(tmp_path, resnet18_file, dataset):
    from zoo import convert
    from zoo.train import transfer

    path, state = resnet18_file
    config = training.resolve(training.TrainConfig(
        model="resnet18", dataset=dataset, workdir=str(tmp_path / "w"), init_from=str(path)))
    assert config.image_shape == (224, 224, 3) and config.num_classes == 10
    loaded, note = transfer.load(config, zoo.create_model("resnet18", **config.create_kwargs()))
    assert note is None  # 10 classes in the file and in the data: the head is loaded too
    expected = flat(convert.load_torchvision("resnet18", path)["params"])
    assert flat(loaded["params"]).keys() == expected.keys()
    for key, value in flat(loaded["params"]).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)

    # the same file for another architecture, and a file with a tensor missing: one line each
    code, _, err = run_main(flags(tmp_path / "w34", dataset, "--init-from", str(path),
                                  model="resnet34"))
    line = error_line(code, err)
    assert "resnet34: the weights do not fit (strict conversion)" in line and \
        "80 missing keys: layer1.2.bn1.running_mean" in line, line
    cut = tmp_path / "cut.pth"
    import torch

    torch.save({k: torch.from_numpy(v) for k, v in state.items()
                if k != "layer2.0.bn1.running_var"}, cut)
    code, _, err = run_main(flags(tmp_path / "w18", dataset, "--init-from", str(cut),
                                  model="resnet18"))
    assert "1 missing key: layer2.0.bn1.running_var" in error_line(code, err)
    assert not (tmp_path / "w34").exists() and not (tmp_path / "w18").exists()


def _folder(root, classes, per_class):
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            ramp = np.add.outer(np.arange(28), 3 * np.arange(28)) * (i + 1)
            Image.fromarray((ramp % 256).astype(np.uint8)).save(root / c / f"{i}.png")
    return f"image_folder:{root}"


@pytest.mark.parametrize("case,message", [
    ("text file", "is not a checkpoint or weights file: give a shipped checkpoint"),
    ("empty directory", "is not a checkpoint or weights file"),
    ("another model", "holds simple_cnn weights, not lenet5's; train --model simple_cnn"),
    ("fewer classes", "--num-classes 5 contradicts"),
    ("no images", "no JPEG/PNG images in class sub-folders"),
    ("one class", "has 1 class; a classifier needs two or more"),
    ("no batch norm", "--freeze bn: simple_cnn has no BatchNorm layers"),
    ("freeze what", "--freeze must be one of none, bn, backbone, not 'all'"),
    ("val fraction", "--val-fraction must be between 0 and 1, not 1.5"),
])
def test_bad_input_exits_2_with_one_line_and_no_workdir(tmp_path, dataset, case, message):
    notes = tmp_path / "notes.txt"
    notes.write_text("not weights\n")
    (tmp_path / "empty").mkdir()
    argv = {
        "text file": flags(tmp_path / "w", dataset, "--init-from", str(notes)),
        "empty directory": flags(tmp_path / "w", dataset, "--init-from", str(tmp_path / "empty")),
        "another model": flags(tmp_path / "w", dataset, "--init-from",
                               "simple_cnn_fashion_mnist", model="lenet5"),
        "fewer classes": flags(tmp_path / "w", dataset, "--num-classes", "5"),
        "no images": flags(tmp_path / "w", _folder(tmp_path / "none", ["a", "b"], 0)),
        "one class": flags(tmp_path / "w", _folder(tmp_path / "one", ["a"], 3)),
        "no batch norm": flags(tmp_path / "w", dataset, "--freeze", "bn"),
        "freeze what": flags(tmp_path / "w", dataset, "--freeze", "all"),
        "val fraction": flags(tmp_path / "w", dataset, "--val-fraction", "1.5"),
    }[case]
    code, _, err = run_main(argv + ["--steps", "1"])
    assert message in error_line(code, err)
    assert not (tmp_path / "w").exists()


def test_image_folder_splits(tmp_path):
    """train/ + val/ folders are the splits; a flat folder's --val-fraction split holds out
    the same files every time, of each class."""
    from zoo import data

    root = tmp_path / "flat"
    name = _folder(root, ["a", "b", "c"], 10)
    spec = data.dataset_info(name, val_fraction=0.2)
    assert spec.splits == {"train": 24, "val": 6} and spec.eval_split == "val"
    files = data.pipeline._folder_splits(str(root), val_fraction=0.2)[1]
    assert sorted(y for _, y in files["val"]) == [0, 0, 1, 1, 2, 2]
    assert files == data.pipeline._folder_splits(str(root), val_fraction=0.2)[1]
    assert data.dataset_info(name).splits == {"test": 30}

    split = tmp_path / "split"
    _folder(split / "train", ["a", "b"], 4)
    _folder(split / "val", ["a", "b"], 2)
    spec = data.dataset_info(f"image_folder:{split}")
    assert spec.splits == {"train": 8, "val": 4} and spec.num_classes == 2
    info = zoo.model_info("resnet18")
    val = list(data.make_dataset(f"image_folder:{split}", "val", info=info,
                                 image_size=(32, 32, 3), global_batch_size=8, train=False))
    assert int(val[0]["mask"].sum()) == 4
    with pytest.raises(ValueError, match="has a val/ folder"):
        data.dataset_info(f"image_folder:{split}", val_fraction=0.2)
    shutil.rmtree(split / "val" / "b")
    with pytest.raises(ValueError, match="val/ has the classes a, train/ has a, b"):
        data.dataset_info(f"image_folder:{split}")


def test_rgb_folders_get_the_transfer_augmentation(tmp_path):
    """Random-resized crops and flips for RGB input (a new view each epoch), none for grey."""
    from zoo import data

    name = _folder(tmp_path / "f", ["a", "b"], 4)
    info = zoo.model_info("resnet18")
    views = lambda size: [next(data.make_dataset(
        name, "train", info=info, image_size=size, global_batch_size=8, train=True,
        start_step=step))["image"] for step in (0, 1)]
    means = lambda batch: np.sort(batch.reshape(8, -1).mean(1))  # the epoch's images, any order
    rgb, grey = views((32, 32, 3)), views((32, 32, 1))
    assert not np.allclose(means(rgb[0]), means(rgb[1]))
    np.testing.assert_allclose(means(grey[0]), means(grey[1]), rtol=1e-6)
