"""Pictures: each writes a PNG of the expected size; the Sobel panel matches NumPy."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import zoo
from zoo import viz


def png_size(path):
    with Image.open(path) as im:
        return im.size


def sobel_numpy(img):
    """Reference: 'same' zero-padded cross-correlation with the Sobel kernels, in NumPy."""
    kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)
    p = np.pad(img, 1)
    windows = np.lib.stride_tricks.sliding_window_view(p, (3, 3))
    gx = (windows * kx).sum((-1, -2))
    gy = (windows * kx.T).sum((-1, -2))
    return np.sqrt(gx ** 2 + gy ** 2)


def test_kernel_panels_and_sobel_magnitude(tmp_path):
    img = np.random.default_rng(0).random((28, 28)).astype(np.float32)
    panels = viz.plot_kernels(img, tmp_path / "k.png")
    assert png_size(tmp_path / "k.png") == (1000, 675)  # 13 panels: 3 rows of 5
    assert list(panels) == ["original", "identity", "edge", "edge_laplace", "edge_all", "sharpen",
                            "sharpen_quarter", "blur_horizontal", "blur_vertical", "box_blur_5x5",
                            "sobel_x", "sobel_y", "sobel_magnitude"]  # the notes' kernels only
    assert all(p.shape == (28, 28) for p in panels.values())  # 'same' for 1x5 and 5x5 too
    np.testing.assert_allclose(panels["identity"], img, atol=1e-6)
    np.testing.assert_allclose(panels["sobel_magnitude"], sobel_numpy(img), rtol=1e-5, atol=1e-5)
    viz.plot_kernels(img, tmp_path / "two.png", kernels=("box_blur",))
    assert png_size(tmp_path / "two.png") == (1000, 225)  # original, box blur, Sobel magnitude


def test_filters_grid(tmp_path):
    model = zoo.create_model("simple_cnn")
    variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    drawn = viz.plot_filters(variables["params"], tmp_path / "f.png")
    assert drawn.shape == (32, 3, 3, 1) and drawn.min() >= 0 and drawn.max() <= 1
    assert png_size(tmp_path / "f.png") == (800, 440)
    with pytest.raises(ValueError, match="no conv layer 'nope'"):
        viz.plot_filters(variables["params"], tmp_path / "g.png", layer="nope")


def test_feature_maps_rows(tmp_path):
    model = zoo.create_model("simple_cnn")
    variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    image = np.random.default_rng(1).random((28, 28, 1)).astype(np.float32)
    drawn = viz.plot_feature_maps(model, variables, image, tmp_path / "m.png", channels=4)
    assert list(drawn) == ["conv1", "pool1", "conv2", "pool2", "conv3", "pool3"]
    assert drawn["pool3"].shape == (3, 3, 4)
    assert png_size(tmp_path / "m.png") == (400, 720)  # 4 channels x (6 stages + input row)


def test_curves_overlay_runs(tmp_path):
    for name, offset in (("adam", 0.0), ("sgd", 0.5)):
        (tmp_path / name).mkdir()
        records = [{"step": s, "train_loss": 2.0 / s + offset, "train_top1": 50 + s}
                   for s in range(1, 6)] + [{"step": 5, "eval_loss": 0.5, "eval_top1": 80.0}]
        (tmp_path / name / "metrics.jsonl").write_text(
            "\n".join(json.dumps(r) for r in records))
    series = viz.plot_curves([tmp_path / "adam", tmp_path / "sgd"], tmp_path / "c.png")
    assert png_size(tmp_path / "c.png") == (1000, 400)
    assert series["sgd"]["train_loss"][0] == (1, 2.5) and series["adam"]["eval_top1"] == [(5, 80.0)]
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        viz.plot_curves([tmp_path / "missing"], tmp_path / "d.png")
