"""Encoded images (JPEG, PNG, WebP) -> uint8 tensors fitted to a model's input.

How a photo becomes the model's H x W is the server's *fit policy* (``bdserve serve --fit``),
decided here and nowhere else:

- ``cover`` (the default): scale so the image covers H x W with its aspect ratio kept, and
  crop the overhang equally from both sides. Nothing is stretched and no padding is invented
  (padding would look like ShrinkPad's border to the model).
- ``print``: find the printed picture in a camera frame (the largest convex quadrilateral that
  stands out from its surroundings, see bdserve.serve.printfit), warp its four corners onto
  the input frame (a non-square print is stretched, so a corner trigger stays in its corner),
  trim a white paper margin, and resize. A frame where no print is found is fitted by
  ``cover``, and the result says so.

The final resize is a setting too (``--resize``): ``area`` (box filter: an integer-upscaled
image comes back exact), ``bilinear`` (no antialiasing) or ``bilinear-aa`` (Pillow's
antialiased bilinear). Defaults: ``bilinear-aa`` for ``cover`` (what it always did), ``area``
for ``print``. An image that already has the model's size passes through untouched under
either policy.

Safety: the pixel count is checked from the header *before* any pixel is
decoded (decompression bombs: a tiny PNG that declares 50000 x 50000), only the
three formats above are tried, and truncated files are rejected rather than
half-decoded (Pillow's LOAD_TRUNCATED_IMAGES stays off).

On a GPU, JPEGs decode with nvjpeg (``torchvision.io.decode_jpeg(device="cuda")``)
and are fitted there with the cover rule and its antialiased bilinear filter, EXIF
orientation applied from the header read by Pillow; pixel values may differ from the CPU
path by a few levels. Anything the GPU path cannot do (another policy or filter, PNG,
WebP, a corrupt file) goes through Pillow, which also produces the error message.
"""

from __future__ import annotations

import io
import warnings

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from bdserve.serve.errors import InvalidInput
from bdserve.serve.fastdecode import decode_exact
from bdserve.serve.printfit import find_print, rectify

FORMATS = ("JPEG", "PNG", "WEBP")
DEFAULT_MAX_PIXELS = 50_000_000  # a 50-megapixel camera photo; larger needs --max-pixels
PRINT_DECODE_SIDE = 1024  # the print fit decodes a JPEG at a reduced scale, down to this side at least

# Never decode half a file: a truncated upload is an error, not a grey stripe.
ImageFile.LOAD_TRUNCATED_IMAGES = False


FIT_POLICIES = ("cover", "print")
RESIZE_FILTERS = ("area", "bilinear", "bilinear-aa")
DEFAULT_RESIZE = {"cover": "bilinear-aa", "print": "area"}


@dataclass(frozen=True)
class FitPolicy:
    """How the server fits a photo to the model's input: the policy and the final resize filter."""

    policy: str = "cover"
    resize: str | None = None  # None: the policy's default (DEFAULT_RESIZE)

    def __post_init__(self):
        if self.policy not in FIT_POLICIES:
            raise ValueError(f"unknown fit {self.policy!r}: choose one of {', '.join(FIT_POLICIES)}")
        if self.resize is not None and self.resize not in RESIZE_FILTERS:
            raise ValueError(f"unknown resize filter {self.resize!r}: choose one of {', '.join(RESIZE_FILTERS)}")

    @property
    def filter(self) -> str:
        return self.resize or DEFAULT_RESIZE[self.policy]

    @property
    def spec(self) -> str:
        """What metadata and responses report, e.g. ``print (area)``."""
        return f"{self.policy} ({self.filter})"


COVER = FitPolicy()


@dataclass
class Fitted:
    """One photo fitted to the model's input, and how."""

    image: np.ndarray  # uint8 (H, W, 3): what the model sees
    fit: str  # the policy applied: "cover" or "print"
    fallback: bool = False  # "print" was asked for, none was found, "cover" was applied
    # What the model's input was taken from: the print's picture (inside a trimmed paper margin) as
    # corners x, y (top-left, top-right, bottom-right, bottom-left) in the upright photo's pixels.
    outline: list[list[float]] | None = None
    frame: tuple[int, int] | None = None  # the upright photo's (width, height), the outline's frame


