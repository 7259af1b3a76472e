"""XLA:CPU's convolution against zoo.layers' CPU paths, per conv shape.

`python benchmarks/cpu_conv.py` prints two tables, the measurements behind
`zoo.layers.conv_general_dilated`'s rules on CPU:

- forward and forward+backward milliseconds of a 3x3, stride-1, padding-1 NHWC convolution for
  each (batch, map, channels) in SHAPES: maps of at most 2x2 outputs take the matmul path, where
  XLA's convolution is 3-40x slower; larger maps keep XLA's convolution, which wins or loses by
  less than 2x up to 7x7 maps and is several times faster on 32x32 maps;
- forward milliseconds of the few-channel first convolutions in TAPS (simple_cnn's, LeNet's,
  the CIFAR ResNets' RGB stem), XLA's against `zoo.layers.conv_taps`' sum of shifted views
  (what inference runs);
- with torch installed, milliseconds of the 3x3 convolutions of resnet20 and simple_cnn that
  remain convolutions (MODEL_CONVS), as the zoo computes them (`conv_general_dilated`: XLA's,
  or `conv_pairs` on resnet20's first stage) against torch's (oneDNN, channels-last), each of
  forward, input gradient and weight gradient, and their sums over a step at batch 64: what is
  left of the two models' gap to torch eager on CPU.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from zoo.layers import conv_general_dilated, conv_taps
from zoo.parallel import compiler_options, keep_host_memory

SHAPES = [(32, 1, 512), (32, 2, 512), (32, 2, 256), (32, 4, 256), (32, 4, 512), (8, 7, 512),
          (32, 8, 128), (128, 8, 64), (128, 32, 16)]
NHWC = ("NHWC", "HWIO", "NHWC")
# model: [(map, Cin, Cout, stride, how many in the model)] of its 3x3 convolutions
MODEL_CONVS = {"resnet20": [(32, 16, 16, 1, 6), (32, 16, 32, 2, 1), (16, 32, 32, 1, 5),
                            (16, 32, 64, 2, 1), (8, 64, 64, 1, 5)],
               "simple_cnn": [(14, 32, 64, 1, 1), (7, 64, 64, 1, 1)]}
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


def against_torch(batch: int = 64) -> None:
    """The zoo's convolution against torch's, per MODEL_CONVS shape and pass."""
    import torch

    print(f"\n| model: map, channels, stride (x count) | zoo fwd / dx / dw ms | torch fwd / dx / "
          f"dw ms |\n|---|---:|---:|")
    rng = np.random.default_rng(0)
    for model, convs in MODEL_CONVS.items():
        totals = np.zeros((2, 3))
        for hw, cin, cout, s, count in convs:
            x = rng.normal(size=(batch, hw, hw, cin)).astype(np.float32)
            w = (rng.normal(size=(3, 3, cin, cout)) * 0.05).astype(np.float32)
            conv = lambda x, w: conv_general_dilated(  # noqa: E731
                x, w, (s, s), [(1, 1), (1, 1)],
                dimension_numbers=lax.conv_dimension_numbers(x.shape, w.shape, NHWC))
            g = jnp.ones(jax.eval_shape(conv, x, w).shape)
            xla = [ms(conv, x, w), ms(lambda x, w: jax.vjp(lambda x: conv(x, w), x)[1](g), x, w),
                   ms(lambda x, w: jax.vjp(lambda w: conv(x, w), w)[1](g), x, w)]
            tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(
                memory_format=torch.channels_last)
            tw = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous(
                memory_format=torch.channels_last)
            tconv = lambda x, w: torch.nn.functional.conv2d(x, w, stride=s, padding=1)  # noqa
            tg = torch.ones_like(tconv(tx, tw))

            def backward(x, w):  # the one gradient asked for, not accumulated
                x.grad = w.grad = None
                tconv(x, w).backward(tg)

            with torch.no_grad():
                fwd = best_ms(lambda: tconv(tx, tw))
            dx_in, dw_in = tx.clone().requires_grad_(), tw.clone().requires_grad_()
            tor = [fwd, best_ms(lambda: backward(dx_in, tw)), best_ms(lambda: backward(tx, dw_in))]
            totals += count * np.array([xla, tor])
            print(f"| {model}: {hw}x{hw}, {cin} -> {cout}, /{s} (x{count}) | "
                  f"{' / '.join(f'{v:.2f}' for v in xla)} | "
                  f"{' / '.join(f'{v:.2f}' for v in tor)} |", flush=True)
        print(f"| {model}: all of them, batch {batch} | "
              f"{' / '.join(f'{v:.1f}' for v in totals[0])} | "
              f"{' / '.join(f'{v:.1f}' for v in totals[1])} |", flush=True)


def best_ms(run, sync=lambda out: out, repeats: int = 5, windows: int = 3) -> float:
    """The fastest of `windows` windows of `repeats` calls of `run`, per call (this VM's speed
    drifts: the best window is the steadiest estimate)."""
    sync(run())
    times = []
    for _ in range(windows):
        t = time.perf_counter()
        for _ in range(repeats):
            out = run()
        sync(out)
        times.append((time.perf_counter() - t) / repeats * 1e3)
    return min(times)


def ms(fn, *args) -> float:
    fn = jax.jit(fn, compiler_options=compiler_options())  # as the zoo compiles on CPU
    return best_ms(lambda: fn(*args), jax.block_until_ready)


def main() -> None:
    keep_host_memory()  # before JAX starts, as the zoo's own scripts
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
    try:
        import torch  # noqa: F401
    except ImportError:
        return
    against_torch()


if __name__ == "__main__":
    main()
