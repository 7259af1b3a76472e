"""Logits parity of converted torchvision weights: writes benchmarks/results/parity.{md,json}.

    python benchmarks/parity.py                     # every convertible model, smallest input
    python benchmarks/parity.py --models 'resnet*'  # a shell pattern (or several)
    python benchmarks/parity.py --size default      # at each model's default input (slow)

For each model: torchvision's model with random weights (every BatchNorm statistic and bias
random too, see `zoo.parity.torchvision_model`), its state_dict converted by
`zoo.convert.convert_state_dict`, both run in float32 eval mode on the same N(0, 1) input. The
table gives the max abs logit difference and that difference relative to the logit scale
(max |torch logit|); the tests require relative < 1e-4.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent


def measure(names: list[str], size: str = "min") -> list[dict]:
    import jax

    from zoo import parity
    from zoo.registry import model_info

    parity.import_torchvision()
    rows = []
    for name in names:
        start = time.perf_counter()
        s = None if size == "min" else model_info(name).input_size[0]
        batch = 1 if name.startswith("vgg") else 2  # VGG's 25088x4096 FC: keep memory low
        row = parity.logits_parity(name, size=s, batch=batch)
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(f"{name:18s} {'x'.join(map(str, row['input'])):12s} max|diff| "
              f"{row['max_abs_diff']:.2e}  scale {row['logit_scale']:.2e}  relative "
              f"{row['relative']:.2e}  ({row['seconds']} s)", file=sys.stderr, flush=True)
        gc.collect()
        jax.clear_caches()
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Logits parity: zoo (Flax) vs torchvision, converted weights",
        "",
        f"float32, eval mode, random weights and N(0, 1) input; {meta['date']}, "
        f"{meta['machine']}, jax {meta['jax']}, torch {meta['torch']}, "
        f"torchvision {meta['torchvision']}. Produced by `python benchmarks/parity.py`.",
        "",
        "| model | input (NHWC) | max abs logit difference | logit scale | relative |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {'x'.join(map(str, r['input']))} | "
                     f"{r['max_abs_diff']:.2e} | {r['logit_scale']:.2e} | {r['relative']:.2e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="*", default=["*"], help="shell patterns (default: all)")
    p.add_argument("--size", choices=["min", "default"], default="min",
                   help="smallest input each model accepts, or its default input size")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "parity"),
                   help="output path without extension (.md and .json are written)")
    args = p.parse_args(argv)

    import jax
    import torch

    from zoo import convert, parity

    tv = parity.import_torchvision()
    names = [n for n in convert.convertible_models()
             if any(fnmatch.fnmatch(n, pat) for pat in args.models)]
    if not names:
        print(f"error: no convertible model matches {args.models}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows = measure(names, args.size)
    meta = {"date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()} CPU ({os.cpu_count()} cores), "
                       f"{jax.devices()[0].platform}",
            "jax": jax.__version__, "torch": torch.__version__, "torchvision": tv.__version__,
            "size": args.size}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, meta))
    worst = max(rows, key=lambda r: r["relative"])
    print(f"wrote {out}.md/.json; worst relative difference {worst['relative']:.2e} "
          f"({worst['model']})", file=sys.stderr)
    return 0 if worst["relative"] < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
