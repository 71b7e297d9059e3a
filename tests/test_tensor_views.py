"""The tensor view path (vlm_tta.tensor_views): each recipe's parameters over many draws, the AugMix
ops against Pillow's, normalisation and shapes against the PIL path, determinism, cache keys."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps

import vlm_tta
from vlm_tta import tensor_views as T
from vlm_tta import views as V
from vlm_tta.models.base import PreprocessConfig
from vlm_tta.views import ViewRNG, ViewSet

CFG = PreprocessConfig((32, 40), (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
SQUARE = PreprocessConfig((48, 48), CFG.mean, CFG.std)
TENSOR_RECIPES = ["crop_flip_t", "augmix_t", "crop_flip_dmn_t", "augmix_dmn_t"]
CPU = torch.device("cpu")


def photo(w=60, h=45, seed=0):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return img.filter(ImageFilter.GaussianBlur(1.5))


def coordinates(side=256):
    """R = column, G = row: a crop's box and flip can be read back from its pixels."""
    yy, xx = np.mgrid[0:side, 0:side]
    return Image.fromarray(np.stack([xx, yy, np.full_like(xx, 128)], -1).astype(np.uint8))


def uniform_ks_ok(x, lo, hi):
    """One-sample Kolmogorov-Smirnov test against U(lo, hi) at the 0.1% level (critical value 1.95 / sqrt(n))."""
    x = np.sort(np.asarray(x, dtype=np.float64))
    n = len(x)
    cdf = np.clip((x - lo) / (hi - lo), 0, 1)
    d = max((np.arange(1, n + 1) / n - cdf).max(), (cdf - np.arange(n) / n).max())
    return d < 1.95 / math.sqrt(n)


def pixels(views, cfg):
    """Normalised views back to [0, 255] values."""
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    return (views * std + mean) * 255


# ---------------------------------------------------------------------------- names and keys
def test_recipes_are_registered_and_have_their_own_cache_keys():
    assert set(TENSOR_RECIPES) <= set(V.list_view_recipes())
    assert T.TENSOR_RECIPES == dict(zip(["crop_flip", "augmix", "crop_flip_dmn", "augmix_dmn"], TENSOR_RECIPES))
    for pil, tensor in T.TENSOR_RECIPES.items():
        a, b = ViewSet(pil, 8, seed=2), ViewSet(tensor, 8, seed=2)
        assert a.key_parts(0) == b.key_parts(0)  # the original view is shared
        assert a.key_parts(3) != b.key_parts(3) and b.key_parts(3)[-2:] == ("tensor", T.TENSOR_VIEWS_VERSION)
        assert a.block_key_parts(0, 1) == b.block_key_parts(0, 1)
        assert b.block_key_parts(1, 3)[-2:] == ("tensor", T.TENSOR_VIEWS_VERSION)


def test_shapes_dtypes_and_the_original_view():
    img = photo()
    for recipe in TENSOR_RECIPES:
        for cfg in (CFG, SQUARE):
            x = ViewSet(recipe, 6, seed=1).make(img, cfg)
            assert x.shape == (6, 3, *cfg.image_size) and x.dtype == torch.float32 and x.device.type == "cpu"
            assert torch.equal(x[0], V.original_view(img, cfg))  # view 0: the exact PIL original
            assert torch.isfinite(x).all()
    one = ViewSet("augmix_t", 6, seed=1).view(img, CFG, 4)  # one view through the per-view registry entry
    assert torch.equal(one, ViewSet("augmix_t", 6, seed=1).make(img, CFG)[4])


def test_normalisation_is_the_pil_paths():
    arr = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    u8 = torch.from_numpy(arr).permute(2, 0, 1)
    assert torch.equal(T.normalize_uint8(u8, CFG), V.to_normalized_tensor(Image.fromarray(arr), CFG))
    # a flat image stays flat through any crop, flip or AugMix op that keeps it inside the image
    flat = Image.new("RGB", (50, 40), (90, 140, 200))
    ref = V.to_normalized_tensor(Image.new("RGB", (40, 32), (90, 140, 200)), CFG)
    assert torch.equal(ViewSet("crop_flip_t", 5).make(flat, CFG)[1:], ref.expand(4, 3, 32, 40))


