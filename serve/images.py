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
            arr = np.asarray(im, dtype=np.uint8)
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


def decode_images(blobs: list[bytes], size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Encoded images -> uint8 tensor (B, 3, H, W). An error names the failing element."""
    if len(blobs) == 0:
        raise InvalidInput("no images in the request")
    out = []
    for i, blob in enumerate(blobs):
        try:
            out.append(decode_image(blob, size, max_pixels))
        except InvalidInput as e:
            raise type(e)(f"image {i}: {e}" if len(blobs) > 1 else str(e)) from None
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()
