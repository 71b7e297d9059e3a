"""Test-time views (vlm_tta.views): exactness of the original view against open_clip, determinism,
the crop sampler against torchvision, AugMix's ops and mixing, odd image sizes."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_tta import views as V
from vlm_tta.images import content_hash
from vlm_tta.models.base import PreprocessConfig
from vlm_tta.views import (
    AUGMIX_OPS,
    VIEWS_VERSION,
    UnknownViewRecipeError,
    ViewRNG,
    ViewSet,
    get_view_recipe,
    list_view_recipes,
    original_view,
    register_view_recipe,
    sample_crop_params,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CFG = PreprocessConfig(image_size=(224, 224), mean=CLIP_MEAN, std=CLIP_STD)
SMALL = PreprocessConfig(image_size=(32, 40), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
RANDOM_RECIPES = ["crop_flip", "augmix", "crop_flip_dmn", "augmix_dmn"]


def photo(w: int = 120, h: int = 90, seed: int = 0) -> Image.Image:
    """A smooth random colour image (blown-up noise), like a photo to the ops."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


def unnormalize(x: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    return x * std + mean


# ------------------------------------------------------------------------- original vs open_clip
def _open_clip_eval(cfg: PreprocessConfig):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(
        PreprocessCfg(
            size=cfg.image_size,
            mean=cfg.mean,
            std=cfg.std,
            interpolation=cfg.interpolation,
            resize_mode=cfg.resize_mode,
            fill_color=cfg.fill_color,
        ),
        is_train=False,
    )


@pytest.mark.parametrize(
    "size,mode,interp,fill",
    [
        ((224, 224), "shortest", "bicubic", 0),
        ((64, 64), "shortest", "bilinear", 0),
        ((48, 64), "shortest", "bicubic", 0),  # non-square: open_clip's ResizeKeepRatio path
        ((224, 224), "squash", "bicubic", 0),
        ((40, 56), "squash", "bilinear", 0),
        ((64, 64), "longest", "bicubic", 0),
        ((48, 64), "longest", "bicubic", 128),
    ],
)
def test_original_equals_open_clip_eval_transform(size, mode, interp, fill):
    cfg = PreprocessConfig(size, CLIP_MEAN, CLIP_STD, interpolation=interp, resize_mode=mode, fill_color=fill)
    ref = _open_clip_eval(cfg)
    for w, h in [(120, 90), (90, 120), (37, 91), (1, 1), (2, 3), (300, 300)]:
        img = photo(w, h, seed=w * 1000 + h)
        ours = original_view(img, cfg)
        theirs = ref(img)
        assert ours.dtype == torch.float32 and ours.shape == (3, *size)
        assert torch.equal(ours, theirs), (size, mode, (w, h), (ours - theirs).abs().max())


def test_view_zero_is_the_original_for_every_recipe():
    img = photo()
    ref = original_view(img, CFG)
    for recipe in list_view_recipes():
        n = 1 if recipe == "original" else 4
        vs = ViewSet(recipe, n, seed=3)
        assert vs.key_parts(0) == ("original", VIEWS_VERSION)
        assert torch.equal(vs.make(img, CFG, indices=[0])[0], ref)
        assert torch.equal(vs.make(img, CFG)[0], ref)


def test_original_override_is_used_for_view_zero_only():
    img = photo()
    calls = []

    def preprocess(im):
        calls.append(im.size)
        return torch.full((3, 224, 224), 0.25)

    vs = ViewSet("crop_flip", 4)
    x = vs.make(img, CFG, original=preprocess)
    assert calls == [img.size]
    assert torch.equal(x[0], torch.full((3, 224, 224), 0.25))
    assert torch.equal(x[1:], vs.make(img, CFG)[1:])
    with pytest.raises(ValueError, match="preprocess"):
        vs.make(img, CFG, original=lambda im: torch.zeros(3, 10, 10))


def test_original_recipe_is_a_single_view():
    img = photo()
    x = ViewSet("original", 1).make(img, CFG)
    assert x.shape == (1, 3, 224, 224) and torch.equal(x[0], original_view(img, CFG))
    with pytest.raises(ValueError, match="single view"):
        ViewSet("original", 2)


# -------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("recipe", RANDOM_RECIPES)
def test_views_are_deterministic_and_independent_of_how_they_are_asked_for(recipe):
    img = photo()
    vs = ViewSet(recipe, 64, seed=7)
    full = vs.make(img, CFG)
    assert full.shape == (64, 3, 224, 224)
    assert torch.equal(full, vs.make(img, CFG))  # across calls
    assert torch.equal(full, ViewSet(recipe, 64, seed=7).make(img.copy(), CFG))  # same content
    sub = [9, 3, 63, 1, 3]
    assert torch.equal(vs.make(img, CFG, indices=sub), full[sub])  # subsets, any order, repeats
    assert torch.equal(ViewSet(recipe, 8, seed=7).make(img, CFG), full[:8])  # 8 of 64 = first 8
    assert torch.equal(vs.make(img, CFG, num_workers=2), full)  # worker threads
    assert torch.equal(vs.make(img, CFG, image_hash=content_hash(img)), full)
    # all 63 random views differ from each other and from the original
    flat = full.flatten(1)
    assert torch.unique(flat, dim=0).shape[0] == 64


def test_make_batch_matches_make_and_is_worker_independent():
    imgs = [photo(seed=s) for s in range(3)] + [photo(60, 80, seed=9)]
    vs = ViewSet("augmix", 6, seed=1)
    serial = vs.make_batch(imgs, SMALL)
    assert serial.shape == (4, 6, 3, 32, 40)
    for b, im in enumerate(imgs):
        assert torch.equal(serial[b], vs.make(im, SMALL))
    assert torch.equal(vs.make_batch(imgs, SMALL, num_workers=2), serial)
    assert torch.equal(vs.make_batch(imgs, SMALL, indices=[5, 0], num_workers=3), serial[:, [5, 0]])
    assert torch.equal(vs.make_batch(imgs, SMALL, image_hashes=[content_hash(i) for i in imgs]), serial)
    assert vs.make_batch([], SMALL).shape == (0, 6, 3, 32, 40)


def test_views_do_not_touch_global_rngs():
    img = photo()
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    for recipe in RANDOM_RECIPES:
        ViewSet(recipe, 5).make(img, SMALL, num_workers=2)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    new_np = np.random.get_state()
    assert new_np[0] == np_state[0] and np.array_equal(new_np[1], np_state[1]) and new_np[2:] == np_state[2:]


@pytest.mark.parametrize("recipe", RANDOM_RECIPES)
def test_different_seeds_and_images_give_different_views(recipe):
    img = photo()
    a = ViewSet(recipe, 6, seed=0).make(img, SMALL)
    b = ViewSet(recipe, 6, seed=1).make(img, SMALL)
    assert torch.equal(a[0], b[0])
    assert all(not torch.equal(a[i], b[i]) for i in range(1, 6))
    # one pixel changed -> another content hash -> other crops
    arr = np.asarray(img).copy()
    arr[0, 0] = 255 - arr[0, 0]
    c = ViewSet(recipe, 6, seed=0).make(Image.fromarray(arr), SMALL)
    assert all(not torch.equal(a[i], c[i]) for i in range(1, 6))


def test_view_rng_streams_are_keyed_and_independent():
    a, b = ViewRNG.for_view(0, "abc", 1), ViewRNG.for_view(0, "abc", 1)
    assert torch.equal(torch.rand(4, generator=a.torch), torch.rand(4, generator=b.torch))
    assert np.array_equal(a.numpy.random(4), b.numpy.random(4))
    c = ViewRNG.for_view(0, "abc", 2)
    assert not torch.equal(
        torch.rand(4, generator=ViewRNG.for_view(0, "abc", 1).torch), torch.rand(4, generator=c.torch)
    )


# ------------------------------------------------------------------------ shapes / normalisation
@pytest.mark.parametrize("recipe", RANDOM_RECIPES)
@pytest.mark.parametrize("cfg", [CFG, SMALL], ids=["clip224", "nonsquare"])
def test_views_are_normalised_images_at_the_model_size(recipe, cfg):
    x = ViewSet(recipe, 5).make(photo(), cfg)
    h, w = cfg.image_size
    assert x.shape == (5, 3, h, w) and x.dtype == torch.float32
    pix = unnormalize(x, cfg)
    assert pix.min() >= -1e-5 and pix.max() <= 1 + 1e-5
    # the un-normalised values are multiples of 1/255: real 8-bit images, except AugMix's blend
    if not recipe.startswith("augmix"):
        assert torch.allclose(pix * 255, (pix * 255).round(), atol=1e-3)


# ------------------------------------------------------------------------------- crop sampler
def test_crop_sampler_reproduces_torchvision_get_params():
    from torchvision.transforms import RandomResizedCrop

    with torch.random.fork_rng():
        for w, h in [(500, 375), (375, 500), (1, 1), (3, 1000), (1000, 3), (64, 64)]:
            img = Image.new("RGB", (w, h))
            for scale in [(0.08, 1.0), (0.5, 1.0)]:
                for seed in range(40):
                    torch.manual_seed(seed)
                    ref = RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3])
                    g = torch.Generator().manual_seed(seed)
                    assert sample_crop_params(w, h, scale, (3 / 4, 4 / 3), g) == tuple(ref), (w, h, scale, seed)


