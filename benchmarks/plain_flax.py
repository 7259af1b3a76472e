"""The zoo's simple_cnn train step against a hand-written Flax one, side by side in one process.

    python benchmarks/plain_flax.py [--batch-size 64] [--windows 5] [--output FILE]

The plain step is what a Flax user writes for the same network: `nn.Conv`, `nn.max_pool`,
`optax.sgd(0.1, momentum=0.9)` (the bench's optimizer), mean cross-entropy, `jax.jit` with the
state donated. The zoo's is `python -m zoo bench simple_cnn`'s (`zoo.training.train_step` via
`parallel.jit_step`). Their windows are interleaved (`zoo.bench.Timer`), so a loaded machine
slows both alike; `ratio` is the median of the per-window zoo / plain images/s.
"""

import argparse
import functools

import flax.linen as nn
import jax
import optax

from zoo import bench, parallel


class PlainCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        for width in (32, 64, 64):
            x = nn.max_pool(nn.relu(nn.Conv(width, (3, 3), padding=1)(x)), (2, 2), (2, 2))
        x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


def plain_timer(batch_size: int) -> bench.Timer:
    model, tx = PlainCNN(), optax.sgd(0.1, momentum=0.9)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (batch_size, 28, 28, 1))
    y = jax.random.randint(k2, (batch_size,), 0, 10)
    params = model.init(k3, x[:1])["params"]
    carry = {"state": (params, tx.init(params))}

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, x, y):
        params, opt = state

        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return (optax.apply_updates(params, updates), opt), loss

    def run():
        carry["state"], loss = step(carry["state"], x, y)
        return carry["state"], loss

    return bench.Timer("plain flax", run, jax.block_until_ready)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--output")
    args = p.parse_args()
    parallel.keep_host_memory()  # before JAX starts, as the zoo's own scripts
    zoo_t, _ = bench.zoo_timer("simple_cnn", "train", args.batch_size, "float32", (28, 28, 1), 10)
    timers = [zoo_t.start(None, 1, 1.0), plain_timer(args.batch_size).start(None, 1, 1.0)]
    bench.interleave(timers, args.windows)
    bench.emit(dict(bench="plain_flax", model="simple_cnn", mode="train",
                    batch_size=args.batch_size, devices=jax.device_count(),
                    jax_version=jax.__version__, zoo=zoo_t.summary(args.batch_size, None, None),
                    plain=timers[1].summary(args.batch_size, None, None),
                    ratio=bench.speed_ratio(timers[1], zoo_t)), args.output)


if __name__ == "__main__":
    main()
