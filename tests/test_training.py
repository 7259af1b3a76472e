"""The train step, its parallel paths, and train.py's checkpoint/resume/error behaviour."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo import checkpoints, training

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"}


def synthetic(n=64, seed=0):
    """Images whose class is written into their brightness: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.int32)
    images = rng.normal(0, 0.1, (n, 28, 28, 1)).astype(np.float32) + labels[:, None, None, None] / 5
    return {"image": images, "label": labels, "mask": np.ones(n, bool)}


def test_loss_falls_and_metrics():
    model = zoo.create_model("simple_cnn")
    tx = training.make_optimizer(training.Recipe("adam", 3e-3), lambda s: 3e-3)
    state = training.create_train_state(model, tx, (28, 28, 1))
    step = jax.jit(training.train_step)
    batch = synthetic()
    losses = []
    for _ in range(30):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0]
    assert 0 <= float(metrics["top1"]) <= float(metrics["top5"]) <= 1
    r = training.evaluate(model, {"params": state.params}, iter([batch]))
    assert r["num_examples"] == 64 and r["top1"] > 50


def test_evaluate_ignores_padding():
    model = zoo.create_model("simple_cnn")
    variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    batch = synthetic(8)
    full = training.evaluate(model, variables, iter([batch]))
    padded = {k: np.concatenate([v, v[:5]]) for k, v in batch.items()}
    padded["mask"][8:] = False
    r = training.evaluate(model, variables, iter([padded]))
    assert r["num_examples"] == 8
    np.testing.assert_allclose(r["loss"], full["loss"], rtol=1e-6)
    assert r["top1"] == full["top1"]


def test_schedules_and_linear_scaling():
    recipe = training.Recipe("nesterov", 0.1, 256, schedule="warmup_cosine", warmup_epochs=1,
                             scale_lr=True)
    sched = training.make_schedule(recipe, steps_per_epoch=10, total_steps=100, global_batch=1024)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(10)), 0.4, rtol=1e-6)  # 0.1 x 1024 / 256
    assert float(sched(100)) < 1e-6
    step = training.make_schedule(training.Recipe(lr=1.0, schedule="step"), 10, 100, 128)
    assert [float(step(s)) for s in (49, 50, 75)] == pytest.approx([1.0, 0.1, 0.01])
    with pytest.raises(ValueError, match="unknown optimizer"):
        training.make_optimizer(training.Recipe("adagrad"), sched)


def test_weight_decay_skips_bn_and_bias():
    params = {"conv": {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.ones(2)},
              "bn": {"scale": jnp.ones(2)}}
    tx = training.make_optimizer(training.Recipe("sgd", 1.0, weight_decay=0.5), lambda s: 1.0)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    assert float(updates["conv"]["kernel"].max()) == -0.5
    assert float(jnp.abs(updates["conv"]["bias"]).max()) == 0
    assert float(jnp.abs(updates["bn"]["scale"]).max()) == 0


PARALLEL_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import functools, jax, jax.numpy as jnp, numpy as np, flax.linen as nn
    from zoo import parallel, training

    class Tiny(nn.Module):  # conv + BatchNorm + dense: BN statistics must be global
        axis_name: str | None = None
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.Conv(8, (3, 3), padding=1)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                             axis_name=self.axis_name)(x)
            return nn.Dense(10)(nn.relu(x).mean(axis=(1, 2)))

    rng = np.random.default_rng(0)
    batches = [{"image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
                "label": rng.integers(0, 10, 16).astype(np.int32),
                "mask": np.ones(16, bool)} for _ in range(3)]
    tx = training.make_optimizer(training.Recipe("momentum", 0.1), lambda s: 0.1)

    def run(kind):
        model = Tiny(axis_name=parallel.PMAP_AXIS if kind == "pmap" else None)
        state = training.create_train_state(model, tx, (8, 8, 3))
        if kind == "pmap":
            step, state = parallel.pmap_step(training.train_step), parallel.replicate(state, 8)
            place = lambda b: parallel.split_for_pmap(b, 8)
        else:
            devices = jax.devices()[:1] if kind == "single" else jax.devices()
            mesh = parallel.make_mesh(devices)
            rep, split = parallel.shardings(mesh)
            step, state = parallel.jit_step(training.train_step, mesh), jax.device_put(state, rep)
            place = lambda b: parallel.global_batch(b, split)
        for b in batches:
            state, m = step(state, place(b))
        if kind == "pmap":
            state, m = parallel.unreplicate(state), parallel.unreplicate(m)
        return jax.device_get((state.params, state.batch_stats, m["loss"]))

    ref = run("single")
    for kind in ("jit", "pmap"):
        got = run(kind)
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        print(kind, "matches", float(got[2]))
    print("devices", jax.device_count())
