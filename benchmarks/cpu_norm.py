"""XLA:CPU's reductions over (N, H, W) against `zoo.layers.channel_sums`' matmul, and flax's
training-mode BatchNorm against `zoo.layers.BatchNorm`, per shape.

`python benchmarks/cpu_norm.py` prints forward+backward milliseconds for the activations the
models normalise (and whose bias gradients they sum), the two interleaved in one process so
that a loaded machine slows both alike. It is the measurement behind `zoo.layers.BatchNorm`
using `batch_norm_train` on CPU.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from cpu_pool import interleaved_ms  # this directory's

from zoo import layers, parallel

SHAPES = [  # (batch, map, channels)
    (64, 32, 16), (64, 16, 32), (64, 8, 64),  # resnet20 at 32 px
    (64, 28, 32), (64, 14, 64),               # simple_cnn's conv outputs (their bias sums)
    (32, 16, 64), (32, 4, 256), (32, 2, 512),  # resnet18 at 64 px
]


def batch_norm_step(module, x):
    variables = module.init(jax.random.key(0), x, use_running_average=False)

    def loss(x):
        y, _ = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
        return jnp.vdot(y, y)
    return parallel.jit(jax.grad(loss))


def main(rounds: int = 5, repeats: int = 10) -> None:
    parallel.keep_host_memory()  # before JAX starts, as the zoo's own scripts
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; median of {rounds} "
          f"interleaved rounds of {repeats} calls")
    print("| batch x map x channels | sum ms | channel_sums ms | ratio | flax BN fwd+bwd ms | "
          "zoo BN fwd+bwd ms | ratio |\n|---|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for n, hw, c in SHAPES:
        x = jnp.asarray(rng.normal(size=(n, hw, hw, c)), jnp.float32)
        sums = interleaved_ms([parallel.jit(lambda x: jnp.sum(x, axis=(0, 1, 2))),
                               parallel.jit(layers.channel_sums)], x, rounds, repeats)
        norms = interleaved_ms([batch_norm_step(nn.BatchNorm(), x),
                                batch_norm_step(layers.BatchNorm(), x)], x, rounds, repeats)
        print(f"| {n}x{hw}x{hw}x{c} | {sums[0]:.3f} | {sums[1]:.3f} | {sums[0] / sums[1]:.1f} | "
              f"{norms[0]:.2f} | {norms[1]:.2f} | {norms[0] / norms[1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
