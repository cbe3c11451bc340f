import torch

from bdserve.transforms.triggers import Trigger, badnets, blended, builtin_trigger, four_corner, list_triggers


def test_stamp_is_eq1_exact_for_a_given_alpha():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g)
    pattern = torch.rand(3, 5, 4, generator=g)
    alpha = torch.rand(3, 5, 4, generator=g)
    trig = Trigger(pattern, alpha, top=7, left=-6)
    out = trig.stamp(x)
    top, left = 7, 32 - 6
    region = out[:, :, top : top + 5, left : left + 4]
    expected = (1 - alpha) * x[:, :, top : top + 5, left : left + 4] + alpha * pattern
    torch.testing.assert_close(region, expected, rtol=0, atol=1e-7)
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[top : top + 5, left : left + 4] = False
    assert torch.equal(out[:, :, outside], x[:, :, outside])


def test_badnets_is_pixel_exact_in_bottom_right_corner():
    x = torch.full((2, 3, 32, 32), 0.5)
    out = badnets(255).stamp(x)
    corner = out[:, :, -3:, -3:]
    assert set(corner.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(out[:, :, :29], x[:, :, :29])
    assert torch.allclose(badnets(128).stamp(x)[:, :, -3:, -3:].max(), torch.tensor(128 / 255))


def test_blended_uses_alpha_point_two():
    x = torch.zeros(1, 3, 32, 32)
    out = blended().stamp(x)
    assert torch.allclose(out[0, :, -1, -1], torch.full((3,), 0.2))


def test_four_corner_trigger_is_symmetric_under_flip():
    trig = four_corner(0.25)
    x = torch.rand(3, 3, 32, 32)
    stamped = trig.stamp(x)
    flipped_then_stamped = trig.stamp(x.flip(-1))
    torch.testing.assert_close(stamped.flip(-1), flipped_then_stamped)
    assert trig.alpha.max() == 0.25


def test_moved_and_with_value_for_the_section3_studies():
    trig = badnets(255)
    moved = trig.moved(0, 0)
    out = moved.stamp(torch.full((1, 3, 32, 32), 0.5))
    assert out[0, 0, 0, 0] == 1.0 and out[0, 0, -1, -1] == 0.5
    grey = trig.with_value(100 / 255)
    assert torch.allclose(grey.pattern.max(), torch.tensor(100 / 255))
    assert torch.equal(grey.pattern == 0, trig.pattern == 0)


def test_trigger_round_trips_through_card_dict_and_png(tmp_path):
    trig = blended()
    back = Trigger.from_dict(trig.to_dict())
    torch.testing.assert_close(back.pattern, trig.pattern)
    torch.testing.assert_close(back.alpha, trig.alpha)
    png = tmp_path / "t.png"
    png.write_bytes(badnets().to_png_bytes())
    user = Trigger.from_png(png, top=2, left=3)
    assert user.position(32, 32) == (2, 3)
    torch.testing.assert_close(user.pattern, badnets().pattern)


def test_trigger_that_does_not_fit_is_a_clear_error():
    import pytest

    with pytest.raises(ValueError, match="does not fit"):
        badnets().moved(31, 0).stamp(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="unknown trigger"):
        builtin_trigger("nope")
    assert "badnets" in list_triggers()
