"""The one train step every model and both parallel paths compile, and exact evaluation."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from zoo import parallel


class TrainState(train_state.TrainState):
    """flax's TrainState (step, params, opt_state, apply_fn, tx) plus BatchNorm statistics and
    the run's PRNG key (dropout keys are derived from it and the step)."""

    batch_stats: Any = None
    rng: jax.Array = None


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The loss: label smoothing and the weight of auxiliary classifiers (GoogLeNet 0.3);
    `frozen_bn`: every BatchNorm normalises with its running statistics and keeps them, while
    the rest of the model trains as usual (dropout, auxiliary classifiers): torch's
    `bn.eval()` inside `model.train()`. `micro_batch`: the gradient of a larger batch is the
    sum of those of its micro-batches of this many examples, computed one after the other
    (gradient accumulation: the same update up to float rounding for a model without
    BatchNorm, dropout masks drawn per micro-batch; the pmap path ignores it)."""

    label_smoothing: float = 0.0
    aux_loss_weight: float = 0.0
    frozen_bn: bool = False
    micro_batch: int | None = None


def _running_batch_norm(next_fun, args, kwargs, context):
    """A flax method interceptor: BatchNorm calls use the running statistics (the models build
    their BatchNorms with `use_running_average=not train`, so the one `train` flag cannot say
    it); the scale and bias stay differentiable, the statistics are not updated."""
    module = context.module
    if not isinstance(module, nn.BatchNorm) or context.method_name != "__call__" or \
            module.use_running_average:
        return next_fun(*args, **kwargs)
    variables = {c: module.variables[c] for c in ("params", "batch_stats")
                 if c in module.variables}
    return module.clone(parent=None, use_running_average=True).apply(variables, *args, **kwargs)


def model_variables(params, batch_stats=None) -> dict:
    """The variables a zoo model is applied to: {'params'} plus 'batch_stats' where it has
    BatchNorm."""
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def state_variables(state: TrainState) -> dict:
    """`model_variables` of a train state."""
    return model_variables(state.params, state.batch_stats)


def create_train_state(model, tx, image_shape, seed: int = 0) -> TrainState:
    """Initialises float32 parameters for `image_shape` (H, W, C). Traceable (jit it with
    `out_shardings` to create the state directly where it lives)."""
    rng = jax.random.PRNGKey(seed)
    variables = model.init({"params": jax.random.fold_in(rng, 0),
                            "dropout": jax.random.fold_in(rng, 2)},
                           jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables.get("batch_stats", {}),
                             rng=jax.random.fold_in(rng, 1))


def _cross_entropy(logits, labels, smoothing: float = 0.0):
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if smoothing:
        targets = optax.smooth_labels(targets, smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _correct(logits, labels, k: int):
    k = min(k, logits.shape[-1])
    return (jax.lax.top_k(logits.astype(jnp.float32), k)[1] == labels[:, None]).any(axis=-1)


def _split_outputs(out):
    """logits and a tuple of auxiliary logits from `model.apply(..., train=True)`."""
    if isinstance(out, tuple):
        logits, aux = out
        return logits, tuple(aux) if isinstance(aux, (tuple, list)) else (aux,)
    return out, ()


def train_step(state: TrainState, batch: dict, *, config: StepConfig = StepConfig(),
               axis_name: str | None = None) -> tuple[TrainState, dict]:
    """One optimisation step: the global batch under jit, one device's slice under pmap.

    The loss is the mask-weighted mean cross-entropy over the global batch (plus weighted
    auxiliary losses); gradients and metric sums are `psum`-ed over `axis_name` under pmap, so
    both paths compute the same update. Returns metrics {'loss', 'top1', 'top5'} (top-k in %,
    as `evaluate`'s).
    """
    rng = jax.random.fold_in(state.rng, state.step)
    if axis_name:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    mask = batch["mask"].astype(jnp.float32)
    count = mask.sum() if not axis_name else jax.lax.psum(mask.sum(), axis_name)
    count = jnp.maximum(count, 1.0)

    def loss_fn(params, part, rng):
        with nn.intercept_methods(_running_batch_norm) if config.frozen_bn else \
                contextlib.nullcontext():
            out, updates = state.apply_fn(model_variables(params, state.batch_stats),
                                          part["image"], train=True, mutable=["batch_stats"],
                                          rngs={"dropout": rng})
        if config.frozen_bn:
            updates = {"batch_stats": state.batch_stats}
        logits, aux = _split_outputs(out)
        weights, labels = part["mask"].astype(jnp.float32), part["label"]
        loss = (_cross_entropy(logits, labels, config.label_smoothing) * weights).sum()
        for a in aux:  # GoogLeNet/Inception auxiliary classifiers
            loss += config.aux_loss_weight * (
                _cross_entropy(a, labels, config.label_smoothing) * weights).sum()
        sums = {f"top{k}": 100 * (_correct(logits, labels, k) * weights).sum() / count
                for k in (1, 5)}
        return loss / count, (sums, updates.get("batch_stats", {}))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    parts = _micro_batches(batch, config.micro_batch, state.batch_stats, axis_name)
    if parts is None:
        (loss, (sums, batch_stats)), grads = grad_fn(state.params, batch, rng)
    else:  # gradients, loss and metric sums add up over the micro-batches (unrolled: XLA:CPU
        # ran a rolled loop of train steps 4-25x slower)
        def accumulate(total, part_index):
            part, i = part_index
            (loss, (sums, _)), grads = grad_fn(state.params, part, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, total, (loss, grads, sums)), None

        (loss, (sums, _)), grads = jax.eval_shape(
            grad_fn, state.params, jax.tree.map(lambda a: a[0], parts), rng)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss, grads, sums))
        (loss, grads, sums), _ = jax.lax.scan(
            accumulate, zeros, (parts, jnp.arange(len(parts["label"]))), unroll=True)
        batch_stats = state.batch_stats
    if axis_name:
        grads = jax.lax.psum(grads, axis_name)
        loss, sums = jax.lax.psum((loss, sums), axis_name)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, {"loss": loss, **sums}


def _micro_batches(batch: dict, micro: int | None, batch_stats, axis_name) -> dict | None:
    """`batch` as (k, micro, ...) arrays to accumulate over, or None for one whole batch."""
    size = batch["label"].shape[0]
    if not micro or size <= micro or axis_name:
        return None
    if size % micro or jax.tree.leaves(batch_stats):
        raise ValueError(f"micro_batch={micro} needs a batch that is a multiple of it (got "
                         f"{size}) and a model without BatchNorm")
    return jax.tree.map(lambda a: a.reshape(size // micro, micro, *a.shape[1:]), batch)


def _eval_sums(apply_fn, variables: dict, batch: dict) -> dict:
    logits = apply_fn(variables, batch["image"], train=False)
    mask = batch["mask"].astype(jnp.float32)
    return {"loss": (_cross_entropy(logits, batch["label"]) * mask).sum(),
            "top1": (_correct(logits, batch["label"], 1) * mask).sum(),
            "top5": (_correct(logits, batch["label"], 5) * mask).sum(),
            "count": mask.sum()}


def evaluate(model, variables: dict, batches: Iterable[dict], progress=None, mesh=None) -> dict:
    """Exact top-1/top-5 (%) and mean loss over every real (mask True) example of `batches`.

    With a `mesh`, each batch is split over its devices (and, multi-host, each process passes
    its own share of the split: the sums are global); without, it runs on the default device.
    """
    fn = functools.partial(_eval_sums, model.apply)
    if mesh is not None:
        rep, split = parallel.shardings(mesh)
        variables = jax.device_put(variables, rep) if jax.process_count() == 1 else \
            parallel.replicated(variables, rep)
        step = parallel.jit(fn, mesh.devices.flat, in_shardings=(rep, split),
                            out_shardings=rep)
        place = lambda b: parallel.global_batch(b, split)
    else:
        step, place = parallel.jit(fn, jax.devices()[:1]), lambda b: b
    totals = None
    for batch in batches:
        sums = step(variables, place(batch))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        if progress is not None:
            progress.update(int(np.sum(batch["mask"])))
    if totals is None:
        raise ValueError("no evaluation batches")
    t = {k: float(np.asarray(v)) for k, v in jax.device_get(totals).items()}
    n = t["count"]
    if n == 0:
        raise ValueError("the evaluation batches hold no real (mask True) examples")
    return {"top1": 100 * t["top1"] / n, "top5": 100 * t["top5"] / n, "loss": t["loss"] / n,
            "num_examples": int(n)}
