"""The bench's correctness (never its timings): valid JSON with positive numbers, analytic FLOPs."""

import json
import math

import pytest

from zoo import bench, onednn

POSITIVE = ("batch_size", "devices", "images_per_sec", "step_ms", "flops_per_image",
            "step_flops_per_image", "tflops")


def run_cli(capsys, *argv):
    assert bench.cli(list(argv)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def is_positive(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def has_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_lenet5_two_steps_prints_valid_json(capsys, mode):
    # infer: MFU against a given peak of 1 TFLOP/s; train: side by side with torch (if present)
    extra = ["--peak-tflops", "1"] if mode == "infer" else (
        ["--against", "torch"] if has_torch() else [])
    out = run_cli(capsys, "lenet5", "--mode", mode, "--steps", "2", "--windows", "1",
                  "--warmup", "0", "--batch-size", "8", *extra)
    assert (out["model"], out["mode"], out["batch_size"], out["dtype"]) == (
        "lenet5", mode, 8, "float32")
    for key in POSITIVE:
        assert is_positive(out[key]), (key, out[key])
    assert isinstance(out["compile_s"], float) and out["compile_s"] >= 0
    assert out["steps_per_window"] == 2 and out["windows"] == 1
    assert out["step_flops_per_image"] == out["flops_per_image"] * (3 if mode == "train" else 1)
    assert out["images_per_sec"] == pytest.approx(8 / (out["step_ms"] / 1e3), rel=1e-3)
    assert out["tflops"] == pytest.approx(
        out["images_per_sec"] * out["step_flops_per_image"] / 1e12, rel=1e-3)
    if mode == "infer":
        assert out["mfu"] == pytest.approx(out["tflops"], rel=1e-3)
    else:
        assert out["mfu"] is None  # no peak is known for a CPU
    if "--against" in extra:
        eager = out["torch"]["eager"]
        assert is_positive(eager["images_per_sec"]) and is_positive(eager["step_ms"])
        assert out["torch"]["compile"] is None and "skipped" in out["torch"]["compile_note"]
        assert out["ratio_against"] == "torch eager"
        # oneDNN's OpenMP threads would share torch's runtime: torch is timed apart
        assert out["torch"]["process"] == ("separate" if onednn.available() else "same")
        assert eager["windows"] == 1 and eager["steps_per_window"] == 2
        assert out["ratio"] == pytest.approx(out["images_per_sec"] / eager["images_per_sec"],
                                             rel=1e-2)


@pytest.mark.parametrize("name", sorted(bench._TORCH_TWINS))
def test_torch_twin_has_the_zoo_models_parameter_count(name):
    torch = pytest.importorskip("torch")
    import jax
    import jax.numpy as jnp
    import numpy as np

    import zoo

    info = zoo.model_info(name)
    model = zoo.create_model(name)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                  jnp.zeros((1, *info.input_size))))
    zoo_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables["params"]))
    twin = bench.torch_model(name, info.num_classes, info.input_size[-1], aux=False)
    assert sum(p.numel() for p in twin.parameters()) == zoo_params
    with torch.no_grad():  # and it runs at the zoo model's native size
        out = twin.eval()(torch.zeros(1, info.input_size[-1], *info.input_size[:2]))
    assert tuple(out.shape) == (1, info.num_classes)


def test_resnet50_flops_match_the_known_4_1_gmacs():
    flops = bench.flops_per_image("resnet50", (224, 224, 3))
    assert flops == pytest.approx(2 * 4.1e9, rel=0.03)


def test_peak_table():
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989
    assert bench.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756
    assert bench.peak_tflops("NVIDIA H200", "bfloat16") == 989
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312
    assert bench.peak_tflops("cpu", "float32") is None


def test_bad_input_is_one_line_error(capsys):
    assert bench.cli(["lenet5", "--image-size", "16"]) == 2
    assert "--image-size" in capsys.readouterr().err


def test_torch_apart_relays_a_readable_error():
    """torch's Timers in a child process (beside oneDNN's convolutions): a ValueError there is
    the same one-line ValueError here, not a child's traceback."""
    pytest.importorskip("torch")
    with pytest.raises(ValueError, match="vgg11 takes 3 channels, not 1"):
        bench.torch_timers_apart((2, 0, 1.0), name="vgg11", mode="train", batch_size=2,
                                 dtype="float32", input_shape=(32, 32, 1), num_classes=10,
                                 compile_mode="auto")