def describe_fits(policy: FitPolicy, how: list[Fitted]) -> str:
    """What a response says about the fit of its images: the policy applied, and which images
    fell back to cover because no print was found."""
    missed = [i for i, f in enumerate(how) if f.fallback]
    if not missed:
        return policy.spec
    if len(missed) == len(how):
        return f"cover ({policy.filter}; no print found)"
    return f"{policy.spec}; no print found in image{'s' if len(missed) > 1 else ''} {', '.join(map(str, missed))}: cover"


def resize(arr: np.ndarray, size: tuple[int, int], method: str) -> np.ndarray:
    """uint8 (h, w, 3) -> (H, W, 3) with one of RESIZE_FILTERS; the same size passes untouched."""
    h, w = size
    if arr.shape[:2] == (h, w):
        return arr
    if method == "area":
        return cv2.resize(arr, (w, h), interpolation=cv2.INTER_AREA)
    if method == "bilinear":
        return cv2.resize(arr, (w, h), interpolation=cv2.INTER_LINEAR)
    if method == "bilinear-aa":  # Pillow widens the bilinear kernel when shrinking (antialiasing)
        return np.array(Image.fromarray(arr).resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8)
    raise ValueError(f"unknown resize filter {method!r}")


def cover_box(ih: int, iw: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The centre of an (ih, iw) photo with the target's aspect ratio (like ImageOps.fit), as
    Pillow's box (left, top, right, bottom)."""
    h, w = size
    if iw * h > ih * w:
        cw = max(1, round(ih * w / h))
        return (iw - cw) // 2, 0, (iw - cw) // 2 + cw, ih
    ch = max(1, round(iw * h / w))
    return 0, (ih - ch) // 2, iw, (ih - ch) // 2 + ch


def cover(arr: np.ndarray, size: tuple[int, int], method: str = "bilinear-aa") -> np.ndarray:
    """Cover-fit: crop the centre to the target's aspect ratio, then resize."""
    left, top, right, bottom = cover_box(*arr.shape[:2], size)
    return resize(np.ascontiguousarray(arr[top:bottom, left:right]), size, method)


def cover_image(im: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """``cover(np.asarray(im), size, "bilinear-aa")`` done on the decoded image itself, so a large
    photo is never also held as an array (Pillow keeps 4 bytes a pixel, the array 3: 196 + 147 MB
    at 7000x7000, plus the conversion's own copy)."""
    h, w = size
    box = cover_box(im.height, im.width, size)
    if box != (0, 0, im.width, im.height):
        im = im.crop(box)
    if im.size != (w, h):
        im = im.resize((w, h), Image.Resampling.BILINEAR)
    return np.array(im, dtype=np.uint8)


def fit_array(arr: np.ndarray, size: tuple[int, int], policy: FitPolicy = COVER) -> Fitted:
    """An upright RGB photo (h, w, 3) uint8 -> the model's input, by ``policy``."""
    frame = (arr.shape[1], arr.shape[0])
    if policy.policy == "print" and arr.shape[:2] != tuple(size):
        found = find_print(arr)
        if found is not None:
            grid, taken = rectify(arr, found.corners, size)
            outline = [[round(float(x), 2), round(float(y), 2)] for x, y in taken]
            return Fitted(resize(grid, size, policy.filter), "print", outline=outline, frame=frame)
        return Fitted(cover(arr, size, policy.filter), "cover", fallback=True, frame=frame)
    return Fitted(cover(arr, size, policy.filter), "cover", frame=frame)


def open_upright(blob: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft: int | None = None) -> tuple[np.ndarray, int, tuple[int, int]]:
    """One encoded image -> upright uint8 RGB array (h, w, 3) (read-only), the reduction it was
    decoded at (1, 2, 4 or 8: one decoded pixel covers that many of the photo's each way) and the
    upright photo's own (width, height). Raises InvalidInput."""
    im, scale, frame = open_upright_image(blob, max_pixels, draft)
    # A view of the bytes Pillow hands over, not one more copy; the image's own buffer goes at once.
    arr = np.asarray(im)
    im.close()
    if arr.ndim != 3 or arr.shape[2] != 3:  # e.g. a mode Pillow converted oddly
        raise InvalidInput(f"could not convert the image to RGB (got array {arr.shape})")
    return arr, scale, frame


def open_upright_image(blob: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                       draft: int | None = None) -> tuple[Image.Image, int, tuple[int, int]]:
    """One encoded image -> the upright, decoded RGB Pillow image, the reduction it was decoded at
    and the upright photo's own (width, height). Raises InvalidInput.

    ``draft``: a JPEG may be decoded at a reduced scale (libjpeg's DCT scaling) as long as
    both sides stay at least this large."""
    if not isinstance(blob, (bytes, bytearray, memoryview)) or len(blob) == 0:
        raise InvalidInput("empty image: expected the bytes of a JPEG, PNG or WebP file")
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check only warns below 2x its global limit; ours is the limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(blob), formats=FORMATS)
            width, height = im.size
            if width * height > max_pixels:
                raise InvalidInput(
                    f"image of {width}x{height} = {width * height} pixels is over this server's limit of "
                    f"{max_pixels} pixels (decompression-bomb guard; see --max-pixels)"
                )
            check_plausible(im.format, width, height, len(blob))
            if im.format == "JPEG" and draft:
                im.draft("RGB", (draft, draft))
            im.load()
            scale = 2 ** round(np.log2(width / im.size[0]))  # libjpeg rounds a reduced side up
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # turned a quarter: the upright frame is transposed
                width, height = height, width
            # Camera photos store rotation as an EXIF tag. In place: the default returns a full
            # copy even when there is nothing to rotate (+150 MB for a 7000x7000 image).
            ImageOps.exif_transpose(im, in_place=True)
            if im.mode != "RGB":
                im = im.convert("RGB")
    except InvalidInput:
        raise
    except UnidentifiedImageError:
        raise InvalidInput(f"not an image: the {len(blob)} bytes are not a JPEG, PNG or WebP file") from None
    except Image.DecompressionBombError as e:
        raise InvalidInput(f"image over the pixel limit (decompression-bomb guard): {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Pillow reports truncated or corrupt data as OSError/SyntaxError, odd modes as ValueError.
        raise InvalidInput(f"corrupt or truncated image: {e}") from None
    return im, scale, (width, height)


def decode_fitted(blob: bytes, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS,
                  policy: FitPolicy = COVER) -> Fitted:
    """One encoded image -> Fitted (the model-sized image and how it was fitted). Raises InvalidInput."""
    m = max(size)
    # Cover needs little more than the model's size; finding a print needs the print's edges sharp.
    draft = m if policy.policy == "cover" else max(PRINT_DECODE_SIDE, 16 * m)
    if policy.policy == "cover" and policy.filter == "bilinear-aa":  # the default: Pillow's own filter
        im, scale, frame = open_upright_image(blob, max_pixels, draft)
        fitted = Fitted(cover_image(im, size), "cover", frame=frame)
    else:
        arr, scale, frame = open_upright(blob, max_pixels, draft)
        fitted = fit_array(arr, size, policy)
        if not fitted.image.flags.writeable:  # a photo already at the model's size is the decoded view itself
            fitted.image = fitted.image.copy()
    fitted.frame = frame
    if scale != 1:  # report the outline in the photo's own pixels, not the reduced decode's
        if fitted.outline is not None:
            fitted.outline = [[round((x + 0.5) * scale - 0.5, 2), round((y + 0.5) * scale - 0.5, 2)] for x, y in fitted.outline]
    return fitted


def decode_image(blob: bytes, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS,
                 policy: FitPolicy = COVER) -> np.ndarray:
    """One encoded image -> uint8 array (H, W, 3) of the given (H, W). Raises InvalidInput."""
    return decode_fitted(blob, size, max_pixels, policy).image


# A baseline or progressive Huffman JPEG spends at least a bit or two per 8x8 block even on a
# flat image (about one byte per 200 pixels); one byte per 1024 pixels is far below any real
# photo. A file under that is truncated or forged (a 631-byte file declaring 7000x7000),
# and libjpeg would "decode" it to flat grey rather than fail.
MIN_JPEG_BYTES_PER_PIXEL = 1 / 1024


def check_plausible(fmt: str | None, width: int, height: int, nbytes: int) -> None:
    if fmt == "JPEG" and nbytes < width * height * MIN_JPEG_BYTES_PER_PIXEL:
        raise InvalidInput(f"implausible JPEG: {nbytes} bytes cannot hold {width}x{height} pixels "
                           "(a truncated or forged file)")


def decode_images(blobs: list[bytes], size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS,
                  device: torch.device | None = None, policy: FitPolicy = COVER) -> torch.Tensor:
    """Encoded images -> uint8 tensor (B, 3, H, W). An error names the failing element."""
    return decode_batch(blobs, size, max_pixels, device, policy)[0]


def decode_batch(blobs: list[bytes], size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS,
                 device: torch.device | None = None, policy: FitPolicy = COVER) -> tuple[torch.Tensor, list[Fitted]]:
    """Encoded images -> uint8 tensor (B, 3, H, W) and how each was fitted (``Fitted.image`` left
    empty: the tensor holds the pixels). An error names the failing element.

    With ``device`` and the cover policy with its default filter, JPEGs decode through
    torchvision onto that device (nvjpeg on CUDA) and the batch is returned there; otherwise
    everything goes through Pillow (and OpenCV) on the CPU.
    """
    if len(blobs) == 0:
        raise InvalidInput("no images in the request")
    gpu = device is not None and policy.policy == "cover" and policy.filter == "bilinear-aa"
    out, how = [], []
    for i, blob in enumerate(blobs):
        try:
            # nvjpeg on the GPU (cover only); an image already at the input size, which every fit
            # passes untouched, skips Pillow (serve/fastdecode.py, same pixels).
            t = decode_image_tensor(blob, size, max_pixels, device) if gpu else None
            if t is not None:
                how.append(Fitted(np.empty((0, 0, 3), np.uint8), "cover"))
            elif (t := decode_exact(blob, size)) is not None:
                how.append(Fitted(np.empty((0, 0, 3), np.uint8), "cover", frame=(size[1], size[0])))
                if device is not None:
                    t = t.to(device)
            else:
                f = decode_fitted(blob, size, max_pixels, policy)
                t = torch.from_numpy(f.image).permute(2, 0, 1)
                if device is not None:
                    t = t.to(device)
                f.image = np.empty((0, 0, 3), np.uint8)
                how.append(f)
            out.append(t)
        except InvalidInput as e:
            raise type(e)(f"image {i}: {e}" if len(blobs) > 1 else str(e)) from None
    return torch.stack(out).contiguous(), how


# EXIF orientation -> the same transposition Pillow's exif_transpose applies, on (C, H, W).
_ORIENT = {
    2: lambda t: t.flip(-1),
    3: lambda t: t.flip(-1).flip(-2),
    4: lambda t: t.flip(-2),
    5: lambda t: t.transpose(-1, -2),
    6: lambda t: torch.rot90(t, -1, (-2, -1)),
    7: lambda t: t.transpose(-1, -2).flip(-1).flip(-2),
    8: lambda t: torch.rot90(t, 1, (-2, -1)),
}


def fit_tensor(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (C, h, w) -> uint8 (C, H, W): cover-fit (bilinear, antialiased) then center-crop."""
    h, w = size
    ih, iw = t.shape[-2:]
    if (ih, iw) == (h, w):
        return t
    # Like ImageOps.fit: crop the source to the target's aspect ratio (centered), then resize.
    if iw * h > ih * w:
        cw = max(1, round(ih * w / h))
        t = t[..., :, (iw - cw) // 2:(iw - cw) // 2 + cw]
    else:
        ch = max(1, round(iw * h / w))
        t = t[..., (ih - ch) // 2:(ih - ch) // 2 + ch, :]
    x = torch.nn.functional.interpolate(t[None].float(), size=(h, w), mode="bilinear",
                                        antialias=True, align_corners=False)[0]
    return x.round_().clamp_(0, 255).to(torch.uint8)


def decode_image_tensor(blob: bytes, size: tuple[int, int], max_pixels: int,
                        device: torch.device) -> torch.Tensor | None:
    """A JPEG decoded by torchvision on ``device`` and fitted there; None when this path does
    not apply or fails (the caller then uses Pillow, which also words the error)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's bomb warning; torchvision's deprecation notice
            im = Image.open(io.BytesIO(blob), formats=FORMATS)  # the header only: size, format, EXIF
            width, height = im.size
            if im.format != "JPEG" or width * height > max_pixels or len(blob) < width * height * MIN_JPEG_BYTES_PER_PIXEL:
                return None  # the Pillow path words the refusal
            orientation = im.getexif().get(0x0112, 1)
            from torchvision.io import ImageReadMode, decode_jpeg

            data = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
            t = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except Exception:  # noqa: BLE001 - any failure: the Pillow path decides
        return None
    t = _ORIENT.get(orientation, lambda t: t)(t)
    return fit_tensor(t, size)
