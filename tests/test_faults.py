"""Faults of long runs, each made for real: two runs on one workdir.

Each checks the exit status, the one `error:` line (no traceback) and that the complete
checkpoints and the other files of the workdir are as they were.
"""

import json
import signal
import socket
import subprocess
import sys
import time

from zoo import checkpoints

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
