"""Argument parsing of the `python -m zoo data` and `convert` subcommands, and the pieces every
command line shares (HxWxC sizes, one-line errors)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def image_size(text: str) -> tuple[int, int, int]:
    """'32x32x1' -> (32, 32, 1); ValueError for anything that is not three positive sizes."""
    try:
        size = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"{text!r} is not HxWxC, e.g. 32x32x1")
    return size


def image_size_arg(text: str) -> tuple[int, int, int]:
    """`image_size` as an argparse type."""
    try:
        return image_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def error(e: BaseException, status: int = 2) -> int:
    """Prints `e` as one `error:` line on stderr; returns `status` (2: bad input)."""
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return status


def data(argv: list[str]) -> int:
    """`python -m zoo data prepare NAME` | `python -m zoo data bench NAME`"""
    parser = argparse.ArgumentParser(prog="python -m zoo data")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("prepare", help="download/prepare a dataset (Fashion-MNIST offline)")
    p.add_argument("name")
    p.add_argument("--data-dir")
    p.add_argument("--force", action="store_true",
                   help="remove a prepared copy first (e.g. after a damaged-file error)")
    p = sub.add_parser("bench", help="images/s of the training input pipeline")
    p.add_argument("name")
    p.add_argument("--model", default="simple_cnn")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--data-dir")
    args = parser.parse_args(argv)
    from zoo import data as zdata
    from zoo.registry import model_info

    try:
        if args.what == "prepare":
            zdata.prepare(args.name, args.data_dir, args.force)
            return 0
        it = zdata.make_dataset(args.name, "train", info=model_info(args.model),
                                global_batch_size=args.batch_size, train=True,
                                data_dir=args.data_dir)
        next(it)  # warm-up: tf.data builds its pipeline
        start = time.perf_counter()
        for _ in range(args.steps):
            next(it)
        elapsed = time.perf_counter() - start
    except ValueError as e:
        return error(e)
    print(json.dumps({"dataset": args.name, "model": args.model,
                      "batch_size": args.batch_size, "steps": args.steps,
                      "images_per_sec": round(args.steps * args.batch_size / elapsed, 1)}))
    return 0


def convert(argv: list[str]) -> int:
    """`python -m zoo convert NAME --from FILE --out DIR [--drop-aux]`"""
    parser = argparse.ArgumentParser(
        prog="python -m zoo convert",
        description="Convert a torchvision state_dict (.pth/.pt/.safetensors) to an exported zoo "
                    "checkpoint (Orbax variables/ + model_card.json), strictly.")
    parser.add_argument("model", help="zoo model name, e.g. resnet50")
    parser.add_argument("--from", dest="source", required=True, help="torchvision weight file")
    parser.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    parser.add_argument("--drop-aux", action="store_true",
                        help="leave out googlenet/inception_v3's auxiliary classifiers")
    parser.add_argument("--timm", metavar="TAG",
                        help="the file holds timm's pretrained weights TAG (e.g. "
                             "resnet50.a1_in1k): record timm's preprocessing for them")
    parser.add_argument("--no-transform-input", action="store_true",
                        help="googlenet/inception_v3 weights trained without transform_input")
    args = parser.parse_args(argv)
    from zoo import cards
    from zoo import convert as cv
    from zoo.checkpoints import save_model
    from zoo.weights import file_sha256
    from zoo.registry import param_count

    try:
        model, variables, kwargs, dropped = cv.load_torchvision_model(
            args.model, args.source, drop_aux=args.drop_aux,
            transform_input=False if args.no_transform_input else None)
        count = param_count(variables)
        card = cards.conversion_card(args.model, args.source, file_sha256(args.source), kwargs,
                                     dropped, count, timm=args.timm)
        save_model(args.out, model_name=args.model, variables=variables, card=card,
                   create_kwargs=kwargs)
    except (ValueError, OSError) as e:
        return error(e)
    known = card["source"]["torchvision_weights"]
    print(json.dumps({"model": args.model, "out": str(Path(args.out).absolute()),
                      "param_count": count, "torchvision_weights": known,
                      "create_kwargs": kwargs}))
    return 0
