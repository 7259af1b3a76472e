"""Input pipelines: mock TFDS data for every dataset, real Fashion-MNIST prepared offline."""

import hashlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import zoo
from zoo import data
from zoo.data import pipeline, preparation


def first(it, n=1):
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("name,model,size", [
    ("mnist", "simple_cnn", (28, 28, 1)),
    ("mnist", "lenet5", (32, 32, 1)),        # 28 -> 32 zero padding
    ("fashion_mnist", "resnet20", (32, 32, 3)),  # 1 -> 3 channels
    ("cifar10", "resnet20", (32, 32, 3)),
    ("cifar100", "resnet20", (32, 32, 3)),
    ("imagenet2012", "resnet18", (64, 64, 3)),   # JPEG bytes: random-resized crop / centre crop
])
def test_mock_batches_shape_dtype_range(name, model, size):
    info = zoo.model_info(model)
    with tfds.testing.mock_data(num_examples=24):
        b = next(data.make_dataset(name, "train", info=info, image_size=size,
                                   global_batch_size=8, train=True))
        spec = data.dataset_info(name)
        ev = list(data.make_dataset(name, spec.eval_split, info=info, image_size=size,
                                    global_batch_size=10, train=False))
    assert b["image"].shape == (8, *size) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and b["mask"].all()
    assert (0 <= b["label"]).all() and (b["label"] < spec.num_classes).all()
    assert np.isfinite(b["image"]).all() and -5 < b["image"].min() < b["image"].max() < 5
    assert [e["image"].shape[0] for e in ev] == [10, 10, 10]
    assert sum(int(e["mask"].sum()) for e in ev) == 24  # padded, each example once


def test_lenet_padding_is_zero_border():
    info = zoo.model_info("lenet5")
    with tfds.testing.mock_data(num_examples=4):
        b = next(data.make_dataset("mnist", "test", info=info, global_batch_size=4, train=False))
    border = (0.0 - info.mean[0]) / info.std[0]  # a black pixel after normalisation
    np.testing.assert_allclose(b["image"][:, :2], border)
    np.testing.assert_allclose(b["image"][:, :, -2:], border)


def test_cifar_augmentation_on_for_train_off_for_eval():
    info = zoo.model_info("resnet20")
    kw = dict(info=info, global_batch_size=8, seed=0)
    with tfds.testing.mock_data(num_examples=16):
        aug = first(data.make_dataset("cifar10", "train", train=True, **kw))[0]
        plain = first(data.make_dataset("cifar10", "train", train=True, augment=False, **kw))[0]
        ev1 = list(data.make_dataset("cifar10", "test", train=False, **kw))
        ev2 = list(data.make_dataset("cifar10", "test", train=False, **kw))
    assert np.array_equal(aug["label"], plain["label"])  # same order, different pixels
    assert not np.allclose(aug["image"], plain["image"])
    np.testing.assert_array_equal(ev1[0]["image"], ev2[0]["image"])


def test_unknown_dataset_and_divisibility():
    info = zoo.model_info("simple_cnn")
    with pytest.raises(ValueError, match="unknown dataset 'svhn'.*fashion_mnist"):
        data.make_dataset("svhn", "train", info=info, global_batch_size=8, train=True)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        data.make_dataset("mnist", "train", info=info, global_batch_size=8, train=True,
                          process_index=0, process_count=3)
    with pytest.raises(ValueError, match=r"put the count in the slice instead \(e.g. train\[:5\]"):
        data.make_dataset("mnist", "train[:10%]", info=info, global_batch_size=8, train=False,
                          num_examples=5)


def test_missing_dataset_says_how_to_prepare(tmp_path):
    info = zoo.model_info("resnet20")
    with pytest.raises(data.DatasetNotFoundError,
                       match="python -m zoo data prepare cifar10"):
        data.make_dataset("cifar10", "test", info=info, global_batch_size=8, train=False,
                          data_dir=str(tmp_path))
    with pytest.raises(data.DatasetNotFoundError, match="ILSVRC2012_img_val.tar"):
        data.prepare("imagenet2012", str(tmp_path))


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for c, cls in enumerate(["cat", "dog"]):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), np.uint8)).save(
                tmp_path / cls / f"{i}.png")
    name = f"image_folder:{tmp_path}"
    assert data.dataset_info(name).num_classes == 2
    ev = list(data.make_dataset(name, "test", info=zoo.model_info("resnet18"),
                                image_size=(32, 32, 3), global_batch_size=4, train=False))
    labels = np.concatenate([e["label"][e["mask"]] for e in ev])
    assert ev[0]["image"].shape == (4, 32, 32, 3) and labels.tolist() == [0, 0, 0, 1, 1, 1]


