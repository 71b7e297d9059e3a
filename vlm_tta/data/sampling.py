"""Reproducible subsets, few-shot support sets and noisy-TTA mixes, saved as small JSON files.

Each function takes an optional ``path``. When the file does not exist, the selection is drawn
from the seed and written there (atomically: temp file + rename); when it exists, the selection
is read back from it, after checking that it was made from the same dataset (same sample list,
by fingerprint) with the same settings. So the second run of an experiment uses exactly the
images of the first, on any machine, whatever changes in random-number libraries.

Files are plain JSON (never pickles)::

    {"format": "vlm_tta.subset", "version": 1, "kind": "random", "seed": 0, "size": 1000,
     "dataset": {"name": "imagenet_a", "split": "test", "size": 7500, "fingerprint": "..."},
     "indices": [...], "samples": [["n01498041/0.000116_digital clock.jpg", 0], ...]}

    {"format": "vlm_tta.noisy_mix", "version": 1, "seed": 0, "noisy_fraction": 0.5,
     "ood_ratio": 1.0, "id": {...}, "ood": {...}, "n_id": 7500, "n_ood": 7500,
     "ood_indices": [...]}
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .._atomic import atomic_write
from ..errors import DatasetError
from .base import NOISY_LABEL, Dataset, PathLike, _check_seed, as_path, permutation

__all__ = [
    "subset",
    "few_shot",
    "noisy_mix",
    "load_subset",
    "load_noisy_mix",
    "resample_indices",
    "NOISY_FRACTIONS",
]

SUBSET_FORMAT = "vlm_tta.subset"
MIX_FORMAT = "vlm_tta.noisy_mix"
VERSION = 1

#: The noisy fractions of the ZS-NTTA protocol: 0, 25, 50 and 75% noisy samples.
NOISY_FRACTIONS = (0.0, 0.25, 0.5, 0.75)


# --------------------------------------------------------------------------------------------
# JSON files
# --------------------------------------------------------------------------------------------


def write_json_atomic(path: PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` via a temp file in the same folder and ``os.replace``."""
    p = as_path(path)

    def write(fh) -> None:
        fh.write((json.dumps(obj, separators=(",", ":")) + "\n").encode("utf-8"))

    atomic_write(p, write)
    return p


def _read_json(path: Path, fmt: str) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise DatasetError(f"{path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path} is not a valid {fmt} JSON file: {exc}") from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise DatasetError(f"{path} is not a {fmt} file (format: {found!r})")
    if obj.get("version") != VERSION:
        raise DatasetError(f"{path} has {fmt} version {obj.get('version')!r}; this vlm_tta reads version {VERSION}")
    return obj


def _describe(ds: Dataset) -> dict:
    return {"name": ds.name, "split": ds.split, "size": len(ds), "fingerprint": ds.fingerprint()}


def _verify(path: Path, role: str, recorded: Any, ds: Dataset) -> None:
    if not isinstance(recorded, dict):
        raise DatasetError(f"{path}: missing the {role} dataset description")
    if recorded.get("size") != len(ds) or recorded.get("fingerprint") != ds.fingerprint():
        raise DatasetError(
            f"{path} was made from {role} dataset {recorded.get('name')!r} (split {recorded.get('split')!r}, "
            f"{recorded.get('size')} samples) but the {role} dataset given now ({ds.name!r}, split "
            f"{ds.split!r}, {len(ds)} samples) has a different sample list (fingerprint "
            f"{str(recorded.get('fingerprint'))[:12]}... vs {ds.fingerprint()[:12]}...). Use the same "
            "dataset files, or delete the file to draw a new selection."
        )


