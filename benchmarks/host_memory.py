"""The zoo's step with and without `zoo.parallel.keep_host_memory`'s malloc settings, in one
process, windows interleaved.

    python benchmarks/host_memory.py [--models simple_cnn lenet5 resnet20]
        [--modes train infer] [--batch-sizes 64 128] [--windows 5] [--output FILE]

CPU executions run on the calling thread for both (the dispatch half of `keep_host_memory`,
fixed for the process); before each timed window glibc's malloc is switched between its
defaults at their most generous (chunks above 32 MiB mapped and unmapped, the heap trimmed above
64 MiB: where glibc's dynamic thresholds end up) and `keep_host_memory`'s (no mapped chunks,
no trimming), and one untimed window lets the heap settle. Each JSON line has both speeds,
`ratio` (median per-window kept / default images/s) and the page faults and kernel CPU time
per step of each. This is the measurement behind `keep_host_memory`.
"""

import argparse
import ctypes
import json
import resource
import statistics
import time

import zoo
from zoo import bench, parallel

from run_all import device_name  # this directory's: the machine's CPU or GPU name

M_MMAP_THRESHOLD = -3  # malloc.h, as zoo.parallel's _M_MMAP_MAX and _M_TRIM_THRESHOLD


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["simple_cnn", "lenet5", "resnet20"])
    p.add_argument("--modes", nargs="+", default=["train", "infer"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 128])
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--output")
    args = p.parse_args()
    if not parallel.keep_host_memory():
        raise SystemExit("error: keep_host_memory tunes glibc's malloc only (Linux)")
    mallopt = ctypes.CDLL(None).mallopt
    settings = {"default": [(M_MMAP_THRESHOLD, 32 << 20), (parallel._M_TRIM_THRESHOLD, 64 << 20),
                            (parallel._M_MMAP_MAX, 65536)],
                "kept": parallel.KEPT_MALLOC}
    for name in args.models:
        info = zoo.model_info(name)
        for mode in args.modes:
            for batch in args.batch_sizes:
                timer, _ = bench.zoo_timer(name, mode, batch, "float32", info.input_size,
                                           info.num_classes)
                timer.start(None, 1, 2.0)
                runs = {k: [] for k in settings}
                for _ in range(args.windows):
                    for k, options in settings.items():
                        for option, value in options:
                            mallopt(option, value)
                        timer.window()
                        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                        timer.window()
                        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                        runs[k].append(((t1 - t0) / timer.steps,
                                        (r1.ru_minflt - r0.ru_minflt) / timer.steps,
                                        (r1.ru_stime - r0.ru_stime) / timer.steps))
                row = {"model": name, "mode": mode, "batch_size": batch,
                       "device": device_name(), "windows": args.windows,
                       "ratio": round(statistics.median(
                           d[0] / k[0] for d, k in zip(runs["default"], runs["kept"])), 4)}
                for k, v in runs.items():
                    row[k] = {"images_per_sec": round(batch / statistics.median(x[0] for x in v), 1),
                              "faults_per_step": round(statistics.median(x[1] for x in v)),
                              "kernel_ms_per_step": round(1e3 * statistics.median(x[2] for x in v), 1)}
                line = json.dumps(row)
                print(line, flush=True)
                if args.output:
                    with open(args.output, "a") as f:
                        f.write(line + "\n")


if __name__ == "__main__":
    main()