def test_crop_flip_reproduces_torchvision_transforms():
    from torchvision.transforms import Compose, RandomHorizontalFlip, RandomResizedCrop

    img = photo(150, 100)
    tv = Compose([RandomResizedCrop((32, 40)), RandomHorizontalFlip()])
    with torch.random.fork_rng():
        for seed in range(20):
            torch.manual_seed(seed)
            ref = tv(img)
            ours = V.random_resized_crop_flip(img, SMALL, torch.Generator().manual_seed(seed))
            assert np.array_equal(np.asarray(ours), np.asarray(ref))


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.5, 1.0)])
def test_crop_area_and_ratio_bounds(scale):
    w, h = 500, 375
    g = torch.Generator().manual_seed(0)
    fracs, ratios = [], []
    for _ in range(3000):
        top, left, ch, cw = sample_crop_params(w, h, scale, (3 / 4, 4 / 3), g)
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch >= 1 and cw >= 1
        fracs.append(ch * cw / (w * h))
        ratios.append(cw / ch)
    fracs, ratios = np.array(fracs), np.array(ratios)
    # rounding the sides to integers moves the area/ratio by a little
    assert fracs.min() >= scale[0] * 0.97 and fracs.max() <= 1.0
    assert ratios.min() >= 0.75 * 0.97 and ratios.max() <= 4 / 3 * 1.03
    # the whole range is used; area ~ U(scale) except that large crops with extreme ratios do
    # not fit and are drawn again, which pulls the mean below the midpoint
    assert fracs.min() < scale[0] + 0.02 and fracs.max() > 0.95
    assert scale[0] < fracs.mean() <= (scale[0] + scale[1]) / 2 + 0.01


