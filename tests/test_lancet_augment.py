"""The labeled-batch augmentation of LANCET: one-pixel shifts of image-shaped pools."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from metaql.engine.errors import InvalidInputException
from metaql.labeling.augment import SCARCE, labeled_augmentation, pixel_shifts
from metaql.labeling.embedding import TrainConfig, train_embedding


def shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """image (C x H x W) moved dy rows down and dx columns right, zero-filled: built by hand."""
    c, h, w = image.shape
    out = torch.zeros_like(image)
    for y in range(h):
        for x in range(w):
            if 0 <= y - dy < h and 0 <= x - dx < w:
                out[:, y, x] = image[:, y - dy, x - dx]
    return out


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), c=st.integers(1, 3), h=st.integers(4, 9), w=st.integers(4, 9),
       seed=st.integers(0, 10_000))
def test_every_row_is_its_image_moved_by_at_most_one_pixel(n, c, h, w, seed):
    images = torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed)) + 0.1
    out = pixel_shifts(images.reshape(n, -1), (c, h, w), torch.Generator().manual_seed(seed))
    assert out.shape == (n, c * h * w)
    for i in range(n):
        moves = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                 if torch.equal(out[i].view(c, h, w), shifted(images[i], dy, dx))]
        assert len(moves) == 1          # one offset, the same for every channel


def test_shifts_cover_all_nine_offsets_and_follow_the_generator():
    image = torch.rand(1, 6, 6) + 0.1
    rows = image.reshape(1, -1).repeat(400, 1)
    out = pixel_shifts(rows, (6, 6), torch.Generator().manual_seed(0))
    seen = {(dy, dx) for r in out for dy in (-1, 0, 1) for dx in (-1, 0, 1)
            if torch.equal(r.view(1, 6, 6), shifted(image, dy, dx))}
    assert len(seen) == 9
    again = pixel_shifts(rows, (6, 6), torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_cold_shifts_while_labels_are_scarce_and_shift_always():
    assert labeled_augmentation("cold", (8, 8), labels_per_class=2) is not None
    assert labeled_augmentation("cold", (3, 32, 32), labels_per_class=2) is not None
    assert labeled_augmentation("cold", (8, 8), labels_per_class=SCARCE) is None
    assert labeled_augmentation("shift", (8, 8), labels_per_class=20) is not None
    assert labeled_augmentation("none", (8, 8)) is None
    assert labeled_augmentation("none", (64,)) is None


def test_auto_is_cold_on_images_and_none_on_flat_features():
    assert TrainConfig().augment == "auto"
    assert labeled_augmentation("auto", (8, 8), labels_per_class=2) is not None
    assert labeled_augmentation("auto", (8, 8), labels_per_class=SCARCE) is None
    assert labeled_augmentation("auto", (64,), labels_per_class=2) is None   # no error either


@pytest.mark.parametrize("mode, shape, match", [
    ("shift", (64,), "image-shaped"),
    ("cold", (64,), "image-shaped"),
    ("flip", (8, 8), "one of auto, none, cold, shift"),
])
def test_bad_augmentation_requests_are_clear_errors(mode, shape, match):
    with pytest.raises(InvalidInputException, match=match):
        labeled_augmentation(mode, shape)


class Recorder(torch.nn.Module):
    """A model without train_step whose features record the batches they see."""

    num_classes = 2

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(16, 2)
        self.seen: list[torch.Tensor] = []

    def features(self, x):
        self.seen.append(x.detach().clone())
        return x

    def logits(self, x):
        return self.head(x)


def test_training_shifts_the_labeled_batch_and_not_the_unlabeled_one():
    x = torch.rand(10, 16) + 0.1
    labeled = torch.tensor([0, 1])
    model = Recorder()
    aug = labeled_augmentation("shift", (4, 4))
    train_embedding(model, x, labeled, torch.tensor([0, 1]), TrainConfig(steps=20, batch_size=8),
                    augment=aug)
    # each step embeds the labeled batch, then the unlabeled one
    labeled_batches, unlabeled_batches = model.seen[0::2], model.seen[1::2]
    assert any(not torch.equal(b, x[labeled]) for b in labeled_batches)
    for b in unlabeled_batches:
        assert all(any(torch.equal(row, r) for r in x[2:]) for row in b)