# ---------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("recipe", ["crop_flip_t", "augmix_t"])
def test_deterministic_given_the_seed_and_independent_of_how_views_are_asked_for(recipe):
    img = photo()
    full = ViewSet(recipe, 12, seed=7).make(img, CFG)
    assert torch.equal(full, ViewSet(recipe, 12, seed=7).make(img.copy(), CFG))
    assert torch.equal(ViewSet(recipe, 12, seed=7).make(img, CFG, indices=[9, 3, 11, 3]), full[[9, 3, 11, 3]])
    assert torch.equal(ViewSet(recipe, 5, seed=7).make(img, CFG), full[:5])
    assert torch.equal(ViewSet(recipe, 12, seed=7).make(img, CFG, num_workers=3), full)  # sliced over threads
    assert torch.equal(ViewSet(recipe, 12, seed=7).make_batch([photo(seed=3), img], CFG)[1], full)
    other = ViewSet(recipe, 12, seed=8).make(img, CFG)
    assert not torch.equal(other[1:], full[1:])
    assert torch.unique(full.flatten(1), dim=0).shape[0] == 12


def test_same_crops_flips_and_ops_as_the_pil_path():
    """Common random numbers: view i of a tensor recipe draws what view i of its PIL recipe draws,
    so only resampling details differ."""
    img = photo(90, 70, seed=4)
    for pil, tensor in T.TENSOR_RECIPES.items():
        a, b = ViewSet(pil, 10, seed=5).make(img, SQUARE), ViewSet(tensor, 10, seed=5).make(img, SQUARE)
        diff = (pixels(a, SQUARE) - pixels(b, SQUARE)).abs()
        assert diff.mean() < 0.5, (pil, float(diff.mean()))  # grey levels
    # and the op sequence of each AugMix view is the PIL one
    names = []

    def recorder(name, fn):
        def op(im, severity, rng):
            names.append(name)
            return fn(im, severity, rng)

        return op

    recorded = {name: recorder(name, fn) for name, fn in V.AUGMIX_OPS.items()}
    rng = ViewRNG.for_view(5, "h", 3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(V, "AUGMIX_OPS", recorded)
        V.augmix(V.random_resized_crop_flip(img, SQUARE, rng.torch), SQUARE, rng.numpy)
    rng = ViewRNG.for_view(5, "h", 3)
    T.sample_crop_flip(rng, img.width, img.height)
    plan = T.sample_augmix(rng.numpy, 48, 48)
    assert [n for chain in plan.chains for n, _ in chain] == names


# ---------------------------------------------------------------------------- crop statistics
def _read_boxes(views, cfg, side):
    """Crop width/height (source pixels) and flip of each view of :func:`coordinates`."""
    px = pixels(views, cfg)
    h, w = cfg.image_size
    r, g = px[:, 0, h // 2], px[:, 1, :, w // 2]
    flip = r[:, -1] < r[:, 0]
    cw = (r[:, -1] - r[:, 0]).abs() * w / (w - 1)
    ch = (g[:, -1] - g[:, 0]).abs() * h / (h - 1)
    return cw / side, ch / side, flip


@pytest.mark.parametrize("recipe,scale", [("crop_flip_t", V.DEFAULT_SCALE), ("crop_flip_dmn_t", V.DMN_SCALE)])
def test_crop_area_ratio_and_flip_statistics(recipe, scale):
    side, n = 256, 400
    views = ViewSet(recipe, n + 1, seed=11).make(coordinates(side), SQUARE)[1:]
    fw, fh, flip = _read_boxes(views, SQUARE, side)
    area, ratio = (fw * fh).numpy(), (fw / fh).numpy()
    lo, hi = scale
    # read back from the pixels: inside the recipe's ranges (up to the read-out's ~2% error)
    assert area.min() > lo * 0.96 and area.max() < 1.02
    assert ratio.min() > 0.75 * 0.96 and ratio.max() < 4 / 3 * 1.04
    # the area is uniform where no draw is rejected (a <= 0.75 fits a square image at every ratio)
    small = area[area <= 0.75]
    assert len(small) > 100 and uniform_ks_ok(small, lo, 0.75)
    # ... and so is log(ratio) there
    log_r = np.log(ratio[area <= 0.75])
    assert uniform_ks_ok(log_r, math.log(3 / 4), math.log(4 / 3))
    # flip probability 0.5 (4 sigma)
    assert abs(float(flip.float().mean()) - V.FLIP_P) < 4 * math.sqrt(0.25 / n)
    # the pixels agree with the sampled boxes, view by view
    truth = [T.sample_crop_flip(ViewRNG.for_view(11, V.content_hash(coordinates(side)), i + 1), side, side, scale)
             for i in range(n)]  # fmt: skip
    assert [c.flip for c in truth] == flip.tolist()
    np.testing.assert_allclose(area, [c.w * c.h / side**2 for c in truth], rtol=0.03, atol=0.003)


# ---------------------------------------------------------------------------- AugMix statistics
def test_augmix_plans_follow_tpts_distributions():
    n = 3000
    plans = [T.sample_augmix(np.random.default_rng(i), 224, 224) for i in range(n)]
    w = np.stack([p.weights for p in plans])
    m = np.array([p.m for p in plans])
    assert w.dtype == np.float32 and np.allclose(w.sum(1), 1, atol=1e-6) and (w >= 0).all()
    assert np.allclose(w.mean(0), 1 / 3, atol=0.02) and abs(w[:, 0].var() - 1 / 18) < 0.01  # Dirichlet(1,1,1)
    assert abs(m.mean() - 0.5) < 0.02 and abs(m.var() - 1 / 12) < 0.01  # Beta(1,1)
    chains = [c for p in plans for c in p.chains]
    assert all(len(p.chains) == V.AUGMIX_WIDTH for p in plans)
    depths = np.bincount([len(c) for c in chains], minlength=4)[1:] / len(chains)
    assert np.allclose(depths, 1 / 3, atol=0.02)  # depth ~ U{1, 2, 3}
    ops = [op for c in chains for op in c]
    names = [name for name, _ in ops]
    freq = np.array([names.count(k) for k in V.AUGMIX_OPS]) / len(names)
    assert np.allclose(freq, 1 / 9, atol=0.015)  # the nine ops, uniformly
    params = {k: [p for name, p in ops if name == k] for k in V.AUGMIX_OPS}
    # severity 1: posterize to 4 bits, rotate by at most 3 degrees, solarize above 231-254,
    # shear at most 0.03, translate at most a tenth of a third of the side
    assert set(params["posterize"]) == {4}
    assert max(abs(d) for d in params["rotate"]) <= 3 and min(params["rotate"]) < 0 < max(params["rotate"])
    assert 231 <= min(params["solarize"]) and max(params["solarize"]) <= 254
    for k in ("shear_x", "shear_y"):
        assert max(abs(s) for s in params[k]) <= 0.03 + 1e-12 and min(params[k]) < 0 < max(params[k])
    for k in ("translate_x", "translate_y"):
        assert max(abs(t) for t in params[k]) <= 224 / 3 / 10


def test_each_op_matches_pillow():
    img = photo(48, 40, seed=2)
    x = T.image_tensor(img, CPU)[None]
    w, h = img.size

    def close(ref, got, tol):
        ref = torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1).int()
        assert (ref - got[0].int()).abs().max() <= tol

    close(ImageOps.autocontrast(img), T._autocontrast(x), 0)
    close(ImageOps.equalize(img), T._equalize(x), 0)
    close(ImageOps.posterize(img, 4), T._posterize(x, torch.tensor([4])), 0)
    close(ImageOps.solarize(img, 240), T._solarize(x, torch.tensor([240])), 0)
    for name, p in [("translate_x", 3), ("translate_y", -2), ("shear_x", 0.03), ("shear_y", -0.02), ("rotate", 2)]:
        got = T._affine(x, torch.tensor([T._affine_matrix(name, p, w, h)], dtype=torch.float64))
        if name == "rotate":
            ref = img.rotate(p, resample=Image.Resampling.BILINEAR)
        elif name.startswith("shear"):
            ref = V._affine(img, (1, p, 0, 0, 1, 0) if name == "shear_x" else (1, 0, 0, p, 1, 0))
        else:
            ref = V._shift(img, p, 0 if name == "translate_x" else 1)
        close(ref, got, 0 if name.startswith("translate") or name.startswith("shear") else 1)
    for axis, offsets in ((0, [3, -5, 0, 99]), (1, [-2, 4, 45, -45])):  # integer shifts: exact copies
        got = T._shift(x.expand(4, -1, -1, -1), offsets, axis)
        for k, off in enumerate(offsets):
            close(V._shift(img, off, axis), got[k : k + 1], 0)
    # flat images and images with one grey level are left alone by autocontrast and equalize
    flat = torch.full((2, 3, 5, 5), 77, dtype=torch.uint8)
    assert torch.equal(T._autocontrast(flat), flat) and torch.equal(T._equalize(flat), flat)


def test_mixing_weights_are_applied():
    img = photo()
    crops = T.resized_crops(T.image_tensor(img, CPU), [T.CropFlip(0, 0, 45, 60, False)], (32, 40))
    chain = (("solarize", 231),)
    black = (("translate_x", 1000),)  # shifted out of the image: black
    plan = T.AugMixPlan(np.array([0, 1, 0], np.float32), np.float32(0.0), (chain, black, chain))
    torch.testing.assert_close(T.augmix_tensors(crops, [plan], CFG)[0], T.normalize_uint8(torch.zeros(3, 32, 40), CFG))
    plan = T.AugMixPlan(np.array([0.2, 0.3, 0.5], np.float32), np.float32(0.25), (black, black, black))
    want = 0.25 * T.normalize_uint8(crops[0], CFG) + 0.75 * T.normalize_uint8(torch.zeros(3, 32, 40), CFG)
    torch.testing.assert_close(T.augmix_tensors(crops, [plan], CFG)[0], want)
    plan = T.AugMixPlan(np.array([0.2, 0.3, 0.5], np.float32), np.float32(1.0), (chain, black, chain))
    torch.testing.assert_close(T.augmix_tensors(crops, [plan], CFG)[0], T.normalize_uint8(crops[0], CFG))


# ---------------------------------------------------------------------------- devices and methods
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: views made on the GPU")
def test_views_on_the_gpu_match_the_cpu():
    img = photo()
    for recipe in ("crop_flip_t", "augmix_t"):
        cpu = ViewSet(recipe, 8, seed=1).make(img, SQUARE)
        gpu = ViewSet(recipe, 8, seed=1).make(img, SQUARE, device="cuda")
        assert gpu.device.type == "cuda"
        assert (pixels(gpu.cpu(), SQUARE) - pixels(cpu, SQUARE)).abs().mean() < 0.5


def test_methods_take_tensor_recipes_and_keep_their_own_cache_entries(tiny_openclip, tmp_path):
    imgs = [photo(seed=s) for s in range(3)]
    classes = ["cat", "dog", "bird"]
    kw = dict(method="zero", n_views=6, model=tiny_openclip, cache_dir=tmp_path)
    pil = vlm_tta.classify(imgs, classes, view_recipe="augmix", **kw)
    ten = vlm_tta.classify(imgs, classes, view_recipe="augmix_t", **kw)
    assert ten.info["cache"]["view_hits"] == 3 and ten.info["cache"]["view_misses"] == 3 * 5  # only originals shared
    again = vlm_tta.classify(imgs, classes, view_recipe="augmix_t", **kw)
    np.testing.assert_array_equal(again.logits, ten.logits)
    assert again.info["cache"]["view_misses"] == 0
    assert pil.logits.shape == ten.logits.shape