""")


def test_jit_pmap_and_single_device_agree_on_8_devices():
    out = subprocess.run([sys.executable, "-c", PARALLEL_SCRIPT], capture_output=True,
                         text=True, env=ENV, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "jit matches" in out.stdout and "pmap matches" in out.stdout
    assert "devices 8" in out.stdout


# ---------------------------------------------------------------- train.py end to end

def train_cmd(workdir, *extra):
    return [sys.executable, str(ROOT / "train.py"), "--model", "simple_cnn", "--dataset",
            "fashion_mnist", "--workdir", str(workdir), "--batch-size", "32", "--no-progress",
            "--log-every", "5", *extra]


def run_train(workdir, *extra, timeout=300):
    return subprocess.run(train_cmd(workdir, *extra), capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def fashion_mnist():
    from zoo import data

    try:
        data.dataset_info("fashion_mnist")
        data.prepare("fashion_mnist")
    except data.DatasetNotFoundError as e:
        pytest.skip(f"Fashion-MNIST unavailable: {e}")


def final_params(workdir):
    _, variables, _, card = checkpoints.load_model(workdir)
    return card["step"], jax.device_get(variables["params"])


def test_kill9_then_resume_is_bit_identical(tmp_path, fashion_mnist):
    steps = ["--steps", "30", "--checkpoint-every", "10", "--eval-every", "30"]
    ref = run_train(tmp_path / "ref", *steps)
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert "test top-1" in ref.stdout
    work = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(work, *steps), env=ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (work / "checkpoints" / "20").is_dir() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (work / "checkpoints" / "10").is_dir(), "the run was killed before any checkpoint"
    resumed = run_train(work, *steps)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from step" in resumed.stderr
    (s1, p1), (s2, p2) = final_params(tmp_path / "ref"), final_params(work)
    assert s1 == s2 == 30
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(a, b)
    record = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "lr", "train_loss", "train_top1", "images_per_sec"} <= set(record[0])


def test_sigterm_saves_and_exits(tmp_path, fashion_mnist):
    work = tmp_path / "term"
    proc = subprocess.Popen(train_cmd(work, "--steps", "100000", "--checkpoint-every", "100000",
                                      "--eval-every", "100000"),
                            env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (work / "metrics.jsonl").is_file() or \
            not (work / "metrics.jsonl").read_text():
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    saved = [int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved and 0 < saved[0] < 100000 and "rerun to resume" in err


def test_nan_loss_stops_with_the_step(tmp_path, fashion_mnist):
    r = run_train(tmp_path / "nan", "--steps", "20", "--optimizer", "sgd", "--lr", "1e30",
                  "--checkpoint-every", "100")
    assert r.returncode == 2
    assert "error: loss is nan at step" in r.stderr or "error: loss is inf at step" in r.stderr
    assert not list((tmp_path / "nan" / "checkpoints").glob("[0-9]*"))  # nothing bad saved


@pytest.mark.parametrize("args,message", [
    (["--model", "resnt50"], "did you mean 'resnet50'"),
    (["--dataset", "mnistt"], "unknown dataset 'mnistt'"),
    (["--optimizer", "adagrad"], "unknown optimizer 'adagrad'"),
    (["--recipe", "nope"], "unknown recipe 'nope'"),
    (["--image-size", "16x16x1"], "needs images of at least 28x28"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, args, message):
    cmd = train_cmd(tmp_path / "w", "--steps", "1")
    flag, value = args
    if flag in cmd:
        cmd[cmd.index(flag) + 1] = value
    else:
        cmd += args
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], r.stderr[-2000:]


def test_batch_not_divisible_by_devices(tmp_path):
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    r = subprocess.run(train_cmd(tmp_path / "w", "--batch-size", "12", "--steps", "1"),
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "not divisible by the 8 devices" in r.stderr


def test_workdir_of_another_run_is_not_touched(tmp_path, fashion_mnist):
    work = tmp_path / "w"
    work.mkdir()
    config = {"model": "lenet5", "dataset": "fashion_mnist"}
    (work / "config.json").write_text(json.dumps(config))
    r = run_train(work, "--steps", "1")
    assert r.returncode == 2 and "holds a lenet5/fashion_mnist run" in r.stderr
    assert json.loads((work / "config.json").read_text()) == config


def test_damaged_checkpoint_needs_allow_fallback(tmp_path, fashion_mnist):
    work = tmp_path / "w"
    steps = ["--steps", "10", "--checkpoint-every", "5", "--eval-every", "100"]
    assert run_train(work, *steps).returncode == 0
    for f in (work / "checkpoints" / "10").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"garbage")
    r = run_train(work, "--steps", "15", "--checkpoint-every", "5", "--eval-every", "100")
    assert r.returncode == 2 and "checkpoint step 10" in r.stderr
    assert "--allow-fallback" in r.stderr
    r = run_train(work, "--steps", "15", "--checkpoint-every", "5", "--eval-every", "100",
                  "--allow-fallback")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "falling back to step 5" in r.stderr and "resuming from step 5" in r.stderr


def test_save_and_load_model_round_trip(tmp_path):
    model = zoo.create_model("lenet5", num_classes=7)
    x = jnp.ones((2, 32, 32, 1))
    variables = model.init(jax.random.key(3), x)
    checkpoints.save_model(tmp_path / "m", model_name="lenet5", variables=variables,
                           card={"dataset": "fashion_mnist"}, create_kwargs={"num_classes": 7})
    loaded, restored, info, card = checkpoints.load_model(tmp_path / "m")
    assert card["model"] == "lenet5" and info.name == "lenet5"
    np.testing.assert_array_equal(loaded.apply(restored, x), model.apply(variables, x))
    with pytest.raises(checkpoints.CheckpointError, match="does not exist"):
        checkpoints.load_model(tmp_path / "missing")
    card_path = tmp_path / "m" / "model_card.json"
    card_path.write_text(card_path.read_text().replace('"lenet5"', '"simple_cnn"', 1))
    with pytest.raises(checkpoints.CheckpointError, match="does not hold simple_cnn variables"):
        checkpoints.load_model(tmp_path / "m")


def test_smoke_train_on_real_fashion_mnist(fashion_mnist):
    """simple_cnn on 512 real images: the loss of the last steps is well below the first."""
    from zoo import data

    info = zoo.model_info("simple_cnn")
    batches = data.make_dataset("fashion_mnist", "train", info=info, global_batch_size=64,
                                train=True, num_examples=512)
    model = zoo.create_model("simple_cnn")
    tx = training.make_optimizer(training.Recipe("adam", 1e-3), lambda s: 1e-3)
    state = training.create_train_state(model, tx, info.input_size)
    step = jax.jit(training.train_step)
    losses = []
    for _ in range(40):  # 5 epochs of the 512 images
        state, metrics = step(state, next(batches))
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-8:]) < 0.6 * np.mean(losses[:8]), losses
