"""Pictures for learning CNNs: classic kernels, learned filters, feature maps, training curves.

Every function writes one PNG (matplotlib, Agg backend) and returns what it drew, so tests can
check the numbers behind the picture. `python -m zoo viz kernels|filters|features|curves`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from zoo import arithmetic  # noqa: E402

DPI = 100
# The notes' kernels of zoo.arithmetic.KERNELS (not its box_blur and gaussian_blur).
KERNEL_PANELS = ("identity", "edge", "edge_laplace", "edge_all", "sharpen", "sharpen_quarter",
                 "blur_horizontal", "blur_vertical", "box_blur_5x5", "sobel_x", "sobel_y")


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_kernels(image: np.ndarray, path, kernels: Sequence[str] = KERNEL_PANELS
                 ) -> dict[str, np.ndarray]:
    """The notes' hand-made filters applied to one grayscale image, side by side.

    Each panel is the 'same'-padded response of one kernel of `zoo.arithmetic.KERNELS` (the
    image's size, whatever the kernel's shape); the last panel is the Sobel gradient magnitude
    sqrt(Gx^2 + Gy^2). Figure: rows of 5 panels, 1000 pixels wide and 225 per row (675 for the
    default kernels). Returns the images drawn, by panel name ('original', kernel names,
    'sobel_magnitude').
    """
    image = np.asarray(image, np.float32).squeeze()
    responses = {name: np.asarray(arithmetic.apply_filter(image, name, padding="same"))
                 for name in dict.fromkeys([*kernels, "sobel_x", "sobel_y"])}
    panels = {"original": image, **{name: responses[name] for name in kernels}}
    panels["sobel_magnitude"] = np.sqrt(responses["sobel_x"] ** 2 + responses["sobel_y"] ** 2)
    cols = 5
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2.25 * rows))
    for ax, (name, img) in zip(axes.flat, panels.items()):
        ax.imshow(img, cmap="gray")
        ax.set_title(name.replace("_", " "), fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)
    return panels


def plot_filters(params: dict, path, layer: str | None = None) -> np.ndarray:
    """The first conv layer's learned kernels as a grid (one tile per output channel).

    Args:
      params: a model's `params` tree.
      layer: the conv module's name; default: the first 4-D kernel in the tree.
    Returns:
      The (K, F, F, C) kernels drawn, each tile min-max scaled on its own.
    """
    kernels = {name: leaf["kernel"] for name, leaf in _modules(params)
               if "kernel" in leaf and np.ndim(leaf["kernel"]) == 4}
    if not kernels:
        raise ValueError("these parameters have no convolution kernel to draw")
    if layer is not None and layer not in kernels:
        raise ValueError(f"no conv layer {layer!r}; conv layers: {', '.join(kernels)}")
    name = layer or next(iter(kernels))
    k = np.moveaxis(np.asarray(kernels[name], np.float32), -1, 0)  # (K, F, F, C)
    if k.shape[-1] not in (1, 3):
        k = k.mean(-1, keepdims=True)  # deeper layers: average the input channels
    lo = k.min(axis=(1, 2, 3), keepdims=True)
    k = (k - lo) / np.maximum(k.max(axis=(1, 2, 3), keepdims=True) - lo, 1e-8)
    cols = min(8, len(k))
    rows = math.ceil(len(k) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols, rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, tile in zip(axes.flat, k):
        ax.imshow(tile.squeeze(-1) if tile.shape[-1] == 1 else tile, cmap="gray",
                  interpolation="nearest")
    fig.suptitle(f"{name}: {k.shape[0]} filters of {k.shape[1]}x{k.shape[2]}", fontsize=9)
    _save(fig, path)
    return k


def _modules(tree: dict, prefix: str = ""):
    """(path, leaf dict) for every module in a params tree, in insertion (definition) order."""
    for key, value in tree.items():
        if isinstance(value, dict) and any(not isinstance(v, dict) for v in value.values()):
            yield prefix + key, value
        if isinstance(value, dict):
            yield from _modules(value, prefix + key + "/")


def plot_feature_maps(model, variables, image: np.ndarray, path, channels: int = 8
                      ) -> dict[str, np.ndarray]:
    """The first `channels` feature maps of every conv stage for one input image.

    Rows are the stages `zoo.features.feature_maps` returns (input at the top), columns channels.
    Returns the maps drawn, by stage name, each (H, W, channels).
    """
    from zoo.features import feature_maps

    maps = feature_maps(model, variables, np.asarray(image, np.float32)[None])
    drawn = {name: np.asarray(m[0, :, :, :channels], np.float32) for name, m in maps.items()}
    fig, axes = plt.subplots(len(drawn) + 1, channels, figsize=(channels, len(drawn) + 1.2),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(np.asarray(image).squeeze(), cmap="gray")
    axes[0, 0].set_title("input", fontsize=8)
    for row, (name, m) in enumerate(drawn.items(), start=1):
        for c in range(m.shape[-1]):
            axes[row, c].imshow(m[:, :, c], cmap="viridis")
        axes[row, 0].set_title(f"{name} {m.shape[0]}x{m.shape[1]}", fontsize=7, loc="left")
    _save(fig, path)
    return drawn


def read_metrics(workdir) -> list[dict]:
    """The records of a workdir's metrics.jsonl (one JSON object a line)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"no metrics.jsonl in {workdir}: is it a train.py --workdir?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(workdirs: Sequence, path, labels: Sequence[str] | None = None
                ) -> dict[str, dict[str, list]]:
    """Loss and top-1 against step for one or more train.py workdirs, train and eval overlaid.

    Returns, per run label, the series drawn: {'train_loss': [(step, value), ...], ...}.
    """
    labels = list(labels or [Path(w).name for w in workdirs])
    series: dict[str, dict[str, list]] = {}
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for label, workdir, color in zip(labels, workdirs, plt.cm.tab10.colors):
        runs = series[label] = {}
        for key in ("train_loss", "eval_loss", "train_top1", "eval_top1"):
            pts = [(r["step"], r[key]) for r in read_metrics(workdir) if r.get(key) is not None]
            if not pts:
                continue
            runs[key] = pts
            ax = ax_loss if key.endswith("loss") else ax_acc
            style = "-" if key.startswith("train") else "o--"
            ax.plot(*zip(*pts), style, color=color, label=f"{label} {key.split('_')[0]}",
                    markersize=3)
    for ax, title in ((ax_loss, "loss"), (ax_acc, "top-1 accuracy")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return series


def sample_image(dataset: str = "fashion_mnist", index: int = 0, split: str = "test",
                 data_dir: str | None = None) -> tuple[np.ndarray, int]:
    """One raw image in [0, 1] (H, W, C) and its label, straight from the prepared TFDS split."""
    import tensorflow_datasets as tfds

    from zoo import data

    spec = data.dataset_info(dataset, data_dir)  # raises with the prepare command if missing
    ds = tfds.load(dataset, split=f"{split}[{index}:{index + 1}]", data_dir=spec.data_dir)
    example = next(iter(tfds.as_numpy(ds)))
    return example["image"].astype(np.float32) / 255.0, int(example["label"])


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo viz", description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("kernels", help="the notes' filters on a real image")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--index", type=int, default=0)
    for what in ("filters", "features"):
        p = sub.add_parser(what, help=f"learned {what} of a checkpoint")
        p.add_argument("--checkpoint", required=True, help="exported model dir or workdir")
        p.add_argument("--index", type=int, default=0, help="test image (features)")
    p = sub.add_parser("curves", help="loss/accuracy curves of train.py workdirs")
    p.add_argument("workdirs", nargs="+")
    for p in sub.choices.values():
        p.add_argument("--out", required=True, help="PNG to write")
        p.add_argument("--data-dir")
    args = parser.parse_args(argv)
    try:
        if args.what == "kernels":
            image, _ = sample_image(args.dataset, args.index, data_dir=args.data_dir)
            plot_kernels(image[..., 0], args.out)
        elif args.what == "curves":
            plot_curves(args.workdirs, args.out)
        else:
            from zoo.checkpoints import load_model

            model, variables, info, card = load_model(args.checkpoint)
            if args.what == "filters":
                plot_filters(variables["params"], args.out)
            else:
                from zoo import data

                image_size = card.get("image_size")
                *_, batch = data.make_dataset(  # the index-th test image, preprocessed
                    card.get("dataset", "fashion_mnist"), "test", info=info, train=False,
                    image_size=tuple(image_size) if image_size else None, global_batch_size=1,
                    num_examples=args.index + 1, data_dir=args.data_dir)
                plot_feature_maps(model, variables, batch["image"][0], args.out)
    except ValueError as e:
        from zoo.cli import error

        return error(e)
    print(args.out)
    return 0
