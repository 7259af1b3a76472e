"""TFDS input pipelines: MNIST, Fashion-MNIST, CIFAR-10/100, ImageNet and image folders.

One entry point, `make_dataset`, serves training and evaluation for every dataset. The model
decides size and normalisation (its ModelInfo), the dataset decides augmentation. Batches are
numpy dicts {'image': float32 NHWC, 'label': int32, 'mask': bool}, each process reading its own
share of the split. Training order is a pure function of (seed, step): re-creating the iterator
with `start_step=N` yields exactly what an uninterrupted run yields from step N, which is what
makes resumed training bit-identical.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from zoo.registry import ModelInfo  # noqa: E402

tf.config.set_visible_devices([], "GPU")  # tf.data only; the accelerators belong to JAX

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# Upstream gzip headers that Debian rewrote (FNAME dropped, MTIME zeroed); restoring them makes
# the files byte-identical to the ones TFDS's registered checksums describe.
_FASHION_MTIME = {"train": 1504176606, "t10k": 1504176627}
_IMAGENET_STEPS = (
    "ImageNet cannot be downloaded automatically. Download ILSVRC2012_img_train.tar and "
    "ILSVRC2012_img_val.tar from https://image-net.org/ (after accepting its terms), put both in "
    "<data_dir>/downloads/manual/ (data_dir: --data-dir, $TFDS_DATA_DIR or ~/tensorflow_datasets), "
    "then run `python -m zoo data prepare imagenet2012` (several hours, ~300 GB of disk).")
_IMAGE_EXTS = {".jpg", ".jpeg", ".png"}


class DatasetNotFoundError(ValueError):
    """The dataset is not on this machine; the message says how to get it."""


class DatasetCorruptError(ValueError):
    """A dataset file is truncated, damaged or not an image; the message names the dataset, the
    file where known, and how to prepare it again (or, for an image folder, --skip-bad-images)."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    image_shape: tuple[int, int, int] | None  # native (H, W, C); None where sizes vary
    splits: dict[str, int]
    eval_split: str
    data_dir: str
    kind: str  # 'small' (decoded in memory), 'imagenet' (JPEG bytes) or 'folder'
    skip_bad_images: bool = False  # an image folder's unreadable files are left out


_SMALL = {"mnist": (10, (28, 28, 1)), "fashion_mnist": (10, (28, 28, 1)),
          "cifar10": (10, (32, 32, 3)), "cifar100": (100, (32, 32, 3))}
DATASETS = (*_SMALL, "imagenet2012", "image_folder:<path>")


def _data_dir(data_dir: str | None) -> str:
    return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR")
                              or "~/tensorflow_datasets")


def dataset_info(name: str, data_dir: str | None = None, skip_bad_images: bool = False
                 ) -> DatasetSpec:
    """Classes, native image shape and split sizes of a supported dataset.

    An image folder's files are checked here (see `_folder_files`): without `skip_bad_images`,
    one that is not an image raises DatasetCorruptError before anything is trained.
    """
    data_dir = _data_dir(data_dir)
    if name.startswith("image_folder:"):
        classes, files = _folder_files(name.split(":", 1)[1], skip_bad_images)
        return DatasetSpec(name, len(classes), None, {"test": len(files)}, "test", data_dir,
                           "folder", skip_bad_images)
    if name not in _SMALL and name != "imagenet2012":
        raise ValueError(f"unknown dataset {name!r}; supported: {', '.join(DATASETS)}")
    info = tfds.builder(name, data_dir=data_dir).info
    splits = {k: v.num_examples for k, v in info.splits.items()}
    if name == "imagenet2012":
        return DatasetSpec(name, 1000, None, splits, "validation", data_dir, "imagenet")
    classes, shape = _SMALL[name]
    return DatasetSpec(name, classes, shape, splits, "test", data_dir, "small")


