"""A non-editable install: the built wheel, in a fresh venv, finds the shipped checkpoints from
any working directory and imports every subpackage."""

import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import ROOT


def test_wheel_in_a_fresh_venv_loads_a_shipped_checkpoint(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(wheels), str(ROOT)], check=True,
                   cwd=tmp_path, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("zoo-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig."
                              "get_paths()['purelib'])"], check=True, capture_output=True,
                             text=True).stdout.strip()
    # the dependencies come from this environment (a path entry: its .pth files, the editable
    # install of this checkout among them, are not run), zoo only from the wheel
    deps = [p for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]}
            if Path(p).is_dir()]
    Path(purelib, "deps.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--target", purelib, str(wheel)], check=True, capture_output=True,
                   timeout=300)
    code = ("import zoo, zoo.data, zoo.train, zoo.checkpoints, zoo.convert, zoo.models\n"
            "model, variables, info = zoo.load_pretrained('simple_cnn_fashion_mnist')\n"
            "print(zoo.__file__); print(zoo.CHECKPOINTS); print(info.name)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(python), "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, env={**env, "JAX_PLATFORMS": "cpu",
                                         "TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    where, shipped, name = out.stdout.split()
    assert where.startswith(purelib) and shipped == str(Path(purelib, "zoo", "shipped"))
    assert name == "simple_cnn"
