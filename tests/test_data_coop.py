"""CoOp-layout readers (split_zhou_*.json), FGVC-Aircraft, and bad split files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fake_datasets import COOP, class_color, make_aircraft, make_coop, symlink_or_skip, write_image

import vlm_tta.data as D
from vlm_tta.data.base import DatasetWarning
from vlm_tta.errors import DatasetError


@pytest.mark.parametrize("name", sorted(COOP))
def test_coop_dataset_labels_and_names(tmp_path, name):
    n = len(D.get_classnames(name))
    labels = [0, 1, n - 1]
    make_coop(tmp_path, name, labels, per_class=2)
    ds = D.get_dataset(name, tmp_path)  # root above the dataset folder
    assert ds.name == name and ds.split == "test" and len(ds) == 6
    assert ds.classnames == D.get_classnames(name)
    assert sorted(set(ds.labels.tolist())) == labels
    for i in range(len(ds)):
        img, y = ds[i]
        assert img.getpixel((0, 0)) == class_color(y)
        assert f"_{y:03d}_" in ds.path(i)
    # the dataset folder itself as root works too
    ds2 = D.get_dataset(name, tmp_path / COOP[name][0])
    assert ds2.samples == ds.samples


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_coop_splits(tmp_path, split):
    make_coop(tmp_path, "dtd", [3, 4], per_class=1)
    ds = D.get_dataset("DTD", tmp_path, split=split)
    assert all(f"{split}_" in p for p in ds.paths) and len(ds) == 2


def test_eurosat_expanded_names(tmp_path):
    make_coop(tmp_path, "eurosat", [0, 3])
    ds = D.get_dataset("eurosat", tmp_path)
    assert ds.classnames[ds.label(0)] == "Annual Crop Land"
    assert {ds.classnames[y] for y in ds.labels} == {"Annual Crop Land", "Highway or Road"}


def test_missing_split_file_names_it(tmp_path):
    base = make_coop(tmp_path, "oxford_pets")
    (base / "split_zhou_OxfordPets.json").unlink()
    with pytest.raises(DatasetError) as e:
        D.get_dataset("pets", tmp_path)
    msg = str(e.value)
    assert "split_zhou_OxfordPets.json" in msg and "missing" in msg and "Expected layout of OxfordPets" in msg


def test_split_file_elsewhere(tmp_path):
    base = make_coop(tmp_path, "oxford_pets")
    moved = tmp_path / "splits" / "pets.json"
    moved.parent.mkdir()
    (base / "split_zhou_OxfordPets.json").rename(moved)
    ds = D.get_dataset("oxford_pets", base, split_file=moved)
    assert len(ds) == 6


def test_missing_image_named(tmp_path):
    base = make_coop(tmp_path, "food101")
    victim = next((base / "images").glob("test_*/*.jpg"))
    victim.unlink()
    with pytest.raises(DatasetError, match=victim.name):
        D.get_dataset("food101", tmp_path)
    rep = D.check_dataset("food101", tmp_path)
    assert any(victim.name in m for m in rep.missing) and not rep.ok


def test_missing_image_folder(tmp_path):
    base = make_coop(tmp_path, "sun397")
    (base / "SUN397").rename(base / "elsewhere")
    with pytest.raises(DatasetError, match="image folder .*SUN397 is missing"):
        D.get_dataset("sun397", tmp_path)


def _rewrite(base: Path, fname: str, fn):
    data = json.loads((base / fname).read_text())
    fn(data)
    (base / fname).write_text(json.dumps(data))


@pytest.mark.parametrize("bad_path", ["../../outside.jpg", "/etc/passwd", "a/../../../outside.jpg"])
def test_split_entry_escaping_root_is_refused(tmp_path, bad_path):
    base = make_coop(tmp_path / "data", "dtd")
    write_image(tmp_path / "outside.jpg")
    _rewrite(base, "split_zhou_DescribableTextures.json", lambda d: d["test"].append([bad_path, 0, "banded"]))
    with pytest.raises(DatasetError, match="outside"):
        D.get_dataset("dtd", tmp_path / "data")


def test_symlink_escaping_root_is_refused(tmp_path):
    base = make_coop(tmp_path / "data", "dtd")
    secret = write_image(tmp_path / "secret.jpg")
    symlink_or_skip(secret, base / "images" / "link.jpg")
    _rewrite(base, "split_zhou_DescribableTextures.json", lambda d: d["test"].append(["link.jpg", 0, "banded"]))
    with pytest.raises(DatasetError, match="outside"):
        D.get_dataset("dtd", tmp_path / "data")


def test_symlinked_dataset_folder_is_fine(tmp_path):
    real = make_coop(tmp_path / "real", "dtd")
    (tmp_path / "data").mkdir()
    symlink_or_skip(real, tmp_path / "data" / "dtd")
    ds = D.get_dataset("dtd", tmp_path / "data")
    assert len(ds) == 6


def test_bad_json_and_structure(tmp_path):
    base = make_coop(tmp_path, "ucf101")
    f = base / "split_zhou_UCF101.json"
    f.write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        D.get_dataset("ucf101", tmp_path)
    f.write_text(json.dumps({"train": []}))
    with pytest.raises(DatasetError, match="no 'test' list"):
        D.get_dataset("ucf101", tmp_path)
    f.write_text(json.dumps([1, 2]))
    with pytest.raises(DatasetError, match="JSON object"):
        D.get_dataset("ucf101", tmp_path)
    f.write_text(json.dumps({"test": [["a.jpg", "zero", "x"]]}))
    with pytest.raises(DatasetError, match="not \\[path, integer label"):
        D.get_dataset("ucf101", tmp_path)


def test_label_out_of_range(tmp_path):
    base = make_coop(tmp_path, "eurosat")
    _rewrite(base, "split_zhou_EuroSAT.json", lambda d: d["test"].append(["x.jpg", 10, "Nope"]))
    with pytest.raises(DatasetError, match="outside 0..9"):
        D.get_dataset("eurosat", tmp_path)


def test_classname_mismatch_warns_and_keeps_shipped(tmp_path):
    base = make_coop(tmp_path, "caltech101", [0, 5])

    def swap(d):
        for e in d["test"]:
            if e[1] == 5:
                e[2] = "something_else"

    _rewrite(base, "split_zhou_Caltech101.json", swap)
    with pytest.warns(DatasetWarning, match="something_else"):
        ds = D.get_dataset("caltech101", tmp_path)
    assert ds.classnames == D.get_classnames("caltech101")


def test_aircraft_from_variant_files(tmp_path):
    make_aircraft(tmp_path, labels=(0, 5, 99))
    ds = D.get_dataset("Aircraft", tmp_path)
    assert len(ds) == 6 and ds.classnames[99] == "Yak-42"
    for i in range(len(ds)):
        assert ds[i][0].getpixel((0, 0)) == class_color(ds.label(i))
    assert sorted(set(ds.labels.tolist())) == [0, 5, 99]
    assert len(D.get_dataset("fgvc_aircraft", tmp_path, split="trainval")) == 6


def test_aircraft_errors(tmp_path):
    base = make_aircraft(tmp_path)
    (base / "images_variant_test.txt").write_text("1234567 Not-A-Plane\n")
    with pytest.raises(DatasetError, match="Not-A-Plane"):
        D.get_dataset("fgvc_aircraft", tmp_path)
    (base / "images_variant_test.txt").write_text("../../etc 707-320\n")
    with pytest.raises(DatasetError, match="outside"):
        D.get_dataset("fgvc_aircraft", tmp_path)
    (base / "variants.txt").unlink()
    with pytest.raises(DatasetError, match="variants.txt is missing"):
        D.get_dataset("fgvc_aircraft", base)


def test_generic_split_json_dataset(tmp_path):
    img = tmp_path / "imgs"
    write_image(img / "cats" / "1.jpg", 0)
    write_image(img / "dogs" / "1.jpg", 1)
    sf = tmp_path / "split.json"
    sf.write_text(json.dumps({"test": [["cats/1.jpg", 0, "tabby_cat"], ["dogs/1.jpg", 1, "dog"]]}))
    ds = D.SplitJsonDataset(sf, img)
    assert ds.classnames == ["tabby cat", "dog"] and ds.labels.tolist() == [0, 1]
    ds2 = D.SplitJsonDataset(sf, img, classnames=["cat", "dog"])
    assert ds2.classnames == ["cat", "dog"]
    sf.write_text(json.dumps({"test": [["../x.jpg", 0, "a"]]}))
    with pytest.raises(DatasetError, match="outside"):
        D.SplitJsonDataset(sf, img)


def test_coop_check_lists_escapes_and_missing(tmp_path):
    base = make_coop(tmp_path, "dtd")
    _rewrite(
        base,
        "split_zhou_DescribableTextures.json",
        lambda d: d["test"].extend([["../evil.jpg", 0, "banded"], ["banded/gone.jpg", 0, "banded"]]),
    )
    rep = D.check_dataset("dtd", tmp_path)
    assert any("gone.jpg" in m for m in rep.missing)
    assert any("evil.jpg" in u for u in rep.unexpected)
    assert rep.found_images == 6 and not rep.ok
    assert os.path.basename(rep.files[0]) == "split_zhou_DescribableTextures.json"


def test_eurosat_split_with_raw_folder_names_is_accepted_silently(tmp_path):
    import warnings

    base = make_coop(tmp_path, "eurosat", [0, 9])

    def raw(d):
        for e in d["test"]:
            e[2] = {0: "AnnualCrop", 9: "SeaLake"}[e[1]]

    _rewrite(base, "split_zhou_EuroSAT.json", raw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetWarning)
        ds = D.get_dataset("eurosat", tmp_path)
    assert ds.classnames[9] == "Sea or Lake"


def test_food101_tpt_class_names_are_a_named_option(tmp_path):
    make_coop(tmp_path, "food101", [16, 17], per_class=1)
    ds = D.get_dataset("food101", tmp_path)
    assert ds.classnames[16:18] == ["cheese plate", "cheesecake"]
    tpt = D.get_dataset("food101", tmp_path, classnames="food101_tpt")
    assert tpt.classnames[16:18] == ["cheesecake", "cheese plate"]
    assert tpt.classnames[:16] == ds.classnames[:16] and tpt.classnames[18:] == ds.classnames[18:]
    assert tpt.labels.tolist() == ds.labels.tolist()  # labels still come from the split file
    custom = D.get_dataset("food101", tmp_path, classnames=[f"c{i}" for i in range(101)])
    assert custom.classnames[16] == "c16"
    with pytest.raises(DatasetError, match="3 class names given for 101"):
        D.get_dataset("food101", tmp_path, classnames=["a", "b", "c"])
    with pytest.raises(DatasetError, match="no shipped class-name list"):
        D.get_dataset("food101", tmp_path, classnames="food101_nope")
