"""Image classification: one target per image (normalize="samples"), exact against the full batch;
BatchNorm in training mode cannot be, and the Accumulator says so."""

from __future__ import annotations

import copy
import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradaccum import Accumulator
from helpers import relative_error

EXACT_TOL = 1e-10  # float64
IGNORE = -100
MICRO_BATCH_SIZE, ACCUMULATION_STEPS = 4, 3

_spec = importlib.util.spec_from_file_location(
    "image_classification", Path(__file__).resolve().parent.parent / "examples" / "image_classification.py")
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


def _data(unlabelled=(1, 5, 6, 13, 19)):
    """22 images = a full window (4, 4, 4) and a partial one (4, 4, 2); some images without a label.

    With equal micro-batches of fully labelled images naive accumulation would be exact too; the
    short last micro-batch and the ignored images give the micro-batches 1 to 4 targets.
    """
    images, labels = example.make_images(22, seed=3, dtype=torch.float64)
    labels[list(unlabelled)] = IGNORE
    return images, labels


def _micro_batches(images, labels, as_dict):
    for start in range(0, len(labels), MICRO_BATCH_SIZE):
        chunk = images[start:start + MICRO_BATCH_SIZE], labels[start:start + MICRO_BATCH_SIZE]
        yield {"pixel_values": chunk[0], "labels": chunk[1]} if as_dict else chunk


def _model(norm="group"):
    torch.manual_seed(0)
    return example.SmallCNN(norm=norm).double()


