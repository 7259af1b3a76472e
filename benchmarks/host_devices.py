"""One host device against one per core for the zoo's CPU train step, interleaved in one process.

    python benchmarks/host_devices.py [--models simple_cnn resnet20] [--batch-sizes 64 128]

Starts JAX with `--xla_force_host_platform_device_count=<cores>` and times, for each model and
batch, the bench's train step on a mesh of the first device alone and on a mesh of all of them
(the batch split over the mesh axis 'data', as `zoo.parallel.jit_step` does), their windows
interleaved so that a loaded machine slows both alike. `ratio` is the median per-window
(all devices / one device) images/s. Prints one JSON line per run.
"""

import argparse
import os

CORES = os.cpu_count()
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={CORES}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

import zoo  # noqa: E402
from zoo import bench, parallel  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["simple_cnn", "resnet20"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 128])
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--output")
    args = p.parse_args()
    parallel.keep_host_memory()  # before JAX starts, as the zoo's own scripts
    for name in args.models:
        info = zoo.model_info(name)
        for bs in args.batch_sizes:
            timers = [bench.zoo_timer(name, "train", bs, "float32", info.input_size,
                                      info.num_classes, devices=d)[0].start(None, 1, 1.0)
                      for d in (jax.devices()[:1], jax.devices())]
            bench.interleave(timers, args.windows)
            one, many = (t.summary(bs, None, None) for t in timers)
            bench.emit(dict(bench="host_devices", model=name, mode="train", batch_size=bs,
                            devices=len(jax.devices()), one_device=one, all_devices=many,
                            ratio=bench.speed_ratio(*timers)), args.output)


if __name__ == "__main__":
    main()
