"""Users' data (folder per class, CSV, image folder) and the OOD-set readers."""

from __future__ import annotations

import pytest
from fake_datasets import class_color, make_flat_images, make_textures, symlink_or_skip, write_image

import vlm_tta.data as D
from vlm_tta.errors import DatasetError


def test_image_folder_dataset(tmp_path):
    for name, y in (("golden_retriever", 0), ("tabby_cat", 1)):
        for k in range(2):
            write_image(tmp_path / name / f"{k}.jpg", y)
    (tmp_path / "tabby_cat" / "notes.txt").write_text("x")
    ds = D.ImageFolderDataset(tmp_path)
    assert ds.classnames == ["golden retriever", "tabby cat"] and len(ds) == 4
    assert ds[3][0].getpixel((0, 0)) == class_color(1) and ds[3][1] == 1
    assert ds.meta["skipped_files"] == ["tabby_cat/notes.txt"]
    names = tmp_path.parent / "names.txt"
    names.write_text("dog\ncat\n")
    assert D.ImageFolderDataset(tmp_path, classnames=names).classnames == ["dog", "cat"]
    with pytest.raises(DatasetError, match="1 class names given for 2"):
        D.ImageFolderDataset(tmp_path, classnames=["dog"])


def test_image_folder_numeric_order_and_errors(tmp_path):
    for c in (0, 1, 2, 10):
        write_image(tmp_path / "d" / str(c) / "a.png", c)
    ds = D.ImageFolderDataset(tmp_path / "d")
    assert ds.classnames == ["0", "1", "2", "10"] and ds[3][1] == 3
    (tmp_path / "d" / "11").mkdir()
    with pytest.raises(DatasetError, match="no images.*11/"):
        D.ImageFolderDataset(tmp_path / "d")
    with pytest.raises(DatasetError, match="does not exist"):
        D.ImageFolderDataset(tmp_path / "nope")


def _csv(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_with_names(tmp_path):
    write_image(tmp_path / "img" / "a.png", 0)
    write_image(tmp_path / "img" / "b.png", 1)
    f = _csv(tmp_path / "list.csv", "path,label\nimg/a.png,cat\nimg/b.png,dog\n")
    ds = D.CsvDataset(f)
    assert ds.classnames == ["cat", "dog"] and ds.labels.tolist() == [0, 1]
    assert ds[1][0].getpixel((0, 0)) == class_color(1)


def test_csv_with_classname_file_and_indices(tmp_path):
    write_image(tmp_path / "a.png", 0)
    write_image(tmp_path / "b.png", 1)
    names = _csv(tmp_path / "names.txt", "zebra\nyak\n")
    f = _csv(tmp_path / "l.csv", "label,path,extra\n1,a.png,x\nzebra,b.png,y\n")
    ds = D.CsvDataset(f, classnames=names)
    assert ds.classnames == ["zebra", "yak"] and ds.labels.tolist() == [1, 0]


def test_csv_errors_name_the_file(tmp_path):
    write_image(tmp_path / "a.png", 0)
    names = _csv(tmp_path / "names.txt", "zebra\nyak\n")
    f = _csv(tmp_path / "l.csv", "path,label\na.png,horse\na.png,7\n")
    with pytest.raises(DatasetError) as e:
        D.CsvDataset(f, classnames=names)
    msg = str(e.value)
    assert str(f) in msg and "'horse'" in msg and "line 3" in msg and "Expected CSV layout" in msg
    f = _csv(tmp_path / "l.csv", "file,class\na.png,yak\n")
    with pytest.raises(DatasetError, match="lacks column.*path, label"):
        D.CsvDataset(f)
    f = _csv(tmp_path / "l.csv", "path,label\n../../etc/passwd,yak\n")
    with pytest.raises(DatasetError, match="outside"):
        D.CsvDataset(f, classnames=names)
    f = _csv(tmp_path / "l.csv", "path,label\n/etc/hostname,yak\n")
    with pytest.raises(DatasetError, match="outside"):
        D.CsvDataset(f, classnames=names)
    f = _csv(tmp_path / "l.csv", "path,label\nmissing.png,yak\n")
    with pytest.raises(DatasetError, match="missing.png"):
        D.CsvDataset(f, classnames=names)
    f = _csv(tmp_path / "l.csv", "path,label\na.png,0\n")
    with pytest.raises(DatasetError, match="integer labels but no class names"):
        D.CsvDataset(f)
    with pytest.raises(DatasetError, match="does not exist"):
        D.CsvDataset(tmp_path / "none.csv")
    dup = _csv(tmp_path / "dup.txt", "a\na\n")
    with pytest.raises(DatasetError, match="twice"):
        D.CsvDataset(_csv(tmp_path / "l.csv", "path,label\na.png,a\n"), classnames=dup)


def test_csv_symlink_escape_refused(tmp_path):
    outside = write_image(tmp_path / "outside.png")
    (tmp_path / "data").mkdir()
    symlink_or_skip(outside, tmp_path / "data" / "link.png")
    f = _csv(tmp_path / "data" / "l.csv", "path,label\nlink.png,cat\n")
    with pytest.raises(DatasetError, match="outside"):
        D.CsvDataset(f)


@pytest.mark.parametrize("name,folder", [("inaturalist", "iNaturalist"), ("sun", "SUN"), ("places", "Places")])
def test_ood_readers(tmp_path, name, folder):
    make_flat_images(tmp_path / folder / "images", 6)
    ds = D.get_dataset(name, tmp_path)
    assert len(ds) == 6 and ds.classnames == [] and (ds.labels == -1).all() and ds.is_noisy.all()
    assert D.get_dataset(name, tmp_path / folder).samples == ds.samples
    rep = D.check_dataset(name, tmp_path)
    assert rep.found_images == 6 and rep.expected_images == 10_000 and not rep.ok


def test_textures_ood_is_all_of_dtd(tmp_path):
    base = make_textures(tmp_path, ("banded", "zigzagged"), per_class=3)
    ds = D.get_dataset("Texture", tmp_path)
    assert len(ds) == 6 and (ds.labels == -1).all()
    assert D.get_dataset("textures", base / "images").samples == ds.samples


def test_ood_empty_folder(tmp_path):
    (tmp_path / "iNaturalist" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        D.get_dataset("inaturalist", tmp_path)


def test_image_dir_as_ood_set(tmp_path):
    make_flat_images(tmp_path / "a", 2)
    make_flat_images(tmp_path / "a" / "sub", 2, start=10)
    ds = D.ImageDirDataset(tmp_path / "a")
    assert len(ds) == 4 and ds.relpath(3) == "sub/img_00011.jpg"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        D.ImageDirDataset(tmp_path / "empty")