def test_dmn_crops_are_larger_than_tpt_crops():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    tpt = [sample_crop_params(200, 150, V.DEFAULT_SCALE, V.DEFAULT_RATIO, g1) for _ in range(500)]
    dmn = [sample_crop_params(200, 150, V.DMN_SCALE, V.DEFAULT_RATIO, g2) for _ in range(500)]
    area = lambda ps: np.array([p[2] * p[3] for p in ps]) / (200 * 150)  # noqa: E731
    assert area(dmn).min() >= 0.5 * 0.97 and area(tpt).min() < 0.15
    assert area(dmn).mean() > area(tpt).mean() + 0.2


def test_flip_frequency_is_about_half():
    # a horizontal ramp: a flipped view gets darker from left to right
    ramp = np.tile(np.linspace(0, 255, 96).astype(np.uint8)[None, :, None], (64, 1, 3))
    img = Image.fromarray(ramp)
    cfg = PreprocessConfig((16, 16), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    x = ViewSet("crop_flip_dmn", 401).make(img, cfg)[1:]
    flipped = (x[..., :8].mean(dim=(1, 2, 3)) > x[..., 8:].mean(dim=(1, 2, 3))).float().mean().item()
    assert 0.4 < flipped < 0.6


# ------------------------------------------------------------------------------------- AugMix
@pytest.mark.parametrize("name", list(AUGMIX_OPS))
@pytest.mark.parametrize("size", [(1, 1), (5, 3), (32, 24)])
def test_each_augmix_op_runs_on_small_images(name, size):
    img = photo(*size)
    rng = np.random.default_rng(0)
    for _ in range(5):
        out = AUGMIX_OPS[name](img, 1.0, rng)
        assert out.size == img.size and out.mode == "RGB"


def test_augmix_has_the_nine_tpt_ops():
    assert list(AUGMIX_OPS) == [
        "autocontrast",
        "equalize",
        "posterize",
        "rotate",
        "solarize",
        "shear_x",
        "shear_y",
        "translate_x",
        "translate_y",
    ]


def test_severity_one_op_ranges():
    img = photo(64, 64)
    rng = np.random.default_rng(0)
    for _ in range(20):  # posterize keeps 4 bits at severity 1
        assert (np.asarray(AUGMIX_OPS["posterize"](img, 1.0, rng)) & 0x0F).max() == 0
    # solarize inverts only pixels at or above a threshold in 231..254
    arr = np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 16, 3)
    ramp = Image.fromarray(arr)
    for _ in range(20):
        out = np.asarray(AUGMIX_OPS["solarize"](ramp, 1.0, rng))
        assert np.array_equal(out[arr < 231], arr[arr < 231])


