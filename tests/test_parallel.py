"""Data parallelism on simulated devices: sharded jit, pmap and one device agree; checkpoints
move between device and process counts; two processes train together over jax.distributed.

8 CPU devices need XLA_FLAGS before JAX starts, so those checks run in one subprocess; the
two-process run uses gloo collectives on 127.0.0.1.
"""

import json
import shutil
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest

import zoo
from zoo import checkpoints, parallel, training

from conftest import ROOT, assert_same_update, run_main


def flags(workdir, dataset, *extra):
    # SGD: its update is linear in the gradient, so runs that sum in another order stay close
    return ["--model", "simple_cnn", "--dataset", dataset, "--workdir", str(workdir),
            "--batch-size", "32", "--optimizer", "momentum", "--lr", "0.05", "--no-progress",
            "--log-every", "100", *extra]


def initial_params():
    """simple_cnn's parameters before the first step of a `flags` run (seed 0)."""
    model = zoo.create_model("simple_cnn", num_classes=10)
    return jax.device_get(training.create_train_state(model, optax.identity(), (28, 28, 1),
                                                      seed=0).params)


def final_params(workdir):
    _, variables, _, card = checkpoints.load_model(workdir)
    return card["step"], jax.device_get(variables["params"])


EIGHT_DEVICES = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
    import contextlib, io
    import flax.linen as nn, jax, numpy as np, optax
    import train, zoo
    from conftest import assert_same_update
    from zoo import layers, parallel, training

    assert jax.device_count() == 8

    class Tiny(nn.Module):  # conv + BatchNorm + dense: BN statistics must be global
        axis_name: str | None = None
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.Conv(8, (3, 3), padding=1, use_bias=False)(x)  # BN follows
            x = layers.BatchNorm(use_running_average=not train, momentum=0.9,  # jit: zoo's
                                 axis_name=self.axis_name)(x)                  # pmap: flax's
            return nn.Dense(10)(nn.relu(x).mean(axis=(1, 2)))

    rng = np.random.default_rng(0)
    batches = [{"image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
                "label": rng.integers(0, 10, 16).astype(np.int32),
                "mask": np.ones(16, bool)} for _ in range(3)]
    tx = training.make_optimizer(training.Recipe("momentum", 0.1, weight_decay=1e-3),
                                 optax.constant_schedule(0.1))
    cfg = training.StepConfig(label_smoothing=0.1)
    step_fn = lambda s, b, axis_name=None: training.train_step(s, b, config=cfg,
                                                               axis_name=axis_name)

    def run(kind):
        model = Tiny(axis_name=parallel.PMAP_AXIS if kind == "pmap" else None)
        state = training.create_train_state(model, tx, (8, 8, 3))
        init = jax.device_get((state.params, state.batch_stats))
        if kind == "pmap":
            step, state = parallel.pmap_step(step_fn), parallel.replicate(state)
            place = parallel.split_for_pmap
        else:
            mesh = parallel.make_mesh(jax.devices()[:1] if kind == "single" else None)
            rep, split = parallel.shardings(mesh)
            step, state = parallel.jit_step(step_fn, mesh), jax.device_put(state, rep)
            place = lambda b: parallel.global_batch(b, split)
        for b in batches:
            state, m = step(state, place(b))
        if kind == "pmap":
            state, m = parallel.unreplicate(state), parallel.unreplicate(m)
        return init, jax.device_get((state.params, state.batch_stats)), float(m["loss"])

    init, ref, ref_loss = run("single")
    for kind in ("jit", "pmap"):
        _, got, loss = run(kind)
        assert_same_update(ref, got, init)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-3)  # a mean summed in another order
        print(kind, "matches one device: loss", loss)

    model = zoo.create_model("resnet20", axis_name=parallel.PMAP_AXIS)  # BN sync in the zoo
    assert model.axis_name == parallel.PMAP_AXIS

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = train.main(["--model", "simple_cnn", "--dataset", sys.argv[2], "--workdir",
                           sys.argv[1] + "/bad", "--batch-size", "12", "--steps", "1"])
    assert code == 2 and "not divisible by the 8 devices" in err.getvalue(), err.getvalue()
    print("indivisible batch refused")

    # resume a one-device run on 8 devices with the pmap path (Orbax reshards)
    code = train.main(["--model", "simple_cnn", "--dataset", sys.argv[2], "--workdir",
                       sys.argv[1] + "/w8", "--batch-size", "32", "--steps", "6",
                       "--optimizer", "momentum", "--lr", "0.05", "--no-progress",
                       "--parallel", "pmap"])
    assert code == 0
    print("resumed on 8 devices")
