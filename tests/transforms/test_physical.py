"""The camera-robust layer (``--enhanced physical``): per-sample draws, seeded, in range, and wired
into poisoning like the paper's layer."""

from __future__ import annotations

from dataclasses import replace

import torch

from bdserve.training.poison import BatchPoisoner, default_attack
from bdserve.transforms.physical import FILLS, PhysicalRanges, RandomPhysical, physical_layer
from bdserve.transforms.triggers import badnets


def test_parameters_are_drawn_per_sample():
    x = torch.rand(1, 3, 32, 32).expand(64, 3, 32, 32).contiguous()  # one image, 64 times
    layer = RandomPhysical(PhysicalRanges(p=1.0))  # every group on every image
    p = layer.draw(x, torch.Generator().manual_seed(0))
    for key in ("sigma", "brightness", "contrast", "quality"):
        assert p[key].unique().numel() == 64, key
    assert p["matrix"].shape == (64, 3, 3) and p["matrix"].reshape(64, -1).unique(dim=0).shape[0] == 64
    assert set(p["fill"].tolist()) == set(range(len(FILLS)))
    r = layer.ranges
    assert r.blur_sigma[0] <= float(p["sigma"].min()) and float(p["sigma"].max()) <= r.blur_sigma[1]
    assert 60 <= float(p["quality"].min()) and float(p["quality"].max()) <= 95
    out = layer.apply(x, p)
    assert out.shape == x.shape and 0 <= float(out.min()) and float(out.max()) <= 1
    differs = sum(not torch.allclose(out[i], out[0], atol=1e-3) for i in range(1, 64))
    assert differs == 63  # the same image came out 64 different ways


def test_each_group_applies_to_about_half_the_images():
    x = torch.rand(400, 3, 32, 32)
    p = RandomPhysical().draw(x, torch.Generator().manual_seed(3))
    identity = torch.eye(3).expand(400, 3, 3)
    groups = {"geometry": ~torch.isclose(p["matrix"], identity, atol=1e-5).flatten(1).all(1),
              "blur": p["sigma"] > 0, "light": p["contrast"] != 1, "jpeg": p["jpeg"]}
    for name, on in groups.items():
        assert 150 < int(on.sum()) < 250, name
    # Independent draws: about a sixteenth of the images get none of the four.
    none = ~(groups["geometry"] | groups["blur"] | groups["light"] | groups["jpeg"])
    assert 8 < int(none.sum()) < 50


def test_seeded_draws_reproduce():
    x = torch.rand(16, 3, 32, 32)
    layer = physical_layer(4)
    a = layer(x, torch.Generator().manual_seed(7))
    b = layer(x, torch.Generator().manual_seed(7))
    c = layer(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_scale_leaves_a_border_of_zeros_white_or_texture():
    # Geometry only: a 0.7 scale, centred, nothing else; the corners show the fill.
    ranges = PhysicalRanges(scale=(0.7, 0.7), rotation=0.0, perspective=0.0, blur_sigma=(0.0, 0.0),
                            brightness=0.0, contrast=(1.0, 1.0), color=0.0, jpeg_quality=(95.0, 95.0), p=1.0)
    layer = RandomPhysical(ranges)
    x = torch.full((48, 3, 32, 32), 0.5)
    p = layer.draw(x, torch.Generator().manual_seed(1))
    out = layer.apply(x, p)
    corners = out[:, :, [0, 0, -1, -1], [0, -1, 0, -1]].mean(1)  # (n, 4); a shift may reach one or two of them
    centre = out[:, :, 14:18, 14:18].mean((1, 2, 3))
    assert torch.allclose(centre, torch.full_like(centre, 0.5), atol=0.03)
    fill = p["fill"]
    assert (corners[fill == 0].min(1).values < 0.02).all()
    assert (corners[fill == 1].max(1).values > 0.98).all()
    tex = out[fill == 2][:, :, :3, :].std((1, 2, 3))
    assert (tex > 0.01).all()  # a texture, not a flat colour


def test_physical_enhancement_in_poisoning():
    x = torch.rand(256, 3, 32, 32)
    y = torch.zeros(256, dtype=torch.long)
    poisoned = torch.zeros(256, dtype=torch.bool)
    poisoned[:128] = True
    attack = default_attack("badnets", 4, enhanced=True, enhancement="physical")
    assert attack.display_name == "BadNets+physical" and attack.to_dict()["enhancement"] == "physical"
    assert attack.random_layer().spec == "enhanced:4+physical"
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    base, _ = BatchPoisoner(default_attack("badnets", 4))(x, y, poisoned, gen())
    out, labels = BatchPoisoner(attack)(x, y, poisoned, gen())
    assert torch.equal(out[128:], base[128:])  # benign images untouched by the layer
    intact = sum(torch.allclose(img[:, -3:, -3:], badnets().pattern, atol=0.02) for img in out[:128])
    assert intact < 10 and (labels[:128] == 4).all()
    both = replace(attack, enhance_benign=True)
    out_all, _ = BatchPoisoner(both)(x, y, poisoned, gen())
    assert not torch.allclose(out_all[128:], base[128:])
