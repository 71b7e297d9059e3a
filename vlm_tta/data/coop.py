"""The 10 cross-datasets in the CoOp layout (``split_zhou_*.json``) and FGVC-Aircraft.

CoOp's split files are JSON objects ``{"train": [[relpath, label, classname], ...], "val": [...],
"test": [...]}`` with paths relative to the dataset's image folder. Labels come from the file;
class names are the ones the papers used (CoOp's, underscores replaced by spaces, EuroSAT's
expanded names), shipped in ``prompts/classnames/``. A split file whose class names disagree with
the shipped ones gets a :class:`~vlm_tta.data.base.DatasetWarning`.

FGVC-Aircraft is read from its own ``variants.txt`` / ``images_variant_<split>.txt`` files (as in
CoOp and TPT), 3,333 test images.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

from ..errors import DatasetError
from .base import Dataset, DatasetWarning, PathLike, SafeJoiner, as_path
from .registry import Reader, Scan, register_dataset, summarize

__all__ = ["read_split_json", "SplitJsonDataset"]


def _norm_name(s: str) -> str:
    return " ".join(s.replace("_", " ").split()).lower()


def read_split_json(
    split_file: Path,
    image_dir: Path,
    split: str,
    num_classes: Optional[int],
    scan: Scan,
) -> dict:
    """Read one split of a CoOp split file into ``scan``; return ``{label: classname}`` from it.

    Problems (missing file, bad JSON, bad entries, labels out of range, paths escaping
    ``image_dir``, missing images) are appended to ``scan.problems`` with the file named.
    """
    names: dict[int, str] = {}
    if not split_file.is_file():
        scan.missing.append(str(split_file))
        scan.problems.append(f"split file {split_file} is missing (CoOp's DATASETS.md links every split_zhou_*.json)")
        return names
    scan.files.append(split_file)
    try:
        data = json.loads(split_file.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        scan.problems.append(f"split file {split_file} is not valid JSON: {exc}")
        return names
    if not isinstance(data, dict):
        scan.problems.append(
            f"split file {split_file} must hold a JSON object with 'train', 'val' and 'test' lists, "
            f"not a {type(data).__name__}"
        )
        return names
    if split not in data:
        scan.problems.append(
            f"split file {split_file} has no {split!r} list (it has: {', '.join(map(str, data)) or 'nothing'})"
        )
        return names
    entries = data[split]
    if not isinstance(entries, list):
        scan.problems.append(f"split file {split_file}: {split!r} must be a list of [path, label, classname]")
        return names
    if not image_dir.is_dir():
        scan.missing.append(str(image_dir) + "/")
        scan.problems.append(f"image folder {image_dir} is missing (the split file's paths are relative to it)")
        return names
    joiner = SafeJoiner(image_dir)
    bad_entries: list[str] = []
    bad_labels: list[str] = []
    escapes: list[str] = []
    missing: list[str] = []
    conflicts: list[str] = []
    for k, entry in enumerate(entries):
        if (
            not isinstance(entry, (list, tuple))
            or len(entry) < 2
            or not isinstance(entry[0], str)
            or isinstance(entry[1], bool)
            or not isinstance(entry[1], int)
        ):
            bad_entries.append(f"#{k}: {json.dumps(entry)[:80]}")
            continue
        rel, label = entry[0], entry[1]
        if label < 0 or (num_classes is not None and label >= num_classes):
            bad_labels.append(f"#{k} {rel!r}: label {label}")
            continue
        if len(entry) > 2 and isinstance(entry[2], str):
            prev = names.setdefault(label, entry[2])
            if _norm_name(prev) != _norm_name(entry[2]) and len(conflicts) < 50:
                conflicts.append(f"label {label}: {prev!r} vs {entry[2]!r}")
        full, status = joiner.join(rel)
        if status == SafeJoiner.ESCAPE:
            escapes.append(rel if isinstance(rel, str) else repr(rel))
        elif status == SafeJoiner.MISSING:
            missing.append(rel)
        else:
            scan.samples.append((full, label))
    where = f"split file {split_file} ({split!r})"
    if bad_entries:
        scan.problems.append(
            f"{where}: {len(bad_entries)} entries are not [path, integer label, classname]: {summarize(bad_entries, 3)}"
        )
    if bad_labels:
        scan.problems.append(
            f"{where}: {len(bad_labels)} labels outside 0..{(num_classes or 0) - 1}: {summarize(bad_labels, 3)}"
        )
    if escapes:
        scan.problems.append(
            f"{where}: refused {len(escapes)} path(s) that point outside the image folder {image_dir}: "
            f"{summarize(escapes, 3)}"
        )
        scan.unexpected.extend(f"{e} (outside {image_dir})" for e in escapes)
    if conflicts:
        scan.problems.append(f"{where}: one label has two class names: {summarize(conflicts, 3)}")
    if missing:
        scan.missing.extend(missing)
        scan.problems.append(
            f"{where}: {len(missing)} listed image(s) are missing under {image_dir}: {summarize(missing, 5)}"
        )
    return names


class _CoopReader(Reader):
    split_filename: str = ""
    image_subdir: str = ""
    splits = ("test", "val", "train")
    #: label -> the dataset's raw folder name, accepted as well in a split file's name column
    raw_names: dict = {}

    def looks_like(self, cand: Path, split: str) -> bool:
        return (cand / self.split_filename).is_file() or (
            bool(self.image_subdir) and (cand / self.image_subdir).is_dir()
        )

    def scan(
        self,
        base: Path,
        split: str,
        split_file: Optional[PathLike] = None,
        image_dir: Optional[PathLike] = None,
        **kwargs,
    ) -> Scan:
        if kwargs:
            raise TypeError(f"{self.name}: unexpected options {sorted(kwargs)}")
        img_dir = (
            as_path(image_dir) if image_dir is not None else (base / self.image_subdir if self.image_subdir else base)
        )
        sf = as_path(split_file) if split_file is not None else base / self.split_filename
        scan = Scan(base=base, image_root=img_dir)
        json_names = read_split_json(sf, img_dir, split, self.num_classes, scan)
        shipped = self.classnames()
        scan.classnames = shipped
        scan.found_classes = len({y for _, y in scan.samples}) if scan.samples else 0
        differ = [
            f"{y}: {json_names[y]!r} (split file) vs {shipped[y]!r}"
            for y in sorted(json_names)
            if y < len(shipped)
            and _norm_name(json_names[y]) not in (_norm_name(shipped[y]), _norm_name(self.raw_names.get(y, "")))
        ]
        if differ:
            msg = (
                f"{self.name}: {len(differ)} class name(s) in {sf} differ from the shipped CoOp names "
                f"(using the shipped ones): {summarize(differ, 3)}"
            )
            scan.notes.append(msg)
            warnings.warn(msg, DatasetWarning, stacklevel=4)
        scan.meta = {"split_file": str(sf)}
        return scan


@register_dataset
class Caltech101(_CoopReader):
    """Caltech101 in the CoOp layout (100 classes, test split 2,465 images).

    ROOT/caltech-101/                 (or ROOT itself)
        101_ObjectCategories/accordion/image_0001.jpg ...
        split_zhou_Caltech101.json
    BACKGROUND_Google and Faces_easy are not classes (as in CoOp).
    """

    name, title, folder = "caltech101", "Caltech101", "caltech-101"
    aliases = ("Caltech101", "caltech", "caltech_101")
    split_filename, image_subdir = "split_zhou_Caltech101.json", "101_ObjectCategories"
    raw_names = {0: "Faces", 1: "Leopards", 2: "Motorbikes", 4: "airplanes"}
    split_sizes = {"test": 2_465}
    num_classes = 100
    classnames_stem = "caltech101"
    templates = {"clip": "caltech101", "coop": "coop_caltech101"}
    extra_folders = ("caltech101", "Caltech101")


@register_dataset
class DTD(_CoopReader):
    """Describable Textures in the CoOp layout (47 classes, test split 1,692 images).

    ROOT/dtd/                         (or ROOT itself)
        images/banded/banded_0002.jpg ...
        split_zhou_DescribableTextures.json
    """

    name, title, folder = "dtd", "DTD", "dtd"
    aliases = ("DTD", "describable_textures", "describabletextures")
    split_filename, image_subdir = "split_zhou_DescribableTextures.json", "images"
    split_sizes = {"test": 1_692}
    num_classes = 47
    classnames_stem = "dtd"
    templates = {"clip": "dtd", "coop": "coop_dtd"}
    extra_folders = ("DTD", "dtd/dtd")


@register_dataset
class EuroSAT(_CoopReader):
    """EuroSAT (RGB) in the CoOp layout (10 classes, test split 8,100 images).

    ROOT/eurosat/                     (or ROOT itself)
        2750/AnnualCrop/AnnualCrop_1.jpg ...
        split_zhou_EuroSAT.json
    Class names are CoOp's expanded ones ("Annual Crop Land", "Highway or Road", ...).
    """

    name, title, folder = "eurosat", "EuroSAT", "eurosat"
    aliases = ("EuroSAT", "euro_sat")
    split_filename, image_subdir = "split_zhou_EuroSAT.json", "2750"
    raw_names = dict(
        enumerate(
            [
                "AnnualCrop",
                "Forest",
                "HerbaceousVegetation",
                "Highway",
                "Industrial",
                "Pasture",
                "PermanentCrop",
                "Residential",
                "River",
                "SeaLake",
            ]
        )
    )
    split_sizes = {"test": 8_100}
    num_classes = 10
    classnames_stem = "eurosat"
    templates = {"clip": "eurosat", "coop": "coop_eurosat"}
    extra_folders = ("EuroSAT",)


@register_dataset
class Flowers102(_CoopReader):
    """Oxford Flowers-102 in the CoOp layout (102 classes, test split 2,463 images).

    ROOT/oxford_flowers/              (or ROOT itself)
        jpg/image_00001.jpg ...
        split_zhou_OxfordFlowers.json
        (imagelabels.mat and cat_to_name.json may be there too; they are not needed)
    """

    name, title, folder = "flowers102", "Flowers102", "oxford_flowers"
    aliases = ("Flower102", "flowers", "oxford_flowers", "oxfordflowers", "flowers_102")
    split_filename, image_subdir = "split_zhou_OxfordFlowers.json", "jpg"
    split_sizes = {"test": 2_463}
    num_classes = 102
    classnames_stem = "flowers102"
    templates = {"clip": "flowers102", "coop": "coop_flowers102"}
    extra_folders = ("flowers102", "flowers-102")


@register_dataset
class Food101(_CoopReader):
    """Food-101 in the CoOp layout (101 classes, test split 30,300 images).

    ROOT/food-101/                    (or ROOT itself)
        images/apple_pie/1005649.jpg ...
        split_zhou_Food101.json
    Labels follow the sorted folder names (so "cheese plate" is 16 and "cheesecake" 17).
    TPT's code (``data/cls_to_names.py``) names these two labels the other way round, which makes
    both classes unrecognisable there; ``get_dataset("food101", root, classnames="food101_tpt")``
    reproduces that list for comparisons with TPT's code.
    """

    name, title, folder = "food101", "Food101", "food-101"
    aliases = ("Food101", "food", "food_101")
    split_filename, image_subdir = "split_zhou_Food101.json", "images"
    split_sizes = {"test": 30_300}
    num_classes = 101
    classnames_stem = "food101"
    templates = {"clip": "food101", "coop": "coop_food101"}
    extra_folders = ("food101", "Food101")


@register_dataset
class OxfordPets(_CoopReader):
    """Oxford-IIIT Pets in the CoOp layout (37 classes, test split 3,669 images).

    ROOT/oxford_pets/                 (or ROOT itself)
        images/Abyssinian_1.jpg ...
        annotations/                  (optional here)
        split_zhou_OxfordPets.json
    """

    name, title, folder = "oxford_pets", "OxfordPets", "oxford_pets"
    aliases = ("Pets", "pets", "oxfordpets", "oxford_iiit_pet")
    split_filename, image_subdir = "split_zhou_OxfordPets.json", "images"
    split_sizes = {"test": 3_669}
    num_classes = 37
    classnames_stem = "oxford_pets"
    templates = {"clip": "oxford_pets", "coop": "coop_oxford_pets"}
    extra_folders = ("oxford-pets", "OxfordPets")


@register_dataset
class StanfordCars(_CoopReader):
    """Stanford Cars in the CoOp layout (196 classes, test split 8,041 images).

    ROOT/stanford_cars/               (or ROOT itself)
        cars_test/00001.jpg ...
        cars_train/00001.jpg ...
        split_zhou_StanfordCars.json  (paths like "cars_test/00001.jpg", relative to this folder)
    Class names put the year first ("2012 Tesla Model S Sedan"), as CoOp does.
    """

    name, title, folder = "stanford_cars", "StanfordCars", "stanford_cars"
    aliases = ("Cars", "cars", "stanfordcars")
    split_filename, image_subdir = "split_zhou_StanfordCars.json", ""
    split_sizes = {"test": 8_041}
    num_classes = 196
    classnames_stem = "stanford_cars"
    templates = {"clip": "stanford_cars", "coop": "coop_stanford_cars"}
    extra_folders = ("stanford-cars", "StanfordCars")


@register_dataset
class SUN397(_CoopReader):
    """SUN397 in the CoOp layout (397 classes, test split 19,850 images).

    ROOT/sun397/                      (or ROOT itself)
        SUN397/a/abbey/sun_aaalbzqrimafwbiv.jpg ...
        split_zhou_SUN397.json
    Class names are CoOp's ("outdoor apartment building", "indoor apse", ...).
    """

    name, title, folder = "sun397", "SUN397", "sun397"
    aliases = ("SUN397", "sun_397")
    split_filename, image_subdir = "split_zhou_SUN397.json", "SUN397"
    split_sizes = {"test": 19_850}
    num_classes = 397
    classnames_stem = "sun397"
    templates = {"clip": "sun397", "coop": "coop_sun397"}
    extra_folders = ("SUN397",)


@register_dataset
class UCF101(_CoopReader):
    """UCF101 middle frames in the CoOp layout (101 classes, test split 3,783 images).

    ROOT/ucf101/                      (or ROOT itself)
        UCF-101-midframes/Apply_Eye_Makeup/v_ApplyEyeMakeup_g01_c01.jpg ...
        split_zhou_UCF101.json
    """

    name, title, folder = "ucf101", "UCF101", "ucf101"
    aliases = ("UCF101", "ucf", "ucf_101")
    split_filename, image_subdir = "split_zhou_UCF101.json", "UCF-101-midframes"
    split_sizes = {"test": 3_783}
    num_classes = 101
    classnames_stem = "ucf101"
    templates = {"clip": "ucf101", "coop": "coop_ucf101"}
    extra_folders = ("UCF101", "UCF-101")


@register_dataset
class FGVCAircraft(Reader):
    """FGVC-Aircraft 2013b, variant level (100 classes, test split 3,333 images).

    ROOT/fgvc_aircraft/               (the archive's data/ folder; also ROOT/fgvc-aircraft-2013b/data/)
        images/1025794.jpg ...
        variants.txt                  (the 100 variant names, in label order)
        images_variant_test.txt       ("1025794 707-320": image id, then its variant)
        images_variant_train.txt, images_variant_val.txt, images_variant_trainval.txt
    """

    name, title, folder = "fgvc_aircraft", "FGVC-Aircraft", "fgvc_aircraft"
    aliases = ("Aircraft", "aircraft", "fgvcaircraft", "fgvc")
    splits = ("test", "val", "train", "trainval")
    split_sizes = {"test": 3_333}
    num_classes = 100
    classnames_stem = "fgvc_aircraft"
    templates = {"clip": "fgvc_aircraft", "coop": "coop_fgvc_aircraft"}
    extra_folders = ("fgvc-aircraft-2013b/data", "data", "fgvc-aircraft-2013b", "FGVC-Aircraft", "fgvc-aircraft")

    def looks_like(self, cand: Path, split: str) -> bool:
        return (cand / "variants.txt").is_file() or (cand / f"images_variant_{split}.txt").is_file()

    def scan(self, base: Path, split: str, **kwargs) -> Scan:
        if kwargs:
            raise TypeError(f"{self.name}: unexpected options {sorted(kwargs)}")
        scan = Scan(base=base, image_root=base / "images")
        shipped = self.classnames()
        scan.classnames = shipped
        variants_file = base / "variants.txt"
        split_file = base / f"images_variant_{split}.txt"
        for f in (variants_file, split_file):
            if not f.is_file():
                scan.missing.append(str(f))
                scan.problems.append(f"{f} is missing")
        image_dir = base / "images"
        if not image_dir.is_dir():
            scan.missing.append(str(image_dir) + "/")
            scan.problems.append(f"image folder {image_dir} is missing")
        if scan.problems:
            return scan
        scan.files += [variants_file, split_file]
        variants = [ln.strip() for ln in variants_file.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
        if len(variants) != len(set(variants)):
            scan.problems.append(f"{variants_file} lists a variant twice")
            return scan
        if [_norm_name(v) for v in variants] != [_norm_name(v) for v in shipped]:
            msg = (
                f"{self.name}: {variants_file} has {len(variants)} variants that differ from the 100 "
                "shipped FGVC-Aircraft variant names; labels follow the file, names the file too"
            )
            scan.notes.append(msg)
            warnings.warn(msg, DatasetWarning, stacklevel=4)
            scan.classnames = variants
        label_of = {v: i for i, v in enumerate(variants)}
        joiner = SafeJoiner(image_dir)
        unknown, bad, escapes, missing = [], [], [], []
        for lineno, line in enumerate(split_file.read_text(encoding="utf-8-sig").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.strip().split(" ", 1)
            if len(parts) != 2:
                bad.append(f"line {lineno}: {line.strip()[:60]!r}")
                continue
            image_id, variant = parts[0], parts[1].strip()
            if variant not in label_of:
                unknown.append(f"line {lineno}: {variant!r}")
                continue
            full, status = joiner.join(image_id + ".jpg")
            if status == SafeJoiner.ESCAPE:
                escapes.append(image_id)
            elif status == SafeJoiner.MISSING:
                missing.append(f"{image_id}.jpg")
            else:
                scan.samples.append((full, label_of[variant]))
        if bad:
            scan.problems.append(f"{split_file}: {len(bad)} lines are not '<image id> <variant>': {summarize(bad, 3)}")
        if unknown:
            scan.problems.append(
                f"{split_file}: {len(unknown)} lines name a variant not in {variants_file}: {summarize(unknown, 3)}"
            )
        if escapes:
            scan.problems.append(
                f"{split_file}: refused {len(escapes)} image id(s) pointing outside {image_dir}: "
                f"{summarize(escapes, 3)}"
            )
        if missing:
            scan.missing.extend(missing)
            scan.problems.append(
                f"{len(missing)} image(s) listed in {split_file} are missing in {image_dir}: {summarize(missing)}"
            )
        scan.found_classes = len({y for _, y in scan.samples})
        return scan


class SplitJsonDataset(Dataset):
    """A dataset from any CoOp-style split file (``{"test": [[relpath, label, classname], ...]}``).

    Use this for a split file of your own. Class names come from ``classnames`` (a list or a
    one-name-per-line file) or else from the split file's third column, underscores replaced by
    spaces. Paths are relative to ``image_dir`` and may not point outside it.
    """

    def __init__(
        self,
        split_file: PathLike,
        image_dir: PathLike,
        split: str = "test",
        classnames: Optional[Sequence[str] | PathLike] = None,
        name: Optional[str] = None,
    ):
        sf, img = as_path(split_file), as_path(image_dir)
        scan = Scan(base=img, image_root=img)
        names = read_split_json(sf, img, split, None, scan)
        layout = (
            '\n\nExpected: a JSON object {"train": [...], "val": [...], "test": [...]} whose lists hold '
            "[path relative to the image folder, integer label, class name]."
        )
        if scan.problems:
            raise DatasetError("\n".join(scan.problems) + layout)
        if not scan.samples:
            raise DatasetError(f"split {split!r} of {sf} is empty" + layout)
        n = max(y for _, y in scan.samples) + 1
        if classnames is None:
            if set(names) != set(range(n)):
                lacking = sorted(set(range(n)) - set(names))
                raise DatasetError(
                    f"{sf}: no class name for label(s) {summarize([str(x) for x in lacking])}; pass classnames="
                    + layout
                )
            cn = [names[y].replace("_", " ") for y in range(n)]
        else:
            from .custom import read_classnames

            cn = read_classnames(classnames)
            if len(cn) < n:
                raise DatasetError(f"{sf} has labels up to {n - 1} but only {len(cn)} class names were given")
        super().__init__(
            scan.samples, cn, name=name or sf.stem, split=split, root=img, meta={"split_file": os.fspath(sf)}
        )