def _folder_files(root: str, skip_bad_images: bool = False
                  ) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes and (path, label) of an image folder's JPEG/PNG files.

    Every file's first bytes are checked (a text file named .jpg fails at once, named, instead
    of deep inside tf.data): DatasetCorruptError. With `skip_bad_images` such files, and ones
    TensorFlow cannot decode (every file is decoded once), are left out and counted on stderr.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise DatasetNotFoundError(f"image folder {root} does not exist (expected one "
                                   "sub-folder of JPEG/PNG images per class)")
    classes = tuple(sorted(p.name for p in root_path.iterdir() if p.is_dir()))
    stamp = tuple((root_path / c).stat().st_mtime_ns for c in classes)  # files added/removed
    files, bad = _checked_files(str(root_path), classes, stamp, skip_bad_images)
    if bad and not skip_bad_images:
        raise DatasetCorruptError(
            f"image_folder:{root}: {len(bad)} of {len(files) + len(bad)} files are not images "
            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); replace or remove them, or "
            "pass --skip-bad-images to leave them out")
    if not files:
        raise DatasetNotFoundError(f"no JPEG/PNG images in class sub-folders of {root}")
    return list(classes), files


_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")  # decode_image's


def _looks_like_image(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8).startswith(_SIGNATURES)
    except OSError:
        return False


@functools.lru_cache(maxsize=16)
def _checked_files(root: str, classes: tuple, stamp: tuple, decode: bool
                   ) -> tuple[list[tuple[str, int]], list[str]]:
    """(usable files, bad paths) of a folder, once per process and state of its directories;
    with `decode` the bad ones are also reported here, once."""
    files = [(str(f), i) for i, c in enumerate(classes) for f in sorted(Path(root, c).iterdir())
             if f.suffix.lower() in _IMAGE_EXTS]
    bad = [f for f, _ in files if not _looks_like_image(f)]
    if decode:
        named = set(bad)
        bad += _undecodable([f for f, _ in files if f not in named])
        if bad:
            print(f"warning: image_folder:{root}: leaving out {len(bad)} of {len(files)} files "
                  f"that are not readable images (--skip-bad-images): {', '.join(bad[:3])}"
                  f"{', ...' if len(bad) > 3 else ''}", file=sys.stderr)
    bad_set = set(bad)
    return [x for x in files if x[0] not in bad_set], bad


def _undecodable(paths: list[str]) -> list[str]:
    """The files tf.io.decode_image fails on (each decoded once, in parallel)."""
    if not paths:
        return []
    ds = tf.data.Dataset.from_tensor_slices(paths).enumerate().map(
        lambda i, p: (i, tf.shape(tf.io.decode_image(tf.io.read_file(p), channels=3,
                                                     expand_animations=False))),
        num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    ok = {int(i) for i, _ in ds.as_numpy_iterator()}
    return [p for i, p in enumerate(paths) if i not in ok]


# ---------------------------------------------------------------- preprocessing ops (tf.data)

def _normalize(image, info: ModelInfo, channels: int):
    """[0, 1] pixels -> (x - mean) / std, with the model's statistics."""
    mean, std = np.asarray(info.mean, np.float32), np.asarray(info.std, np.float32)
    if len(mean) != channels:  # e.g. a CIFAR model run on grayscale input
        mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
    return (image - mean) / std


def _to_channels(image, channels: int):
    have = image.shape[-1]
    if have == channels:
        return image
    if have == 1 and channels == 3:
        return tf.image.grayscale_to_rgb(image)
    if have == 3 and channels == 1:
        return tf.image.rgb_to_grayscale(image)
    raise ValueError(f"cannot turn {have}-channel images into {channels} channels")


def _fit_small(image, size: tuple[int, int]):
    """28 -> 32 by zero padding (the LeNet-5 convention), anything else by bilinear resize."""
    h, w = image.shape[0], image.shape[1]
    th, tw = size
    if (th, tw) == (h, w):
        return image
    if 0 < th - h <= 8 and th - h == tw - w and (th - h) % 2 == 0:
        p = (th - h) // 2
        return tf.pad(image, [[p, p], [p, p], [0, 0]])
    return tf.image.resize(image, size, method="bilinear", antialias=True)


def _crop_flip(image, seed, pad: int, flip: bool):
    """Random crop after zero padding by `pad`, optional horizontal flip; stateless in `seed`."""
    h, w, c = image.shape
    image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    image = tf.image.stateless_random_crop(image, (h, w, c), seed=seed)
    if flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=seed[::-1])
    return image