def _full_batch(model, images, labels, num_steps=2):
    """The reference: one step per window, each over all the window's images at once."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    window_size = MICRO_BATCH_SIZE * ACCUMULATION_STEPS
    gradients, losses = [], []
    for start in range(0, window_size * num_steps, window_size):
        loss = F.cross_entropy(model(images[start:start + window_size]), labels[start:start + window_size],
                               ignore_index=IGNORE)
        loss.backward()
        gradients.append([p.grad.clone() for p in model.parameters()])
        losses.append(float(loss.detach()))
        optimizer.step()
        optimizer.zero_grad()
    return model, gradients, losses


def _accumulated(model, images, labels, accumulation="exact", as_dict=False):
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    acc = Accumulator(model, optimizer, accumulation_steps=ACCUMULATION_STEPS, normalize="samples",
                      shift_labels=False, accumulation=accumulation)
    gradients, stats = [], []
    for window in acc.windows(_micro_batches(images, labels, as_dict)):
        for batch in window:
            if as_dict:  # the built-in loss: per-image cross-entropy, summed, scaled
                loss = window.loss(model(batch["pixel_values"]), batch["labels"])
            else:  # a loss of one's own: its sum over images, then window.scale
                logits = model(batch[0])
                loss = window.scale(F.cross_entropy(logits, batch[1], ignore_index=IGNORE, reduction="sum"))
            loss.backward()
        gradients.append([p.grad.clone() for p in model.parameters()])
        stats.append(window.step())
    return model, gradients, stats


def _gradient_error(gradient, reference):
    return example.relative_error(gradient, reference)


@pytest.mark.parametrize("as_dict", [False, True], ids=["tuple+scale", "dict+loss"])
def test_exact_matches_full_batch_naive_departs(as_dict):
    images, labels = _data()
    model = _model()
    reference, ref_gradients, ref_losses = _full_batch(model, images, labels)
    exact, gradients, stats = _accumulated(model, images, labels, "exact", as_dict)
    naive, naive_gradients, _ = _accumulated(model, images, labels, "naive", as_dict)

    assert [s.num_targets for s in stats] == [9, 8]  # labelled images per window, counted before the forward
    assert _window_sizes(labels) == [[4, 4, 4], [4, 4, 2]]  # the second window's last micro-batch is short
    for step, (s, ref_loss) in enumerate(zip(stats, ref_losses)):
        assert abs(s.loss - ref_loss) <= EXACT_TOL * ref_loss, f"window {step} loss {s.loss} vs {ref_loss}"
    for step in range(2):
        err_exact = _gradient_error(gradients[step], ref_gradients[step])
        err_naive = _gradient_error(naive_gradients[step], ref_gradients[step])
        assert err_exact <= EXACT_TOL, f"window {step}: exact departs from the full batch ({err_exact:.2e})"
        assert err_naive > 1e-2, f"window {step}: naive unexpectedly matched the full batch ({err_naive:.2e})"
    assert relative_error(exact, reference, model) <= EXACT_TOL
    assert relative_error(naive, reference, model) > 1e-2


def _window_sizes(labels):
    """Micro-batch sizes per window: [[4, 4, 4], [4, 4, 2]]."""
    sizes = [len(labels[i:i + MICRO_BATCH_SIZE]) for i in range(0, len(labels), MICRO_BATCH_SIZE)]
    return [sizes[i:i + ACCUMULATION_STEPS] for i in range(0, len(sizes), ACCUMULATION_STEPS)]


def test_naive_is_exact_when_every_micro_batch_has_as_many_targets():
    """The control: 4 labelled images in every micro-batch, so the departure above is the uneven counts."""
    images, labels = _data(unlabelled=())
    images, labels = images[:12], labels[:12]
    model = _model()
    _, ref_gradients, _ = _full_batch(model, images, labels, num_steps=1)
    _, naive_gradients, _ = _accumulated(model, images, labels, "naive")
    assert _gradient_error(naive_gradients[0], ref_gradients[0]) <= EXACT_TOL


def test_one_dimensional_labels_need_shift_labels_false():
    """The causal shift would drop the first image of every micro-batch from the count: refused."""
    images, labels = _data()
    model = _model()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accumulation_steps=ACCUMULATION_STEPS,
                      normalize="samples")
    with pytest.raises(ValueError, match="shift_labels=False"):
        next(iter(acc.windows(_micro_batches(images, labels, as_dict=False))))


# -- BatchNorm ----------------------------------------------------------------------------------

def _batchnorm_warnings(model, accumulation_steps=ACCUMULATION_STEPS, num_loops=1):
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.0), accumulation_steps=accumulation_steps,
                      normalize="samples", shift_labels=False)
    images, labels = _data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(num_loops):
            for window in acc.windows(_micro_batches(images[:8], labels[:8], as_dict=False)):
                for batch in window:
                    window.scale(F.cross_entropy(model(batch[0]), batch[1], ignore_index=IGNORE,
                                                 reduction="sum")).backward()
                window.step()
    return [w for w in caught if "BatchNorm" in str(w.message)]


def test_batchnorm_in_train_mode_warns_once():
    caught = _batchnorm_warnings(_model("batch").train(), num_loops=2)
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "features.1: BatchNorm2d" in message and "micro-batch" in message
    assert "GroupNorm" in message and "eval mode" in message
    assert caught[0].filename == __file__  # points at the user's loop


def test_no_batchnorm_warning_in_eval_mode_or_without_batchnorm_or_without_accumulation():
    assert _batchnorm_warnings(_model("batch").eval()) == []
    assert _batchnorm_warnings(_model("group").train()) == []
    assert _batchnorm_warnings(_model("batch").train(), accumulation_steps=1) == []  # the micro-batch is the batch


def test_batchnorm_warning_sees_sync_batchnorm_and_eval_without_running_stats():
    sync = nn.Sequential(nn.Conv2d(1, 4, 3), nn.SyncBatchNorm(4))
    acc = Accumulator(sync, torch.optim.SGD(sync.parameters(), lr=0.0), accumulation_steps=2)
    with pytest.warns(UserWarning, match="1: SyncBatchNorm"):
        list(acc.windows([]))  # its forward needs a process group; the check, when a loop starts, does not
    model = _model("batch").eval()
    model.features[1].running_mean = model.features[1].running_var = None  # batch statistics even in eval
    caught = _batchnorm_warnings(model)
    assert len(caught) == 1 and "features.1" in str(caught[0].message) and "features.5" not in str(caught[0].message)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm_train_mode_is_not_the_full_batch_eval_mode_is(mode):
    """What the warning says: per-micro-batch statistics make even exact accumulation depart."""
    images, labels = _data()
    model = _model("batch")
    with torch.no_grad():  # running statistics that are not the identity, as after some training
        for index in (1, 5):
            model.features[index].running_mean.uniform_(-0.5, 0.5)
            model.features[index].running_var.uniform_(0.5, 2.0)
    model.train(mode == "train")
    _, ref_gradients, _ = _full_batch(model, images, labels, num_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, gradients, _ = _accumulated(model, images, labels, "exact")
    err = _gradient_error(gradients[0], ref_gradients[0])
    if mode == "train":
        assert err > 1e-2, f"BatchNorm in train mode unexpectedly matched the full batch ({err:.2e})"
    else:
        assert err <= EXACT_TOL, f"BatchNorm in eval mode departs from the full batch ({err:.2e})"


def test_example_learns_and_is_exact(capsys):
    result = example.main(["--epochs", "4", "--train-images", "300"])
    assert result["after"] >= result["before"] + 0.2, result
    assert result["exact"] <= EXACT_TOL and result["naive"] > 1e-2, result
    assert "exact" in capsys.readouterr().out
