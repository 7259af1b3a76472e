"""Per-op times of a `python -m zoo bench ... --trace DIR` trace on the CPU backend.

    python benchmarks/trace_ops.py DIR [--steps N] [--top 25]

Reads the Chrome trace (`*.trace.json.gz`) the JAX profiler writes under DIR, keeps the XLA
thunks (the events on XLA's worker threads, without the executor's own wrappers) and prints,
per op kind (the HLO name without its numeric suffix: `ynn_fusion`, `wrapped_reduce-window`,
`select-and-scatter`, ...) and per op, the milliseconds per step (`--steps`: the steps of the
traced window, the bench's `steps_per_window`), their share of the thunk time, and the busy
time of each thread against the window's wall time.

XLA:CPU's convolutions (Eigen's, with the zoo's CPU options) return from their thunk at once
and run as tasks on Eigen's thread pool, which the profiler does not see: a convolution's
event holds only its dispatch. So the shares are those of everything but the convolutions'
arithmetic, and the thunk time against the wall time says how much of the cores' time was
*not* convolution (e.g. resnet20 inference 0.2 of 2 busy cores, training 0.5). Time the
convolutions themselves with `benchmarks/cpu_conv.py`.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
from pathlib import Path

_WRAPPERS = re.compile(r"^(ThunkExecutor|PjRt|CommonPjRt|Pjit|end: |\$)")


def load(trace_dir: str) -> list[dict]:
    """The complete ('X') events of the newest trace under `trace_dir`, with thread names."""
    path = max(Path(trace_dir).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    events = json.load(gzip.open(path))["traceEvents"]
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    return [dict(e, thread=threads.get((e["pid"], e["tid"]), "?")) for e in events
            if e.get("ph") == "X"]


def op_kind(name: str) -> str:
    return re.sub(r"\.\d+$", "", name)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace_dir")
    p.add_argument("--steps", type=int, default=1, help="steps in the traced window")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    events = load(args.trace_dir)
    window = [e for e in events if e["name"].endswith(" window") and e["thread"] == "python"]
    wall = max(e["dur"] for e in window) if window else None
    ops = [e for e in events if e["thread"].startswith("tf_XLA") and
           not _WRAPPERS.match(e["name"])]
    total = sum(e["dur"] for e in ops) or 1
    per = lambda us: f"{us / 1e3 / args.steps:9.2f}"
    for title, key in (("op kind", lambda e: op_kind(e["name"])), ("op", lambda e: e["name"])):
        sums = collections.Counter()
        for e in ops:
            sums[key(e)] += e["dur"]
        print(f"\n{'ms/step':>9} {'share':>6}  {title}")
        for name, us in sums.most_common(args.top):
            print(f"{per(us)} {us / total:6.1%}  {name}")
    busy = collections.Counter()
    for e in ops:
        busy[e["thread"]] += e["dur"]
    print(f"\nthunk time {per(total)} ms/step", end="")
    if wall:
        print(f"; window wall {per(wall)} ms/step; thunk time / wall {total / wall:.2f} "
              "(convolutions' arithmetic not included)")
        for thread, us in busy.most_common():
            print(f"  {thread}: {us / wall:.0%} of the window")
    else:
        print()


if __name__ == "__main__":
    main()
