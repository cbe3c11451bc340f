import math

import pytest
import torch

from bdserve.transforms import create_defense
from bdserve.transforms.detectors import (Consistency, ScaleUp, Strip, build_detector, forward_passes, parse_methods,
                                          score_batch)


def linear_classifier(seed: int = 0):
    """A fixed random linear classifier on pixels: position- and scale-sensitive, cheap."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3 * 8 * 8, 10, generator=g)

    def classify(x):
        return torch.softmax(8 * (x.flatten(1) - 0.5) @ w / 8, dim=1)

    return classify


def batch(n=6, seed=1):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def overlays(n=4):
    return torch.randint(0, 256, (n, 3, 8, 8), generator=torch.Generator().manual_seed(7), dtype=torch.uint8)


def detectors(seed=3):
    g = torch.Generator().manual_seed(seed)
    return [Consistency("shrinkpad:2", 5, input_shape=(3, 8, 8), generator=g), Strip(overlays()), ScaleUp(6)]


def test_one_score_per_image_and_a_forward_pass_count_per_view():
    x = batch()
    calls = []

    def counting(v):
        calls.append(len(v))
        return linear_classifier()(v)

    dets = detectors()
    also, scores = score_batch(dets, x, counting, also=[x])
    assert len(calls) == 1  # one batched call for everything
    assert calls[0] == len(x) * (1 + 1 + 5 + 4 + 5)  # also + undefended + views
    assert [d.passes for d in dets] == [5, 4, 5]
    assert forward_passes(dets) == 15
    assert also[0].shape == (6, 10)
    assert set(scores) == {"consistency", "strip", "scaleup"}
    assert all(s.shape == (6,) and torch.isfinite(s).all() for s in scores.values())


def test_a_score_depends_on_the_image_alone_not_its_batch_mates():
    x = batch(8)
    classify = linear_classifier()
    for d in detectors():
        whole = d.score(x, classify)
        parts = torch.cat([d.score(x[:3], classify), d.score(x[3:], classify)])
        torch.testing.assert_close(whole, parts)
        torch.testing.assert_close(d.score(x[5:6], classify), whole[5:6])


def test_same_seed_same_draws_other_seed_other_draws():
    x = batch()
    classify = linear_classifier()
    a = detectors(3)[0].score(x, classify)
    torch.testing.assert_close(a, detectors(3)[0].score(x, classify))
    assert not torch.allclose(a, detectors(4)[0].score(x, classify))


def test_consistency_views_are_the_served_defense_with_fixed_draws():
    g = torch.Generator().manual_seed(0)
    d = Consistency("shrinkpad:2", 4, input_shape=(3, 8, 8), generator=g)
    x = torch.ones(3, 3, 8, 8)
    v = d.views(x).view(4, 3, 3, 8, 8)
    for k in range(4):  # view k: the same placement for every image of the batch
        assert torch.equal(v[k, 0], v[k, 1]) and torch.equal(v[k, 1], v[k, 2])
        assert v[k].sum() == pytest.approx(3 * 3 * 6 * 6)  # 6x6 block of ones, zero border
    # A deterministic defense is one view however many draws were asked for.
    assert Consistency("flip", 8, input_shape=(3, 8, 8)).passes == 1


def test_consistency_score_is_one_minus_kept_probability():
    x = batch()
    d = Consistency("flip", 3, input_shape=(3, 8, 8))
    classify = linear_classifier()
    base, flipped = classify(x), classify(create_defense("flip")(x))
    expected = 1 - flipped.gather(1, base.argmax(1, keepdim=True)).squeeze(1)
    torch.testing.assert_close(d.score(x, classify), expected)


def test_strip_is_log_c_minus_mean_entropy():
    x = batch()
    strip = Strip(overlays(2))
    uniform = lambda v: torch.full((len(v), 10), 0.1)  # noqa: E731
    onehot = lambda v: torch.nn.functional.one_hot(torch.zeros(len(v), dtype=torch.long), 10).float()  # noqa: E731
    torch.testing.assert_close(strip.score(x, uniform), torch.zeros(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(strip.score(x, onehot), torch.full((6,), math.log(10)), atol=1e-5, rtol=0)
    v = strip.views(x).view(2, 6, 3, 8, 8)
    torch.testing.assert_close(v[1, 4], 0.5 * x[4] + 0.5 * overlays(2)[1].float() / 255)


def test_scaleup_amplifies_and_clips():
    x = torch.full((2, 3, 8, 8), 0.2)
    v = ScaleUp(6).views(x).view(5, 2, 3, 8, 8)
    assert [round(float(v[k, 0, 0, 0, 0]), 4) for k in range(5)] == [0.4, 0.6, 0.8, 1.0, 1.0]
    # A classifier whose answer never moves: every amplified copy keeps the class, fully.
    constant = lambda v: torch.nn.functional.one_hot(torch.full((len(v),), 3), 10).float()  # noqa: E731
    torch.testing.assert_close(ScaleUp(6).score(x, constant), torch.ones(2))


def test_parse_and_build_refuse_bad_names():
    assert parse_methods("consistency, strip:32") == [("consistency", None), ("strip", 32)]
    for bad, msg in (("", "no detector"), ("nope", "unknown detector"), ("strip,strip", "twice"),
                     ("strip:x", "count")):
        with pytest.raises(ValueError, match=msg):
            parse_methods(bad)
    with pytest.raises(ValueError, match="needs a defense"):
        build_detector("consistency", defense="none")
    with pytest.raises(ValueError, match="overlay images"):
        build_detector("strip")
    with pytest.raises(ValueError, match="uint8"):
        Strip(torch.rand(2, 3, 8, 8))
