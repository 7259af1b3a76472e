"""TFDS input pipelines: MNIST, Fashion-MNIST, CIFAR-10/100, ImageNet and image folders.

An image folder is `ROOT/<class>/<images>`, or `ROOT/train/<class>/...` with an optional
`ROOT/val/<class>/...`; without a val/ folder, `val_fraction` holds out a deterministic part of
each class as the 'val' split (`_held_out`), and without that the one set of files serves every
split.

One entry point, `make_dataset`, serves training and evaluation for every dataset. The model
decides size, normalisation and interpolation (its ModelInfo), the dataset decides augmentation.
Batches are numpy dicts {'image': float32 NHWC, 'label': int32, 'mask': bool}, each process
reading its own share of the split. Training order is a pure function of (seed, step):
re-creating the iterator with `start_step=N` yields exactly what an uninterrupted run yields
from step N, which is what makes resumed training bit-identical.

Importing this module imports TensorFlow, for tf.data only: its GPUs are hidden from it, since
the accelerators belong to JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import re
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from zoo.registry import ModelInfo  # noqa: E402

tf.config.set_visible_devices([], "GPU")

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
    val_fraction: float | None = None  # of each class of a folder without val/, held out


SMALL_DATASETS = {"mnist": (10, (28, 28, 1)), "fashion_mnist": (10, (28, 28, 1)),
          "cifar10": (10, (32, 32, 3)), "cifar100": (100, (32, 32, 3))}
DATASETS = (*SMALL_DATASETS, "imagenet2012", "image_folder:<path>")


def data_dir_of(data_dir: str | None) -> str:
    """The TFDS data directory: `data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR")
                              or "~/tensorflow_datasets")


def dataset_info(name: str, data_dir: str | None = None, skip_bad_images: bool = False,
                 val_fraction: float | None = None) -> DatasetSpec:
    """Classes, native image shape and split sizes of a supported dataset.

    An image folder's files are checked here (see `_folder_files`): without `skip_bad_images`,
    one that is not an image raises DatasetCorruptError before anything is trained. Its splits
    are 'train' and 'val' (a val/ folder or `val_fraction`), else one 'test' set of all files.
    """
    data_dir = data_dir_of(data_dir)
    if name.startswith("image_folder:"):
        classes, splits = _folder_splits(name.split(":", 1)[1], skip_bad_images, val_fraction)
        return DatasetSpec(name, len(classes), None, {k: len(v) for k, v in splits.items()},
                           "val" if "val" in splits else "test", data_dir, "folder",
                           skip_bad_images, val_fraction)
    if name not in SMALL_DATASETS and name != "imagenet2012":
        raise ValueError(f"unknown dataset {name!r}; supported: {', '.join(DATASETS)}")
    info = tfds.builder(name, data_dir=data_dir).info
    splits = {k: v.num_examples for k, v in info.splits.items()}
    if name == "imagenet2012":
        return DatasetSpec(name, 1000, None, splits, "validation", data_dir, "imagenet")
    classes, shape = SMALL_DATASETS[name]
    return DatasetSpec(name, classes, shape, splits, "test", data_dir, "small")


def _folder_splits(root: str, skip_bad_images: bool = False, val_fraction: float | None = None
                   ) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """Classes and {split: (path, label) files} of an image folder (see the module's doc)."""
    base = Path(root, "train")
    if not base.is_dir():
        classes, files = _folder_files(root, skip_bad_images)
        return classes, _held_out(files, val_fraction) if val_fraction is not None else \
            {"test": files}
    classes, files = _folder_files(str(base), skip_bad_images)
    if not Path(root, "val").is_dir():
        return classes, _held_out(files, val_fraction) if val_fraction is not None else \
            {"train": files}
    if val_fraction is not None:
        raise ValueError(f"image_folder:{root} has a val/ folder; --val-fraction is for folders "
                         "without one")
    val_classes, val = _folder_files(str(Path(root, "val")), skip_bad_images)
    if val_classes != classes:
        raise ValueError(f"image_folder:{root}: val/ has the classes {', '.join(val_classes)}, "
                         f"train/ has {', '.join(classes)}; they must be the same")
    return classes, {"train": files, "val": val}


def _held_out(files: list[tuple[str, int]], fraction: float) -> dict[str, list]:
    """{'train', 'val'}: of each class, round(n x fraction) files (at least one, never all)
    are 'val', the first in the order of their names' SHA-1, so that the split is the same
    every time and follows neither the names' order nor the directory listing's."""
    if not 0 < fraction < 1:
        raise ValueError(f"--val-fraction must be between 0 and 1, not {fraction}")
    val = set()
    for label in sorted({y for _, y in files}):
        names = sorted((hashlib.sha1(Path(f).name.encode()).hexdigest(), f)
                       for f, y in files if y == label)
        k = min(len(names) - 1, max(1, round(len(names) * fraction)))
        val.update(f for _, f in names[:k])
    if not val:
        raise ValueError(f"--val-fraction {fraction}: no class has two images to split")
    return {"train": [x for x in files if x[0] not in val],
            "val": [x for x in files if x[0] in val]}


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


def padding_to(native: tuple[int, int], size: tuple[int, int]) -> int | None:
    """The zero padding per side that takes `native` (H, W) images to `size`, where padding is
    how they get there: a small, even, square margin such as MNIST's 28 -> 32 for LeNet-5
    (LeCun et al. 1998 pad the digits so). None where they need a resize."""
    grow = size[0] - native[0]
    return grow // 2 if 0 < grow <= 8 and grow == size[1] - native[1] and grow % 2 == 0 \
        else None


def _fit_small(image, size: tuple[int, int], interpolation: str):
    """Zero padding where `padding_to` says so, else a resize."""
    native = (image.shape[0], image.shape[1])
    if tuple(size) == native:
        return image
    p = padding_to(native, size)
    if p is not None:
        return tf.pad(image, [[p, p], [p, p], [0, 0]])
    return tf.image.resize(image, size, method=interpolation, antialias=True)


def _crop_flip(image, seed, pad: int, flip: bool):
    """Random crop after zero padding by `pad`, optional horizontal flip; stateless in `seed`."""
    h, w, c = image.shape
    image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    image = tf.image.stateless_random_crop(image, (h, w, c), seed=seed)
    if flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=seed[::-1])
    return image


def _resize_shorter_center_crop(image, resize: int, crop: int, interpolation: str):
    """Eval transform of torchvision's weights: shorter side to `resize`, centre `crop`."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = resize / tf.reduce_min(shape)
    new = tf.cast(tf.round(shape * scale), tf.int32)
    image = tf.image.resize(image, new, method=interpolation, antialias=True)
    top, left = (new[0] - crop) // 2, (new[1] - crop) // 2
    return image[top:top + crop, left:left + crop]


def _crop_window(shape, seed):
    """(begin, size) of an Inception-style crop (scale 0.08-1, ratio 3/4-4/3) of `shape`."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.zeros([0, 0, 4]), seed=seed, min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    return begin, size


def _random_resized_crop(jpeg, seed, size: tuple[int, int], interpolation: str):
    """Inception-style crop, resized to `size`, and a random flip, decoded straight from JPEG
    bytes."""
    begin, crop = _crop_window(tf.image.extract_jpeg_shape(jpeg), seed)
    image = tf.image.decode_and_crop_jpeg(jpeg, tf.stack([begin[0], begin[1], crop[0], crop[1]]),
                                          channels=3)
    return _resize_flip(tf.cast(image, tf.float32) / 255.0, seed, size, interpolation)


def _random_resized_crop_image(image, seed, size: tuple[int, int], interpolation: str):
    """`_random_resized_crop` of a decoded image."""
    begin, crop = _crop_window(tf.shape(image), seed)
    return _resize_flip(tf.slice(image, begin, crop), seed, size, interpolation)


def _resize_flip(image, seed, size: tuple[int, int], interpolation: str):
    image = tf.image.resize(image, size, method=interpolation)
    return tf.image.stateless_random_flip_left_right(image, seed=seed[::-1])


def _preprocess_fn(spec: DatasetSpec, info: ModelInfo, size: tuple[int, int, int], train: bool,
                   augment: bool):
    h, w, c = size
    # torchvision's eval ratio (256 -> 224) kept at any crop size; no margin without one
    resize = round(h * info.resize_size / info.crop_size) if info.resize_size else h

    def small(image, seed):
        image = tf.cast(image, tf.float32) / 255.0
        image = _fit_small(_to_channels(image, c), (h, w), info.interpolation)
        if augment:  # CIFAR: crop 4 + flip; MNIST-like: crop 2, never flip (digits, clothes)
            rgb = spec.image_shape[-1] == 3
            image = _crop_flip(image, seed, 4 if rgb else 2, flip=rgb)
        return image

    def jpeg(image, seed):
        if train and augment:
            image = _random_resized_crop(image, seed, (h, w), info.interpolation)
        else:
            image = tf.cast(tf.io.decode_jpeg(image, channels=3), tf.float32) / 255.0
            image = _resize_shorter_center_crop(image, resize, h, info.interpolation)
        return _to_channels(image, c)

    def folder(path, seed):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        image = tf.cast(image, tf.float32) / 255.0
        if train and augment and c == 3:  # ImageNet's transfer augmentation
            return _random_resized_crop_image(image, seed, (h, w), info.interpolation)
        image = _to_channels(_resize_shorter_center_crop(image, resize, h, info.interpolation), c)
        if train and augment:  # grey images: MNIST-like 2-pixel crops, never flipped
            image = _crop_flip(image, seed, 2, flip=False)
        return image

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
        _, splits = _folder_splits(spec.name.split(":", 1)[1], spec.skip_bad_images,
                                   spec.val_fraction)
        if len(splits) == 1:  # one set of files serves every split
            files = next(iter(splits.values()))
        elif split in splits:
            files = splits[split]
        else:
            raise ValueError(f"{spec.name} has the splits {' and '.join(splits)}, not {split!r}")
        paths, labels = zip(*files)
        return tf.data.Dataset.from_tensor_slices({"image": list(paths), "label": list(labels)})
    decoders = {"image": tfds.decode.SkipDecoding()} if spec.kind == "imagenet" else None
    try:
        ds = tfds.builder(spec.name, data_dir=spec.data_dir).as_dataset(
            split=split, decoders=decoders, shuffle_files=False,
            read_config=tfds.ReadConfig(interleave_cycle_length=1))
    except (AssertionError, tfds.core.registered.DatasetNotFoundError, FileNotFoundError) as e:
        from zoo.data.preparation import IMAGENET_STEPS

        how = IMAGENET_STEPS if spec.kind == "imagenet" else (
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
                 skip_bad_images: bool = False, val_fraction: float | None = None
                 ) -> Iterator[dict]:
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
      augment: None for the dataset's standard: on for CIFAR/ImageNet training and for image
        folders fed as RGB (Inception-style random-resized crops and flips), off for
        MNIST-like data and grey folders (random 2-pixel crops when True).
      num_examples: use only the first N examples of the split.
      process_index, process_count: this process's share (default: from JAX).
      skip_bad_images: leave out an image folder's unreadable files (see `_folder_files`).
      val_fraction: an image folder's held-out share of each class (see `_held_out`).
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
    spec = dataset_info(name, data_dir, skip_bad_images, val_fraction)
    size = tuple(image_size or info.input_size)
    if spec.kind in ("small", "folder") and augment is None:
        augment = train and (spec.image_shape or size)[-1] == 3
    augment = train if augment is None else augment
    part, per_process = _process_split(spec, split, num_examples, index, count)
    base = _source(spec, part)
    if spec.kind == "small":  # MNIST, Fashion-MNIST, CIFAR: decoded once, kept in memory
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
    except GeneratorExit:  # closed, also at interpreter exit, when `tf` may be torn down
        raise
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
        f" --data-dir {spec.data_dir}" if spec.data_dir != data_dir_of(None) else "") + " --force"
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
    """Whole shuffled batches forever, from one iterator: epoch e is the order in which a
    shuffle buffer of min(n, 50,000) seeded by seed * 1,000,003 + e emits the split, so it
    depends only on (seed, e). A new iterator for each epoch had stalled training at every
    other epoch's end for up to 19 s: tf.data's iterator destructor waits for the iterator's
    autotuning thread (README, Benchmarks)."""
    steps_per_epoch = n // batch
    if steps_per_epoch == 0:
        raise ValueError(f"the split has {n} examples per process, fewer than one batch of {batch}")
    first, skip = divmod(start_step, steps_per_epoch)

    def epoch(e):  # e: an int64 scalar tensor
        epoch_seed = seed * 1_000_003 + e
        ds = base.enumerate().shuffle(min(n, 50_000), seed=epoch_seed,
                                      reshuffle_each_iteration=False)
        ds = ds.skip(tf.cast(e == first, tf.int64) * (skip * batch)).map(
            lambda i, ex: preprocess(i, ex, epoch_seed),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.batch(batch, drop_remainder=True)

    epochs = tf.data.Dataset.range(first, np.iinfo(np.int64).max).flat_map(epoch)
    for b in epochs.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
        b["mask"] = np.ones(batch, bool)
        yield b


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
