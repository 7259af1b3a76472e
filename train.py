"""Train a zoo model: `python train.py --model simple_cnn --dataset fashion_mnist`.

Intentionally short: the step, the loop, checkpoints and data live in the `zoo` package. A run
resumes from the newest complete checkpoint in --workdir, which also receives config.json,
metrics.jsonl, TensorBoard events and the Orbax checkpoints (the newest --max-to-keep plus the
best by eval top-1), and is held by one run at a time (WORKDIR/train.lock). Exit status:
see EXIT_CODES (printed by --help).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from zoo.cli import error, image_size_arg  # noqa: E402


EXIT_CODES = """exit status (each failure prints one line `error: ...`):
  0        done
  1        diverged: the loss became NaN/inf (the step is named; the last good checkpoint is kept)
  2        bad input or environment, the workdir left as it was: bad flags, missing or damaged
           data, an unreadable checkpoint, a workdir in use by another run; or a checkpoint
           that could not be written (full disk): the complete ones are kept, rerun to resume
  128+N    stopped by signal N after saving (143: SIGTERM); rerun to resume"""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Flag defaults shown, the exit-status epilog kept as written."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's usage block is noise in logs)
        self.exit(2, f"error: {message} (see --help)\n")


def parse(argv=None) -> argparse.Namespace:
    p = _Parser(description=__doc__.split("\n\n")[0], epilog=EXIT_CODES,
                formatter_class=_Formatter)
    p.add_argument("--model", required=True, help="a name from `python -m zoo list`")
    p.add_argument("--dataset", required=True,
                   help="mnist, fashion_mnist, cifar10, cifar100, imagenet2012, image_folder:PATH")
    p.add_argument("--workdir", help="default: runs/MODEL_DATASET")
    p.add_argument("--data-dir", help="TFDS data directory")
    g = p.add_argument_group("recipe (defaults: --recipe, else finetune with --init-from, else "
                             "MODEL_DATASET, else Adam 1e-3)")
    g.add_argument("--recipe", help="a named recipe from zoo.training.RECIPES")
    g.add_argument("--epochs", type=float)
    g.add_argument("--steps", type=int, help="total steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, help="global batch size (all devices)")
    g.add_argument("--optimizer", help="sgd, momentum, nesterov, adam, adamw, rmsprop, lamb")
    g.add_argument("--lr", type=float, help="peak learning rate (per 256 images for recipes "
                                            "with linear scaling)")
    g.add_argument("--schedule", help="constant, step, cosine, warmup_cosine")
    g.add_argument("--warmup-epochs", type=float)
    g.add_argument("--weight-decay", type=float, help="on conv/dense kernels only")
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="the dataset's training augmentation (default: the recipe's)")
    g.add_argument("--freeze", help="none; bn: BatchNorm layers use and keep their running statistics, their "
                        "scale/bias not updated; backbone: train the classifier head alone "
                        "(a linear probe, BatchNorm frozen too)")
    g.add_argument("--backbone-lr-scale", type=float,
                   help="learning-rate factor of the parameters outside the classifier head")
    f = p.add_argument_group("fine-tuning")
    f.add_argument("--init-from", metavar="SOURCE",
                   help="start a fresh workdir from these weights: a shipped checkpoint name, "
                        "an exported/converted model or train.py workdir, or a torchvision "
                        ".pth/.safetensors file; the head is re-initialised when the class "
                        "count differs (a resumed run continues from its own checkpoint)")
    f.add_argument("--val-fraction", type=float,
                   help="image_folder without val/: hold out this share of each class for "
                        "evaluation (a deterministic split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype; parameters and the loss stay float32")
    p.add_argument("--parallel", default="jit", choices=["jit", "pmap"])
    p.add_argument("--image-size", type=image_size_arg,
                   help="HxWxC fed to the model, resizing the data (default: the model's size "
                        "with the dataset's channels)")
    p.add_argument("--in-channels", type=int, help="build the model for this many channels")
    p.add_argument("--num-classes", type=int, help="default: the dataset's")
    p.add_argument("--eval-every", type=int, help="steps (default: once an epoch)")
    p.add_argument("--checkpoint-every", type=int,
                   help="steps (epoch ends and evaluations are always saved)")
    p.add_argument("--log-every", type=int, default=50, help="steps")
    p.add_argument("--max-to-keep", type=int, default=3,
                   help="newest checkpoints kept (the best by eval top-1 is kept too)")
    p.add_argument("--allow-fallback", action="store_true",
                   help="resume from the previous checkpoint when the newest is damaged")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="image_folder: leave out (and count) files that are not readable images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--export", help="also write the final model + model card to this directory")
    h = p.add_argument_group("multi-host (default: detected from SLURM / Open MPI / TPU)")
    h.add_argument("--coordinator", help="HOST:PORT of process 0")
    h.add_argument("--num-processes", type=int)
    h.add_argument("--process-id", type=int)
    return p.parse_args(argv)


def config_from_args(args):
    """The TrainConfig of the flags: a recipe, with any recipe flag overriding its field."""
    from zoo import training

    name = args.recipe or ("finetune" if args.init_from else
                           training.default_recipe_name(args.model, args.dataset))
    if name is not None and name not in training.RECIPES:
        raise ValueError(f"unknown recipe {name!r}; recipes: {', '.join(training.RECIPES)}")
    recipe = training.RECIPES[name] if name else training.Recipe()
    overrides = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                 "optimizer": args.optimizer, "schedule": args.schedule,
                 "warmup_epochs": args.warmup_epochs, "weight_decay": args.weight_decay,
                 "label_smoothing": args.label_smoothing, "augment": args.augment,
                 "freeze": args.freeze, "backbone_lr_scale": args.backbone_lr_scale}
    recipe = dataclasses.replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    return training.TrainConfig(
        model=args.model, dataset=args.dataset,
        workdir=args.workdir or os.path.join("runs", f"{args.model}_{args.dataset}"),
        recipe=recipe, recipe_name=name, steps=args.steps, seed=args.seed, dtype=args.dtype,
        parallel=args.parallel, image_size=args.image_size, in_channels=args.in_channels,
        num_classes=args.num_classes, data_dir=args.data_dir, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every, log_every=args.log_every,
        max_to_keep=args.max_to_keep, allow_fallback=args.allow_fallback,
        progress=not args.no_progress, export=args.export,
        skip_bad_images=args.skip_bad_images, val_fraction=args.val_fraction,
        init_from=args.init_from)


def main(argv=None) -> int:
    args = parse(argv)
    from zoo import parallel, training

    parallel.keep_host_memory()
    try:
        parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        config = config_from_args(args)
        final = training.train(config)
    except ValueError as e:  # bad flags, missing/damaged data, checkpoints, workdir in use
        return error(e)
    except FloatingPointError as e:  # diverged
        return error(e, 1)
    except training.Interrupted as e:
        print(f"stopped by {e}", file=sys.stderr)
        return 128 + e.signum
    if parallel.is_lead():
        print(f"test top-1 {final['test_top1']:.2f}%  top-5 {final['test_top5']:.2f}%  "
              f"loss {final['test_loss']:.4f}  ({final['test_examples']} {final['split']} "
              f"images, {config.model} on {config.dataset}, step {final['step']}, epoch "
              f"{final['epoch']:g})", flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    if code > 128:  # stopped by a signal, the state saved: don't wait for tf.data threads to wind
        sys.stdout.flush()  # down (a preempted job has seconds, not minutes)
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
