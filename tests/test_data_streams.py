"""Lazy loading, seeded stream orders, corrupt images, and decoding of odd image modes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from fake_datasets import class_color, write_corrupt, write_image
from PIL import Image

import vlm_tta.data as D
from vlm_tta.data.base import CorruptImageWarning, permutation
from vlm_tta.errors import ImageError


@pytest.fixture
def folder_ds(tmp_path):
    for c in range(4):
        for k in range(5):
            write_image(tmp_path / f"class_{c}" / f"{k}.png", c)
    return D.ImageFolderDataset(tmp_path)


def test_permutation_is_deterministic_and_pinned():
    p = permutation(10, 0)
    assert sorted(p.tolist()) == list(range(10))
    assert p.tolist() == permutation(10, 0).tolist()
    assert p.tolist() != permutation(10, 1).tolist()
    # pinned: the order must never change across platforms or library versions
    assert permutation(10, 0).tolist() == PINNED_SEED0
    assert permutation(10, 123).tolist() == PINNED_SEED123
    big = permutation(50_000, 7)
    assert len(np.unique(big)) == 50_000


# SplitMix64-keyed orders, checked against a pure-Python SplitMix64 when they were frozen
PINNED_SEED0 = [1, 4, 5, 7, 6, 9, 0, 3, 2, 8]
PINNED_SEED123 = [8, 7, 9, 1, 3, 2, 5, 6, 0, 4]


def test_permutation_rejects_bad_seeds():
    with pytest.raises(ValueError):
        permutation(5, -1)
    with pytest.raises(TypeError):
        permutation(5, 1.5)


def test_dataset_is_lazy(tmp_path, monkeypatch):
    for c in range(3):
        write_image(tmp_path / f"c{c}" / "a.png", c)
    opened = []
    real_open = Image.open

    def spy(*a, **k):
        opened.append(a[0])
        return real_open(*a, **k)

    monkeypatch.setattr(Image, "open", spy)
    ds = D.ImageFolderDataset(tmp_path)
    assert len(ds) == 3 and opened == []  # nothing decoded up front
    ds[1]
    assert len(opened) == 1


def test_stream_orders(folder_ds):
    s1 = list(folder_ds.stream(seed=3, with_index=True))
    s2 = list(folder_ds.stream(seed=3, with_index=True))
    s3 = list(folder_ds.stream(seed=4, with_index=True))
    idx1 = [i for i, _, _ in s1]
    assert idx1 == [i for i, _, _ in s2] == folder_ds.order(3).tolist()
    assert idx1 != [i for i, _, _ in s3]
    assert sorted(idx1) == list(range(20))
    for i, img, y in s1:
        assert y == folder_ds.label(i) and img.getpixel((0, 0)) == class_color(y)
    # seed=None: the dataset's own order; plain iteration does the same
    assert [y for _, y in folder_ds.stream(seed=None)] == folder_ds.labels.tolist()
    assert [y for _, y in folder_ds] == folder_ds.labels.tolist()


def test_stream_resume(folder_ds):
    full = [i for i, _, _ in folder_ds.stream(seed=9, with_index=True)]
    st = folder_ds.stream(seed=9, start=12, with_index=True)
    assert len(st) == 8
    assert [i for i, _, _ in st] == full[12:]


def test_corrupt_image_is_reported_and_skipped(tmp_path):
    for k in range(3):
        write_image(tmp_path / "a" / f"{k}.png", 0)
        write_image(tmp_path / "b" / f"{k}.png", 1)
    bad = write_corrupt(tmp_path / "b" / "1.png")
    ds = D.ImageFolderDataset(tmp_path)
    st = ds.stream(seed=0, with_index=True)
    with pytest.warns(CorruptImageWarning, match="1.png"):
        items = list(st)
    assert len(items) == 5 and st.n_skipped == 1
    assert st.skipped[0][1] == str(bad)
    for i, img, y in items:  # never mislabelled: each image's colour matches its label
        assert img.getpixel((0, 0)) == class_color(y) and ds.path(i) != str(bad)
    with pytest.raises(ImageError, match="1.png"):
        ds[ds.paths.index(str(bad))]
    with pytest.raises(ImageError):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            list(ds.stream(seed=0, skip_corrupt=False))


def _save(img: Image.Image, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def test_odd_modes_decode_to_the_right_rgb(tmp_path):
    cases = {}
    cases["L"] = (_save(Image.new("L", (4, 4), 100), tmp_path / "m" / "l.png"), (100, 100, 100))
    cases["LA"] = (_save(Image.new("LA", (4, 4), (50, 0)), tmp_path / "m" / "la.png"), (255, 255, 255))
    p = Image.new("P", (4, 4), 0)
    p.putpalette([10, 20, 30] + [0] * 765)
    cases["P"] = (_save(p, tmp_path / "m" / "p.png"), (10, 20, 30))
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    cases["RGBA"] = (_save(rgba, tmp_path / "m" / "rgba.png"), (127, 127, 127))
    i16 = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    cases["I;16"] = (_save(i16, tmp_path / "m" / "i16.png"), (255, 255, 255))
    i16h = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    cases["I;16 half"] = (_save(i16h, tmp_path / "m" / "i16h.png"), (128, 128, 128))
    cases["CMYK"] = (_save(Image.new("CMYK", (4, 4), (0, 255, 0, 0)), tmp_path / "m" / "cmyk.tif"), (255, 0, 255))
    cases["1"] = (_save(Image.new("1", (4, 4), 1), tmp_path / "m" / "one.png"), (255, 255, 255))
    ds = D.ImageDirDataset(tmp_path / "m")
    by_name = {p.split("/")[-1]: i for i, p in enumerate(ds.paths)}
    for mode, (path, rgb) in cases.items():
        img, y = ds[by_name[path.name]]
        assert img.mode == "RGB", mode
        assert img.getpixel((0, 0)) == rgb, mode
        assert y == D.NOISY_LABEL


def test_dataset_accessors(folder_ds):
    assert folder_ds.num_classes == 4
    assert folder_ds.class_counts().tolist() == [5, 5, 5, 5]
    assert folder_ds.samples[0] == (folder_ds.path(0), 0)
    assert folder_ds.relpath(0) == "class_0/0.png"
    assert folder_ds[-1][1] == 3
    with pytest.raises(IndexError):
        folder_ds[20]
    with pytest.raises(TypeError):
        folder_ds["0"]
    sel = folder_ds.select([19, 0])
    assert sel.labels.tolist() == [3, 0] and sel.classnames == folder_ds.classnames
    assert "samples=20" in repr(folder_ds)
    assert len(folder_ds.fingerprint()) == 64


def _splitmix64_reference(x: int) -> int:
    m = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


@pytest.mark.parametrize("seed", [0, 1, 2**40 + 3])
def test_permutation_matches_pure_python_splitmix(seed):
    key = _splitmix64_reference(seed)
    ref = sorted(range(1000), key=lambda i: (_splitmix64_reference(i ^ key), i))
    assert permutation(1000, seed).tolist() == ref
