"""Users' own data: a folder per class, a CSV of ``path,label``, or any folder of images (OOD)."""

from __future__ import annotations

import csv
import os
from typing import Optional, Sequence, Union

from ..errors import DatasetError
from .base import NOISY_LABEL, Dataset, PathLike, SafeJoiner, as_path
from .folders import scan_class_folders, scan_image_tree
from .registry import summarize

__all__ = ["ImageFolderDataset", "CsvDataset", "ImageDirDataset", "read_classnames"]

ClassNames = Union[Sequence[str], PathLike]

FOLDER_LAYOUT = """\
Expected layout (a folder per class):
    ROOT/<class name>/<image>.jpg
Class folders are read in sorted order (numeric order when every folder name is a number);
the class name is the folder name with '_' replaced by ' ' unless classnames= is given."""

CSV_LAYOUT = """\
Expected CSV layout (a header row, then one row per image):
    path,label
    images/cat_001.jpg,cat
    images/dog_004.jpg,dog
'path' is relative to the CSV's folder (or root=); 'label' is a class name or a 0-based index
into the class-name file (one name per line, in label order) given as classnames=."""


def read_classnames(classnames: ClassNames) -> list[str]:
    """Class names from a list, or from a UTF-8 file with one name per line (blank lines ignored)."""
    if isinstance(classnames, (str, os.PathLike)) and not isinstance(classnames, (list, tuple)):
        p = as_path(classnames)
        if not p.is_file():
            raise DatasetError(f"class-name file {p} does not exist (expected one class name per line)")
        try:
            names = [ln.strip() for ln in p.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
        except UnicodeDecodeError as exc:
            raise DatasetError(f"class-name file {p} is not UTF-8 text: {exc}") from None
        src = str(p)
    else:
        names = [str(c).strip() for c in classnames]
        src = "classnames"
    if not names:
        raise DatasetError(f"{src} holds no class names")
    if any(not n for n in names):
        raise DatasetError(f"{src} contains a blank class name")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DatasetError(f"{src} lists class name(s) twice: {summarize(dup)}")
    return names


class ImageFolderDataset(Dataset):
    """A folder per class: ``root/<class>/<image>``. See ``FOLDER_LAYOUT``.

    Args:
        root: the folder holding one sub-folder per class.
        classnames: names in class order (a list or a one-per-line file); default: folder names
            with ``_`` replaced by spaces.
        name: dataset name for logs and subset files (default: the folder's name).
    """

    def __init__(self, root: PathLike, classnames: Optional[ClassNames] = None, name: Optional[str] = None):
        base = as_path(root)
        if not base.is_dir():
            raise DatasetError(f"image folder {base} does not exist or is not a folder\n\n{FOLDER_LAYOUT}")
        folders = sorted(e.name for e in os.scandir(base) if not e.name.startswith(".") and e.is_dir())
        if not folders:
            raise DatasetError(f"{base} has no class folders\n\n{FOLDER_LAYOUT}")
        if all(f.isdigit() for f in folders):
            folders.sort(key=lambda f: (int(f), f))
        index = {f: i for i, f in enumerate(folders)}
        fs = scan_class_folders(base, index.get)
        if fs.empty:
            raise DatasetError(f"class folder(s) with no images in {base}: {summarize(fs.empty)}\n\n{FOLDER_LAYOUT}")
        if classnames is None:
            names = [f.replace("_", " ") for f in folders]
        else:
            names = read_classnames(classnames)
            if len(names) != len(folders):
                raise DatasetError(
                    f"{len(names)} class names given for {len(folders)} class folders in {base}\n\n{FOLDER_LAYOUT}"
                )
        super().__init__(
            fs.samples,
            names,
            name=name or base.name,
            root=base,
            meta={"class_folders": folders, "skipped_files": fs.unexpected_files},
        )


class ImageDirDataset(Dataset):
    """Every image under a folder (recursively), all with label -1: any image folder as an OOD set."""

    def __init__(self, root: PathLike, name: Optional[str] = None):
        base = as_path(root)
        if not base.is_dir():
            raise DatasetError(f"image folder {base} does not exist or is not a folder")
        images, others = scan_image_tree(base)
        if not images:
            raise DatasetError(f"no images found under {base} (looked for .jpg/.jpeg/.png/... files)")
        super().__init__(
            [(p, NOISY_LABEL) for p in images],
            [],
            name=name or base.name,
            root=base,
            meta={"ood": True, "skipped_files": others},
        )


class CsvDataset(Dataset):
    """Images listed in a CSV with columns ``path`` and ``label``. See ``CSV_LAYOUT``.

    Args:
        csv_path: the CSV file (UTF-8, comma-separated, header row).
        root: folder the paths are relative to (default: the CSV's folder). Paths may not point
            outside it (symlinks are resolved).
        classnames: a list or one-per-line file; labels are names from it or 0-based indices.
            Without it, labels must be names and the classes are their sorted unique values.
    """

    def __init__(
        self,
        csv_path: PathLike,
        root: Optional[PathLike] = None,
        classnames: Optional[ClassNames] = None,
        name: Optional[str] = None,
        path_column: str = "path",
        label_column: str = "label",
    ):
        p = as_path(csv_path)
        if not p.is_file():
            raise DatasetError(f"CSV file {p} does not exist\n\n{CSV_LAYOUT}")
        base = as_path(root) if root is not None else p.parent
        if not base.is_dir():
            raise DatasetError(f"root folder {base} for {p} does not exist")
        try:
            with open(p, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                header = reader.fieldnames or []
                missing_cols = [c for c in (path_column, label_column) if c not in header]
                if missing_cols:
                    raise DatasetError(
                        f"{p} lacks column(s) {', '.join(missing_cols)} (its header is: "
                        f"{', '.join(header) if header else 'empty'})\n\n{CSV_LAYOUT}"
                    )
                rows = [(reader.line_num, r.get(path_column), r.get(label_column)) for r in reader]
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{p} is not UTF-8 text: {exc}") from None
        except csv.Error as exc:
            raise DatasetError(f"{p} is not a readable CSV: {exc}\n\n{CSV_LAYOUT}") from None
        rows = [(n, (a or "").strip(), (b or "").strip()) for n, a, b in rows if (a or "").strip() or (b or "").strip()]
        if not rows:
            raise DatasetError(f"{p} lists no images\n\n{CSV_LAYOUT}")
        blank = [f"line {n}" for n, a, b in rows if not a or not b]
        if blank:
            raise DatasetError(f"{p}: empty path or label on {summarize(blank)}\n\n{CSV_LAYOUT}")

        if classnames is not None:
            names = read_classnames(classnames)
            by_name = {c: i for i, c in enumerate(names)}
        else:
            ints = [b for _, _, b in rows if _is_int(b)]
            if len(ints) == len(rows):
                raise DatasetError(
                    f"{p} has integer labels but no class names: pass classnames= (a list or a file "
                    f"with one name per line, in label order)\n\n{CSV_LAYOUT}"
                )
            names = sorted({b for _, _, b in rows})
            by_name = {c: i for i, c in enumerate(names)}

        joiner = SafeJoiner(base)
        samples, unknown, escapes, missing = [], [], [], []
        for n, rel, lab in rows:
            if lab in by_name:
                y = by_name[lab]
            elif classnames is not None and _is_int(lab) and 0 <= int(lab) < len(names):
                y = int(lab)
            else:
                unknown.append(f"line {n}: {lab!r}")
                continue
            full, status = joiner.join(rel)
            if status == SafeJoiner.ESCAPE:
                escapes.append(f"line {n}: {rel!r}")
            elif status == SafeJoiner.MISSING:
                missing.append(f"line {n}: {rel}")
            else:
                samples.append((full, y))
        if unknown:
            known = f"the {len(names)} names in the class-name file or indices 0..{len(names) - 1}"
            raise DatasetError(
                f"{p}: {len(unknown)} row(s) have labels that are not {known}: {summarize(unknown)}\n\n{CSV_LAYOUT}"
            )
        if escapes:
            raise DatasetError(
                f"{p}: refused {len(escapes)} path(s) that point outside {base}: {summarize(escapes)}\n\n{CSV_LAYOUT}"
            )
        if missing:
            raise DatasetError(
                f"{p}: {len(missing)} image(s) do not exist under {base}: {summarize(missing)}\n\n{CSV_LAYOUT}"
            )
        super().__init__(samples, names, name=name or p.stem, root=base, meta={"csv": os.fspath(p)})


def _is_int(s: str) -> bool:
    s = s.strip()
    return s.isdigit() or (s.startswith("-") and s[1:].isdigit())
