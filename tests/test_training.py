"""The train step, recipes, checkpoints, and train.py's resume/signal/NaN/error behaviour.

train.py runs read a tiny image folder written by the tests (260 28x28 PNGs in 10 classes; an
`image_folder:` dataset needs no preparation): in this process where possible, in a subprocess
where the test kills it. A shared persistent compilation cache keeps repeated compilations
cheap. (`tfds.testing.mock_data` is no substitute here: it redirects every etils.epath file
access while a dataset is being opened, Orbax's background checkpoint writes included.)
"""

import functools
import json
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zoo
from zoo import checkpoints, data, training

from conftest import EXAMPLES, ROOT, assert_same_update, run_main


def flags(workdir, dataset, *extra):
    return ["--model", "simple_cnn", "--dataset", dataset, "--workdir", str(workdir),
            "--batch-size", "32", "--no-progress", "--log-every", "5", *extra]


def synthetic(n=32, seed=0):
    """Images whose class is written into their brightness: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.int32)
    images = rng.normal(0, 0.1, (n, 28, 28, 1)).astype(np.float32) + labels[:, None, None, None] / 5
    return {"image": images, "label": labels, "mask": np.ones(n, bool)}


# ---------------------------------------------------------------- the step

def test_loss_falls_and_metrics():
    model = zoo.create_model("simple_cnn")
    # at 3e-3 Adam oscillated on this batch, and where 30 steps ended (the accuracy) hung on
    # float rounding (oneDNN's convolutions against XLA's: 44% against 69%); at 1e-3 both
    # paths end at the same place
    tx = training.make_optimizer(training.Recipe("adam", 1e-3), optax.constant_schedule(1e-3))
    state = training.create_train_state(model, tx, (28, 28, 1))
    step = jax.jit(training.train_step)
    batch = synthetic()
    losses = []
    for _ in range(60):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0]
    assert 0 <= float(metrics["top1"]) <= float(metrics["top5"]) <= 100  # %, as evaluate's
    assert int(state.step) == 60
    r = training.evaluate(model, {"params": state.params}, iter([batch]))
    assert r["num_examples"] == 32 and r["top1"] > 50


def test_micro_batches_update_as_the_whole_batch():
    """Gradient accumulation over micro-batches gives the whole batch's update, loss and
    metrics up to float rounding (masked examples included) for a model without BatchNorm, and
    is refused for a BatchNorm model or a batch that is not a multiple of the micro-batch."""
    model = zoo.create_model("simple_cnn")
    state = training.create_train_state(model, optax.sgd(0.1), (28, 28, 1))
    batch = synthetic(8)
    batch["mask"][-3:] = False
    micro = lambda m: jax.jit(functools.partial(
        training.train_step, config=training.StepConfig(micro_batch=m)))
    whole, whole_metrics = jax.jit(training.train_step)(state, batch)
    split, split_metrics = micro(2)(state, batch)
    assert_same_update(whole.params, split.params, state.params, rtol=1e-4)
    for k, v in whole_metrics.items():
        np.testing.assert_allclose(split_metrics[k], v, rtol=1e-5, err_msg=k)
    with pytest.raises(ValueError, match="multiple of it"):
        micro(3)(state, batch)
    bn = zoo.create_model("resnet20", num_classes=10, in_channels=1)
    bn_state = training.create_train_state(bn, optax.sgd(0.1), (28, 28, 1))
    with pytest.raises(ValueError, match="without BatchNorm"):
        micro(2)(bn_state, batch)


def test_evaluate_ignores_padding():
    model = zoo.create_model("simple_cnn")
    variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    batch = synthetic(8)
    full = training.evaluate(model, variables, iter([batch]))
    padded = {k: np.concatenate([v, v[:5]]) for k, v in batch.items()}
    padded["mask"][8:] = False
    r = training.evaluate(model, variables, iter([padded, padded]))
    assert r["num_examples"] == 16
    np.testing.assert_allclose(r["loss"], full["loss"], rtol=1e-6)
    assert r["top1"] == full["top1"] and r["top5"] == full["top5"]


class AuxNet(nn.Module):
    """Returns (logits, (aux1, aux2)) in training, like GoogLeNet."""

    @nn.compact
    def __call__(self, x, train=False):
        x = x.reshape(x.shape[0], -1)
        logits = nn.Dense(10, name="head")(x)
        aux = (nn.Dense(10, name="aux1")(x), nn.Dense(10, name="aux2")(x))
        return (logits, aux) if train else logits


def test_label_smoothing_and_auxiliary_losses():
    model = AuxNet()
    tx = optax.sgd(0.0)
    state = training.create_train_state(model, tx, (28, 28, 1))
    batch = synthetic(16)
    batch["mask"][12:] = False  # padding counts for nothing
    cfg = training.StepConfig(label_smoothing=0.1, aux_loss_weight=0.3)
    _, metrics = training.train_step(state, batch, config=cfg)
    logits, (a1, a2) = model.apply({"params": state.params}, batch["image"], train=True)
    target = optax.smooth_labels(jax.nn.one_hot(batch["label"], 10), 0.1)
    ce = lambda z: optax.softmax_cross_entropy(z, target)[:12].mean()
    expected = ce(logits) + 0.3 * (ce(a1) + ce(a2))
    np.testing.assert_allclose(float(metrics["loss"]), float(expected), rtol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_loss():
    model = zoo.create_model("simple_cnn", dtype=jnp.bfloat16)
    tx = training.make_optimizer(training.Recipe("adam", 1e-3), optax.constant_schedule(1e-3))
    state = training.create_train_state(model, tx, (28, 28, 1))
    state, metrics = jax.jit(training.train_step)(state, synthetic(8))
    assert {p.dtype for p in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))


def test_schedules_and_linear_scaling():
    recipe = training.Recipe("nesterov", 0.1, 256, schedule="warmup_cosine", warmup_epochs=1,
                             scale_lr=True)
    sched = training.make_schedule(recipe, steps_per_epoch=10, total_steps=100, global_batch=1024)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(10)), 0.4, rtol=1e-6)  # 0.1 x 1024 / 256
    assert float(sched(100)) < 1e-6
    step = training.make_schedule(training.Recipe(lr=1.0, schedule="step"), 10, 100, 128)
    assert [float(step(s)) for s in (49, 50, 74, 75)] == pytest.approx([1.0, 0.1, 0.1, 0.01])
    cosine = training.make_schedule(training.Recipe(lr=1.0, schedule="cosine"), 10, 100, 128)
    assert float(cosine(50)) == pytest.approx(0.5)
    tiny = training.make_schedule(recipe, 10, 1, 256)  # warm-up longer than the run
    assert np.isfinite(float(tiny(0)))
    with pytest.raises(ValueError, match="unknown optimizer"):
        training.make_optimizer(training.Recipe("adagrad"), sched)
    with pytest.raises(ValueError, match="unknown schedule"):
        training.make_schedule(training.Recipe(schedule="linear"), 10, 100, 128)


@pytest.mark.parametrize("name", sorted(training.RECIPES))
def test_every_recipe_builds_an_optimizer(name):
    recipe = training.RECIPES[name]
    assert recipe.optimizer in training.OPTIMIZERS and recipe.schedule in training.SCHEDULES
    sched = training.make_schedule(recipe, 100, int(recipe.epochs * 100), recipe.batch_size)
    params = {"conv": {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.ones(2)}}
    tx = training.make_optimizer(recipe, sched)
    updates, _ = tx.update(params, tx.init(params), params)
    assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(updates))
    assert float(sched(0)) >= 0


def test_the_notes_recipe_and_resnet50_recipe():
    r = training.RECIPES["simple_cnn_mnist"]
    assert (r.optimizer, r.lr) == ("adam", 1e-3)
    r = training.RECIPES["resnet50_imagenet"]
    assert (r.optimizer, r.momentum, r.schedule, r.warmup_epochs, r.weight_decay,
            r.label_smoothing, r.epochs, r.scale_lr) == ("nesterov", 0.9, "warmup_cosine", 5,
                                                         1e-4, 0.1, 90, True)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adamw", "lamb"])
def test_weight_decay_skips_bn_and_bias(optimizer):
    params = {"conv": {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.ones(2)},
              "bn": {"scale": jnp.ones(2), "bias": jnp.ones(2)}}
    tx = training.make_optimizer(training.Recipe(optimizer, 1.0, weight_decay=0.5),
                                 optax.constant_schedule(1.0))
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    assert float(jnp.abs(updates["conv"]["kernel"]).max()) > 0
    for leaf in (updates["conv"]["bias"], updates["bn"]["scale"], updates["bn"]["bias"]):
        assert float(jnp.abs(leaf).max()) == 0


# ---------------------------------------------------------------- checkpoints

def _tree(value):
    return {"step": jnp.int32(value), "params": {"w": jnp.full((3,), value, jnp.float32)}}


def test_keeps_the_newest_and_the_best(tmp_path):
    with checkpoints.TrainCheckpointer(tmp_path, max_to_keep=2) as ckpt:
        for step, top1 in zip(range(1, 6), [50.0, 90.0, 60.0, None, 70.0]):
            ckpt.save(step, _tree(step), None if top1 is None else {"eval_top1": top1})
        ckpt.wait()
        assert ckpt.steps() == [2, 4, 5] and ckpt.best_step() == 2
        step, tree = ckpt.restore(checkpoints.abstract_like(_tree(0)))
        assert step == 5 and float(tree["params"]["w"][0]) == 5


def test_partial_checkpoint_is_never_picked(tmp_path):
    import shutil

    with checkpoints.TrainCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, _tree(1))
    # what a process killed mid-save leaves: Orbax's temporary directory, never renamed
    shutil.copytree(tmp_path / "checkpoints" / "1",
                    tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1234")
    with checkpoints.TrainCheckpointer(tmp_path) as ckpt:
        assert ckpt.steps() == [1]
        assert ckpt.restore(checkpoints.abstract_like(_tree(0)))[0] == 1


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


# ---------------------------------------------------------------- train.py

def test_train_py_writes_its_workdir_and_handles_damaged_checkpoints(tmp_path, env, dataset,
                                                                     monkeypatch):
    work = tmp_path / "w"
    drawn = []  # training batches the run takes from its dataset
    make_dataset = data.make_dataset

    def counted(*args, train, **kwargs):
        batches = make_dataset(*args, train=train, **kwargs)
        for b in batches:
            drawn.append(train)
            yield b
    monkeypatch.setattr(data, "make_dataset", counted)
    code, out, err = run_main(flags(work, dataset, "--steps", "10", "--checkpoint-every", "5",
                                    "--eval-every", "5"))
    assert code == 0, err[-3000:]
    assert drawn.count(True) == 10  # no batch (nor epoch) beyond the last step is opened
    assert out.startswith("test top-1 ") and f"{EXAMPLES} test images" in out
    config = json.loads((work / "config.json").read_text())
    assert config["model"] == "simple_cnn" and config["recipe"]["batch_size"] == 32
    assert config["create_kwargs"] == {"num_classes": 10, "in_channels": 1}
    records = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 8, 10, 10]  # 8: the epoch's end (260 // 32)
    assert {"step", "epoch", "lr", "train_loss", "train_top1", "eval_loss", "eval_top1",
            "eval_top5", "images_per_sec", "wall_time"} <= set(records[0])
    assert records[-1]["test_top1"] == records[-2]["eval_top1"]
    assert list((work / "tensorboard").glob("events.out.tfevents.*"))
    _, variables, _, card = checkpoints.load_model(work)
    assert card["step"] == 10 and "params" in variables
    assert checkpoints.load_model(work / "checkpoints" / "5")[3]["step"] == 5
    best = checkpoints.load_model(work, step="best")[3]["step"]
    with pytest.raises(checkpoints.CheckpointError, match="a number or 'best', got 'newest'"):
        checkpoints.load_model(work, step="newest")
    assert best in (5, 10) and records[[r["step"] for r in records].index(best)]["eval_top1"] \
        == max(r["eval_top1"] for r in records if "eval_top1" in r)

    # damage the newest step: a clear error naming it; the previous one only when asked
    for f in (work / "checkpoints" / "10").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"garbage")
    more = flags(work, dataset, "--steps", "15", "--checkpoint-every", "5", "--eval-every",
                 "100")
    code, _, err = run_main(more)
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2 and len(lines) == 1, err[-3000:]
    assert "checkpoint step 10" in lines[0] and "--allow-fallback" in lines[0]
    assert (work / "checkpoints" / "10").is_dir()  # nothing removed
    code, out, err = run_main(more + ["--allow-fallback"])
    assert code == 0, err[-3000:]
    assert "falling back to step 8" in err and "resuming from step 8" in err
    assert "step 15" in out


def test_nan_loss_stops_with_the_step_and_keeps_the_good_checkpoint(tmp_path, env, dataset):
    work = tmp_path / "nan"
    code, _, err = run_main(flags(work, dataset, "--steps", "20", "--optimizer", "sgd",
                                  "--lr", "1e30", "--checkpoint-every", "1", "--log-every", "100"))
    assert code == 1, err[-3000:]
    line = [x for x in err.splitlines() if x.startswith("error:")][-1]
    assert "at step 2;" in line and "last good checkpoint (step 1)" in line, line
    assert sorted(p.name for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


@pytest.mark.parametrize("args,message", [
    (["--model", "resnt50"], "did you mean 'resnet50'"),
    (["--dataset", "mnistt"], "unknown dataset 'mnistt'"),
    (["--optimizer", "adagrad"], "unknown optimizer 'adagrad'"),
    (["--schedule", "linear"], "unknown schedule 'linear'"),
    (["--recipe", "nope"], "unknown recipe 'nope'"),
    (["--image-size", "16x16x1"], "do not fit simple_cnn"),
    (["--image-size", "16x16"], "is not HxWxC"),
    (["--model", "resnet50"], "pass --image-size 224x224x1 to resize"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--batch-size", "x"], "invalid int value"),
    (["--parallel", "vmap"], "invalid choice"),
    (["--coordinator", "127.0.0.1:1234"], "need all of --coordinator"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, args, message):
    argv = flags(tmp_path / "w", "fashion_mnist", "--steps", "1")  # fails before reading data
    flag, value = args
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += args
    code, out, err = run_main(argv)
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert message in lines[0]
    assert not (tmp_path / "w").exists()


def test_workdir_of_another_run_is_not_touched(tmp_path, dataset):
    work = tmp_path / "w"
    work.mkdir()
    config = {"model": "lenet5", "dataset": dataset}
    (work / "config.json").write_text(json.dumps(config))
    code, _, err = run_main(flags(work, dataset, "--steps", "1"))
    assert code == 2 and f"holds a lenet5/{dataset} run" in err
    assert json.loads((work / "config.json").read_text()) == config
    assert sorted(p.name for p in work.iterdir()) == ["config.json"]


def _params(workdir):
    _, variables, _, card = checkpoints.load_model(workdir)
    return card["step"], jax.device_get(variables["params"])


def test_kill9_then_resume_is_bit_identical(tmp_path, env, dataset):
    """30 steps crossing data epochs (260 examples = 8 batches), killed after step 20's
    checkpoint, resumed: the same parameters, bit for bit, as one uninterrupted run."""
    run = ["--steps", "30", "--checkpoint-every", "10", "--eval-every", "30"]
    work = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *flags(work, dataset, *run)],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (work / "checkpoints" / "20").is_dir() and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, stderr[-2000:]
    steps = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] < 30, steps
    code, _, err = run_main(flags(tmp_path / "ref", dataset, *run))  # the uninterrupted reference
    assert code == 0, err[-3000:]
    code, out, err = run_main(flags(work, dataset, *run))
    assert code == 0, err[-3000:]
    assert f"resuming from step {steps[-1]}" in err
    assert f"train.lock was left by a run that no longer holds it (pid {proc.pid} " in err
    (s1, p1), (s2, p2) = _params(tmp_path / "ref"), _params(work)
    assert s1 == s2 == 30
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_array_equal(a, b)


def test_sigterm_saves_then_exits(tmp_path, env, dataset):
    work = tmp_path / "term"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"),
         *flags(work, dataset, "--steps", "100000", "--eval-every", "100000", "--log-every", "2")],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = work / "metrics.jsonl"
    deadline = time.time() + 300
    while (not metrics.is_file() or not metrics.read_text()) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    saved = [int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 0 < saved[0] < 100000
    assert f"saved step {saved[0]}" in err and "rerun the same command to resume" in err
    assert not (work / "train.lock").exists()


@pytest.fixture(scope="module")
def fashion_mnist():
    try:
        data.dataset_info("fashion_mnist")
        data.prepare("fashion_mnist")
    except data.DatasetNotFoundError as e:
        pytest.skip(f"Fashion-MNIST unavailable: {e}")


def test_smoke_train_on_real_fashion_mnist(fashion_mnist):
    """simple_cnn on 512 real images: the loss of the last steps is well below the first."""
    info = zoo.model_info("simple_cnn")
    batches = data.make_dataset("fashion_mnist", "train", info=info, global_batch_size=64,
                                train=True, num_examples=512)
    model = zoo.create_model("simple_cnn")
    tx = training.make_optimizer(training.Recipe("adam", 1e-3), optax.constant_schedule(1e-3))
    state = training.create_train_state(model, tx, info.input_size)
    step = jax.jit(training.train_step)
    losses = []
    for _ in range(40):  # 5 epochs of the 512 images
        state, metrics = step(state, next(batches))
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-8:]) < 0.6 * np.mean(losses[:8]), losses

