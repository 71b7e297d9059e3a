"""ImageNet family readers on fake layouts: class order, label mapping, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from fake_datasets import (
    class_color,
    make_imagenet_subset,
    make_imagenet_val,
    make_v2_numeric,
    make_wnid_folders,
    write_image,
)

import vlm_tta.data as D
from vlm_tta.errors import DatasetError

NAMES = D.imagenet_classnames()
WNIDS = D.imagenet_wnids()


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("in")
    make_imagenet_val(root / "imagenet" / "images" / "val")  # CoOp layout
    return root


def test_imagenet_val_labels_follow_wnid_order(imagenet_root):
    ds = D.get_dataset("imagenet", imagenet_root)
    assert len(ds) == 1000 and ds.classnames == NAMES and ds.split == "test"
    for i in (0, 1, 417, 999):
        img, y = ds[i]
        assert y == i
        assert Path(ds.path(i)).parent.name == WNIDS[i]
        assert img.mode == "RGB" and img.getpixel((0, 0)) == class_color(i)


@pytest.mark.parametrize("layout", ["ImageNet/val", "val", ""])
def test_imagenet_root_variants(tmp_path, imagenet_root, layout):
    src = imagenet_root / "imagenet" / "images" / "val"
    dst = tmp_path / layout if layout else tmp_path / "x"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst)
    root = tmp_path if layout else dst
    ds = D.get_dataset("I", root)
    assert len(ds) == 1000 and ds.labels[5] == 5


def test_imagenet_missing_class_folder_is_named(tmp_path):
    make_wnid_folders(tmp_path / "val", WNIDS[:-1])
    with pytest.raises(DatasetError) as e:
        D.get_dataset("imagenet", tmp_path)
    msg = str(e.value)
    assert WNIDS[-1] in msg and "missing" in msg and "Expected layout of ImageNet" in msg


def test_imagenet_unexpected_and_empty_folders(tmp_path):
    make_wnid_folders(tmp_path / "val", WNIDS)
    (tmp_path / "val" / "n99999999").mkdir()
    with pytest.raises(DatasetError, match="n99999999"):
        D.get_dataset("imagenet", tmp_path)
    shutil.rmtree(tmp_path / "val" / "n99999999")
    for f in (tmp_path / "val" / WNIDS[3]).iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match=f"no images.*{WNIDS[3]}"):
        D.get_dataset("imagenet", tmp_path)


def test_flat_val_archive_gets_a_specific_error(tmp_path):
    for i in range(3):
        write_image(tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
    with pytest.raises(DatasetError, match="valprep"):
        D.get_dataset("imagenet", tmp_path)


def test_missing_root():
    with pytest.raises(DatasetError, match="does not exist"):
        D.get_dataset("imagenet", "/nonexistent/vlm_tta_root")


def test_unknown_split():
    with pytest.raises(DatasetError, match="no split 'train'"):
        D.get_dataset("imagenet_a", "/tmp", split="train")


@pytest.fixture(scope="module")
def a_r_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ar")
    make_imagenet_subset(root / "imagenet-adversarial" / "imagenet-a", "imagenet_a", per_class=2)
    (root / "imagenet-adversarial" / "imagenet-a" / "README.txt").write_text("readme")
    make_imagenet_subset(root / "imagenet-r", "imagenet_r")
    return root


def test_imagenet_a_wnid_gets_its_1k_index_and_name(a_r_root):
    ds = D.get_dataset("A", a_r_root)
    assert ds.name == "imagenet_a" and len(ds) == 400 and ds.num_classes == 200
    # n01498041 (stingray) is ImageNet class 6 and ImageNet-A class 0
    i = next(k for k in range(len(ds)) if "/n01498041/" in ds.path(k))
    img, y = ds[i]
    assert y == 0 and ds.classnames[y] == "stingray" and ds.meta["imagenet_indices"][y] == 6
    assert img.getpixel((0, 0)) == class_color(6)  # the fake image was painted with its 1k index
    # every sample: its folder's 1k index maps back through meta
    for k in range(0, len(ds), 37):
        wnid = Path(ds.path(k)).parent.name
        y = ds.label(k)
        assert ds.meta["wnids"][y] == wnid
        assert ds.classnames[y] == NAMES[WNIDS.index(wnid)]
        assert ds[k][0].getpixel((0, 0)) == class_color(ds.meta["imagenet_indices"][y])


def test_imagenet_a_in_1k_label_space(a_r_root):
    ds = D.get_dataset("imagenet_a", a_r_root, label_space="imagenet")
    assert ds.num_classes == 1000 and ds.classnames == NAMES
    for k in range(0, len(ds), 53):
        assert WNIDS[ds.label(k)] == Path(ds.path(k)).parent.name


def test_imagenet_r(a_r_root):
    ds = D.get_dataset("R", a_r_root)
    assert ds.num_classes == 200 and len(ds) == 200
    assert ds.labels.tolist() == list(range(200))
    for k in (0, 100, 199):
        assert ds[k][0].getpixel((0, 0)) == class_color(ds.meta["imagenet_indices"][k])


def test_imagenet_a_rejects_a_folder_outside_its_200(tmp_path):
    base = make_imagenet_subset(tmp_path / "imagenet-a", "imagenet_a")
    make_wnid_folders(base, [WNIDS[0]])  # tench is not an ImageNet-A class
    with pytest.raises(DatasetError, match=f"unexpected.*{WNIDS[0]}"):
        D.get_dataset("imagenet_a", tmp_path)


@pytest.fixture(scope="module")
def v2_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("v2")
    make_v2_numeric(root / "imagenetv2" / "imagenetv2-matched-frequency-format-val")
    return root


def test_v2_numeric_folders_in_numeric_order(v2_root):
    ds = D.get_dataset("V", v2_root)
    assert len(ds) == 1000 and ds.classnames == NAMES and ds.meta["format"] == "numeric"
    assert ds.labels.tolist() == list(range(1000))
    # the image in folder "10" gets ImageNet class 10 (not the lexicographic 3rd folder)
    i = next(k for k in range(len(ds)) if Path(ds.path(k)).parent.name == "10")
    img, y = ds[i]
    assert y == 10 and ds.classnames[10] == NAMES[10]
    assert img.getpixel((0, 0)) == class_color(10)
    for k in (2, 100, 999):
        assert Path(ds.path(k)).parent.name == str(k)


def test_v2_wnid_formatted_release(tmp_path):
    make_wnid_folders(tmp_path / "imagenetv2-matched-frequency-format-val", WNIDS)
    ds = D.get_dataset("imagenet_v2", tmp_path)
    assert ds.meta["format"] == "wnid" and ds.labels.tolist() == list(range(1000))


def test_v2_missing_and_mixed_folders(tmp_path):
    base = make_v2_numeric(tmp_path / "v2")
    shutil.rmtree(base / "10")
    with pytest.raises(DatasetError, match=r"missing.*10/"):
        D.get_dataset("V", base)
    make_wnid_folders(base, [WNIDS[10]])
    with pytest.raises(DatasetError, match="mixes numeric"):
        D.get_dataset("V", base)


def test_sketch(tmp_path):
    make_wnid_folders(tmp_path / "ImageNet-Sketch" / "sketch", WNIDS, ext=".JPEG")
    ds = D.get_dataset("K", tmp_path)
    assert len(ds) == 1000 and ds.classnames == NAMES and int(np.sum(ds.labels == 7)) == 1


def test_check_report_counts(v2_root):
    rep = D.check_dataset("imagenet_v2", v2_root)
    assert rep.found_classes == 1000 and rep.expected_classes == 1000
    assert rep.found_images == 1000 and rep.expected_images == 10_000
    assert not rep.ok and not rep.problems
    text = rep.format()
    assert "10,000" in text and "MISMATCH" in text