""")


def test_8_devices_jit_pmap_and_one_device_agree_and_resume(tmp_path, env, dataset):
    """Sharded jit and pmap on 8 devices give one device's update (`assert_same_update`):
    fails if pmap's gradients are not psum-ed, if the loss is divided by a device's own count,
    or if BatchNorm statistics stay per device; then an 8-device pmap resume of a one-device
    run continues it with the same update."""
    code, _, err = run_main(flags(tmp_path / "w1", dataset, "--steps", "4",
                                  "--checkpoint-every", "2"))
    assert code == 0, err[-3000:]
    shutil.copytree(tmp_path / "w1", tmp_path / "w8")
    script = EIGHT_DEVICES.replace("ROOT", repr(str(ROOT)))
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path), dataset],
                         capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    for line in ("jit matches one device", "pmap matches one device",
                 "indivisible batch refused", "resumed on 8 devices"):
        assert line in out.stdout, out.stdout
    assert "resuming from step 4" in out.stderr
    # the same two steps on one device: the 8-device pmap run computed the same update
    code, _, err = run_main(flags(tmp_path / "w1", dataset, "--steps", "6"))
    assert code == 0, err[-3000:]
    (s1, p1), (s8, p8) = final_params(tmp_path / "w1"), final_params(tmp_path / "w8")
    assert s1 == s8 == 6
    assert_same_update(p1, p8, initial_params())


# A synthetic dataset standing in for zoo.data (whose image folders are single-process):
# global batch s is the same whatever the process count, each process taking its slice, so a
# 2-process run must match a 1-process run. Evaluation is one padded pass, as zoo.data's.
FAKE_DATA = textwrap.dedent("""
    import types
    import jax
    import numpy as np
    from zoo import data as _data

    N = 256
    _rng = np.random.default_rng(0)
    LABELS = _rng.integers(0, 10, N).astype(np.int32)
    IMAGES = (_rng.normal(0, 0.3, (N, 28, 28, 1)) + LABELS[:, None, None, None] / 5).astype(
        np.float32)

    def dataset_info(name, data_dir=None, skip_bad_images=False, val_fraction=None):
        return types.SimpleNamespace(name=name, num_classes=10, image_shape=(28, 28, 1),
                                     splits={"train": N, "test": N}, eval_split="test",
                                     kind="small")

    def make_dataset(name, split, *, info, global_batch_size, train, start_step=0, seed=0,
                     **kw):
        index, count = jax.process_index(), jax.process_count()
        local = global_batch_size // count
        def take(ids):
            ids = ids[index * local:(index + 1) * local]
            mask = np.arange(local) < len(ids)
            ids = np.concatenate([ids, np.zeros(local - len(ids), int)])
            return {"image": IMAGES[ids], "label": LABELS[ids], "mask": mask}
        if not train:
            return (take(np.arange(b, min(b + global_batch_size, N)))
                    for b in range(0, N, global_batch_size))
        per_epoch = N // global_batch_size
        def endless(step):
            while True:
                epoch, i = divmod(step, per_epoch)
                order = np.random.default_rng([seed, epoch]).permutation(N)
                yield take(order[i * global_batch_size:(i + 1) * global_batch_size])
                step += 1
        return endless(start_step)

    _data.dataset_info, _data.make_dataset = dataset_info, make_dataset