def test_translate_fast_path_equals_pillow_affine():
    for w, h in [(224, 224), (7, 5), (1, 1), (30, 20)]:
        img = photo(w, h, seed=w)
        for t in range(-9, 10):
            for axis, coeffs in [(0, (1, 0, t, 0, 1, 0)), (1, (1, 0, 0, 0, 1, t))]:
                ref = img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
                assert np.array_equal(np.asarray(V._shift(img, t, axis)), np.asarray(ref)), (w, h, t, axis)


def test_augmix_with_m_one_is_the_crop_view(monkeypatch):
    img = photo()
    crop = ViewSet("crop_flip", 6, seed=2).make(img, SMALL)
    mixed = ViewSet("augmix", 6, seed=2).make(img, SMALL)
    assert torch.equal(crop[0], mixed[0])
    assert all(not torch.equal(crop[i], mixed[i]) for i in range(1, 6))
    monkeypatch.setattr(
        V, "_sample_mixing", lambda rng, width: (np.full(width, 1 / width, np.float32), np.float32(1.0))
    )
    assert torch.equal(ViewSet("augmix", 6, seed=2).make(img, SMALL), crop)
    crop_dmn = ViewSet("crop_flip_dmn", 6, seed=2).make(img, SMALL)
    assert torch.equal(ViewSet("augmix_dmn", 6, seed=2).make(img, SMALL), crop_dmn)


def test_augmix_blend_weights(monkeypatch):
    crop = V.random_resized_crop_flip(photo(), SMALL, torch.Generator().manual_seed(0))
    black = Image.new("RGB", crop.size)
    monkeypatch.setattr(V, "AUGMIX_OPS", {"black": lambda im, sev, rng: black.copy()})
    x_crop, x_black = V.to_normalized_tensor(crop, SMALL), V.to_normalized_tensor(black, SMALL)
    monkeypatch.setattr(V, "_sample_mixing", lambda rng, width: (np.array([0, 1, 0], np.float32), np.float32(0.0)))
    assert torch.equal(V.augmix(crop, SMALL, np.random.default_rng(0)), x_black)
    monkeypatch.setattr(
        V, "_sample_mixing", lambda rng, width: (np.array([0.2, 0.3, 0.5], np.float32), np.float32(0.25))
    )
    x = V.augmix(crop, SMALL, np.random.default_rng(0))
    assert torch.allclose(x, 0.25 * x_crop + 0.75 * x_black, atol=1e-5)


def test_augmix_mixing_distribution():
    rng = np.random.default_rng(0)
    ws, ms = zip(*(V._sample_mixing(rng, 3) for _ in range(4000)))
    ws, ms = np.array(ws), np.array(ms)
    assert ws.dtype == np.float32 and np.allclose(ws.sum(1), 1, atol=1e-6) and (ws >= 0).all()
    assert np.allclose(ws.mean(0), 1 / 3, atol=0.02)  # Dirichlet(1,1,1): mean 1/3, var 1/18
    assert abs(ws[:, 0].var() - 1 / 18) < 0.01
    assert abs(ms.mean() - 0.5) < 0.02 and abs(ms.var() - 1 / 12) < 0.01  # Beta(1,1) = U(0,1)


