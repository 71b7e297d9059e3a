"""Tiny fake datasets in the real on-disk layouts, for the data tests (no network).

Images are 8x8 PNG bytes encoded once per colour and copied, so a 1000-folder ImageNet costs
milliseconds. The colour of an image encodes its class (``class_color(label)``) so a test can
check that the decoded pixels belong to the label it was given.
"""

from __future__ import annotations

import io
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional, Sequence

from PIL import Image

from vlm_tta.data.resources import classnames_file, imagenet_wnids


def class_color(label: int) -> tuple[int, int, int]:
    return ((label * 37) % 256, (label * 91 + 11) % 256, (label * 53 + 101) % 256)


@lru_cache(maxsize=None)
def png_bytes(color: tuple[int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def write_image(path: Path, label: int = 0) -> Path:
    """Write an 8x8 image of ``class_color(label)`` (PNG bytes, whatever the extension says)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(class_color(label)))
    return path


def write_corrupt(path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return path


# -- ImageNet family ----------------------------------------------------------------------------


def make_wnid_folders(
    base: Path, wnids: Sequence[str], labels: Optional[Sequence[int]] = None, per_class: int = 1, ext: str = ".JPEG"
) -> Path:
    """``base/<wnid>/<wnid>_<k><ext>``; the image colour is ``class_color(labels[i])``."""
    labels = list(labels) if labels is not None else list(range(len(wnids)))
    for w, y in zip(wnids, labels):
        for k in range(per_class):
            write_image(base / w / f"{w}_{k}{ext}", y)
    return base


def make_imagenet_val(base: Path, per_class: int = 1) -> Path:
    return make_wnid_folders(base, imagenet_wnids(), per_class=per_class)


def make_imagenet_subset(base: Path, stem: str, per_class: int = 1) -> Path:
    """ImageNet-A (stem 'imagenet_a') or -R layout; colours encode the 1k index."""
    all_w = imagenet_wnids()
    index = {w: i for i, w in enumerate(all_w)}
    wnids = classnames_file(f"{stem}_wnids")
    return make_wnid_folders(base, wnids, [index[w] for w in wnids], per_class=per_class, ext=".jpg")


def make_v2_numeric(base: Path, per_class: int = 1) -> Path:
    for c in range(1000):
        for k in range(per_class):
            write_image(base / str(c) / f"{k:04x}.jpeg", c)
    return base


# -- CoOp layouts -------------------------------------------------------------------------------

COOP = {
    # name: (folder, image_subdir, split file)
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "flowers102": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": ("food-101", "images", "split_zhou_Food101.json"),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}


def coop_entries(name: str, labels: Iterable[int], per_class: int = 2, split: str = "test") -> list:
    """``[relpath, label, classname]`` entries in CoOp's style (classname with underscores)."""
    names = classnames_file(name)
    out = []
    for y in labels:
        cname = names[y].replace(" ", "_")
        for k in range(per_class):
            folder = f"{split}_{y:03d}_{cname.replace('/', '-')}"
            out.append([f"{folder}/img_{k}.jpg", y, cname])
    return out


def make_coop(
    root: Path,
    name: str,
    labels: Optional[Sequence[int]] = None,
    per_class: int = 2,
    splits: Sequence[str] = ("train", "val", "test"),
) -> Path:
    """A CoOp dataset folder ``root/<folder>/`` with images and its split JSON; returns the folder."""
    folder, subdir, split_file = COOP[name]
    base = Path(root) / folder
    img_dir = base / subdir if subdir else base
    n = len(classnames_file(name))
    labels = list(labels) if labels is not None else [0, 1, n - 1]
    data = {}
    for s in ("train", "val", "test"):
        entries = coop_entries(name, labels, per_class, s) if s in splits else []
        for rel, y, _ in entries:
            write_image(img_dir / rel, y)
        data[s] = entries
    base.mkdir(parents=True, exist_ok=True)
    (base / split_file).write_text(json.dumps(data), encoding="utf-8")
    return base


def make_aircraft(root: Path, labels: Sequence[int] = (0, 5, 99), per_class: int = 2) -> Path:
    """``root/fgvc_aircraft/`` with variants.txt, images_variant_{split}.txt and images/."""
    base = Path(root) / "fgvc_aircraft"
    variants = classnames_file("fgvc_aircraft")
    base.mkdir(parents=True, exist_ok=True)
    (base / "variants.txt").write_text("\n".join(variants) + "\n", encoding="utf-8")
    for s, offset in (("train", 1000000), ("val", 2000000), ("test", 3000000), ("trainval", 4000000)):
        lines = []
        for y in labels:
            for k in range(per_class):
                image_id = f"{offset + 100 * y + k:07d}"
                write_image(base / "images" / f"{image_id}.jpg", y)
                lines.append(f"{image_id} {variants[y]}")
        (base / f"images_variant_{s}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return base


# -- OOD sets -----------------------------------------------------------------------------------


def make_flat_images(base: Path, n: int, start: int = 0, ext: str = ".jpg") -> Path:
    for i in range(n):
        write_image(base / f"img_{start + i:05d}{ext}", 500 + i)
    return base


def make_textures(root: Path, classes: Sequence[str] = ("banded", "zigzagged"), per_class: int = 2) -> Path:
    base = Path(root) / "dtd" / "images"
    for c in classes:
        for k in range(per_class):
            write_image(base / c / f"{c}_{k:04d}.jpg", 600 + k)
    return Path(root) / "dtd"


def symlink_or_skip(target: Path, link: Path) -> None:
    import pytest

    try:
        os.symlink(target, link)
    except (OSError, NotImplementedError):  # pragma: no cover - platforms without symlinks
        pytest.skip("symlinks not supported here")
