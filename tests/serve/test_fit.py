"""Fit policies: ``print`` finds a synthetic print at its known corners; ``area`` keeps a checker exact;
a frame without a print falls back to ``cover`` and says so."""

from __future__ import annotations

import io
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from bdserve.serve.images import FitPolicy, cover, cover_image, decode_fitted, decode_image, fit_array
from bdserve.serve.printfit import find_print
from bdserve.testing.print_scenes import picture, scene, textured

PRINT = FitPolicy("print")


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("background", ["plain", "textured"])
@pytest.mark.parametrize("margin", [0.0, 0.06])
@pytest.mark.parametrize("angle, tilt", [(-15, 0.0), (0, 0.05), (9, 0.07), (15, 0.04)])
def test_print_found_at_known_corners(background, margin, angle, tilt):
    rng = np.random.default_rng(zlib.crc32(repr((background, margin, angle, tilt)).encode()))
    pic = picture(rng)
    frame, corners, inner = scene(rng, pic, angle=angle, tilt=tilt, margin=margin, background=background)
    found = find_print(frame)
    assert found is not None
    assert np.abs(found.corners - corners).max() < 1.0  # frame pixels
    fitted = fit_array(frame, (32, 32), PRINT)
    assert fitted.fit == "print" and not fitted.fallback
    # The outline is what the model's input came from: the picture, inside the paper's margin.
    side = np.hypot(*(inner[1] - inner[0]))
    assert np.abs(np.array(fitted.outline) - inner).max() < 0.25 * side / 32  # within a quarter of a model pixel
    # After rectification (and the margin trimmed) the model sees the picture, its trigger in the corner.
    diff = np.abs(fitted.image.astype(int) - pic.astype(int))
    assert diff.mean() < 4
    checker = fitted.image[-3:, -3:].astype(int).mean(2)
    white = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]], bool)
    assert checker[white].min() > 170 and checker[~white].max() < 85


@pytest.mark.parametrize("margin", [0.0, 0.06])
def test_white_sky_is_picture_not_margin(margin):
    """A picture whose top rows are as white as paper: without a margin nothing is trimmed; with
    one, the margin is found on the other sides and the top takes the bottom's depth."""
    rng = np.random.default_rng(8)
    pic = picture(rng)
    pic[:7] = 238  # the paper's white
    frame, _, inner = scene(rng, pic, angle=6, tilt=0.03, margin=margin, background="textured")
    fitted = fit_array(frame, (32, 32), PRINT)
    side = np.hypot(*(inner[1] - inner[0]))
    assert fitted.fit == "print" and np.abs(np.array(fitted.outline) - inner).max() < 0.5 * side / 32
    assert np.abs(fitted.image.astype(int) - pic.astype(int)).mean() < 4


@pytest.mark.parametrize("seed", range(3))
def test_a_pictures_own_pale_border_is_not_taken_for_a_margin(seed):
    """A borderless print whose outermost pixels are pale and even but of different hues on different
    sides (a beige top, pink elsewhere: a CIFAR photo's vignette) is the picture, not paper: nothing is
    trimmed. One sheet of paper has one hue on all four sides."""
    rng = np.random.default_rng(40 + seed)
    pic = picture(rng)
    pic[:, :1] = pic[:, -1:] = pic[-1:] = (197, 161, 161)  # pale pink, one model pixel wide
    pic[:1] = (190, 166, 120)  # pale beige top
    frame, _, inner = scene(rng, pic, angle=int(rng.integers(-8, 9)), tilt=0.02, background="textured")
    fitted = fit_array(frame, (32, 32), PRINT)
    side = np.hypot(*(inner[1] - inner[0]))
    assert fitted.fit == "print" and np.abs(np.array(fitted.outline) - inner).max() < 0.5 * side / 32


@pytest.mark.parametrize("angle", [0, pytest.param(7, marks=pytest.mark.xfail(
    strict=True, reason="known limit: turned 7 degrees, the corner cut off is still chosen over the sides extended"))])
def test_a_corner_of_the_picture_the_tables_colour_is_still_found(angle):
    """A borderless print whose top-left corner is the table's colour (a sky against a table of the
    same shade) segments with that corner cut off; its four sides, extended, still meet where the print's
    corner is."""
    rng = np.random.default_rng(60 + angle)
    pic = picture(rng)
    tri = np.add.outer(np.arange(32), np.arange(32)) < 7  # a triangle of 7 pixels along each edge
    pic[tri] = (96, 110, 124)  # the plain table's colour (bdserve.testing.print_scenes)
    frame, corners, _ = scene(rng, pic, angle=angle, tilt=0.02, background="plain")
    found = find_print(frame)
    assert found is not None and np.abs(found.corners - corners).max() < 1.0


def test_non_square_print_is_stretched_not_cropped():
    rng = np.random.default_rng(3)
    pic = picture(rng)
    wide = cv2.resize(pic, (64, 32), interpolation=cv2.INTER_NEAREST)  # a 2:1 print of the same picture
    frame, corners, _ = scene(rng, wide, side=220, angle=5, background="textured")
    fitted = fit_array(frame, (32, 32), PRINT)
    assert fitted.fit == "print"
    assert np.abs(np.array(fitted.outline) - corners).max() < 1.0
    checker = fitted.image[-3:, -3:].astype(int).mean(2)
    assert checker[0, 0] > 170 and checker[1, 1] > 170 and checker[0, 1] < 85  # the corner trigger kept its corner


