"""Shipped class names, WNIDs, template files and the registry's names."""

from __future__ import annotations

from importlib import resources

import pytest

import vlm_tta.data as D
from vlm_tta.errors import DatasetError

EXPECTED_CLASSES = {
    "imagenet": 1000,
    "imagenet_a": 200,
    "imagenet_r": 200,
    "imagenet_v2": 1000,
    "imagenet_sketch": 1000,
    "caltech101": 100,
    "dtd": 47,
    "eurosat": 10,
    "fgvc_aircraft": 100,
    "flowers102": 102,
    "food101": 101,
    "oxford_pets": 37,
    "stanford_cars": 196,
    "sun397": 397,
    "ucf101": 101,
}
EXPECTED_TEST_SIZES = {
    "caltech101": 2465,
    "dtd": 1692,
    "eurosat": 8100,
    "fgvc_aircraft": 3333,
    "flowers102": 2463,
    "food101": 30300,
    "oxford_pets": 3669,
    "stanford_cars": 8041,
    "sun397": 19850,
    "ucf101": 3783,
    "imagenet": 50000,
    "imagenet_sketch": 50889,
    "imagenet_a": 7500,
    "imagenet_r": 30000,
    "imagenet_v2": 10000,
    "inaturalist": 10000,
    "sun": 10000,
    "places": 10000,
    "textures": 5640,
}


def test_registry_lists_every_builtin_dataset():
    names = D.list_datasets()
    assert set(names) == set(EXPECTED_TEST_SIZES)
    assert set(D.list_datasets("ood")) == {"inaturalist", "sun", "places", "textures"}
    assert names[:5] == ["imagenet", "imagenet_a", "imagenet_r", "imagenet_sketch", "imagenet_v2"]


@pytest.mark.parametrize("name,n", sorted(EXPECTED_CLASSES.items()))
def test_class_counts_and_sizes(name, n):
    names = D.get_classnames(name)
    assert len(names) == n
    assert all(c == c.strip() and c for c in names)
    assert "_" not in "".join(names)
    reader = D.get_reader(name)
    assert reader.num_classes == n
    assert reader.split_sizes["test"] == EXPECTED_TEST_SIZES[name]


def test_ood_sizes_and_no_classnames():
    for name in ("inaturalist", "sun", "places", "textures"):
        assert D.get_reader(name).split_sizes["test"] == EXPECTED_TEST_SIZES[name]
        with pytest.raises(DatasetError, match="out-of-distribution"):
            D.get_classnames(name)


def test_imagenet_names_are_clips_curated_list():
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    assert D.get_classnames("imagenet") == list(IMAGENET_CLASSNAMES)
    assert D.get_classnames("imagenet")[:3] == ["tench", "goldfish", "great white shark"]
    wnids = D.imagenet_wnids()
    assert len(wnids) == 1000 and wnids == sorted(wnids) and len(set(wnids)) == 1000
    assert wnids[0] == "n01440764"


@pytest.mark.parametrize("stem", ["imagenet_a", "imagenet_r"])
def test_imagenet_a_r_subsets_map_into_1k(stem):
    from vlm_tta.data.resources import classnames_file

    all_w = D.imagenet_wnids()
    sub = classnames_file(f"{stem}_wnids")
    assert len(sub) == 200 and len(set(sub)) == 200
    idx = [all_w.index(w) for w in sub]
    assert idx == sorted(idx)  # 1k index order
    assert D.get_classnames(stem) == [D.imagenet_classnames()[i] for i in idx]


def test_imagenet_a_r_match_timm_reference_files():
    timm = pytest.importorskip("timm")
    info = resources.files(timm.__name__).joinpath("data", "_info")
    for k in ("a", "r"):
        s = info.joinpath(f"imagenet_{k}_synsets.txt").read_text().split()
        i = [int(x) for x in info.joinpath(f"imagenet_{k}_indices.txt").read_text().split()]
        from vlm_tta.data.resources import classnames_file

        assert classnames_file(f"imagenet_{k}_wnids") == s
        assert [D.imagenet_wnids().index(w) for w in s] == i
    assert info.joinpath("imagenet_synsets.txt").read_text().split() == D.imagenet_wnids()


