"""Reading user photos safely, and the 512x512 resize DECA's TestData applies (spec 6.1 step 1)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

MAX_PIXELS = 4096 * 4096
MAX_BYTES = 40 << 20


class PhotoError(ValueError):
    """A photo that cannot be used: missing, unreadable, truncated, too large."""


def load_photo(path: str | Path, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES) -> Image.Image:
    """Open a photo as RGB, checking file size and pixel count BEFORE decoding the pixels.

    Alpha is dropped and grey is expanded to RGB (as DECA's TestData does; facenet-pytorch and
    BiSeNet need 3 channels too). Raises PhotoError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise PhotoError(f"photo not found: {path}")
    nbytes = path.stat().st_size
    if nbytes > max_bytes:
        raise PhotoError(f"photo {path} is {nbytes / 2**20:.1f} MB, over the {max_bytes / 2**20:.0f} MB limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)  # reads the header only
            w, h = img.size
            if w * h > max_pixels or w < 1 or h < 1:
                raise PhotoError(f"photo {path} is {w}x{h} pixels, over the {max_pixels} pixel limit "
                                 f"(e.g. {int(max_pixels ** 0.5)}x{int(max_pixels ** 0.5)})")
            img.load()  # decodes; a truncated file raises here
    except PhotoError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise PhotoError(f"cannot read photo {path}: {e}") from None
    return img if img.mode == "RGB" else img.convert("RGB")


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
