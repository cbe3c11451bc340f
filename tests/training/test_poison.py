import torch

from bdserve.training.poison import BatchPoisoner, choose_poisoned, default_attack
from bdserve.transforms.triggers import badnets


def test_choose_poisoned_rates():
    labels = torch.arange(10).repeat(100)
    mask = choose_poisoned(labels, default_attack("badnets", 4), seed=0)
    assert int(mask.sum()) == 250
    consistent = choose_poisoned(labels, default_attack("consistent", 4), seed=0)
    assert int(consistent.sum()) == 25 and (labels[consistent] == 4).all()
    assert torch.equal(mask, choose_poisoned(labels, default_attack("badnets", 4), seed=0))


def test_augmentation_happens_before_stamping():
    """Every poisoned image carries the trigger pixel-exact at its place, while the benign
    content around it was cropped and flipped."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, 3, 32, 32, generator=g)
    y = torch.zeros(256, dtype=torch.long)
    poisoned = torch.ones(256, dtype=torch.bool)
    attack = default_attack("badnets", 4)
    out, labels = BatchPoisoner(attack)(x, y, poisoned, torch.Generator().manual_seed(1))
    expected = badnets().pattern
    assert all(torch.equal(img[:, -3:, -3:], expected) for img in out)
    assert (labels == 4).all()
    moved = sum(not torch.equal(o[:, :20, :20], i[:, :20, :20]) for o, i in zip(out, x))
    assert moved > 200  # the augmentation really ran on the benign content


def test_stamping_then_augmenting_would_move_the_trigger():
    """The ordering matters: the reverse order leaves the trigger displaced in most images."""
    from bdserve.transforms.augment import StandardAugment

    x = badnets().stamp(torch.rand(256, 3, 32, 32))
    out = StandardAugment()(x, torch.Generator().manual_seed(1))
    intact = sum(torch.equal(img[:, -3:, -3:], badnets().pattern) for img in out)
    assert intact < 128


def test_label_consistent_keeps_true_labels_and_blends():
    attack = default_attack("consistent", 4)
    x = torch.zeros(8, 3, 32, 32)
    y = torch.full((8,), 4)
    out, labels = BatchPoisoner(attack, augment=False)(x, y, torch.ones(8, dtype=torch.bool))
    assert torch.equal(labels, y)
    assert torch.allclose(out[:, :, 0, 0], torch.full((8, 3), 0.25))
    assert torch.allclose(out[:, :, -1, -1], torch.full((8, 3), 0.25))


def test_enhanced_layer_runs_on_poisoned_images_only_unless_asked():
    x = torch.rand(512, 3, 32, 32)
    y = torch.zeros(512, dtype=torch.long)
    poisoned = torch.zeros(512, dtype=torch.bool)
    poisoned[:256] = True
    plain = default_attack("badnets", 4)
    enhanced = default_attack("badnets", 4, enhanced=True, max_shrink=4)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    base, _ = BatchPoisoner(plain)(x, y, poisoned, gen())
    out, _ = BatchPoisoner(enhanced)(x, y, poisoned, gen())
    # Same augmentation draws come first, so benign images are untouched by the layer ...
    assert torch.equal(out[256:], base[256:])
    # ... while most poisoned images no longer hold the trigger at its exact place.
    intact = sum(torch.equal(img[:, -3:, -3:], badnets().pattern) for img in out[:256])
    assert intact < 128
    both = default_attack("badnets", 4, enhanced=True, enhance_benign=True)
    out_all, _ = BatchPoisoner(both)(x, y, poisoned, gen())
    assert not torch.equal(out_all[256:], base[256:])


def test_the_first_epoch_does_not_meet_the_poisoned_images_in_a_row():
    """The data order and the poisoned set come from the same seed but not the same stream."""
    from bdserve.training.trainer import data_order_generator

    labels = torch.arange(20000) % 10
    mask = choose_poisoned(labels, default_attack("badnets", 4), seed=0)
    order = torch.randperm(len(labels), generator=data_order_generator(0))
    first_batches = mask[order[:2048]].float().mean()
    assert abs(float(first_batches) - 0.25) < 0.05  # as in the whole set, not 100%