def _resize_shorter_center_crop(image, resize: int, crop: int):
    """Eval transform of torchvision's weights: shorter side to `resize`, centre `crop`."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = resize / tf.reduce_min(shape)
    new = tf.cast(tf.round(shape * scale), tf.int32)
    image = tf.image.resize(image, new, method="bilinear", antialias=True)
    top, left = (new[0] - crop) // 2, (new[1] - crop) // 2
    return image[top:top + crop, left:left + crop]


def _random_resized_crop(jpeg, seed, size: int):
    """Inception-style crop (scale 0.08-1, ratio 3/4-4/3) decoded straight from JPEG bytes."""
    shape = tf.image.extract_jpeg_shape(jpeg)
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.zeros([0, 0, 4]), seed=seed, min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
    image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
    image = tf.image.resize(tf.cast(image, tf.float32) / 255.0, (size, size), method="bilinear")
    return tf.image.stateless_random_flip_left_right(image, seed=seed[::-1])


def _preprocess_fn(spec: DatasetSpec, info: ModelInfo, size: tuple[int, int, int], train: bool,
                   augment: bool):
    h, w, c = size
    # torchvision's eval ratio (256 -> 224) kept at any crop size; no margin without one
    resize = round(h * info.resize_size / info.crop_size) if info.resize_size else h

    def small(image, seed):
        image = tf.cast(image, tf.float32) / 255.0
        image = _fit_small(_to_channels(image, c), (h, w))
        if augment:  # CIFAR: crop 4 + flip; MNIST-like: crop 2, never flip (digits, clothes)
            rgb = spec.image_shape[-1] == 3
            image = _crop_flip(image, seed, 4 if rgb else 2, flip=rgb)
        return image

    def jpeg(image, seed):
        if train and augment:
            image = _random_resized_crop(image, seed, h)
        else:
            image = tf.cast(tf.io.decode_jpeg(image, channels=3), tf.float32) / 255.0
            image = _resize_shorter_center_crop(image, resize, h)
        return _to_channels(image, c)

    def folder(path, seed):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        image = tf.cast(image, tf.float32) / 255.0
        return _to_channels(_resize_shorter_center_crop(image, resize, h), c)

    fn = {"small": small, "imagenet": jpeg, "folder": folder}[spec.kind]

    def apply(index, example, seed_base):
        seed = tf.stack([seed_base, tf.cast(index, tf.int64)])
        image = tf.ensure_shape(fn(example["image"], seed), (h, w, c))
        return {"image": _normalize(image, info, c), "label": tf.cast(example["label"], tf.int32)}

    return apply


# ---------------------------------------------------------------- the entry point

def _source(spec: DatasetSpec, split: str) -> tf.data.Dataset:
    """Examples {'image', 'label'} of a split string ('test', 'train[:10%]', ...)."""
    if spec.kind == "folder":
        _, files = _folder_files(spec.name.split(":", 1)[1], spec.skip_bad_images)
        paths, labels = zip(*files)
        return tf.data.Dataset.from_tensor_slices({"image": list(paths), "label": list(labels)})
    decoders = {"image": tfds.decode.SkipDecoding()} if spec.kind == "imagenet" else None
    try:
        ds = tfds.builder(spec.name, data_dir=spec.data_dir).as_dataset(
            split=split, decoders=decoders, shuffle_files=False,
            read_config=tfds.ReadConfig(interleave_cycle_length=1))
    except (AssertionError, tfds.core.registered.DatasetNotFoundError, FileNotFoundError) as e:
        how = _IMAGENET_STEPS if spec.kind == "imagenet" else (
            f"prepare it with `python -m zoo data prepare {spec.name}`")
        raise DatasetNotFoundError(f"dataset {spec.name} is not prepared in {spec.data_dir}: "
                                   f"{how}") from e
    return ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})


def _process_split(spec: DatasetSpec, split: str, num_examples: int | None, index: int,
                   count: int) -> tuple[str, int]:
    """This process's part of the split and the size of the largest part."""
    total = spec.splits.get(split) or None  # unknown for slices and unprepared metadata
    if num_examples is not None:
        if "[" in split:
            raise ValueError(f"--num-examples cannot shorten the sliced split {split!r}; put "
                             f"the count in the slice instead (e.g. {split.split('[')[0]}"
                             f"[:{num_examples}])")
        split, total = f"{split}[:{num_examples}]", num_examples
    if total is None:
        total = len(list(_source(spec, split).map(lambda ex: ex["label"])))
    parts = tfds.even_splits(split, n=count) if count > 1 and spec.kind != "folder" else [split]
    if spec.kind == "folder" and count > 1:
        raise ValueError("image folders are read by a single process")
    return parts[index if count > 1 else 0], math.ceil(total / count)


