"""Reading user photos safely, and the 512x512 resize DECA's TestData applies (spec 6.1 step 1)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

MAX_PIXELS = 4096 * 4096
MAX_BYTES = 40 << 20


class PhotoError(ValueError):
    """A photo that cannot be used: missing, unreadable, truncated, too large, of an unusable kind."""


# Pillow modes of 16-bit (and wider) integer grey: their values span 0..65535, not 0..255.
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def open_photo(source, what: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open a photo (a path or a binary file object) reading its HEADER only: format and size, checked
    against `max_pixels` before any pixel is decoded. Raises PhotoError naming `what`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source)  # reads the header only
    except UnidentifiedImageError:
        raise PhotoError(f"{what} is not a readable image (unknown or corrupt format; use PNG/JPEG/WebP)") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise PhotoError(f"{what} is not a readable image ({type(e).__name__}: {e})") from None
    w, h = img.size
    if w * h > max_pixels or w < 1 or h < 1:
        raise PhotoError(f"{what} is {w}x{h} pixels, over the {max_pixels} pixel limit "
                         f"(e.g. {int(max_pixels ** 0.5)}x{int(max_pixels ** 0.5)})")
    return img


def as_upright_rgb8(img: Image.Image, what: str) -> Image.Image:
    """A decoded photo as the camera's viewer shows it, in 8-bit RGB: EXIF orientation applied (phones
    store portraits sideways with an orientation tag), 16-bit grey scaled to 8 bits (Pillow's own
    conversion clips it, which turns most photos white), alpha dropped, palettes and CMYK converted.
    Float and other modes without a clear 8-bit meaning are refused."""
    img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        return img
    if img.mode in _WIDE_GREY:
        grey = np.asarray(img).astype(np.int64)
        grey = (np.clip(grey, 0, 65535) * 255 + 32767) // 65535  # 0..65535 -> 0..255, rounded
        return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
    if img.mode in ("1", "L", "LA", "La", "P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGBA").convert("RGB") if img.mode in ("P", "PA") else img.convert("RGB")
    raise PhotoError(f"{what} has pixel mode {img.mode!r}, which has no 8-bit RGB reading; "
                     "send an 8- or 16-bit RGB or greyscale PNG/JPEG/WebP")


def decode_photo_source(source, what: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The one photo decoder (files: `load_photo`; request bytes: the server's `decode_photo`):
    header checked first (`open_photo`), then decoded and made upright 8-bit RGB (`as_upright_rgb8`)."""
    img = open_photo(source, what, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()  # decodes; a truncated file raises here
            return as_upright_rgb8(img, what)
    except PhotoError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise PhotoError(f"{what} is not a readable image ({type(e).__name__}: {e})") from None


def load_photo(path: str | Path, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES) -> Image.Image:
    """Open a photo file as upright 8-bit RGB, checking file size and pixel count BEFORE decoding the pixels.

    Alpha is dropped and grey is expanded to RGB (as DECA's TestData does; facenet-pytorch and
    BiSeNet need 3 channels too). Raises PhotoError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise PhotoError(f"photo not found: {path}")
    nbytes = path.stat().st_size
    if nbytes > max_bytes:
        raise PhotoError(f"photo {path} is {nbytes / 2**20:.1f} MB, over the {max_bytes / 2**20:.0f} MB limit")
    with open(path, "rb") as f:
        return decode_photo_source(f, f"photo {path}", max_pixels)


def resize_like_deca(image: np.ndarray, size: int = 512) -> np.ndarray:
    """``(skimage.transform.resize(im, (size, size), anti_aliasing=True) * 255).astype(uint8)``.

    skimage >= 0.19 semantics: image as float in [0, 1]; Gaussian pre-filter with
    sigma = max(0, (in/out - 1) / 2) per axis (mode 'mirror'); then ``ndimage.zoom`` order 1,
    grid_mode=True, mode 'mirror'; clipped to the input range; *255 truncated to uint8.
    The aspect ratio is not kept (non-square photos are squashed, as the official code does).
    An 8-bit photo already at size x size comes back unchanged (a copy): no filter, no zoom, and
    ``uint8(k / 255 * 255) == k`` for every k, so the float round trip is the identity.
    """
    if image.dtype == np.uint8 and image.shape[:2] == (size, size):
        return image.copy()
    img = image.astype(np.float64) / 255.0
    h, w = img.shape[:2]
    factors = np.array([h / size, w / size, 1.0])
    sigma = np.maximum(0.0, (factors - 1) / 2)
    if np.any(sigma > 0):
        img = ndimage.gaussian_filter(img, sigma, mode="mirror")
    if (h, w) != (size, size):
        img = ndimage.zoom(img, (size / h, size / w, 1.0), order=1, mode="mirror", grid_mode=True)
    img = np.clip(img, image.min() / 255.0, image.max() / 255.0)
    return (img * 255.0).astype(np.uint8)
