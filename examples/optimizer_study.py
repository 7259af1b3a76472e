"""The notes' exercise: swap Adam for RMSProp (and others) and compare, at equal budgets.

    python examples/optimizer_study.py --epochs 1 --out docs/optimizer_study

trains simple_cnn on Fashion-MNIST once per optimizer (same seed, batch, steps and cosine
schedule; each optimizer at its usual learning rate), then writes `<out>.md` (a results table)
and `<out>.png` (loss and accuracy curves, runs overlaid). Workdirs go to runs/optimizer_study/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from zoo import parallel, training, viz  # noqa: E402

# optimizer -> learning rate (the usual defaults: 1e-3 for adaptive methods, 0.05 for SGD)
OPTIMIZERS = {"adam": 1e-3, "rmsprop": 1e-3, "momentum": 0.05, "adamw": 1e-3}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--out", default="docs/optimizer_study")
    p.add_argument("--workdir", default="runs/optimizer_study")
    args = p.parse_args(argv)
    parallel.keep_host_memory()  # before JAX starts: CPU steps reuse their memory
    rows, workdirs = [], []
    for name, lr in OPTIMIZERS.items():
        recipe = training.Recipe(name, lr, batch_size=64, epochs=args.epochs, schedule="cosine",
                                 weight_decay=1e-4 if name == "adamw" else 0.0,
                                 augment=False)
        workdir = Path(args.workdir) / name
        config = training.TrainConfig("simple_cnn", "fashion_mnist", str(workdir), recipe,
                                      recipe_name=f"optimizer_study_{name}", progress=False)
        final = training.train(config)
        records = viz.read_metrics(workdir)
        rows.append((name, lr, final["test_top1"], final["test_loss"],
                     training.train_seconds(records)))
        workdirs.append(workdir)
        print(json.dumps({"optimizer": name, **final}), flush=True)
    viz.plot_curves(workdirs, f"{args.out}.png", labels=list(OPTIMIZERS))
    table = ["| optimizer | lr | test top-1 | test loss | train time (s) |", "|---|---:|---:|---:|---:|"]
    table += [f"| {n} | {lr:g} | {top1:.2f}% | {loss:.4f} | {sec:.0f} |"
              for n, lr, top1, loss, sec in rows]
    Path(f"{args.out}.md").write_text(
        f"simple_cnn on Fashion-MNIST, {args.epochs} epoch(s), batch 64, cosine schedule, "
        "seed 0\n\n" + "\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