def test_scene_corners_mean_what_they_say():
    """The helper's ground truth: a plain print's left edge lies where the frame changes half-way."""
    rng = np.random.default_rng(0)
    pic = np.full((32, 32, 3), 250, np.uint8)
    frame, corners, _ = scene(rng, pic, side=200, angle=0, tilt=0, blur=0, noise=0)
    row = frame[int(corners[:, 1].mean())].astype(float).mean(1)
    x = int(np.floor(corners[0, 0]))
    level = (row[x - 3] + row[x + 3]) / 2
    crossing = x - 1 + (level - row[x - 1]) / (row[x] - row[x - 1]) if row[x] > level else x + (level - row[x]) / (row[x + 1] - row[x])
    assert abs(crossing - 0.5 - corners[0, 0]) < 0.35 or abs(crossing - corners[0, 0]) < 0.6


def test_outline_in_the_photos_own_pixels_after_a_reduced_decode():
    rng = np.random.default_rng(5)
    pic = picture(rng)
    frame, corners, _ = scene(rng, pic, width=2560, height=1920, side=1200, angle=7, blur=1.5)
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, "JPEG", quality=92)
    fitted = decode_fitted(buf.getvalue(), (32, 32), policy=PRINT)  # decoded at half scale (draft)
    assert fitted.fit == "print" and fitted.frame == (2560, 1920)
    assert np.abs(np.array(fitted.outline) - corners).max() < 2.5  # a pixel of the half-scale decode


def test_outline_in_the_upright_photo_when_exif_turns_it():
    """A phone stores a portrait shot sideways with an EXIF orientation: the frame and the outline
    are the upright photo's, the way a browser shows it."""
    rng = np.random.default_rng(6)
    frame, corners, _ = scene(rng, picture(rng), angle=-6, tilt=0.03)
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to show": stored turned a quarter anticlockwise
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.rot90(frame))).save(buf, "JPEG", quality=92, exif=exif)
    fitted = decode_fitted(buf.getvalue(), (32, 32), policy=PRINT)
    assert fitted.fit == "print" and fitted.frame == (640, 480)
    assert np.abs(np.array(fitted.outline) - corners).max() < 1.5


def test_integer_upscaled_checker_is_exact_through_area():
    checker = ((np.indices((32, 32)).sum(0) % 2) * 255).astype(np.uint8)
    checker = np.repeat(checker[..., None], 3, 2)
    big = cv2.resize(checker, (32 * 7, 32 * 7), interpolation=cv2.INTER_NEAREST)
    assert np.array_equal(decode_image(png(big), (32, 32), policy=FitPolicy("cover", "area")), checker)
    # The antialiased bilinear filter smears it into greys: what the area filter is for.
    smeared = decode_image(png(big), (32, 32), policy=FitPolicy("cover", "bilinear-aa")).astype(int)
    assert np.abs(smeared - checker).max() > 40


@pytest.mark.parametrize("kind", ["texture", "uniform", "noise"])
def test_frame_without_print_falls_back_to_cover(kind):
    rng = np.random.default_rng(1)
    frame = {"texture": lambda: textured(rng, 480, 640),
             "uniform": lambda: np.full((480, 640, 3), 128, np.uint8),
             "noise": lambda: rng.integers(0, 256, (480, 640, 3)).astype(np.uint8)}[kind]()
    fitted = decode_fitted(png(frame), (32, 32), policy=PRINT)
    assert fitted.fit == "cover" and fitted.fallback and fitted.outline is None
    assert np.array_equal(fitted.image, decode_image(png(frame), (32, 32), policy=FitPolicy("cover", "area")))


def test_policy_settings_are_checked():
    assert FitPolicy().spec == "cover (bilinear-aa)" and PRINT.spec == "print (area)"
    assert FitPolicy("print", "bilinear").filter == "bilinear"
    with pytest.raises(ValueError, match="unknown fit"):
        FitPolicy("crop")
    with pytest.raises(ValueError, match="unknown resize"):
        FitPolicy("cover", "lanczos")


def test_model_sized_image_passes_untouched_under_print():
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    fitted = decode_fitted(png(arr), (32, 32), policy=PRINT)
    assert np.array_equal(fitted.image, arr) and fitted.fit == "cover"


def test_default_cover_on_the_decoded_image_is_the_array_cover():
    """The default fit runs on Pillow's image (a large photo is never also held as an array): the
    pixels must be exactly those of the array fit, for every aspect ratio and size."""
    rng = np.random.default_rng(7)
    shapes = [(int(a), int(b)) for a, b in rng.integers(1, 300, (60, 2))] + [(32, 32), (64, 64), (31, 33), (1, 400), (400, 1)]
    for ih, iw in shapes:
        arr = rng.integers(0, 256, (ih, iw, 3), dtype=np.uint8)
        for size in [(32, 32), (24, 40), (5, 3)]:
            got = cover_image(Image.fromarray(arr), size)
            assert got.flags.writeable and np.array_equal(got, cover(arr, size, "bilinear-aa")), (ih, iw, size)
        assert np.array_equal(decode_image(png(arr), (32, 32)), cover(arr, (32, 32)))
