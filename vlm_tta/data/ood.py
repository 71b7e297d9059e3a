"""Out-of-distribution sets for ImageNet-1k zero-shot OOD detection and noisy TTA.

The iNaturalist, SUN and Places subsets are the ones of Huang & Li (MOS, CVPR 2021), with the
concepts that overlap ImageNet-1k removed (10,000 images each), as used by MCM and ZS-NTTA;
Textures is the whole DTD (5,640 images). Every sample has label -1 (``NOISY_LABEL``) and the
dataset has no class names.
"""

from __future__ import annotations

from pathlib import Path

from .base import is_image_file
from .folders import scan_image_tree
from .registry import Reader, Scan, register_dataset


class _OODReader(Reader):
    kind = "ood"
    splits = ("test",)
    num_classes = None
    classnames_stem = None
    templates: dict = {}

    def looks_like(self, cand: Path, split: str) -> bool:
        if (cand / "images").is_dir():
            return True
        try:
            return any(is_image_file(e.name) for e in cand.iterdir())
        except OSError:
            return False

    def scan(self, base: Path, split: str, **kwargs) -> Scan:
        if kwargs:
            raise TypeError(f"{self.name}: unexpected options {sorted(kwargs)}")
        image_root = base / "images" if (base / "images").is_dir() else base
        images, others = scan_image_tree(image_root)
        scan = Scan(base=base, image_root=image_root)
        scan.samples = [(p, -1) for p in images]
        scan.classnames = []
        scan.unexpected = others
        if others:
            scan.notes.append(f"{len(others)} non-image file(s) under {image_root} were skipped")
        if not images:
            scan.problems.append(f"no images found under {image_root}")
        scan.meta = {"ood": True}
        return scan


@register_dataset
class INaturalistOOD(_OODReader):
    """iNaturalist OOD subset (MOS/MCM), 10,000 images.

    ROOT/iNaturalist/images/*.jpg     (or ROOT itself = the iNaturalist folder; images may also lie
                                       directly in it or in sub-folders)
    """

    name, title, folder = "inaturalist", "iNaturalist (OOD)", "iNaturalist"
    aliases = ("iNaturalist", "inat", "inaturalist_ood")
    split_sizes = {"test": 10_000}
    extra_folders = ("inaturalist",)


@register_dataset
class SUNOOD(_OODReader):
    """SUN OOD subset (MOS/MCM), 10,000 images; not the SUN397 classification set.

    ROOT/SUN/images/*.jpg             (or ROOT itself = the SUN folder)
    """

    name, title, folder = "sun", "SUN (OOD)", "SUN"
    aliases = ("SUN_OOD", "sun_ood")
    split_sizes = {"test": 10_000}
    extra_folders = ("sun",)


@register_dataset
class PlacesOOD(_OODReader):
    """Places OOD subset (MOS/MCM), 10,000 images.

    ROOT/Places/images/*.jpg          (or ROOT itself = the Places folder)
    """

    name, title, folder = "places", "Places (OOD)", "Places"
    aliases = ("Places", "places_ood", "places365_ood")
    split_sizes = {"test": 10_000}
    extra_folders = ("places", "Places365")


@register_dataset
class TexturesOOD(_OODReader):
    """Textures OOD set = all of DTD, 5,640 images (class folders are ignored: every image is OOD).

    ROOT/dtd/images/<texture>/*.jpg   (also ROOT/Textures/..., ROOT/dtd/images_file/..., or ROOT
                                       itself = the dtd folder or its images folder)
    """

    name, title, folder = "textures", "Textures (OOD)", "dtd"
    aliases = ("Texture", "Textures", "textures_ood", "dtd_ood")
    split_sizes = {"test": 5_640}
    extra_folders = ("Textures", "textures", "Texture", "dtd/images", "dtd/images_file", "DTD")

    def looks_like(self, cand: Path, split: str) -> bool:
        if super().looks_like(cand, split):
            return True
        # the images folder itself: texture class folders holding images
        try:
            return any(
                e.is_dir() and any(is_image_file(f.name) for f in e.iterdir()) for e in cand.iterdir()
            ) and cand.name in ("images", "images_file")
        except OSError:
            return False
