"""Faults of long runs, each made for real: two runs on one workdir, a full disk during a save,
a truncated TFDS record file, an image folder with a file that is not an image.

Each checks the exit status, the one `error:` line (no traceback) and that the complete
checkpoints and the other files of the workdir are as they were.
"""

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from zoo import checkpoints, cli, data
from zoo.data import pipeline

from conftest import ROOT, run_main


def flags(workdir, dataset, *extra, model="simple_cnn"):
    return ["--model", model, "--dataset", dataset, "--workdir", str(workdir),
            "--batch-size", "32", "--no-progress", "--log-every", "1", *extra]


def snapshot(directory):
    """Every file under `directory` with its size and modification time."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def error_line(code, err, expected_code=2):
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == expected_code and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def steps_on_disk(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def wait_for(path, proc, seconds=300):
    deadline = time.time() + seconds
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists(), proc.communicate()[1][-3000:]


# ---------------------------------------------------------------- two runs, one workdir

def test_a_second_run_on_a_workdir_in_use_is_refused(tmp_path, env, dataset):
    """A real first run (a subprocess, paused with SIGSTOP so its files hold still) and a
    second one in this process; a reader needs no lock; SIGTERM releases the lock."""
    work = tmp_path / "w"
    argv = flags(work, dataset, "--steps", "100000", "--checkpoint-every", "2",
                 "--eval-every", "100000")
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], env=env, cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(work / "checkpoints" / "4", first)
        lock = json.loads((work / "train.lock").read_text())
        assert lock["pid"] == first.pid and lock["host"] == socket.gethostname()
        first.send_signal(signal.SIGSTOP)
        before = snapshot(work)
        code, _, err = run_main(argv)
        line = error_line(code, err)
        assert f"in use by another run (pid {first.pid} on host {socket.gethostname()}, " \
               f"since {lock['since']}" in line, line
        # a reader (evaluate.py, exports) takes no lock and sees complete steps only
        step = checkpoints.load_model(work)[3]["step"]
        assert step in steps_on_disk(work) and step >= 4
        assert snapshot(work) == before
    finally:
        first.send_signal(signal.SIGCONT)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=180)
    assert first.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert not (work / "train.lock").exists()


def test_the_lock_of_a_run_that_died_is_taken_over(tmp_path, env, dataset):
    work = tmp_path / "w"
    work.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    record = {"host": socket.gethostname(), "pid": dead.pid, "since": "2025-01-01 00:00:00"}
    (work / "train.lock").write_text(json.dumps(record))  # as a SIGKILL leaves it: not held
    code, out, err = run_main(flags(work, dataset, "--steps", "2"))
    assert code == 0, err[-3000:]
    notes = [x for x in err.splitlines() if "train.lock" in x]
    assert len(notes) == 1 and notes[0].startswith("note: ") and f"pid {dead.pid} on host" in \
        notes[0] and "taking it over" in notes[0], err[-3000:]
    assert not (work / "train.lock").exists() and steps_on_disk(work) == [2]


# ---------------------------------------------------------------- a full disk

def _mount_tmpfs(path, size):
    """Whether a tmpfs of `size` could be mounted at `path` (needs root or CAP_SYS_ADMIN)."""
    path.mkdir()
    if not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_during_a_save_stops_with_one_line(tmp_path, env, dataset):
    """lenet5 (0.7 MiB a checkpoint) on a 4 MiB tmpfs: a save fails with ENOSPC, for real.
    Where no filesystem can be mounted, the write error is injected at the OS layer instead:
    the run's file-size limit (RLIMIT_FSIZE, set with prlimit after two steps) makes the next
    checkpoint's write fail with EFBIG."""
    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, "4m")
    try:
        work = disk / "w"
        argv = flags(work, dataset, "--checkpoint-every", "1", "--max-to-keep", "100",
                     "--eval-every", "100000", model="lenet5")
        code, _, err = run_main(argv + ["--steps", "2"])
        assert code == 0, err[-3000:]
        kept = snapshot(work / "checkpoints")
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv, "--steps", "30"],
                                env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        if not mounted:
            wait_for(work / "checkpoints" / "3", proc)
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
        _, err = proc.communicate(timeout=300)
        line = error_line(proc.returncode, err)
        steps = steps_on_disk(work)
        failed, newest = steps[-1] + 1, steps[-1]
        assert 2 < newest < 29, steps
        assert f"could not write checkpoint step {failed} to {work / 'checkpoints'}: " in line
        assert (("no space left on the device holding it" in line and "once space is freed"
                 in line) if mounted else "file too large" in line), line
        assert f"the newest complete checkpoint is step {newest}; rerunning the same command " \
               "resumes from it" in line, line
        if mounted:
            assert "MiB free on the device holding" in err and "less than the 101 " \
                "checkpoints of 0.7 MiB that --max-to-keep 100 needs" in err, err[-3000:]
        # the earlier checkpoints are as they were, the newest complete one restores, and
        # nothing partial is left
        assert {k: v for k, v in snapshot(work / "checkpoints").items() if k in kept} == kept
        assert all(p.name.isdigit() for p in (work / "checkpoints").iterdir())
        assert checkpoints.load_model(work)[3]["step"] == newest
        assert not (work / "train.lock").exists()
        if mounted:  # space freed: the same command resumes from the newest complete step
            subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        code, out, err = run_main(argv + ["--steps", str(newest + 1)])
        assert code == 0 and f"resuming from step {newest}" in err, err[-3000:]
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], check=False)


