"""XLA:CPU's max-pool gradient (select-and-scatter) against `zoo.layers.max_pool`'s, per shape.

`python benchmarks/cpu_pool.py` prints forward+backward milliseconds of a max pool for the
(batch, map, channels, window, stride, padding) the models use, lax's reduce-window +
select-and-scatter against `zoo.layers.max_pool` (the same reduce-window forward, an
elementwise backward), the two interleaved in one process so that a loaded machine slows both
alike. It is the measurement behind `zoo.layers.MaxPool` using `max_pool` on CPU.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from zoo import parallel
from zoo.layers import max_pool

SHAPES = [  # (batch, map, channels, window, stride, padding): where the models pool
    (64, 28, 32, 2, 2, 0), (64, 14, 64, 2, 2, 0), (64, 7, 64, 2, 2, 0),  # simple_cnn
    (64, 28, 6, 2, 2, 0), (64, 10, 16, 2, 2, 0),                         # lenet5
    (64, 32, 64, 3, 2, 1),                                               # resnet18 @ 64 px
    (8, 55, 96, 3, 2, 0), (8, 27, 256, 3, 2, 0),                         # alexnet_lrn
]


def lax_pool(x, k, s, p):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, k, k, 1), (1, s, s, 1),
                             ((0, 0), (p, p), (p, p), (0, 0)))


def zoo_pool(x, k, s, p):
    return max_pool(x, k, s, ((p, p), (p, p)))


def interleaved_ms(fns, x, rounds: int, repeats: int) -> list[float]:
    """Median milliseconds per call of each of `fns` on `x`, over `rounds` rounds in which each
    runs `repeats` calls in turn (a loaded machine slows them alike)."""
    for fn in fns:
        jax.block_until_ready(fn(x))
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            for _ in range(repeats):
                out = fn(x)
            jax.block_until_ready(out)
            t.append((time.perf_counter() - t0) / repeats * 1e3)
    return [float(np.median(t)) for t in times]


def main(rounds: int = 5, repeats: int = 5) -> None:
    parallel.keep_host_memory()  # before JAX starts, as the zoo's own scripts
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; median of {rounds} "
          f"interleaved rounds of {repeats} calls")
    print("| batch x map x channels, window/stride pad | lax fwd+bwd ms | zoo fwd+bwd ms | "
          "lax / zoo |\n|---|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for n, hw, c, k, s, p in SHAPES:
        x = jnp.asarray(np.maximum(rng.normal(size=(n, hw, hw, c)), 0), jnp.float32)
        fns = [jax.jit(jax.grad(lambda x, pool=pool: jnp.sum(pool(x, k, s, p) ** 2)))
               for pool in (lax_pool, zoo_pool)]
        a, b = interleaved_ms(fns, x, rounds, repeats)
        print(f"| {n}x{hw}x{hw}x{c}, {k}/{s} p{p} | {a:.2f} | {b:.2f} | {a / b:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
