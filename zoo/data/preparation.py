"""Preparing datasets for TFDS: Fashion-MNIST offline from Debian's files, ImageNet's
manual steps, the ordinary TFDS download for the rest."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from zoo.data.pipeline import DATASETS, DatasetNotFoundError, SMALL_DATASETS, data_dir_of, tfds

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# Upstream gzip headers that Debian rewrote (FNAME dropped, MTIME zeroed); restoring them makes
# the files byte-identical to the ones TFDS's registered checksums describe.
_FASHION_MTIME = {"train": 1504176606, "t10k": 1504176627}
IMAGENET_STEPS = (
    "ImageNet cannot be downloaded automatically. Download ILSVRC2012_img_train.tar and "
    "ILSVRC2012_img_val.tar from https://image-net.org/ (after accepting its terms), put both in "
    "<data_dir>/downloads/manual/ (data_dir: --data-dir, $TFDS_DATA_DIR or ~/tensorflow_datasets), "
    "then run `python -m zoo data prepare imagenet2012` (several hours, ~300 GB of disk).")


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
    data_dir = data_dir_of(data_dir)
    if name not in SMALL_DATASETS and name != "imagenet2012":
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
            raise DatasetNotFoundError(IMAGENET_STEPS)
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
