"""XLA:CPU's convolution against zoo.layers' CPU paths, per conv shape.

`python benchmarks/cpu_conv.py` prints two tables, the measurements behind
`zoo.layers.conv_general_dilated`'s rules on CPU:

- forward and forward+backward milliseconds of a 3x3, stride-1, padding-1 NHWC convolution for
  each (batch, map, channels) in SHAPES: maps of at most 2x2 outputs take the matmul path, where
  XLA's convolution is 3-40x slower; larger maps keep XLA's convolution, which wins or loses by
  less than 2x up to 7x7 maps and is several times faster on 32x32 maps;
- forward milliseconds of the few-channel first convolutions in TAPS (simple_cnn's, LeNet's,
  the CIFAR ResNets' RGB stem), XLA's against `zoo.layers.conv_taps`' sum of shifted views
  (what inference runs).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from zoo.layers import conv_taps
from zoo.parallel import compiler_options

SHAPES = [(32, 1, 512), (32, 2, 512), (32, 2, 256), (32, 4, 256), (32, 4, 512), (8, 7, 512),
          (32, 8, 128), (128, 8, 64), (128, 32, 16)]
TAPS = [(64, 28, 1, 3, 32, 1), (128, 28, 1, 3, 32, 1), (64, 32, 1, 5, 6, 0), (128, 32, 1, 5, 6, 0),
        (64, 32, 3, 3, 16, 1), (128, 32, 3, 3, 16, 1)]


def matmul_conv(x, w):
    """The fast path's arithmetic, forced for every size: one matmul over 3x3 patches."""
    h, wd = x.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([xp[:, i:i + h, j:j + wd] for i in range(3) for j in range(3)], -1)
    return patches @ w.reshape(-1, w.shape[-1])


def xla_conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), [(1, 1), (1, 1)],
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def ms(fn, *args, repeats: int = 5) -> float:
    fn = jax.jit(fn, compiler_options=compiler_options())  # as the zoo compiles on CPU
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / repeats * 1e3


def main() -> None:
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"compiler options {compiler_options()}")
    print("| batch x map x channels | XLA fwd ms | matmul fwd ms | XLA fwd+bwd ms | "
          "matmul fwd+bwd ms |\n|---|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for n, hw, c in SHAPES:
        x = jnp.asarray(rng.normal(size=(n, hw, hw, c)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(3, 3, c, c)) * 0.05, jnp.float32)
        row = []
        for conv in (xla_conv, matmul_conv):
            grad = jax.grad(lambda x, w, conv=conv: jnp.sum(conv(x, w) ** 2), (0, 1))
            row.append((ms(conv, x, w), ms(grad, x, w)))
        (xf, xb), (mf, mb) = row
        print(f"| {n}x{hw}x{hw}x{c} | {xf:.1f} | {mf:.1f} | {xb:.1f} | {mb:.1f} |", flush=True)
    print("\n| batch x map x channels, kernel -> channels | XLA fwd ms | conv_taps fwd ms |\n"
          "|---|---:|---:|")
    for n, hw, cin, k, c, pad in TAPS:
        x = jnp.asarray(rng.normal(size=(n, hw, hw, cin)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(k, k, cin, c)), jnp.float32)
        args = ((1, 1), ((pad, pad), (pad, pad)))
        xla = ms(lambda x, w: lax.conv_general_dilated(
            x, w, *args, dimension_numbers=("NHWC", "HWIO", "NHWC")), x, w)
        taps = ms(lambda x, w: conv_taps(x, w, *args, None), x, w)
        print(f"| {n}x{hw}x{hw}x{cin}, {k}x{k} -> {c} | {xla:.2f} | {taps:.2f} |", flush=True)


if __name__ == "__main__":
    main()
