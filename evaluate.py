"""Evaluate a zoo model: `python evaluate.py --model resnet50 --torchvision-weights FILE
--dataset imagenet2012` or `--checkpoint DIR` (an exported model or a train.py workdir).

Intentionally short: loading lives in `zoo.checkpoints` / `zoo.convert`, the input pipeline in
`zoo.data`, the exact masked metrics in `zoo.training.evaluate`. Prints one JSON object on
stdout (model, dataset, split, num_examples, top1, top5, loss, images_per_sec, param_count, ...),
a progress bar on stderr, and on bad input one line `error: ...` with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from zoo.cli import error, image_size_arg  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="zoo model name (`python -m zoo list`)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="exported model dir (model_card.json) or train.py workdir")
    src.add_argument("--torchvision-weights", help="torchvision .pth/.pt/.safetensors state_dict")
    p.add_argument("--step", help="with a train.py workdir: a step number or 'best' (the best "
                                  "eval top-1) instead of the newest step")
    p.add_argument("--drop-aux", action="store_true",
                   help="with --torchvision-weights: build googlenet/inception_v3 without the "
                        "auxiliary classifiers (weights of a file without them)")
    p.add_argument("--dataset", required=True,
                   help="mnist, fashion_mnist, cifar10, cifar100, imagenet2012, image_folder:PATH")
    p.add_argument("--split", help="default: the dataset's evaluation split")
    p.add_argument("--data-dir")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-examples", type=int, help="evaluate the first N examples only")
    p.add_argument("--image-size", type=image_size_arg, help="HxWxC fed to the model (default: the checkpoint's, "
                                        "else the model's)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="image_folder: leave out (and count) files that are not readable images")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def load(args):
    """(model, variables, info, source) for --checkpoint or --torchvision-weights."""
    from zoo import cards, checkpoints, convert, weights
    from zoo.registry import model_info

    if args.checkpoint:
        try:
            model, variables, info, card = checkpoints.load_model(args.checkpoint, args.step)
        except (ValueError, OSError):
            raise
        except Exception as e:  # a damaged file can surface as any error inside Orbax
            raise ValueError(f"cannot load checkpoint {args.checkpoint} ({type(e).__name__}: "
                             f"{str(e).strip()[:200]}); it is damaged or not a zoo "
                             "checkpoint") from None
        if card["model"] != args.model:
            raise ValueError(f"{args.checkpoint} is a {card['model']} checkpoint, not "
                             f"{args.model}")
        info = cards.apply_preprocessing(info, card.get("preprocessing"))
        source = {"checkpoint": str(args.checkpoint), "image_size": card.get("image_size"),
                  "reference_top1": cards.reference_top1(card)}
    else:
        model, variables, _, _ = convert.load_torchvision_model(
            args.model, args.torchvision_weights, drop_aux=args.drop_aux)
        release = weights.recognise_weights(weights.file_sha256(args.torchvision_weights),
                                            args.torchvision_weights)
        info = cards.apply_preprocessing(model_info(args.model),
                                         cards.preprocessing(model_info(args.model), release))
        source = {"torchvision_weights": release.name if release else None,
                  "reference_top1": release.top1 if release else None, "image_size": None}
    return model, variables, info, source


def check_fits(model, info, spec, image_size) -> None:
    """Raises ValueError when the dataset cannot be fed to the model."""
    from zoo.registry import abstract_variables

    classes = getattr(model, "num_classes", None)
    if classes is not None and classes != spec.num_classes:
        raise ValueError(f"{spec.name} has {spec.num_classes} classes but this {info.name} has "
                         f"{classes} outputs")
    try:  # the model's own input check (channels, smallest size), without computing anything
        abstract_variables(model, image_size)
    except ValueError as e:
        raise ValueError(f"{spec.name} images as {'x'.join(map(str, image_size))} do not fit "
                         f"{info.name}: {e}") from None


def run(args) -> dict:
    from tqdm import tqdm

    from zoo import data, training
    from zoo.registry import param_count

    # DatasetNotFoundError / DatasetCorruptError for folders
    spec = data.dataset_info(args.dataset, args.data_dir, args.skip_bad_images)
    model, variables, info, source = load(args)
    if args.image_size:
        image_size = args.image_size
    else:
        image_size = tuple(source.pop("image_size") or info.input_size)
    source.pop("image_size", None)
    check_fits(model, info, spec, image_size)
    split = args.split or spec.eval_split
    batches = data.make_dataset(args.dataset, split, info=info, image_size=image_size,
                                global_batch_size=args.batch_size, train=False,
                                data_dir=args.data_dir, num_examples=args.num_examples,
                                skip_bad_images=args.skip_bad_images)
    total = spec.splits.get(split)
    if args.num_examples is not None:
        total = min(total, args.num_examples) if total else args.num_examples
    start = time.perf_counter()
    with tqdm(total=total, unit="img", file=sys.stderr, disable=args.no_progress,
              desc=f"{args.model} {args.dataset}") as bar:
        metrics = training.evaluate(model, variables, batches, progress=bar)
    seconds = time.perf_counter() - start  # includes the one compilation of the eval step
    return {"model": args.model, "dataset": args.dataset, "split": split,
            "num_examples": metrics["num_examples"], "top1": metrics["top1"],
            "top5": metrics["top5"], "loss": metrics["loss"],
            "images_per_sec": metrics["num_examples"] / seconds,
            "param_count": param_count(variables), "seconds": seconds,
            "image_size": list(image_size), **source}


def main(argv=None) -> int:
    args = parse(argv)
    from zoo import parallel

    parallel.keep_host_memory()
    try:
        result = run(args)
    except (ValueError, OSError) as e:  # CheckpointError, ConversionError, DatasetNotFoundError
        return error(e)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