@pytest.fixture(scope="module")
def fashion_mnist():
    try:
        data.prepare("fashion_mnist")
    except data.DatasetNotFoundError as e:
        pytest.skip(f"Fashion-MNIST unavailable (install Debian's dataset-fashion-mnist): {e}")
    return data.dataset_info("fashion_mnist")


def test_real_fashion_mnist_offline(fashion_mnist):
    assert fashion_mnist.splits == {"train": 60_000, "test": 10_000}
    labels = np.concatenate([b.numpy() for b in tfds.load(
        "fashion_mnist", split="train").map(lambda e: e["label"]).batch(20_000)])
    assert np.bincount(labels).tolist() == [6000] * 10
    ex = next(iter(tfds.as_numpy(tfds.load("fashion_mnist", split="train[:1]"))))
    assert int(ex["label"]) == 2  # a pullover
    assert hashlib.sha256(ex["image"].tobytes()).hexdigest() == (
        "94389a5b82ced92929865441f616eaf2281f2a892c4db10ed11828b8f957d0e1")


def test_restored_gzip_headers_match_tfds_checksums(tmp_path, fashion_mnist):
    expected = preparation._tfds_checksums("fashion_mnist")
    name = "t10k-labels-idx1-ubyte.gz"
    preparation._restore_gzip_header(data.DEBIAN_FASHION_MNIST / name, tmp_path / name)
    assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == expected[name]


def test_resume_at_step_n_gives_the_same_batches(fashion_mnist):
    kw = dict(info=zoo.model_info("simple_cnn"), global_batch_size=32, train=True, seed=7,
              num_examples=256)  # 8 steps an epoch: step 10 is inside the second epoch
    straight = first(data.make_dataset("fashion_mnist", "train", **kw), 12)
    resumed = first(data.make_dataset("fashion_mnist", "train", start_step=10, **kw), 2)
    for a, b in zip(straight[10:], resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(straight[0]["label"], straight[8]["label"])  # reshuffled


def test_training_order_is_each_epochs_seeded_shuffle(fashion_mnist):
    """One iterator serves every epoch (the epoch a tensor inside the pipeline), and epoch e is
    still the order of a shuffle buffer seeded by seed * 1,000,003 + e: from the start, and
    resumed inside an epoch."""
    base = pipeline._source(pipeline.dataset_info("fashion_mnist"), "train[:200]")
    as_is = lambda i, ex, seed: ex
    labels = lambda batches: np.concatenate([b["label"] for b in batches])
    expected = np.concatenate([  # 6 whole batches of 32 an epoch: its last 8 examples left out
        [ex["label"] for ex in base.shuffle(200, seed=5 * 1_000_003 + e,
                                            reshuffle_each_iteration=False)
         .take(192).as_numpy_iterator()] for e in range(3)])
    np.testing.assert_array_equal(
        labels(first(pipeline._train_batches(base, as_is, 32, 5, 0, 200), 18)), expected)
    np.testing.assert_array_equal(
        labels(first(pipeline._train_batches(base, as_is, 32, 5, 8, 200), 10)), expected[256:])


def test_process_shards_disjoint_and_covering(fashion_mnist):
    kw = dict(info=zoo.model_info("simple_cnn"), global_batch_size=16, train=False,
              num_examples=101, process_count=2)
    shards = [list(data.make_dataset("fashion_mnist", "test", process_index=i, **kw))
              for i in range(2)]
    assert len(shards[0]) == len(shards[1])  # equal step counts: no process waits forever
    images = [np.concatenate([b["image"][b["mask"]] for b in s]) for s in shards]
    assert len(images[0]) + len(images[1]) == 101
    whole = list(data.make_dataset("fashion_mnist", "test", **{**kw, "process_count": 1},
                                   process_index=0))
    all_images = np.concatenate([b["image"][b["mask"]] for b in whole])
    np.testing.assert_array_equal(np.concatenate(images), all_images)