def make_dataset(name: str, split: str, *, info: ModelInfo,
                 image_size: tuple[int, int, int] | None = None, global_batch_size: int,
                 train: bool, data_dir: str | None = None, seed: int = 0, start_step: int = 0,
                 augment: bool | None = None, num_examples: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 skip_bad_images: bool = False) -> Iterator[dict]:
    """Batches of one split, preprocessed for one model.

    Args:
      name: 'mnist', 'fashion_mnist', 'cifar10', 'cifar100', 'imagenet2012' or
        'image_folder:<path>'.
      split: a TFDS split ('train', 'test', 'validation', 'train[:10%]', ...).
      info: the model's ModelInfo (normalisation, ImageNet resize/crop).
      image_size: (H, W, C) the model takes; default `info.input_size`.
      global_batch_size: examples per step over all processes.
      train: infinite, shuffled, augmented, whole batches; else one padded, masked pass.
      seed, start_step: the training order is a function of both (exact resume).
      augment: None for the dataset's standard: on for CIFAR/ImageNet training, off for
        MNIST-like data (random 2-pixel crops when True).
      num_examples: use only the first N examples of the split.
      process_index, process_count: this process's share (default: from JAX).
      skip_bad_images: leave out an image folder's unreadable files (see `_folder_files`).
    Yields:
      {'image': float32 (B, H, W, C), 'label': int32 (B,), 'mask': bool (B,)}, with
      B = global_batch_size // process_count.
    """
    import jax

    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if global_batch_size % count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                         f"{count} processes")
    batch = global_batch_size // count
    spec = dataset_info(name, data_dir, skip_bad_images)
    size = tuple(image_size or info.input_size)
    if spec.kind == "small" and augment is None:
        augment = train and spec.image_shape[-1] == 3
    augment = train if augment is None else augment
    part, per_process = _process_split(spec, split, num_examples, index, count)
    base = _source(spec, part)
    if spec.kind == "small":
        base = base.cache()
    preprocess = _preprocess_fn(spec, info, size, train, augment)
    if train:
        return _guarded(_train_batches(base, preprocess, batch, seed, start_step, per_process),
                        spec, part)
    return _guarded(_eval_batches(base, preprocess, batch, per_process), spec, part)


def _guarded(batches: Iterator[dict], spec: DatasetSpec, split) -> Iterator[dict]:
    """`batches`, a damaged file turned into one DatasetCorruptError: a truncated or corrupt
    TFRecord (DataLossError, raised at the first read past the damage) or an image of a folder
    that cannot be decoded."""
    try:
        yield from batches
    except tf.errors.DataLossError as e:
        raise DatasetCorruptError(_damaged_records(spec, split, e.message)) from None
    except tf.errors.InvalidArgumentError as e:
        if spec.kind != "folder":
            raise
        raise DatasetCorruptError(
            f"{spec.name}: an image cannot be decoded ({_tf_message(e.message)}); pass "
            "--skip-bad-images to find and leave out such files") from None


def _tf_message(message: str) -> str:
    """A tf.data error's own words, without the op and function names around them."""
    message = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", message)
    message = message.replace("' failed with ", ": ")  # TFRecordReader's unbalanced quote
    return re.split(r" \[Op:|\n", message)[0].strip()


