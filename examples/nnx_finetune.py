"""Fine-tuning with Flax NNX: the shipped resnet20 under a new head, on a task of its own.

    python examples/nnx_finetune.py --steps 200

The task is binary and made from Fashion-MNIST (footwear, labels 5/7/9, against the rest).
The shipped `resnet20_fashion_mnist` backbone is loaded into an NNX module with a fresh 2-class
head (`Model.load(..., skip=('fc',))`), then trained in two phases, as transfer learning
usually is: a linear probe (`--probe-steps`, BatchNorm in eval mode, only the head in the
optimizer), then the whole network (`model.train()`, every parameter, a lower learning rate).
Prints the test accuracy after each phase.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import zoo  # noqa: E402
import zoo.nnx  # noqa: E402
from zoo import data, parallel  # noqa: E402

FOOTWEAR = np.array([5, 7, 9])  # sandal, sneaker, ankle boot


def binary(batch: dict) -> dict:
    return {**batch, "label": np.isin(batch["label"], FOOTWEAR).astype(np.int32)}


@nnx.jit
def train_step(model, optimizer, x, y):
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, optimizer.wrt))(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def correct(model, x, y, mask):
    return ((model(x, train=False).argmax(-1) == y) & mask).sum()


def accuracy(model, info, size) -> float:
    hits = total = 0
    for b in data.make_dataset("fashion_mnist", "test", info=info, image_size=size,
                               global_batch_size=500, train=False):
        b = binary(b)
        hits += int(correct(model, jnp.asarray(b["image"]), b["label"], b["mask"]))
        total += int(b["mask"].sum())
    return 100 * hits / total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps after the probe")
    p.add_argument("--probe-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    parallel.keep_host_memory()  # before JAX starts: CPU steps reuse their memory

    source = "resnet20_fashion_mnist"
    _, variables, info = zoo.load_pretrained(source)
    size = (32, 32, 1)
    model = zoo.nnx.create_model("resnet20", num_classes=2, input_shape=size)
    model.load(variables, skip=("fc",))  # the backbone strictly, a new 2-class head
    batches = map(binary, data.make_dataset("fashion_mnist", "train", info=info,
                                            image_size=size, global_batch_size=args.batch_size,
                                            train=True))

    model.eval()  # linear probe: running BatchNorm statistics, only the head moves
    head = nnx.All(nnx.Param, nnx.PathContains("fc"))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=head)
    for _ in range(args.probe_steps):
        b = next(batches)
        train_step(model, optimizer, jnp.asarray(b["image"]), b["label"])
    print(f"linear probe, {args.probe_steps} steps: test accuracy {accuracy(model, info, size):.2f}%")

    model.train()  # then everything, BatchNorm statistics included
    optimizer = nnx.Optimizer(model, optax.adam(1e-4), wrt=nnx.Param)
    for _ in range(args.steps):
        b = next(batches)
        loss = train_step(model, optimizer, jnp.asarray(b["image"]), b["label"])
    model.eval()
    print(f"fine-tuned, {args.steps} more steps (last loss {float(loss):.4f}): test accuracy "
          f"{accuracy(model, info, size):.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
