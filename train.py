"""Train a zoo model: `python train.py --model simple_cnn --dataset fashion_mnist`.

Intentionally short: the step, the loop, checkpoints and data live in the `zoo` package. Runs
resume from the newest checkpoint in --workdir, which also receives config.json, metrics.jsonl,
TensorBoard events and `best/` (the best model by eval top-1).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True,
                   help="mnist, fashion_mnist, cifar10, cifar100, imagenet2012")
    p.add_argument("--workdir", help="default: runs/MODEL_DATASET")
    p.add_argument("--recipe", help="named recipe (default: MODEL_DATASET if one exists)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--steps", type=int, help="total steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--optimizer", help="sgd, momentum, nesterov, adam, adamw, rmsprop, lamb")
    p.add_argument("--lr", type=float)
    p.add_argument("--schedule", help="constant, step, cosine, warmup_cosine")
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--parallel", default="jit", choices=["jit", "pmap"])
    p.add_argument("--image-size", help="HxWxC fed to the model (default: the model's)")
    p.add_argument("--in-channels", type=int, help="build the model for this many channels")
    p.add_argument("--data-dir")
    p.add_argument("--eval-every", type=int, help="steps (default: every epoch)")
    p.add_argument("--checkpoint-every", type=int, help="steps (default: every epoch)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--max-to-keep", type=int, default=3)
    p.add_argument("--allow-fallback", action="store_true",
                   help="resume from an older checkpoint when the newest is damaged")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--export", help="also write the final model + model card to this directory")
    p.add_argument("--coordinator", help="multi-host: coordinator host:port")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    return p.parse_args(argv)


def config_from_args(args):
    from zoo import training

    name = args.recipe or training.default_recipe_name(args.model, args.dataset)
    if name is not None and name not in training.RECIPES:
        raise ValueError(f"unknown recipe {name!r}; recipes: {', '.join(training.RECIPES)}")
    recipe = training.RECIPES.get(name, training.Recipe())
    overrides = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                 "optimizer": args.optimizer, "schedule": args.schedule,
                 "warmup_epochs": args.warmup_epochs, "weight_decay": args.weight_decay,
                 "label_smoothing": args.label_smoothing, "augment": args.augment}
    recipe = dataclasses.replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    if recipe.optimizer not in training.OPTIMIZERS:
        raise ValueError(f"unknown optimizer {recipe.optimizer!r}; use "
                         f"{', '.join(training.OPTIMIZERS)}")
    image_size = tuple(int(v) for v in args.image_size.split("x")) if args.image_size else None
    if image_size is not None and len(image_size) != 3:
        raise ValueError("--image-size takes HxWxC, e.g. 32x32x1")
    return training.TrainConfig(
        model=args.model, dataset=args.dataset,
        workdir=args.workdir or f"runs/{args.model}_{args.dataset}", recipe=recipe,
        recipe_name=name, steps=args.steps, seed=args.seed, dtype=args.dtype,
        parallel=args.parallel, image_size=image_size,
        in_channels=args.in_channels or (image_size[2] if image_size else None),
        data_dir=args.data_dir, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every, log_every=args.log_every,
        max_to_keep=args.max_to_keep, allow_fallback=args.allow_fallback,
        progress=not args.no_progress, export=args.export)


def main(argv=None) -> int:
    args = parse(argv)
    from zoo import parallel, training

    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    try:
        config = config_from_args(args)
        final = training.train(config)
    except (ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 130
    print(f"test top-1 {final['test_top1']:.2f}%  top-5 {final['test_top5']:.2f}%  "
          f"({final['test_examples']} images, {config.model} on {config.dataset}, "
          f"step {final['step']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