# ------------------------------------------------------------------------------- odd images
@pytest.mark.parametrize("recipe", RANDOM_RECIPES)
def test_one_pixel_image(recipe):
    img = Image.new("RGB", (1, 1), (200, 10, 30))
    x = ViewSet(recipe, 8).make(img, CFG)
    assert x.shape == (8, 3, 224, 224) and torch.isfinite(x).all()
    if not recipe.startswith("augmix"):  # every crop of a 1x1 image is that pixel
        assert torch.equal(x[1], x[0])


def test_very_large_image_every_recipe():
    ramp = np.linspace(0, 255, 4000).astype(np.uint8)
    arr = np.stack(
        [
            np.broadcast_to(ramp[None, :], (3000, 4000)),
            np.broadcast_to(ramp[:3000, None], (3000, 4000)),
            np.full((3000, 4000), 77, np.uint8),
        ],
        axis=-1,
    )
    img = Image.fromarray(np.ascontiguousarray(arr))
    h = content_hash(img)
    for recipe in RANDOM_RECIPES:
        x = ViewSet(recipe, 64).make(img, CFG, indices=[0, 1, 63], image_hash=h)
        assert x.shape == (3, 3, 224, 224) and torch.isfinite(x).all()


def test_non_rgb_inputs_are_converted():
    img = photo()
    gray = img.convert("L")
    x = ViewSet("crop_flip", 3).make(gray, SMALL)
    assert torch.equal(x, ViewSet("crop_flip", 3).make(gray.convert("RGB"), SMALL))
    arr = np.asarray(img)
    assert torch.equal(ViewSet("augmix", 3).make(arr, SMALL), ViewSet("augmix", 3).make(img, SMALL))


# ------------------------------------------------------------------------------- registry / API
def test_unknown_recipe_error_lists_known_names():
    with pytest.raises(UnknownViewRecipeError) as err:
        ViewSet("augmixx", 64)
    assert isinstance(err.value, ValueError)
    for name in ["original", "crop_flip", "augmix", "crop_flip_dmn"]:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="crop_flip"):
        get_view_recipe("nope")


def test_list_and_register_recipes(monkeypatch):
    assert {"original", "crop_flip", "augmix", "crop_flip_dmn", "augmix_dmn"} <= set(list_view_recipes())
    monkeypatch.setattr(V, "_RECIPES", dict(V._RECIPES))

    @register_view_recipe("gray_test")
    def gray(image, cfg, rng):
        return V.to_normalized_tensor(
            V.random_resized_crop_flip(image.convert("L").convert("RGB"), cfg, rng.torch), cfg
        )

    assert "gray_test" in list_view_recipes()
    x = ViewSet("gray_test", 3).make(photo(), SMALL)
    assert x.shape == (3, 3, 32, 40)
    assert torch.equal(x[1:, 0], x[1:, 1]) and not torch.equal(x[0, 0], x[0, 1])  # gray views, colour original
    with pytest.raises(ValueError, match="already registered"):
        register_view_recipe("gray_test")(lambda image, cfg, rng: None)


def test_key_parts_and_validation():
    vs = ViewSet("augmix", 64, seed=5)
    assert vs.key_parts(0) == ("original", VIEWS_VERSION)
    assert vs.key_parts(7) == ("augmix", 5, 7, VIEWS_VERSION)
    assert ViewSet("crop_flip", 64).key_parts(0) == ViewSet("augmix", 8, seed=3).key_parts(0)
    for bad in (-1, 64, 1.5, True):
        with pytest.raises(ValueError):
            vs.key_parts(bad)
    with pytest.raises(ValueError):
        vs.make(photo(), SMALL, indices=[64])
    for n in (0, -3, 2.0):
        with pytest.raises(ValueError):
            ViewSet("crop_flip", n)
    with pytest.raises(ValueError):
        ViewSet("crop_flip", 4, seed="0")
    assert ViewSet("crop_flip", np.int64(4)).n_views == 4
    assert hash(ViewSet("augmix", 64)) == hash(ViewSet("augmix", 64))  # frozen: usable as a key