# ---------------------------------------------------------------- damaged data

def write_tfds_fashion_mnist(data_dir, train=320, test=64):
    """A tiny Fashion-MNIST in TFDS's own format (records + dataset_info.json), written here
    (brightness encodes the class); returns the train split's record file."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    builder = tfds.builder("fashion_mnist", data_dir=str(data_dir))
    info, root = builder.info, builder.data_dir
    os.makedirs(root)
    rng = np.random.default_rng(0)
    splits, paths = [], {}
    for split, n in (("train", train), ("test", test)):
        template = tfds.core.ShardedFileTemplate(data_dir=root, dataset_name="fashion_mnist",
                                                 split=split, filetype_suffix="tfrecord")
        path = paths[split] = os.fspath(template.sharded_filepaths(1)[0])
        with tf.io.TFRecordWriter(path) as w:
            for label in rng.integers(0, 10, n):
                image = np.clip(rng.normal(20 + 22 * label, 20, (28, 28, 1)), 0, 255)
                w.write(info.features.serialize_example(
                    {"image": image.astype(np.uint8), "label": int(label)}))
        splits.append(tfds.core.SplitInfo(name=split, shard_lengths=[n],
                                          num_bytes=os.path.getsize(path),
                                          filename_template=template))
    info.set_splits(tfds.core.SplitDict(splits))
    info.write_to_directory(root)
    return paths["train"]


def test_a_truncated_tfds_record_file_names_it_and_how_to_prepare_again(tmp_path, env,
                                                                         monkeypatch):
    data_dir = tmp_path / "tfds"
    train_file = write_tfds_fashion_mnist(data_dir)
    work = tmp_path / "w"
    argv = flags(work, "fashion_mnist", "--data-dir", str(data_dir), "--checkpoint-every", "1")
    code, _, err = run_main(argv + ["--steps", "2"])
    assert code == 0, err[-3000:]
    before = snapshot(work)
    with open(train_file, "r+b") as f:  # cut the second half off
        f.truncate(os.path.getsize(train_file) // 2)
    code, _, err = run_main(argv + ["--steps", "4"])
    line = error_line(code, err)
    assert f"dataset fashion_mnist in {data_dir} is damaged: {train_file} (truncated record at" \
        in line, line
    assert line.endswith(f"prepare it again with `python -m zoo data prepare fashion_mnist "
                         f"--data-dir {data_dir} --force`"), line
    assert snapshot(work) == before
    code, _, err = run_main(argv + ["--steps", "4", "--skip-bad-images"])  # folders only
    assert "applies to image_folder: datasets only" in error_line(code, err)

    # the command named: --force removes the damaged copy, then prepares it as usual
    if not data.DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip("no Debian Fashion-MNIST to prepare from")
    version_dir = os.path.dirname(train_file)
    seen = []
    monkeypatch.setattr(pipeline.tfds.core.DatasetBuilder, "download_and_prepare",
                        lambda self, **kw: seen.append(os.path.exists(version_dir)))
    assert cli.data(["prepare", "fashion_mnist", "--data-dir", str(data_dir), "--force"]) == 0
    assert seen == [False]


def test_an_image_folder_file_that_is_not_an_image(tmp_path, env, dataset):
    folder = tmp_path / "images"
    shutil.copytree(dataset.split(":", 1)[1], folder)
    name = f"image_folder:{folder}"
    work = tmp_path / "w"
    code, _, err = run_main(flags(work, name, "--steps", "2"))
    assert code == 0, err[-3000:]
    before = snapshot(work)
    (folder / "class3" / "notes.jpg").write_text("not a picture\n")
    code, _, err = run_main(flags(work, name, "--steps", "4"))
    line = error_line(code, err)
    assert line == (f"error: {name}: 1 of 261 files are not images ({folder}/class3/notes.jpg); "
                    "replace or remove them, or pass --skip-bad-images to leave them out"), line
    assert snapshot(work) == before

    # --skip-bad-images leaves them out, counted: also a PNG cut short (only decoding tells)
    png = (folder / "class5" / "0.png").read_bytes()
    (folder / "class5" / "cut.png").write_bytes(png[:len(png) // 2])
    code, out, err = run_main(flags(work, name, "--steps", "4", "--skip-bad-images"))
    assert code == 0, err[-3000:]
    warnings = [x for x in err.splitlines() if "--skip-bad-images" in x]
    assert warnings == [f"warning: {name}: leaving out 2 of 262 files that are not readable "
                        f"images (--skip-bad-images): {folder}/class3/notes.jpg, "
                        f"{folder}/class5/cut.png"], err[-3000:]
    assert "(260 test images" in out