def _damaged_records(spec: DatasetSpec, split, message: str) -> str:
    """The one-line report of a damaged TFDS record file (named where it can be found)."""
    at = re.search(r"record at (\d+)", message)
    name = split if isinstance(split, str) else split.split  # tfds.even_splits' objects
    info_splits = tfds.builder(spec.name, data_dir=spec.data_dir).info.splits
    base = re.split(r"[\[+]", name)[0]
    files = [str(f) for f in info_splits[base].filepaths] if base in info_splits else []
    if at:  # the damage is at this offset of one of them
        files = [f for f in files if os.path.exists(f) and os.path.getsize(f) >= int(at[1])]
    if len(files) > 1:
        files = [f for f in files if _cut_short(f)]
    where = (files[0] if len(files) == 1 else f"a record file of its {base} split")
    again = f"python -m zoo data prepare {spec.name}" + (
        f" --data-dir {spec.data_dir}" if spec.data_dir != _data_dir(None) else "") + " --force"
    return (f"dataset {spec.name} in {spec.data_dir} is damaged: {where} "
            f"({_tf_message(message)}); prepare it again with `{again}`")


def _cut_short(path: str) -> bool:
    """Whether a TFRecord file ends inside a record: its framing (8-byte length, 4-byte CRC,
    data, 4-byte CRC) is walked without reading the data."""
    size, pos = os.path.getsize(path), 0
    with open(path, "rb") as f:
        while pos < size:
            f.seek(pos)
            head = f.read(8)
            if len(head) < 8:
                return True
            pos += 16 + int.from_bytes(head, "little")
    return pos != size


def _train_batches(base, preprocess, batch: int, seed: int, start_step: int, n: int):
    steps_per_epoch = n // batch
    if steps_per_epoch == 0:
        raise ValueError(f"the split has {n} examples per process, fewer than one batch of {batch}")
    epoch, skip = divmod(start_step, steps_per_epoch)
    while True:
        epoch_seed = seed * 1_000_003 + epoch
        ds = base.enumerate().shuffle(min(n, 50_000), seed=epoch_seed,
                                      reshuffle_each_iteration=False)
        ds = ds.skip(skip * batch).map(lambda i, ex: preprocess(i, ex, tf.constant(epoch_seed,
                                                                                   tf.int64)),
                                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
        for b in ds.as_numpy_iterator():
            b["mask"] = np.ones(batch, bool)
            yield b
        epoch, skip = epoch + 1, 0


def _eval_batches(base, preprocess, batch: int, n: int):
    """One pass; the last batch is padded (mask False), and every process yields the same count."""
    ds = base.enumerate().map(lambda i, ex: preprocess(i, ex, tf.constant(0, tf.int64)),
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch).prefetch(tf.data.AUTOTUNE)
    steps = math.ceil(n / batch)
    last = None
    for last in ds.as_numpy_iterator():
        steps -= 1
        yield _pad(last, batch)
    for _ in range(steps):  # this process's share was smaller than the largest share
        if last is None:
            raise ValueError("the split is empty")
        yield _pad({k: v[:0] for k, v in last.items() if k != "mask"}, batch)


def _pad(b: dict, batch: int) -> dict:
    real = len(b["label"])
    out = {k: np.concatenate([v, np.zeros((batch - real, *v.shape[1:]), v.dtype)])
           for k, v in b.items() if k != "mask"}
    out["mask"] = np.arange(batch) < real
    return out


def prefetch_to_device(iterator, size: int = 2, sharding=None):
    """Keeps `size` batches in flight on the device(s) so host input overlaps the step."""
    import jax

    queue = collections.deque()
    for b in iterator:
        queue.append(jax.device_put(b, sharding))
        if len(queue) == size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


# ---------------------------------------------------------------- offline preparation

def _restore_gzip_header(src: Path, dst: Path) -> None:
    """Rewrites Debian's gzip header as upstream wrote it: FNAME flag, MTIME, original name."""
    raw = src.read_bytes()
    if raw[:3] != b"\x1f\x8b\x08" or raw[3] != 0:
        raise ValueError(f"{src}: not the headerless gzip file Debian ships")
    stem = src.name[:-3]
    mtime = _FASHION_MTIME[stem.split("-")[0]]
    header = raw[:3] + b"\x08" + mtime.to_bytes(4, "little") + raw[8:10] + stem.encode() + b"\0"
    dst.write_bytes(header + raw[10:])


def _tfds_checksums(name: str) -> dict[str, str]:
    path = Path(tfds.__file__).parent / "url_checksums" / f"{name}.txt"
    return {line.split("\t")[3].strip(): line.split("\t")[2]
            for line in path.read_text().splitlines() if line.strip()}


def prepare(name: str, data_dir: str | None = None, force: bool = False) -> None:
    """Prepares a dataset for TFDS; Fashion-MNIST offline from Debian's dataset-fashion-mnist.
    `force` first removes a prepared copy (damaged files: DatasetCorruptError says so)."""
    data_dir = _data_dir(data_dir)
    if name not in _SMALL and name != "imagenet2012":
        raise ValueError(f"unknown dataset {name!r}; supported: {', '.join(DATASETS[:-1])}")
    builder = tfds.builder(name, data_dir=data_dir)
    if force and builder.is_prepared():
        print(f"removing the prepared {name} in {builder.data_dir} (--force)", file=sys.stderr)
        shutil.rmtree(builder.data_dir)
        builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        print(f"{name} is already prepared in {data_dir}", file=sys.stderr)
        return
    if name == "imagenet2012":
        manual = Path(data_dir) / "downloads" / "manual"
        if not (manual / "ILSVRC2012_img_val.tar").exists():
            raise DatasetNotFoundError(_IMAGENET_STEPS)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
        return
    if name != "fashion_mnist":
        builder.download_and_prepare()  # needs the internet
        return
    if not DEBIAN_FASHION_MNIST.is_dir():
        try:
            _apt_install("dataset-fashion-mnist")
        except (DatasetNotFoundError, subprocess.CalledProcessError):
            builder.download_and_prepare()  # the ordinary TFDS download, where there is internet
            return
    expected = _tfds_checksums(name)
    with tempfile.TemporaryDirectory() as manual:
        for file, sha in expected.items():
            dst = Path(manual) / file
            _restore_gzip_header(DEBIAN_FASHION_MNIST / file, dst)
            got = hashlib.sha256(dst.read_bytes()).hexdigest()
            if got != sha:
                raise ValueError(f"{file}: sha256 {got} differs from TFDS's registered {sha}; "
                                 "these are not the Fashion-MNIST files TFDS expects")
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual))
    print(f"prepared {name} in {data_dir} from {DEBIAN_FASHION_MNIST}", file=sys.stderr)


