"""Encoded images (JPEG, PNG, WebP) -> uint8 tensors fitted to a model's input.

Fit: *cover, then center-crop*. The image is scaled (bilinear, antialiased by
Pillow) so that it covers the model's H x W with the aspect ratio kept, i.e. the
shorter side (relative to the target's aspect) lands exactly on the target, and
the overhang is cropped equally from both sides (``PIL.ImageOps.fit``). Nothing
is stretched and no padding is invented - padding would look like ShrinkPad's
border to the model. An image that already has the model's size passes through
untouched.

Safety: the pixel count is checked from the header *before* any pixel is
decoded (decompression bombs: a tiny PNG that declares 50000 x 50000), only the
three formats above are tried, and truncated files are rejected rather than
half-decoded (Pillow's LOAD_TRUNCATED_IMAGES stays off).

On a GPU, JPEGs decode with nvjpeg (``torchvision.io.decode_jpeg(device="cuda")``)
and are fitted there with the same cover/center-crop rule (bilinear,
antialiased ``interpolate``), EXIF orientation applied from the header read by
Pillow; pixel values may differ from the CPU path by a few levels. Anything the
GPU path cannot do (PNG, WebP, a corrupt file) goes through Pillow, which also
produces the error message.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from bdserve.serve.errors import InvalidInput

FORMATS = ("JPEG", "PNG", "WEBP")
DEFAULT_MAX_PIXELS = 50_000_000  # a 50-megapixel camera photo; larger needs --max-pixels

# Never decode half a file: a truncated upload is an error, not a grey stripe.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def decode_image(blob: bytes, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """One encoded image -> uint8 array (H, W, 3) of the given (H, W). Raises InvalidInput."""
    if not isinstance(blob, (bytes, bytearray, memoryview)) or len(blob) == 0:
        raise InvalidInput("empty image: expected the bytes of a JPEG, PNG or WebP file")
    h, w = size
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
            if im.format == "JPEG":
                # Let libjpeg decode at a reduced scale (DCT scaling) when the photo is far
                # larger than the model input: same cover-fit, a fraction of the work and memory.
                m = max(h, w)
                im.draft("RGB", (m, m))
            im.load()
            im = ImageOps.exif_transpose(im)  # camera photos store rotation as an EXIF tag
            if im.mode != "RGB":
                im = im.convert("RGB")
            if im.size != (w, h):
                im = ImageOps.fit(im, (w, h), method=Image.Resampling.BILINEAR, centering=(0.5, 0.5))
            arr = np.array(im, dtype=np.uint8)  # a writable copy (torch.from_numpy wants one)
    except InvalidInput:
        raise
    except UnidentifiedImageError:
        raise InvalidInput(f"not an image: the {len(blob)} bytes are not a JPEG, PNG or WebP file") from None
    except Image.DecompressionBombError as e:
        raise InvalidInput(f"image over the pixel limit (decompression-bomb guard): {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Pillow reports truncated or corrupt data as OSError/SyntaxError, odd modes as ValueError.
        raise InvalidInput(f"corrupt or truncated image: {e}") from None
    if arr.shape != (h, w, 3):  # e.g. a mode Pillow converted oddly
        raise InvalidInput(f"could not convert the image to RGB {h}x{w} (got array {arr.shape})")
    return arr


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
                  device: torch.device | None = None) -> torch.Tensor:
    """Encoded images -> uint8 tensor (B, 3, H, W). An error names the failing element.

    With ``device``, JPEGs decode through torchvision onto that device (nvjpeg on CUDA)
    and the batch is returned there; otherwise everything goes through Pillow on the CPU.
    """
    if len(blobs) == 0:
        raise InvalidInput("no images in the request")
    out = []
    for i, blob in enumerate(blobs):
        try:
            t = decode_image_tensor(blob, size, max_pixels, device) if device is not None else None
            if t is None:
                t = torch.from_numpy(decode_image(blob, size, max_pixels)).permute(2, 0, 1)
                if device is not None:
                    t = t.to(device)
            out.append(t)
        except InvalidInput as e:
            raise type(e)(f"image {i}: {e}" if len(blobs) > 1 else str(e)) from None
    return torch.stack(out).contiguous()


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