def _check_indices(path: Path, indices: Any, n: int, what: str) -> list[int]:
    if not isinstance(indices, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise DatasetError(f"{path}: {what} must be a list of integers")
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise DatasetError(f"{path}: {what} holds {len(bad)} index(es) outside 0..{n - 1}, e.g. {bad[0]}")
    return indices


def _same_settings(path: Path, obj: dict, wanted: dict) -> None:
    diff = {k: (obj.get(k), v) for k, v in wanted.items() if obj.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}={a!r} in the file vs {b!r} asked" for k, (a, b) in diff.items())
        raise DatasetError(f"{path} was made with other settings ({detail}); pass the same or delete the file")


# --------------------------------------------------------------------------------------------
# Subsets and few-shot sets
# --------------------------------------------------------------------------------------------


def _subset_record(ds: Dataset, kind: str, settings: dict, indices: list[int]) -> dict:
    return {
        "format": SUBSET_FORMAT,
        "version": VERSION,
        "kind": kind,
        **settings,
        "dataset": _describe(ds),
        "indices": indices,
        "samples": [[ds.relpath(i), ds.label(i)] for i in indices],
    }


def _from_subset_file(ds: Dataset, path: Path, kind: Optional[str], settings: Optional[dict]) -> Dataset:
    obj = _read_json(path, SUBSET_FORMAT)
    if kind is not None and obj.get("kind") != kind:
        raise DatasetError(f"{path} holds a {obj.get('kind')!r} selection, not a {kind!r} one")
    if settings:
        _same_settings(path, obj, settings)
    _verify(path, "source", obj.get("dataset"), ds)
    indices = _check_indices(path, obj.get("indices"), len(ds), "indices")
    return ds.select(
        indices, name=_subset_name(ds, obj), meta={"subset_file": str(path), "subset_indices": list(indices)}
    )


def _subset_name(ds: Dataset, obj: dict) -> str:
    if obj.get("kind") == "few_shot":
        return f"{ds.name}[{obj.get('shots')}shot,seed{obj.get('seed')}]"
    return f"{ds.name}[{obj.get('size')},seed{obj.get('seed')}]"


def subset(dataset: Dataset, size: int, seed: int = 0, path: Optional[PathLike] = None) -> Dataset:
    """A fixed-size random subset (e.g. DiffTPT's 1,000 test images), drawn with ``seed``.

    The chosen samples keep the dataset's order (streams shuffle them with their own seed). With
    ``path``, the selection is saved there, or read back when the file already exists.
    """
    seed = _check_seed(seed)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
        raise ValueError(f"size must be a non-negative integer, got {size!r}")
    size = int(size)
    settings = {"seed": seed, "size": size}
    if path is not None and as_path(path).exists():
        return _from_subset_file(dataset, as_path(path), "random", settings)
    if size > len(dataset):
        raise DatasetError(f"cannot draw {size} samples from {dataset.name}, which has {len(dataset)}")
    indices = sorted(permutation(len(dataset), seed)[:size].tolist())
    record = _subset_record(dataset, "random", settings, indices)
    if path is not None:
        write_json_atomic(path, record)
    return dataset.select(
        indices,
        name=_subset_name(dataset, record),
        meta={"subset_file": str(path) if path else None, "subset_indices": indices},
    )


def few_shot(dataset: Dataset, shots: int, seed: int = 0, path: Optional[PathLike] = None) -> Dataset:
    """``shots`` samples per class (e.g. a k-shot support set from a train split), drawn with ``seed``.

    A class with fewer samples contributes all it has. Saved to / read from ``path`` like
    :func:`subset`.
    """
    seed = _check_seed(seed)
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 1:
        raise ValueError(f"shots must be a positive integer, got {shots!r}")
    shots = int(shots)
    settings = {"seed": seed, "shots": shots}
    if path is not None and as_path(path).exists():
        return _from_subset_file(dataset, as_path(path), "few_shot", settings)
    labels = dataset.labels
    chosen: list[int] = []
    for c in range(dataset.num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) == 0:
            continue
        order = permutation(len(idx), (seed << 20) + c)
        chosen.extend(idx[order[:shots]].tolist())
    chosen.sort()
    record = _subset_record(dataset, "few_shot", settings, chosen)
    if path is not None:
        write_json_atomic(path, record)
    return dataset.select(
        chosen,
        name=_subset_name(dataset, record),
        meta={"subset_file": str(path) if path else None, "subset_indices": chosen},
    )


def load_subset(dataset: Dataset, path: PathLike) -> Dataset:
    """Rebuild a subset or few-shot set from its file (checks that ``dataset`` is the same one)."""
    return _from_subset_file(dataset, as_path(path), None, None)


# --------------------------------------------------------------------------------------------
# Noisy-TTA mixes (ZS-NTTA)
# --------------------------------------------------------------------------------------------


def resample_indices(n: int, size: int, seed: int) -> list[int]:
    """``size`` indices into a set of ``n``: a seeded sample without replacement when
    ``size <= n``; otherwise every index ``size // n`` times (tiling, as ZS-NTTA does) plus a
    seeded sample of ``size % n`` more."""
    if size < 0 or n < 0:
        raise ValueError("sizes must be non-negative")
    if size == 0:
        return []
    if n == 0:
        raise DatasetError(f"cannot draw {size} samples from an empty set")
    perm = permutation(n, seed)
    if size <= n:
        return perm[:size].tolist()
    return list(range(n)) * (size // n) + perm[: size % n].tolist()


def _ood_count(n_id: int, noisy_fraction: Optional[float], ood_ratio: Optional[float]) -> tuple[int, float, float]:
    if ood_ratio is not None:
        if not (isinstance(ood_ratio, (int, float)) and math.isfinite(ood_ratio) and ood_ratio >= 0):
            raise ValueError(f"ood_ratio must be a finite number >= 0, got {ood_ratio!r}")
        n_ood = int(n_id * float(ood_ratio))  # ZS-NTTA: int(|ID| * OOD_ratio)
        frac = n_ood / (n_id + n_ood) if n_id + n_ood else 0.0
        return n_ood, frac, float(ood_ratio)
    f = 0.5 if noisy_fraction is None else noisy_fraction
    if not (isinstance(f, (int, float)) and 0.0 <= f < 1.0):
        raise ValueError(f"noisy_fraction must be in [0, 1), got {f!r}")
    n_ood = int(round(n_id * f / (1.0 - f)))
    return n_ood, float(f), (n_ood / n_id if n_id else 0.0)


def _build_mix(id_ds: Dataset, ood_ds: Dataset, ood_indices: list[int], record: dict, path) -> Dataset:
    n_id = len(id_ds)
    id_paths = id_ds._paths
    ood_paths = ood_ds._paths
    samples = list(zip(id_paths, id_ds._labels.tolist()))
    samples += [(ood_paths[i], NOISY_LABEL) for i in ood_indices]
    is_noisy = np.zeros(len(samples), dtype=bool)
    is_noisy[n_id:] = True
    pct = int(round(100 * record["noisy_fraction"]))
    roots = [r for r in (id_ds.root, ood_ds.root) if r]
    try:  # relative paths (fingerprints, subset files) stay valid when $DATA moves
        root = os.path.commonpath(roots) if len(roots) == 2 else None
    except ValueError:  # different drives
        root = None
    mix = Dataset(
        samples,
        id_ds.classnames,
        name=f"{id_ds.name}+{ood_ds.name}@{pct}%",
        split=id_ds.split,
        root=root,
        is_noisy=is_noisy,
        meta={
            "id_name": id_ds.name,
            "ood_name": ood_ds.name,
            "noisy_fraction": record["noisy_fraction"],
            "ood_ratio": record["ood_ratio"],
            "n_id": n_id,
            "n_ood": len(ood_indices),
            "ood_indices": list(ood_indices),
            "mix_file": str(path) if path else None,
        },
    )
    return mix


def noisy_mix(
    id_dataset: Dataset,
    ood_dataset: Dataset,
    noisy_fraction: Optional[float] = 0.5,
    *,
    seed: int = 0,
    path: Optional[PathLike] = None,
    ood_ratio: Optional[float] = None,
) -> Dataset:
    """A noisy-TTA stream set: every ID sample plus noisy samples drawn from an OOD set.

    ``noisy_fraction`` is the share of noisy samples in the mix (0, 0.25, 0.5, 0.75), i.e.
    ``round(n_id * f / (1 - f))`` OOD samples. ``ood_ratio`` instead gives ZS-NTTA's
    ``OOD_ratio`` (noisy:clean, so 1.0 = 50% and ZS-NTTA's 0.33 ~ 25%), ``int(n_id * ood_ratio)``
    OOD samples. OOD samples are drawn with ``seed``, tiled when the OOD set is smaller
    (:func:`resample_indices`). Noisy samples get label ``NOISY_LABEL`` (-1) and ``is_noisy``
    True; the ID samples come first (streams shuffle with their own seed). With ``path``, the
    OOD indices are saved there, or read back when the file exists.
    """
    seed = _check_seed(seed)
    n_id = len(id_dataset)
    n_ood, frac, ratio = _ood_count(n_id, noisy_fraction, ood_ratio)
    settings = {"seed": seed, "noisy_fraction": frac, "ood_ratio": ratio}
    if path is not None and as_path(path).exists():
        p = as_path(path)
        obj = _read_json(p, MIX_FORMAT)
        _same_settings(p, obj, {"seed": seed, "n_ood": n_ood})
        return _mix_from_record(p, obj, id_dataset, ood_dataset)
    if n_ood and len(ood_dataset) == 0:
        raise DatasetError(f"OOD dataset {ood_dataset.name} is empty")
    ood_indices = resample_indices(len(ood_dataset), n_ood, seed)
    record = {
        "format": MIX_FORMAT,
        "version": VERSION,
        **settings,
        "id": _describe(id_dataset),
        "ood": _describe(ood_dataset),
        "n_id": n_id,
        "n_ood": n_ood,
        "ood_indices": ood_indices,
    }
    if path is not None:
        write_json_atomic(path, record)
    return _build_mix(id_dataset, ood_dataset, ood_indices, record, path)


def _mix_from_record(p: Path, obj: dict, id_ds: Dataset, ood_ds: Dataset) -> Dataset:
    _verify(p, "ID", obj.get("id"), id_ds)
    _verify(p, "OOD", obj.get("ood"), ood_ds)
    indices = _check_indices(p, obj.get("ood_indices"), len(ood_ds), "ood_indices")
    if obj.get("n_ood") != len(indices):
        raise DatasetError(f"{p}: n_ood is {obj.get('n_ood')} but ood_indices holds {len(indices)}")
    return _build_mix(id_ds, ood_ds, indices, obj, p)


def load_noisy_mix(path: PathLike, id_dataset: Dataset, ood_dataset: Dataset) -> Dataset:
    """Rebuild a noisy mix from its file (checks both datasets are the ones it was made from)."""
    p = as_path(path)
    return _mix_from_record(p, _read_json(p, MIX_FORMAT), id_dataset, ood_dataset)
