"""`python -m zoo list|summary|data|bench|convert|viz ...`"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Subcommands with parsers of their own: name -> (module, function(argv) -> int, help).
_DELEGATED = {
    "data": ("zoo.cli", "data", "prepare a dataset offline, or measure the input pipeline"),
    "bench": ("zoo.bench", "cli", "measure training/inference throughput, compile time and MFU"),
    "convert": ("zoo.cli", "convert", "convert torchvision weights to an Orbax checkpoint"),
    "viz": ("zoo.viz", "cli", "draw filters, feature maps and training curves as PNG"),
}


def _list(args) -> int:
    import zoo
    from zoo.registry import abstract_variables, param_count

    rows = []
    for name in zoo.list_models(args.pattern):
        info = zoo.model_info(name)
        model = zoo.create_model(name)
        params = param_count(abstract_variables(model, info.input_size))
        size = "x".join(map(str, info.input_size))
        rows.append((name, f"{params:,}", size, info.family, info.torchvision_name or "-"))
    head = ("model", "params", "input", "family", "torchvision")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.rjust(w) if i == 1 else c.ljust(w)
                        for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    return 0


def _summary(args) -> int:
    import zoo

    from zoo.cli import image_size

    shape = image_size(args.input_size) if args.input_size else None
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    print(zoo.summary(args.model, shape, arithmetic=args.arithmetic, **kwargs))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m zoo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="the registered models with parameter counts")
    p.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. 'resnet*'")
    p = sub.add_parser("summary", help="per-layer table: shapes, params, FLOPs, receptive field")
    p.add_argument("model")
    p.add_argument("--input-size", help="HxWxC, e.g. 32x32x3 (default: the model's)")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--arithmetic", action="store_true",
                   help="each layer's (N - F + 2P) / S + 1 and parameter count, numbers filled in")
    for name, (_, _, help_) in _DELEGATED.items():
        sub.add_parser(name, help=help_, add_help=False)
    if argv and argv[0] in _DELEGATED:
        from zoo import parallel

        parallel.keep_host_memory()
        module, function, _ = _DELEGATED[argv[0]]
        return getattr(importlib.import_module(module), function)(argv[1:])
    args = parser.parse_args(argv)
    try:
        return {"list": _list, "summary": _summary}[args.command](args)
    except ValueError as e:
        from zoo.cli import error

        return error(e)


if __name__ == "__main__":
    sys.exit(main())
