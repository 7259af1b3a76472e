"""XLA's default CPU compilation against the zoo's (`zoo.parallel.compiler_options`), in one
process, for the zoo's train step and inference.

    python benchmarks/cpu_options.py [--models simple_cnn lenet5 resnet20 resnet18:64]
        [--modes train infer] [--batch-sizes 64] [--windows 5] [--output FILE]

For each model (NAME or NAME:IMAGE_SIZE), mode and batch, `zoo.bench.zoo_timer` builds the
bench's step twice, once with the zoo's options and once with `compiler_options` patched to
None (XLA's defaults), and their windows are interleaved so that a loaded machine slows both
alike. `ratio` is the median per-window (zoo options / XLA defaults) images/s. Prints one JSON
line per run. This is the measurement behind `CPU_COMPILER_OPTIONS`.
"""

import argparse
from unittest import mock

import jax

import zoo
from zoo import bench, parallel

from run_all import device_name  # this directory's: the machine's CPU or GPU name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+",
                   default=["simple_cnn", "lenet5", "resnet20", "resnet18:64"])
    p.add_argument("--modes", nargs="+", default=["train", "infer"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[64])
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--output")
    args = p.parse_args()
    parallel.keep_host_memory()  # before JAX starts, as the zoo's own scripts
    options = parallel.compiler_options()
    for spec in args.models:
        name, _, size = spec.partition(":")
        info = zoo.model_info(name)
        shape = (int(size), int(size), info.input_size[2]) if size else info.input_size
        for mode in args.modes:
            for bs in args.batch_sizes:
                make = lambda: bench.zoo_timer(name, mode, bs, "float32", shape,
                                               info.num_classes, devices=jax.devices()[:1])[0]
                with mock.patch.object(parallel, "compiler_options", lambda devices=None: None):
                    default = make().start(None, 1, 1.0)
                tuned = make().start(None, 1, 1.0)
                bench.interleave([default, tuned], args.windows)
                bench.emit(dict(
                    bench="cpu_options", model=name, image_size=list(shape), mode=mode,
                    batch_size=bs, compiler_options=options, device=device_name(),
                    xla_defaults=default.summary(bs, None, None),
                    zoo_options=tuned.summary(bs, None, None),
                    ratio=bench.speed_ratio(default, tuned)), args.output)


if __name__ == "__main__":
    main()
