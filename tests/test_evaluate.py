"""evaluate.py end to end on converted torchvision weights (a random resnet18 with 3 classes, an
image folder of generated PNGs), through --checkpoint and --torchvision-weights, and its errors:
one `error: ...` line and exit status 2."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from zoo import cards, convert, parity, registry, weights  # noqa: E402
from zoo.checkpoints import save_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SIZE = [32, 32, 3]  # resnet18's smallest input: the card's image_size, used by evaluate.py


def _evaluate_module():
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A .pth of a random 3-class resnet18, its converted checkpoint, and a 3-class image folder."""
    from PIL import Image

    tmp = tmp_path_factory.mktemp("eval")
    model = parity.torchvision_model("resnet18", num_classes=3, calibrate=False)
    torch.save(model.state_dict(), tmp / "resnet18.pth")
    zoo_model, variables, kwargs, dropped = convert.load_torchvision_model(
        "resnet18", tmp / "resnet18.pth")
    card = cards.conversion_card("resnet18", tmp / "resnet18.pth",
                              weights.file_sha256(tmp / "resnet18.pth"), kwargs, dropped,
                              registry.param_count(variables))
    save_model(tmp / "ckpt", model_name="resnet18", variables=variables,
               card={**card, "image_size": SIZE}, create_kwargs=kwargs)
    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp / "images" / f"class{c}").mkdir(parents=True)
        for i in range(2):  # odd sizes: the resize-shorter-side + centre-crop path runs
            Image.fromarray(rng.integers(0, 256, (40 + 9 * i, 52, 3), np.uint8)).save(
                tmp / "images" / f"class{c}" / f"{i}.png")
    return tmp


def test_checkpoint_end_to_end_and_same_as_torchvision_weights(files):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), "--model", "resnet18", "--checkpoint",
         str(files / "ckpt"), "--dataset", f"image_folder:{files / 'images'}", "--batch-size", "4"],
        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1  # one JSON object on stdout; the progress bar is on stderr
    result = json.loads(lines[0])
    for key in ("model", "dataset", "split", "num_examples", "top1", "top5", "loss",
                "images_per_sec", "param_count"):
        assert key in result
    assert result["model"] == "resnet18" and result["num_examples"] == 6
    assert result["split"] == "test" and result["image_size"] == SIZE  # the card's size
    assert result["param_count"] == 11_689_512 - 997 * 513  # a 3-class head
    assert 0 <= result["top1"] <= 100 and result["top5"] == 100.0  # 3 classes
    assert "img" in out.stderr  # tqdm

    # the same numbers straight from the .pth
    evaluate = _evaluate_module()
    args = evaluate.parse(["--model", "resnet18", "--torchvision-weights",
                           str(files / "resnet18.pth"), "--dataset",
                           f"image_folder:{files / 'images'}", "--batch-size", "4",
                           "--image-size", "32x32x3", "--no-progress"])
    direct = evaluate.run(args)
    assert direct["top1"] == result["top1"] and direct["num_examples"] == 6
    assert direct["loss"] == pytest.approx(result["loss"], rel=1e-6)


def _error(capsys, *argv) -> str:
    code = _evaluate_module().main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_errors(files, tmp_path, capsys):
    folder = f"image_folder:{files / 'images'}"
    ckpt = str(files / "ckpt")
    # a checkpoint of another model
    assert "is a resnet18 checkpoint, not resnet34" in _error(
        capsys, "--model", "resnet34", "--checkpoint", ckpt, "--dataset", folder)
    # a step chosen in an exported model, which has one
    assert "step can only be chosen" in _error(
        capsys, "--model", "resnet18", "--checkpoint", ckpt, "--step", "best", "--dataset", folder)
    # missing and corrupt checkpoints
    assert "does not exist" in _error(
        capsys, "--model", "resnet18", "--checkpoint", str(tmp_path / "nothing"),
        "--dataset", folder)
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    for f in (broken / "variables").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0" * 7)
    _error(capsys, "--model", "resnet18", "--checkpoint", str(broken), "--dataset", folder)
    shutil.rmtree(broken / "variables")
    assert "missing" in _error(capsys, "--model", "resnet18", "--checkpoint", str(broken),
                               "--dataset", folder)
    # a dataset that does not fit: class count, impossible input shape
    assert "10 classes" in _error(capsys, "--model", "resnet18", "--checkpoint", ckpt,
                                  "--dataset", "fashion_mnist")
    assert "do not fit" in _error(capsys, "--model", "resnet18", "--checkpoint", ckpt,
                                  "--dataset", folder, "--image-size", "16x16x3")
    # a missing dataset
    assert "does not exist" in _error(capsys, "--model", "resnet18", "--checkpoint", ckpt,
                                      "--dataset", f"image_folder:{tmp_path / 'none'}")
    # a weight file that does not fit the model
    assert "missing" in _error(capsys, "--model", "resnet34", "--torchvision-weights",
                               str(files / "resnet18.pth"), "--dataset", folder)


def test_error_exit_status_from_the_command_line(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), "--model", "resnet18", "--checkpoint",
         str(tmp_path / "nothing"), "--dataset", f"image_folder:{tmp_path}"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines()[-1].startswith("error: ")


def test_metrics_equal_torch_on_the_same_batches(files):
    """evaluate.py's top-1/top-5/loss are torchvision's own on exactly the batches it reads."""
    from zoo import data
    from zoo.registry import model_info

    tv = parity.import_torchvision()
    model = tv.models.resnet18(num_classes=3).eval()
    model.load_state_dict(torch.load(files / "resnet18.pth", weights_only=True))
    folder = f"image_folder:{files / 'images'}"
    evaluate = _evaluate_module()
    got = evaluate.run(evaluate.parse([
        "--model", "resnet18", "--torchvision-weights", str(files / "resnet18.pth"),
        "--dataset", folder, "--batch-size", "4", "--image-size", "32x32x3", "--no-progress"]))
    logits, labels = [], []
    for b in data.make_dataset(folder, "test", info=model_info("resnet18"), image_size=(32, 32, 3),
                               global_batch_size=4, train=False):
        with torch.no_grad():
            out = model(torch.from_numpy(b["image"].transpose(0, 3, 1, 2).copy())).double()
        logits.append(out.numpy()[b["mask"]])
        labels.append(b["label"][b["mask"]])
    logits, labels = np.concatenate(logits), np.concatenate(labels)
    loss = torch.nn.functional.cross_entropy(torch.from_numpy(logits),
                                             torch.from_numpy(labels).long()).item()
    assert got["num_examples"] == len(labels) == 6
    assert got["top1"] == pytest.approx(100 * np.mean(logits.argmax(1) == labels))
    assert got["loss"] == pytest.approx(loss, rel=1e-4)


class _RunsCode:
    """Unpickling this would run code (it writes `marker`)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_refused_pickle_and_zeroed_metadata(files, tmp_path, capsys):
    folder = f"image_folder:{files / 'images'}"
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(3, 512), "x": _RunsCode(tmp_path / "ran")}, evil)
    assert "refused" in _error(capsys, "--model", "resnet18", "--torchvision-weights", str(evil),
                               "--dataset", folder)
    assert not (tmp_path / "ran").exists()
    # a checkpoint whose Orbax metadata was zeroed (Orbax then reports no tree at all)
    broken = tmp_path / "zeroed"
    shutil.copytree(files / "ckpt", broken)
    meta = broken / "variables" / "_METADATA"
    meta.write_bytes(b"\0" * meta.stat().st_size)
    assert "damaged" in _error(capsys, "--model", "resnet18", "--checkpoint", str(broken),
                               "--dataset", folder)
