"""Image decoding with errors that name the file (no torch import: used by the check CLI)."""

from __future__ import annotations

from PIL import Image

from src.data.records import ImageReadError


def read_image(path: str) -> Image.Image:
    """Open and fully decode an image as RGB.

    Raises:
        ImageReadError: naming `path` when the file is missing, truncated or not an image.
    """
    try:
        with Image.open(path) as img:
            img.load()  # decode now: truncated files fail here, not later in a transform
            return img.convert("RGB")
    except FileNotFoundError as e:
        raise ImageReadError(f"{path}: image file not found") from e
    except (OSError, ValueError, SyntaxError) as e:  # what PIL raises for corrupt data
        raise ImageReadError(f"{path}: cannot decode image ({e})") from e
