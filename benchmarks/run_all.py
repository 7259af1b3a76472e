"""Runs `python -m zoo bench` for the issue's model list and writes one JSONL file.

    python benchmarks/run_all.py                       # 5 models x train/infer, vs torch
    python benchmarks/run_all.py --models resnet18 --modes infer --bench-args "--image-size 64"
    python benchmarks/run_all.py --deadline-s 480 --ablations --out results.jsonl
    python benchmarks/run_all.py --markdown benchmarks/results/X.jsonl   # README table
    python benchmarks/run_all.py --separate       # JAX and torch in separate processes

Every (model, mode) runs in its own process (`python -m zoo bench ... --against torch`), so an
out-of-memory or a crash costs one line, GPU memory is fully returned between runs, and a run
can be cut off by a timeout. Each result is appended (and flushed) as soon as it exists; a run
that fails or is skipped for lack of time is recorded as a line with `error`/`skipped`, so the
file always says what was and was not measured. `--ablations` adds the fast-path before/after
runs (zoo only, resnet50 train): float32 instead of bf16, no buffer donation, remat, and no
XLA_FLAGS from the launcher; they run last, only while the deadline allows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("resnet50", "resnet18", "vgg16", "googlenet", "alexnet")
ROOT = Path(__file__).resolve().parent.parent


def device_name() -> str:
    """The GPU's name from nvidia-smi, else the CPU's, without starting JAX."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            names = out.stdout.strip().splitlines()
            return f"{len(names)}x {names[0]}" if len(names) > 1 else names[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu {os.cpu_count()} cores {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def jobs(models, modes, bench_args, against, ablations, separate=False) -> list[dict]:
    """The runs in order of importance: every model's train, then every model's infer (so a
    deadline cuts the cheaper runs of the same models last), the ablations at the end.

    `separate`: the zoo and torch each in their own process (for a machine where JAX and torch
    cannot share one, e.g. two cuDNN builds); the two JSON objects are merged into one record,
    the ratio then comes from windows that were not interleaved.
    """
    out = []
    for mode in modes:
        for model in models:
            args = [model, "--mode", mode, *bench_args]
            if against and separate:
                out.append(dict(label=f"{model}/{mode}", args=args, env={},
                                torch_args=[*args, "--against", against, "--torch-only"]))
                continue
            if against:
                args += ["--against", against]
            out.append(dict(label=f"{model}/{mode}", args=args, env={}))
    if ablations:
        base = ["resnet50", "--mode", "train", *bench_args]
        out += [
            dict(label="ablation resnet50/train float32", args=[*base, "--dtype", "float32"],
                 env={}),
            dict(label="ablation resnet50/train no donation", args=[*base, "--no-donate"],
                 env={}),
            dict(label="ablation resnet50/train remat", args=[*base, "--remat"], env={}),
            dict(label="ablation resnet50/train no XLA_FLAGS", args=base,
                 env={"XLA_FLAGS": ""}),
        ]
    return out


def run_job(job: dict, timeout_s: float, python: str) -> dict:
    """One bench process (two with `torch_args`); its JSON (plus label/wall_s) or an error."""
    if job.get("torch_args"):
        start = time.perf_counter()
        torch_rec = run_job(dict(job, args=job["torch_args"], torch_args=None), timeout_s, python)
        left = timeout_s - (time.perf_counter() - start)
        record = run_job(dict(job, torch_args=None), max(left, 1), python)
        if "torch" in torch_rec and "images_per_sec" in record:
            record["torch"] = torch_rec["torch"]
            for key in ("eager", "compile"):
                t = torch_rec["torch"].get(key)
                record[f"ratio_vs_torch_{key}"] = t and round(
                    record["images_per_sec"] / t["images_per_sec"], 4)
            best = "compile" if torch_rec["torch"].get("compile") else "eager"
            record.update(ratio=record[f"ratio_vs_torch_{best}"],
                          ratio_against="torch.compile" if best == "compile" else "torch eager",
                          ratio_method="separate processes")
        elif "error" in torch_rec:
            record["torch_error"] = torch_rec["error"]
            record["torch_stderr_tail"] = torch_rec.get("stderr_tail")
        record["wall_s"] = round(time.perf_counter() - start, 1)
        return record
    cmd = [python, "-m", "zoo", "bench", *job["args"]]
    env = {**os.environ, **job["env"]}
    start = time.perf_counter()
    record = dict(label=job["label"], command=shlex.join(cmd[1:]),
                  env={k: v for k, v in job["env"].items()} or None)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env,
                              cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-800:]
        record.update(error=f"timed out after {timeout_s:.0f} s",
                      stderr_tail=tail.decode(errors="replace") if isinstance(tail, bytes)
                      else tail)
    else:
        lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        if proc.returncode == 0 and lines:
            record.update(json.loads(lines[-1]))
        else:
            record.update(error=f"exit status {proc.returncode}",
                          stderr_tail=proc.stderr[-1500:])
    record["wall_s"] = round(time.perf_counter() - start, 1)
    return record


def markdown(path: str) -> str:
    """The README's performance table from a JSONL file of this script."""
    rows = [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]
    done = [r for r in rows if "images_per_sec" in r]
    if not done:
        return "no results"
    kinds = sorted({r.get("device") or r.get("device_kind", "?") for r in done})
    head = ("| model | mode | batch | dtype | zoo img/s | torch.compile img/s | torch eager img/s "
            "| zoo / torch.compile | zoo / eager | zoo MFU | zoo compile s | torch.compile s |")
    lines = [f"Device: {', '.join(kinds)}; synthetic data, median of timed windows "
             f"(`{Path(path).name}`).", "", head, "|" + "---|" * (head.count("|") - 1)]
    f = lambda v, fmt="{:,.0f}": "-" if v is None else fmt.format(v)
    for r in done:
        t = r.get("torch") or {}
        comp, eager = t.get("compile") or {}, t.get("eager") or {}
        label = r.get("label", "")
        name = r["model"] + (f" ({label.split(' ', 1)[1].split(' ', 1)[1]})"
                             if label.startswith("ablation") else "")
        lines.append("| " + " | ".join([
            name, r["mode"], str(r["batch_size"]), r["dtype"], f(r["images_per_sec"]),
            f(comp.get("images_per_sec")), f(eager.get("images_per_sec")),
            f(r.get("ratio_vs_torch_compile"), "{:.2f}x"),
            f(r.get("ratio_vs_torch_eager"), "{:.2f}x"), f(r.get("mfu"), "{:.1%}"),
            f(r.get("compile_s"), "{:.1f}"), f(comp.get("compile_s"), "{:.1f}")]) + " |")
    missing = [f"{r.get('label')}: {r.get('error') or r.get('skipped')}" for r in rows
               if "images_per_sec" not in r]
    if missing:
        lines += ["", "Not measured: " + "; ".join(missing)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    p.add_argument("--modes", default="train,infer", help="comma-separated")
    p.add_argument("--bench-args", default="", help="extra arguments for every bench, quoted")
    p.add_argument("--against", default="torch", help="'' for the zoo alone")
    p.add_argument("--ablations", action="store_true", help="add the fast-path ablations")
    p.add_argument("--separate", action="store_true",
                   help="run torch and the zoo in separate processes (not interleaved)")
    p.add_argument("--out", help="JSONL file (default benchmarks/results/<device>.jsonl)")
    p.add_argument("--deadline-s", type=float, default=0,
                   help="stop starting runs after this many seconds (0: no limit)")
    p.add_argument("--timeout-s", type=float, default=900, help="limit of one run")
    p.add_argument("--min-left-s", type=float, default=45,
                   help="do not start a run with less time than this left before the deadline")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--markdown", metavar="JSONL", help="print the table of a results file")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(args.markdown))
        return 0

    device = device_name()
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"{slug(device)}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    todo = jobs(args.models.split(","), args.modes.split(","), shlex.split(args.bench_args),
                args.against, args.ablations, args.separate)
    start = time.perf_counter()
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    failures = 0
    with out.open("a") as f:
        for job in todo:
            left = (args.deadline_s - (time.perf_counter() - start)) if args.deadline_s else None
            if left is not None and left < args.min_left_s:
                record = dict(label=job["label"], skipped=f"deadline ({args.deadline_s:.0f} s)")
            else:
                timeout = args.timeout_s if left is None else min(args.timeout_s, left)
                record = run_job(job, timeout, args.python)
            record.update(device=device, run_started=stamp)
            failures += "error" in record
            f.write(json.dumps(record) + "\n")
            f.flush()
            summary = (f"{record['images_per_sec']:,.0f} img/s, ratio {record.get('ratio')}"
                       if "images_per_sec" in record else record.get("error") or
                       record.get("skipped"))
            print(f"[{time.perf_counter() - start:6.0f} s] {job['label']}: {summary}",
                  file=sys.stderr, flush=True)
    print(out)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
