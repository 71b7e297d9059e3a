"""Seeded subsets, few-shot sets and noisy-TTA mixes, and their files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fake_datasets import make_flat_images, write_image

import vlm_tta.data as D
from vlm_tta.errors import DatasetError


@pytest.fixture
def id_ds(tmp_path):
    for c in range(5):
        for k in range(8):
            write_image(tmp_path / "id" / f"c{c}" / f"{k}.png", c)
    return D.ImageFolderDataset(tmp_path / "id", name="toy")


@pytest.fixture
def ood_ds(tmp_path):
    return D.ImageDirDataset(make_flat_images(tmp_path / "ood", 7), name="toy_ood")


def test_subset_is_reproducible_from_its_file(tmp_path, id_ds):
    f = tmp_path / "runs" / "subset.json"
    a = D.subset(id_ds, 12, seed=3, path=f)
    assert len(a) == 12 and f.is_file()
    rec = json.loads(f.read_text())
    assert rec["format"] == "vlm_tta.subset" and rec["seed"] == 3 and rec["size"] == 12
    assert rec["dataset"]["fingerprint"] == id_ds.fingerprint() and len(rec["indices"]) == 12
    assert rec["samples"][0] == [id_ds.relpath(rec["indices"][0]), id_ds.label(rec["indices"][0])]
    assert not [p for p in f.parent.iterdir() if p.name != "subset.json"]  # no temp files left
    b = D.subset(id_ds, 12, seed=3, path=f)  # read back
    assert b.samples == a.samples
    c = D.load_subset(id_ds, f)
    assert c.samples == a.samples
    assert D.subset(id_ds, 12, seed=3).samples == a.samples  # same draw without a file
    assert D.subset(id_ds, 12, seed=4).samples != a.samples
    assert a.paths == sorted(a.paths, key=id_ds.paths.index)  # keeps dataset order


def test_subset_file_checks(tmp_path, id_ds):
    f = tmp_path / "s.json"
    D.subset(id_ds, 10, seed=0, path=f)
    with pytest.raises(DatasetError, match="other settings"):
        D.subset(id_ds, 11, seed=0, path=f)
    other = id_ds.select(range(1, len(id_ds)))
    with pytest.raises(DatasetError, match="different sample list"):
        D.load_subset(other, f)
    f.write_text("[]")
    with pytest.raises(DatasetError, match="not a vlm_tta.subset file"):
        D.load_subset(id_ds, f)
    with pytest.raises(DatasetError, match="cannot draw"):
        D.subset(id_ds, 1000)


def test_few_shot(tmp_path, id_ds):
    f = tmp_path / "fs.json"
    fs = D.few_shot(id_ds, 3, seed=1, path=f)
    assert fs.class_counts().tolist() == [3] * 5
    assert D.few_shot(id_ds, 3, seed=1, path=f).samples == fs.samples
    assert D.few_shot(id_ds, 3, seed=2).samples != fs.samples
    assert D.few_shot(id_ds, 100, seed=0).class_counts().tolist() == [8] * 5
    with pytest.raises(DatasetError, match="'few_shot' one|not a 'random'"):
        D.subset(id_ds, 15, seed=1, path=f)


@pytest.mark.parametrize("frac,n_ood", [(0.0, 0), (0.25, 13), (0.5, 40), (0.75, 120)])
def test_noisy_mix_fractions(id_ds, ood_ds, frac, n_ood):
    mix = D.noisy_mix(id_ds, ood_ds, frac, seed=0)
    assert len(mix) == 40 + n_ood
    assert int(mix.is_noisy.sum()) == n_ood
    assert (mix.labels[mix.is_noisy] == D.NOISY_LABEL).all()
    assert mix.labels[:40].tolist() == id_ds.labels.tolist()
    assert mix.classnames == id_ds.classnames
    assert abs(mix.meta["noisy_fraction"] - frac) < 1e-9


def test_noisy_mix_tiles_a_small_ood_set(id_ds, ood_ds):
    mix = D.noisy_mix(id_ds, ood_ds, 0.5, seed=5)  # 40 noisy from 7 OOD images
    idx = mix.meta["ood_indices"]
    counts = np.bincount(idx, minlength=7)
    assert counts.sum() == 40 and counts.min() >= 40 // 7 and counts.max() <= 40 // 7 + 1
    assert idx[:35] == list(range(7)) * 5
    assert D.resample_indices(7, 40, 5)[35:] == D.permutation(7, 5)[:5].tolist()
    assert D.resample_indices(10, 4, 0) == D.permutation(10, 0)[:4].tolist()


def test_noisy_mix_zs_ntta_ratio(id_ds, ood_ds):
    mix = D.noisy_mix(id_ds, ood_ds, ood_ratio=0.33, seed=0)
    assert int(mix.is_noisy.sum()) == int(40 * 0.33)


def test_noisy_mix_rebuilt_from_its_file(tmp_path, id_ds, ood_ds):
    f = tmp_path / "mix.json"
    a = D.noisy_mix(id_ds, ood_ds, 0.75, seed=2, path=f)
    rec = json.loads(f.read_text())
    assert rec["format"] == "vlm_tta.noisy_mix" and rec["n_ood"] == 120 and len(rec["ood_indices"]) == 120
    b = D.noisy_mix(id_ds, ood_ds, 0.75, seed=2, path=f)
    c = D.load_noisy_mix(f, id_ds, ood_ds)
    assert a.samples == b.samples == c.samples
    assert (c.is_noisy == a.is_noisy).all()
    with pytest.raises(DatasetError, match="other settings"):
        D.noisy_mix(id_ds, ood_ds, 0.5, seed=2, path=f)
    with pytest.raises(DatasetError, match="OOD dataset"):
        D.load_noisy_mix(f, id_ds, ood_ds.select(range(6)))
    # a stream over the mix is seeded too, and noisy samples keep label -1
    order = [(i, y) for i, _, y in c.stream(seed=1, with_index=True)]
    assert all((y == -1) == bool(c.is_noisy[i]) for i, y in order)


def test_noisy_mix_bad_fraction(id_ds, ood_ds):
    with pytest.raises(ValueError):
        D.noisy_mix(id_ds, ood_ds, 1.0)


def test_mix_paths_are_relative_to_the_common_root(tmp_path, id_ds, ood_ds):
    import pickle

    mix = D.noisy_mix(id_ds, ood_ds, 0.5, seed=0)
    assert mix.relpath(0).startswith("id/c0/") and mix.relpath(len(mix) - 1).startswith("ood/")
    clone = pickle.loads(pickle.dumps(mix))  # picklable for DataLoader workers
    assert clone.samples == mix.samples and (clone.is_noisy == mix.is_noisy).all()
    sub = D.subset(mix, 10, seed=1, path=tmp_path / "mixsub.json")
    assert int(sub.is_noisy.sum()) == int((sub.labels == -1).sum())