""")

TWO_PROCESSES = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    sys.path.insert(0, ROOT)
    exec(FAKE)
    import train
    sys.exit(train.main(sys.argv[1:]))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_together_over_jax_distributed(tmp_path, env, monkeypatch):
    """2 processes x 2 CPU devices over jax.distributed (gloo on 127.0.0.1): the same update
    as one process on one device (fails if the processes read the same shard, or if their
    gradients are not combined); process 0 alone logs; Orbax saves collectively; evaluation
    sums both processes' shares; then one process resumes the 2-process checkpoint."""
    work = tmp_path / "dist"
    run = ["--steps", "6", "--eval-every", "3", "--log-every", "3"]
    script = TWO_PROCESSES.replace("ROOT", repr(str(ROOT))).replace("FAKE", repr(FAKE_DATA))
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-c", script, *flags(work, "synthetic", *run), "--coordinator",
         f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=600))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    assert "test top-1" in outs[0][0] and "256 test images" in outs[0][0]
    assert "test top-1" not in outs[1][0]  # only process 0 reports (gloo prints its ranks)
    records = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6, 6]  # written once, by process 0
    assert records[0]["eval_examples"] == 256  # both processes' shares
    assert sorted(int(p.name) for p in (work / "checkpoints").iterdir()
                  if p.name.isdigit()) == [3, 6]

    from zoo import data
    monkeypatch.setattr(data, "dataset_info", data.dataset_info)  # restored after the test
    monkeypatch.setattr(data, "make_dataset", data.make_dataset)
    exec(FAKE_DATA, {})  # the same data in this process (one process, one device)
    code, _, err = run_main(flags(tmp_path / "ref", "synthetic", *run))
    assert code == 0, err[-3000:]
    (s2, p2), (s1, p1) = final_params(work), final_params(tmp_path / "ref")
    assert s1 == s2 == 6
    assert_same_update(p1, p2, initial_params())
    # the 2-process checkpoint resumes in one process on one device
    code, out, err = run_main(flags(work, "synthetic", "--steps", "8"))
    assert code == 0 and "resuming from step 6" in err, err[-3000:]
    assert final_params(work)[0] == 8


def test_initialize_distributed_checks_its_flags(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri",
                "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    assert parallel.initialize_distributed() is False  # a plain run: nothing to start
    with pytest.raises(ValueError, match="need all of"):
        parallel.initialize_distributed("127.0.0.1:1234", 2, None)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parallel.initialize_distributed("localhost", 2, 0)
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        parallel.initialize_distributed("127.0.0.1:1234", 2, 2)
    monkeypatch.setenv("SLURM_JOB_ID", "1")  # an interactive SLURM shell: one task
    for var, value in (("SLURM_STEP_NODELIST", "n1"), ("SLURM_NTASKS", "1"),
                       ("SLURM_PROCID", "0"), ("SLURM_LOCALID", "0")):
        monkeypatch.setenv(var, value)
    assert parallel._launcher_env() is None
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert parallel._launcher_env() == "SLURM"


def test_batch_placement_helpers():
    batch = {"image": np.zeros((8, 4, 4, 1), np.float32), "label": np.arange(8)}
    split = parallel.split_for_pmap(batch)
    assert split["image"].shape == (jax.local_device_count(), 8 // jax.local_device_count(),
                                    4, 4, 1)
    rep, sharded = parallel.shardings(parallel.make_mesh())
    g = parallel.global_batch(batch, sharded)
    np.testing.assert_array_equal(np.asarray(g["label"]), np.arange(8))
    with pytest.raises(ValueError, match="not divisible by the 3 devices"):
        parallel.check_batch_size(8, 3)
    assert list(parallel.prefetch(iter(range(5)), lambda x: x * 2, size=2)) == [0, 2, 4, 6, 8]
