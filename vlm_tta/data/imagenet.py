"""ImageNet and its natural-shift variants: -A, -R, -V2 (matched frequency), -Sketch.

Class names are CLIP's curated 1000 ImageNet names (``prompts/classnames/imagenet.txt``), not
WordNet lemmas. Labels follow the ImageNet-1k index, i.e. the sorted WNID order. ImageNet-A and
ImageNet-R have 200 classes each; by default their labels are 0..199 over those classes in 1k
index order (as in TPT), and ``label_space="imagenet"`` gives labels in the 1000-class space.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .folders import WNID_RE, has_wnid_folders, scan_class_folders
from .registry import Reader, Scan, register_dataset, summarize
from .resources import classnames_file, imagenet_classnames, imagenet_wnids

IMAGENET_TEMPLATES = {"clip": "imagenet", "coop": "coop_imagenet"}


class _WnidFolderReader(Reader):
    """Base: one folder per WNID."""

    subset_stem: Optional[str] = None  # "imagenet_a" -> imagenet_a_wnids.txt, or None for all 1000

    def looks_like(self, cand: Path, split: str) -> bool:
        return has_wnid_folders(cand)

    def class_wnids(self) -> list[str]:
        if self.subset_stem is None:
            return imagenet_wnids()
        return classnames_file(f"{self.subset_stem}_wnids")

    def scan(self, base: Path, split: str, label_space: str = "subset", **kwargs) -> Scan:
        if kwargs:
            raise TypeError(f"{self.name}: unexpected options {sorted(kwargs)}")
        if label_space not in ("subset", "imagenet"):
            raise ValueError("label_space must be 'subset' or 'imagenet'")
        all_wnids = imagenet_wnids()
        all_names = imagenet_classnames()
        wnids = self.class_wnids()
        index_1k = {w: i for i, w in enumerate(all_wnids)}
        subset_index = {w: i for i, w in enumerate(wnids)}
        scan = Scan(base=base, image_root=base)
        fs = scan_class_folders(base, subset_index.get, dict(enumerate(wnids)))
        self._report_folders(scan, fs, base, "WNID")
        if label_space == "imagenet" and self.subset_stem is not None:
            scan.samples = [(p, index_1k[wnids[y]]) for p, y in fs.samples]
            scan.classnames = list(all_names)
        else:
            scan.samples = fs.samples
            scan.classnames = [all_names[index_1k[w]] for w in wnids]
        scan.found_classes = len(fs.found)
        scan.meta = {
            "wnids": list(wnids) if label_space == "subset" else list(all_wnids),
            "imagenet_indices": [index_1k[w] for w in wnids],
            "label_space": "imagenet" if self.subset_stem is None else label_space,
        }
        return scan

    def _report_folders(self, scan: Scan, fs, base: Path, kind: str) -> None:
        scan.missing.extend(fs.missing)
        scan.unexpected.extend(fs.unexpected_folders)
        scan.unexpected.extend(fs.unexpected_files)
        if fs.loose_images and not fs.found:
            scan.problems.append(
                f"{base} holds {fs.loose_images} images directly but no {kind} class folders; "
                "the images must be sorted into one folder per class (the raw ILSVRC2012 val "
                "archive is flat: sort it with the usual valprep.sh script first)"
            )
        elif fs.loose_images:
            scan.notes.append(f"{fs.loose_images} images directly in {base} are ignored")
        if fs.missing:
            scan.problems.append(f"{len(fs.missing)} class folder(s) missing in {base}: {summarize(fs.missing)}")
        if fs.unexpected_folders:
            scan.problems.append(
                f"{len(fs.unexpected_folders)} unexpected folder(s) in {base} that are not classes "
                f"of {self.title}: {summarize(fs.unexpected_folders)}"
            )
        if fs.empty:
            scan.problems.append(f"class folder(s) with no images in {base}: {summarize(fs.empty)}")
        if fs.unexpected_files:
            scan.notes.append(f"{len(fs.unexpected_files)} non-image file(s) inside class folders were skipped")


@register_dataset
class ImageNet(_WnidFolderReader):
    """ImageNet-1k (ILSVRC2012), validation images as the test split; ``split="train"`` for train.

    ROOT may be the folder of WNID class folders itself, or a folder above it:
        ROOT/val/n01440764/ILSVRC2012_val_00000293.JPEG   (also ROOT/images/val/..., ROOT/ImageNet/val/...,
        ROOT/imagenet/images/val/..., ROOT/imagenet/val/...)
        ROOT/train/n01440764/*.JPEG                       (split="train")
    1000 folders named by WNID (n01440764 ... n15075141); 50,000 val images. Class order is the
    sorted WNID order (the standard 1k index). The flat val archive must first be sorted into
    WNID folders.
    """

    name = "imagenet"
    title = "ImageNet"
    aliases = ("I", "imagenet1k", "imagenet_1k", "in1k", "ilsvrc2012")
    splits = ("test", "val", "train")
    split_sizes = {"test": 50_000, "val": 50_000, "train": 1_281_167}
    num_classes = 1000
    classnames_stem = "imagenet"
    templates = IMAGENET_TEMPLATES
    folder = "imagenet"

    def candidates(self, split: str) -> list[str]:
        sub = "train" if split == "train" else "val"
        out = [""] if split != "train" else []
        for prefix in (
            "",
            "images",
            "ImageNet",
            "imagenet",
            "imagenet/images",
            "ILSVRC2012",
            "imagenet_1k",
            "ILSVRC/Data/CLS-LOC",
        ):
            out.append(f"{prefix}/{sub}" if prefix else sub)
        if split == "train":
            out.append("")
        return out

    def looks_like(self, cand: Path, split: str) -> bool:
        return has_wnid_folders(cand) or (cand.name.lower() in ("val", "train") and any(cand.iterdir()))


@register_dataset
class ImageNetA(_WnidFolderReader):
    """ImageNet-A (natural adversarial examples), 200 ImageNet classes, 7,500 images.

    ROOT may be the imagenet-a folder itself or a folder above it:
        ROOT/imagenet-a/n01498041/*.jpg      (also ROOT/imagenet-adversarial/imagenet-a/...)
    200 folders named by WNID (the hendrycks/natural-adv-examples release); README.txt is ignored.
    Labels 0..199 follow the 1k index order of those WNIDs; names are CLIP's ImageNet names.
    """

    name = "imagenet_a"
    title = "ImageNet-A"
    aliases = ("A", "imageneta", "imagenet_adversarial", "in_a")
    split_sizes = {"test": 7_500}
    num_classes = 200
    classnames_stem = "imagenet_a"
    subset_stem = "imagenet_a"
    templates = IMAGENET_TEMPLATES
    folder = "imagenet-a"
    extra_folders = ("imagenet-adversarial/imagenet-a", "imagenet_a", "ImageNet-A")


@register_dataset
class ImageNetR(_WnidFolderReader):
    """ImageNet-R (renditions), 200 ImageNet classes, 30,000 images.

    ROOT may be the imagenet-r folder itself or a folder above it:
        ROOT/imagenet-r/n01443537/*.jpg      (also ROOT/imagenet-rendition/imagenet-r/...)
    200 folders named by WNID (the hendrycks/imagenet-r release); README.txt is ignored.
    Labels 0..199 follow the 1k index order of those WNIDs; names are CLIP's ImageNet names.
    """

    name = "imagenet_r"
    title = "ImageNet-R"
    aliases = ("R", "imagenetr", "imagenet_rendition", "in_r")
    split_sizes = {"test": 30_000}
    num_classes = 200
    classnames_stem = "imagenet_r"
    subset_stem = "imagenet_r"
    templates = IMAGENET_TEMPLATES
    folder = "imagenet-r"
    extra_folders = ("imagenet-rendition/imagenet-r", "imagenet_r", "ImageNet-R")


@register_dataset
class ImageNetSketch(_WnidFolderReader):
    """ImageNet-Sketch, 1000 ImageNet classes, 50,889 images.

    ROOT may be the folder of WNID folders itself or a folder above it:
        ROOT/sketch/n01440764/*.JPEG         (also ROOT/ImageNet-Sketch/sketch/...,
        ROOT/imagenet-sketch/images/..., ROOT/ImageNet-Sketch/images/...)
    1000 folders named by WNID; class order is the sorted WNID order (the 1k index).
    """

    name = "imagenet_sketch"
    title = "ImageNet-Sketch"
    aliases = ("K", "imagenetsketch", "sketch", "in_sketch")
    split_sizes = {"test": 50_889}
    num_classes = 1000
    classnames_stem = "imagenet"
    templates = IMAGENET_TEMPLATES
    folder = "ImageNet-Sketch/sketch"
    extra_folders = (
        "sketch",
        "imagenet-sketch/images",
        "ImageNet-Sketch/images",
        "imagenet-sketch/sketch",
        "imagenet-sketch",
        "ImageNet-Sketch",
        "imagenet_sketch",
    )


@register_dataset
class ImageNetV2(_WnidFolderReader):
    """ImageNet-V2 matched-frequency, 1000 ImageNet classes, 10,000 images.

    ROOT may be the folder of class folders itself or a folder above it:
        ROOT/imagenetv2-matched-frequency-format-val/0/*.jpeg ... /999/*.jpeg
        (also ROOT/imagenetv2/imagenetv2-matched-frequency-format-val/...)
    Folders 0..999 are ImageNet class indices, read in numeric order (folder "10" is class 10,
    not the 3rd folder in lexicographic order). The WNID-formatted release (folders n01440764
    ...) is also accepted.
    """

    name = "imagenet_v2"
    title = "ImageNet-V2"
    aliases = ("V", "imagenetv2", "imagenet_v2_matched_frequency", "in_v2")
    split_sizes = {"test": 10_000}
    num_classes = 1000
    classnames_stem = "imagenet"
    templates = IMAGENET_TEMPLATES
    folder = "imagenetv2-matched-frequency-format-val"
    extra_folders = (
        "imagenetv2/imagenetv2-matched-frequency-format-val",
        "imagenetv2-matched-frequency",
        "imagenetv2/imagenetv2-matched-frequency",
        "imagenet-v2",
        "imagenetv2",
        "ImageNetV2",
        "imagenet_v2",
    )

    def looks_like(self, cand: Path, split: str) -> bool:
        try:
            names = [e.name for e in cand.iterdir() if e.is_dir()]
        except OSError:
            return False
        return any(n.isdigit() for n in names) or any(WNID_RE.match(n) for n in names)

    def scan(self, base: Path, split: str, **kwargs) -> Scan:
        if kwargs:
            raise TypeError(f"{self.name}: unexpected options {sorted(kwargs)}")
        wnids = imagenet_wnids()
        names = imagenet_classnames()
        folders = [e.name for e in base.iterdir() if e.is_dir() and not e.name.startswith(".")]
        numeric = [f for f in folders if f.isdigit()]
        wnid_style = [f for f in folders if WNID_RE.match(f)]
        scan = Scan(base=base, image_root=base)
        if numeric and wnid_style:
            scan.problems.append(
                f"{base} mixes numeric class folders ({summarize(sorted(numeric, key=int))}) and WNID "
                f"folders ({summarize(sorted(wnid_style))}); use one release format"
            )
        if wnid_style and not numeric:
            index = {w: i for i, w in enumerate(wnids)}
            fs = scan_class_folders(base, index.get, dict(enumerate(wnids)))
            scan.meta = {"format": "wnid"}
        else:

            def label_of(folder: str):
                if folder.isdigit() and str(int(folder)) == folder and int(folder) < 1000:
                    return int(folder)
                return None

            fs = scan_class_folders(base, label_of, {i: str(i) for i in range(1000)})
            scan.meta = {"format": "numeric"}
        self._report_folders(scan, fs, base, "class (0..999)")
        scan.samples = fs.samples
        scan.classnames = list(names)
        scan.found_classes = len(fs.found)
        scan.meta["wnids"] = list(wnids)
        return scan