def test_known_names_and_orders():
    assert D.get_classnames("A")[0] == "stingray"  # ImageNet-A's first class, 1k index 6
    assert D.get_classnames("eurosat") == [
        "Annual Crop Land",
        "Forest",
        "Herbaceous Vegetation Land",
        "Highway or Road",
        "Industrial Buildings",
        "Pasture Land",
        "Permanent Crop Land",
        "Residential Buildings",
        "River",
        "Sea or Lake",
    ]
    food = D.get_classnames("food101")
    assert food[16:18] == ["cheese plate", "cheesecake"]  # sorted folder order, as in CoOp's split
    assert D.get_classnames("caltech101")[:5] == ["face", "leopard", "motorbike", "accordion", "airplane"]
    assert D.get_classnames("oxford_pets")[:2] == ["abyssinian", "american bulldog"]
    assert D.get_classnames("stanford_cars")[0] == "2000 AM General Hummer SUV"
    assert D.get_classnames("sun397")[8] == "outdoor apartment building"
    assert D.get_classnames("ucf101")[0] == "Apply Eye Makeup"
    assert D.get_classnames("flowers102")[0] == "pink primrose"
    assert D.get_classnames("fgvc_aircraft")[0] == "707-320"


@pytest.mark.parametrize(
    "alias,name",
    [
        ("I", "imagenet"),
        ("A", "imagenet_a"),
        ("V", "imagenet_v2"),
        ("R", "imagenet_r"),
        ("K", "imagenet_sketch"),
        ("Flower102", "flowers102"),
        ("Cars", "stanford_cars"),
        ("Aircraft", "fgvc_aircraft"),
        ("Pets", "oxford_pets"),
        ("eurosat", "eurosat"),
        ("DTD", "dtd"),
        ("SUN397", "sun397"),
        ("UCF101", "ucf101"),
        ("Caltech101", "caltech101"),
        ("imagenet-a", "imagenet_a"),
        ("iNaturalist", "inaturalist"),
        ("Texture", "textures"),
        ("SUN", "sun"),
    ],
)
def test_aliases(alias, name):
    assert D.resolve_name(alias) == name


def test_unknown_name_suggests():
    with pytest.raises(DatasetError, match="did you mean") as e:
        D.get_classnames("imagenet_x")
    assert "ImageFolderDataset" in str(e.value)


def _template_file(stem):
    return resources.files("vlm_tta.prompts").joinpath("templates", f"{stem}.txt")


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASSES))
def test_template_sets_exist_and_are_well_formed(name):
    sets = D.get_templates_for(name)
    assert set(sets) == {"clip", "coop"}
    for stem in sets.values():
        lines = [ln for ln in _template_file(stem).read_text(encoding="utf-8").splitlines() if ln.strip()]
        assert lines and all(ln.count("{}") == 1 for ln in lines)
    coop = _template_file(sets["coop"]).read_text(encoding="utf-8").splitlines()
    assert len(coop) == 1


def test_specific_templates():
    def read(stem):
        return _template_file(stem).read_text(encoding="utf-8").splitlines()

    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    assert read("imagenet") == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert read("coop_oxford_pets") == ["a photo of a {}, a type of pet."]
    assert read("coop_dtd") == ["{} texture."]
    assert read("coop_eurosat") == ["a centered satellite photo of {}."]
    assert read("coop_ucf101") == ["a photo of a person doing {}."]
    assert read("food101") == ["a photo of {}, a type of food."]
    assert len(read("ucf101")) == 48 and len(read("caltech101")) == 34 and len(read("stanford_cars")) == 8
    assert D.get_templates_for("inaturalist") == {}


def test_dataset_info_has_layout():
    info = D.dataset_info("V")
    assert info["name"] == "imagenet_v2"
    assert "numeric order" in info["layout"]


def test_template_sets_load_through_the_template_loader():
    templates = pytest.importorskip("vlm_tta.templates")
    for name in EXPECTED_CLASSES:
        for stem in D.get_templates_for(name).values():
            assert templates.get_templates(stem)


def test_clip_imagenet_names_keep_their_known_duplicates():
    # CLIP's curated list names two pairs of classes alike; the papers use it as is.
    names = D.get_classnames("imagenet")
    assert names[657] == names[744] == "missile"
    assert names[836] == names[837] == "sunglasses"
    assert len(set(names)) == 998