def _apt_install(package: str) -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise DatasetNotFoundError(
            f"no internet and no {DEBIAN_FASHION_MNIST}: run `sudo apt-get install {package}` "
            "(Debian/Ubuntu), then this command again")
    print(f"installing Debian's {package} ...", file=sys.stderr)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


# ---------------------------------------------------------------- CLI

def bench(name: str, model: str, batch_size: int, steps: int, data_dir: str | None) -> dict:
    """Images/s of the training pipeline (host side only, after one warm-up batch)."""
    from zoo.registry import model_info

    it = make_dataset(name, "train", info=model_info(model), global_batch_size=batch_size,
                      train=True, data_dir=data_dir)
    next(it)
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    elapsed = time.perf_counter() - start
    return {"dataset": name, "model": model, "batch_size": batch_size, "steps": steps,
            "images_per_sec": round(steps * batch_size / elapsed, 1)}


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo data")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("prepare", help="download/prepare a dataset (Fashion-MNIST offline)")
    p.add_argument("name")
    p.add_argument("--data-dir")
    p.add_argument("--force", action="store_true",
                   help="remove a prepared copy first (e.g. after a damaged-file error)")
    p = sub.add_parser("bench", help="images/s of the training input pipeline")
    p.add_argument("name")
    p.add_argument("--model", default="simple_cnn")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--data-dir")
    args = parser.parse_args(argv)
    try:
        if args.what == "prepare":
            prepare(args.name, args.data_dir, args.force)
        else:
            print(json.dumps(bench(args.name, args.model, args.batch_size, args.steps,
                                   args.data_dir)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
