"""Image classification with exact gradient accumulation: a small CNN on synthetic shapes.

    python examples/image_classification.py                 # a few seconds on one CPU core
    python examples/image_classification.py --norm batch    # BatchNorm: gradaccum warns why

Each image is one target, so the Accumulator runs with normalize="samples" and
shift_labels=False (labels are class ids of shape [batch], not token sequences). The
loss is the *sum* of the per-image cross-entropies, which `window.scale` turns into
this micro-batch's share of the window mean.

Where does naive accumulation go wrong with images? With equal micro-batches and every
image labelled, the mean of the micro-batch means *is* the big-batch mean. It departs when
micro-batches hold different numbers of targets: the short last micro-batch of an epoch
(a DataLoader without drop_last), or images without a label (-100, ignored). Both occur
here, and the script prints how far exact and naive accumulation are from the full batch.

BatchNorm in training mode normalises each micro-batch with its own statistics, so no
accumulation reproduces the big batch through it; the model uses GroupNorm instead.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradaccum import Accumulator

IGNORE = -100
IMAGE_SIZE = 12
SHAPES = ("horizontal bar", "vertical bar", "diagonal", "square")


def _draw(shape: int, generator: torch.Generator) -> torch.Tensor:
    """One 1 x 12 x 12 image: a shape of random size, place and brightness on noise."""
    image = 0.3 * torch.randn(1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    length = int(torch.randint(4, 7, (), generator=generator))
    row, col = (int(v) for v in torch.randint(0, IMAGE_SIZE - length + 1, (2,), generator=generator))
    brightness = 0.7 + 0.3 * float(torch.rand((), generator=generator))
    steps = torch.arange(length)
    if shape == 0:
        image[0, row, col + steps] += brightness
    elif shape == 1:
        image[0, row + steps, col] += brightness
    elif shape == 2:
        image[0, row + steps, col + steps] += brightness
    else:
        last = length - 1
        image[0, row, col + steps] += brightness
        image[0, row + last, col + steps] += brightness
        image[0, row + 1:row + last, col] += brightness
        image[0, row + 1:row + last, col + last] += brightness
    return image


def make_images(num_images: int, seed: int = 0, unlabelled: float = 0.0,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """`num_images` images [N, 1, 12, 12] and class ids [N]; a fraction `unlabelled` gets -100."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(SHAPES), (num_images,), generator=generator)
    images = torch.stack([_draw(int(label), generator) for label in labels]).to(dtype)
    hidden = torch.rand(num_images, generator=generator) < unlabelled
    return images, labels.masked_fill(hidden, IGNORE)


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head. norm="group" (per image) or "batch" (per batch)."""

    def __init__(self, num_classes: int = len(SHAPES), norm: str = "group", width: int = 8):
        super().__init__()

        def block(channels_in: int, channels_out: int) -> list[nn.Module]:
            norm_layer = nn.GroupNorm(2, channels_out) if norm == "group" else nn.BatchNorm2d(channels_out)
            return [nn.Conv2d(channels_in, channels_out, 3, padding=1), norm_layer, nn.ReLU(), nn.MaxPool2d(2)]

        if norm not in ("group", "batch"):
            raise ValueError(f"norm must be 'group' or 'batch', got {norm!r}")
        self.features = nn.Sequential(*block(1, width), *block(width, 2 * width))
        self.head = nn.Linear(2 * width * (IMAGE_SIZE // 4) ** 2, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixel_values).flatten(1))


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    predictions = model(images).argmax(dim=1)
    model.train(was_training)
    return float((predictions == labels).double().mean())


def window_gradient(model: nn.Module, micro_batches: list, accumulation: str) -> list[torch.Tensor]:
    """The gradient one Accumulator window builds from `micro_batches` (read before its step)."""
    model = copy.deepcopy(model)
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.0), accumulation_steps=len(micro_batches),
                      normalize="samples", shift_labels=False, accumulation=accumulation)
    for window in acc.windows(micro_batches):
        for images, labels in window:
            window.scale(F.cross_entropy(model(images), labels, ignore_index=IGNORE, reduction="sum")).backward()
        gradient = [p.grad.clone() for p in model.parameters()]
        window.step()
    return gradient


def full_batch_gradient(model: nn.Module, micro_batches: list) -> list[torch.Tensor]:
    """The reference: one forward and backward over every image of the window at once."""
    model = copy.deepcopy(model)
    images = torch.cat([images for images, _ in micro_batches])
    labels = torch.cat([labels for _, labels in micro_batches])
    F.cross_entropy(model(images), labels, ignore_index=IGNORE).backward()  # mean over labelled images
    return [p.grad.clone() for p in model.parameters()]


def relative_error(gradient: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    diff = sum(float((g - r).pow(2).sum()) for g, r in zip(gradient, reference))
    return (diff / sum(float(r.pow(2).sum()) for r in reference)) ** 0.5


def gradient_errors(model: nn.Module, micro_batches: list) -> dict[str, float]:
    """Exact and naive accumulation against the full batch, in float64."""
    model = copy.deepcopy(model).double()
    micro_batches = [(images.double(), labels) for images, labels in micro_batches]
    reference = full_batch_gradient(model, micro_batches)
    return {accumulation: relative_error(window_gradient(model, micro_batches, accumulation), reference)
            for accumulation in ("exact", "naive")}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--norm", choices=("group", "batch"), default="group")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-images", type=int, default=500, help="not a multiple of the batch on purpose")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--accumulation-steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    train_images, train_labels = make_images(args.train_images, args.seed, unlabelled=0.1)
    test_images, test_labels = make_images(400, args.seed + 1)
    model = SmallCNN(norm=args.norm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    acc = Accumulator(model, optimizer, accumulation_steps=args.accumulation_steps, max_grad_norm=1.0,
                      normalize="samples", shift_labels=False)  # labels: one class id per image
    loader = DataLoader(TensorDataset(train_images, train_labels), batch_size=args.micro_batch_size,
                        shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    before = accuracy(model, test_images, test_labels)
    print(f"{len(train_labels)} training images ({int((train_labels == IGNORE).sum())} unlabelled), "
          f"batch {args.micro_batch_size} x {args.accumulation_steps}, {args.norm} norm")

    last_window: list = []
    for epoch in range(args.epochs):
        model.train()
        loss_sum, num_targets = 0.0, 0
        for window in acc.windows(loader):  # the last window of an epoch is partial, its last micro-batch short
            last_window = list(window.batches)
            for images, labels in window:
                summed = F.cross_entropy(model(images), labels, ignore_index=IGNORE, reduction="sum")
                window.scale(summed).backward()
            stats = window.step()
            loss_sum, num_targets = loss_sum + stats.loss * stats.num_targets, num_targets + stats.num_targets
        print(f"epoch {epoch + 1}: training loss {loss_sum / num_targets:.3f} over {num_targets} labelled images, "
              f"test accuracy {accuracy(model, test_images, test_labels):.1%}")

    after = accuracy(model, test_images, test_labels)
    sizes = [len(labels) for _, labels in last_window]
    targets = [int((labels != IGNORE).sum()) for _, labels in last_window]
    errors = gradient_errors(model, last_window)
    seconds = time.perf_counter() - start
    print(f"test accuracy: {before:.1%} before, {after:.1%} after ({len(SHAPES)} classes)")
    print(f"gradient of the last window (micro-batches of {sizes} images, {targets} labelled) against the "
          f"full batch, float64, relative L2: exact {errors['exact']:.1e}, naive {errors['naive']:.1e}")
    if args.norm == "batch":
        print("(BatchNorm in training mode: each micro-batch is normalised with its own statistics, so even "
              "exact accumulation is not the full batch)")
    print(f"{seconds:.1f} s")
    return {"before": before, "after": after, "exact": errors["exact"], "naive": errors["naive"],
            "seconds": seconds}


if __name__ == "__main__":
    main()
