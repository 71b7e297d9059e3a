"""classify() end to end on the tiny backbones: parity with the backbone, the cache, bad input."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import vlm_tta
from vlm_tta.cache import EmbeddingCache
from vlm_tta.errors import ClassNamesError, ImageError, TemplateError, UnknownMethodError
from vlm_tta.features import FeatureStore, encoder_call_counter
from vlm_tta.views import ViewSet

CLASSES = ["cat", "dog", "bird"]


def _images(n=5, seed=0, size=(40, 30)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(params=["tiny_openclip", "tiny_hf_clip", "tiny_hf_siglip"])
def model(request):
    return request.getfixturevalue(request.param)


def test_zeroshot_equals_the_backbone(model, tmp_path):
    imgs = _images()
    res = vlm_tta.classify(imgs, CLASSES, model=model, cache_dir=tmp_path)
    pixels = torch.stack([model.preprocess(img) for img in imgs])
    expected = model.logits(model.encode_images(pixels), model.class_embeddings(CLASSES, ["a photo of a {}."]))
    np.testing.assert_allclose(res.logits, expected.numpy(), rtol=1e-4, atol=1e-4)
    assert res.labels == [CLASSES[i] for i in expected.argmax(1)]
    assert res.probs.shape == (5, 3) and res.scores.shape == (5,)


def test_siglip_logits_carry_the_bias(tiny_hf_siglip, tmp_path):
    assert tiny_hf_siglip.logit_bias is not None
    res = vlm_tta.classify(_images(2), CLASSES, model=tiny_hf_siglip, cache=False)
    feats = FeatureStore(tiny_hf_siglip).view_features(_images(2), ViewSet("original", 1))[:, 0]
    cls = tiny_hf_siglip.class_embeddings(CLASSES)
    expected = tiny_hf_siglip.logit_scale * feats @ cls.T + tiny_hf_siglip.logit_bias
    np.testing.assert_allclose(res.logits, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_ensemble_templates_are_averaged_per_class(tiny_openclip, tmp_path):
    temps = ["a photo of a {}.", "a drawing of a {}.", "itap of a {}."]
    res = vlm_tta.classify(_images(3), CLASSES, model=tiny_openclip, templates=temps, cache=False)
    per = [tiny_openclip.encode_texts([t.format(c) for c in CLASSES]) for t in temps]  # normalised
    cls = torch.nn.functional.normalize(torch.stack(per).mean(0), dim=-1)
    img = torch.nn.functional.normalize(
        tiny_openclip.encode_images(torch.stack([tiny_openclip.preprocess(i) for i in _images(3)])), dim=-1
    )
    np.testing.assert_allclose(res.logits, (tiny_openclip.logit_scale * img @ cls.T).numpy(), rtol=1e-4, atol=1e-4)


def test_second_run_reads_the_cache(tiny_openclip, tmp_path):
    imgs = _images(6)
    calls = encoder_call_counter(tiny_openclip)
    first = vlm_tta.classify(imgs, CLASSES, model=tiny_openclip, cache_dir=tmp_path, batch_size=4)
    c1 = calls()
    assert c1["images"] >= 1 and c1["texts"] >= 1
    second = vlm_tta.classify(imgs, CLASSES, model=tiny_openclip, cache_dir=tmp_path, batch_size=4)
    c2 = calls()
    assert c2 == c1, "a warm cache must not run any encoder"
    np.testing.assert_array_equal(first.logits, second.logits)
    # a new template set encodes text again but reuses every image embedding
    vlm_tta.classify(imgs, CLASSES, model=tiny_openclip, cache_dir=tmp_path, templates="clip7")
    c3 = calls()
    assert c3["images"] == c1["images"] and c3["texts"] > c1["texts"]
    # the same picture given as a path or an array hashes the same: no new encoder call
    path = tmp_path / "img.png"
    imgs[0].save(path)
    vlm_tta.classify([str(path), np.asarray(imgs[1])], CLASSES, model=tiny_openclip, cache_dir=tmp_path)
    assert calls()["images"] == c1["images"]


def test_view_zero_is_shared_across_view_sets(tiny_openclip, tmp_path):
    cache = EmbeddingCache(tmp_path)
    store = FeatureStore(tiny_openclip, cache)
    imgs = _images(2)
    calls = encoder_call_counter(tiny_openclip)
    orig = store.view_features(imgs, ViewSet("original", 1))
    n_after_original = calls()["images"]
    many = store.view_features(imgs, ViewSet("crop_flip", 4, seed=0))
    assert many.shape == (2, 4, tiny_openclip.embed_dim)
    torch.testing.assert_close(many[:, 0], orig[:, 0], rtol=0, atol=0)
    before = calls()["images"]
    again = store.view_features(imgs, ViewSet("crop_flip", 4, seed=0))
    assert calls()["images"] == before and n_after_original >= 1
    torch.testing.assert_close(again, many, rtol=0, atol=0)
    # more views of the same recipe: only the new ones are encoded, the first ones are unchanged
    more = store.view_features(imgs, ViewSet("crop_flip", 6, seed=0))
    torch.testing.assert_close(more[:, :4], many, rtol=0, atol=0)


def test_cache_and_no_cache_agree(tiny_hf_clip, tmp_path):
    imgs = _images(3)
    a = vlm_tta.classify(imgs, CLASSES, model=tiny_hf_clip, cache=False)
    b = vlm_tta.classify(imgs, CLASSES, model=tiny_hf_clip, cache_dir=tmp_path)
    c = vlm_tta.classify(imgs, CLASSES, model=tiny_hf_clip, cache_dir=tmp_path)
    np.testing.assert_array_equal(a.logits, b.logits)
    np.testing.assert_array_equal(b.logits, c.logits)


def test_order_is_kept_and_inputs_mix(tiny_openclip, tmp_path):
    imgs = _images(4)
    mixed = [imgs[0], np.asarray(imgs[1]), torch.from_numpy(np.array(imgs[2])).permute(2, 0, 1), imgs[3]]
    a = vlm_tta.classify(mixed, CLASSES, model=tiny_openclip, cache=False)
    b = vlm_tta.classify(imgs, CLASSES, model=tiny_openclip, cache=False)
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-6)
    rev = vlm_tta.classify(imgs[::-1], CLASSES, model=tiny_openclip, cache=False)
    np.testing.assert_allclose(rev.logits, b.logits[::-1], rtol=1e-6)
    single = vlm_tta.classify(imgs[0], CLASSES, model=tiny_openclip, cache=False)
    assert len(single) == 1


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("L", (30, 20), 128),
        lambda: Image.new("RGBA", (30, 20), (255, 0, 0, 128)),
        lambda: Image.new("P", (30, 20), 3),
        lambda: Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16)),
        lambda: Image.new("RGB", (1, 1), (10, 20, 30)),
        lambda: Image.new("RGB", (3000, 2000), (10, 200, 30)),
        lambda: Image.new("CMYK", (30, 20), (0, 255, 0, 0)),
    ],
    ids=["grayscale", "rgba", "palette", "16bit", "1x1", "large", "cmyk"],
)
def test_odd_images_are_classified(tiny_openclip, make, tmp_path):
    img = make()
    path = tmp_path / "odd.png"
    if img.mode != "CMYK":
        img.save(path)
        res = vlm_tta.classify([img, str(path)], CLASSES, model=tiny_openclip, cache=False)
        np.testing.assert_allclose(res.logits[0], res.logits[1], rtol=1e-5, atol=1e-5)
    else:
        res = vlm_tta.classify([img], CLASSES, model=tiny_openclip, cache=False)
    assert np.isfinite(res.logits).all()


def test_bad_input_errors(tiny_openclip, tmp_path):
    imgs = _images(1)
    with pytest.raises(UnknownMethodError, match="Available methods"):
        vlm_tta.classify(imgs, CLASSES, method="nope", model=tiny_openclip)
    with pytest.raises(ClassNamesError, match="empty"):
        vlm_tta.classify(imgs, [], model=tiny_openclip)
    with pytest.raises(ClassNamesError, match="blank"):
        vlm_tta.classify(imgs, ["cat", "  "], model=tiny_openclip)
    with pytest.raises(ClassNamesError, match="twice"):
        vlm_tta.classify(imgs, ["cat", "dog", "cat"], model=tiny_openclip)
    with pytest.raises(ClassNamesError, match="not one string"):
        vlm_tta.classify(imgs, "cat,dog", model=tiny_openclip)
    with pytest.raises(TemplateError, match="placeholder"):
        vlm_tta.classify(imgs, CLASSES, model=tiny_openclip, templates=["a photo"])
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageError, match="corrupt.jpg"):
        vlm_tta.classify([imgs[0], str(corrupt)], CLASSES, model=tiny_openclip, cache=False)
    with pytest.raises(ImageError, match="not found"):
        vlm_tta.classify([str(tmp_path / "missing.png")], CLASSES, model=tiny_openclip, cache=False)
    with pytest.raises(ImageError, match="NaN"):
        vlm_tta.classify([np.full((8, 8, 3), np.nan, dtype=np.float32)], CLASSES, model=tiny_openclip, cache=False)
    with pytest.raises(ImageError, match="shape"):
        vlm_tta.classify([torch.zeros(2, 3, 8, 8, 1)], CLASSES, model=tiny_openclip, cache=False)
    with pytest.raises(ImageError, match="type"):
        vlm_tta.classify([object()], CLASSES, model=tiny_openclip, cache=False)
    with pytest.raises(ValueError, match="batch_size"):
        vlm_tta.classify(imgs, CLASSES, model=tiny_openclip, batch_size=0)


def test_unwritable_cache_falls_back_with_a_warning(tiny_openclip, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = vlm_tta.classify(_images(2), CLASSES, model=tiny_openclip, cache_dir=blocker / "cache")
    assert len(res) == 2
    assert any("cache" in str(w.message).lower() for w in caught)


def test_cli_classify_table_and_json(tiny_hf_clip_dir, tmp_path, capsys):
    from vlm_tta.cli import main

    paths = []
    for i, img in enumerate(_images(2)):
        paths.append(str(tmp_path / f"img{i}.png"))
        img.save(paths[-1])
    spec = f"hf:{tiny_hf_clip_dir}"
    assert (
        main(["classify", *paths, "--classes", "cat,dog,bird", "--model", spec, "--cache-dir", str(tmp_path / "c")])
        == 0
    )
    out = capsys.readouterr().out
    assert "img0.png" in out and "label" in out
    assert main(["classify", *paths, "--classes", "cat,dog,bird", "--model", spec, "--json", "--no-cache"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["predictions"]) == 2 and data["predictions"][0]["label"] in CLASSES
    classes_file = tmp_path / "classes.txt"
    classes_file.write_text("cat\ndog\n\nbird\n")
    assert (
        main(["classify", paths[0], "--classes-file", str(classes_file), "--model", spec, "--json", "--no-cache"]) == 0
    )
    assert len(json.loads(capsys.readouterr().out)["predictions"][0]["top"]) == 3


def test_cli_errors_are_readable(tiny_hf_clip_dir, tmp_path, capsys):
    from vlm_tta.cli import main

    spec = f"hf:{tiny_hf_clip_dir}"
    img = tmp_path / "x.png"
    _images(1)[0].save(img)
    assert main(["classify", str(img), "--classes", "cat,cat", "--model", spec, "--no-cache"]) == 2
    assert "twice" in capsys.readouterr().err
    assert main(["classify", str(img), "--classes", "cat,dog", "--method", "nope", "--model", spec]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["classify", str(img), "--model", spec]) == 2
    assert "--classes" in capsys.readouterr().err


def test_cli_lists_methods_and_templates(capsys):
    from vlm_tta.cli import main

    assert main(["methods"]) == 0
    assert "zeroshot" in capsys.readouterr().out
    assert main(["templates"]) == 0
    assert "clip80" in capsys.readouterr().out


def test_imagenet_style_duplicate_names_when_allowed(tiny_openclip):
    names = ["missile", "sunglasses", "missile"]
    with pytest.raises(ClassNamesError):
        vlm_tta.classify(_images(1), names, model=tiny_openclip, cache=False)
    res = vlm_tta.classify(_images(2), names, model=tiny_openclip, cache=False, allow_duplicate_classnames=True)
    assert res.probs.shape == (2, 3)


def test_model_level_methods_get_samples_with_pixels_and_views(tiny_openclip, tmp_path):
    from vlm_tta.methods import Method, Prediction, register_method
    from vlm_tta.methods.base import _REGISTRY

    seen = []

    @register_method("_test_pixels")
    class PixelProbe(Method):
        needs_pixels = True

        def predict_sample(self, sample):
            vs = ViewSet("crop_flip", 3, seed=1)
            pixels = sample.views(vs)
            feats = sample.view_features(vs)
            seen.append((sample.index, sample.image.size, tuple(pixels.shape), tuple(feats.shape)))
            # the views' pixels encode to the cached view embeddings
            direct = torch.nn.functional.normalize(self.ctx.model.encode_images(pixels), dim=-1)
            torch.testing.assert_close(direct, feats, rtol=1e-4, atol=1e-5)
            return Prediction(self.ctx.logits(feats[0]))

    try:
        imgs = _images(3)
        res = vlm_tta.classify(imgs, CLASSES, method="_test_pixels", model=tiny_openclip, cache_dir=tmp_path)
        zs = vlm_tta.classify(imgs, CLASSES, model=tiny_openclip, cache_dir=tmp_path)
    finally:
        _REGISTRY.pop("_test_pixels")
    size = tiny_openclip.preprocess_cfg.image_size
    assert [s[0] for s in seen] == [0, 1, 2]
    assert seen[0][1] == (40, 30) and seen[0][2] == (3, 3, *size) and seen[0][3] == (3, tiny_openclip.embed_dim)
    np.testing.assert_allclose(res.logits, zs.logits, rtol=1e-5, atol=1e-5)  # view 0 is the original


def test_a_dataset_can_be_classified_directly(tiny_openclip, tmp_path):
    from vlm_tta.data import ImageFolderDataset

    for c, cls in enumerate(CLASSES):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for j, img in enumerate(_images(2, seed=c)):
            img.save(tmp_path / "data" / cls / f"{j}.png")
    ds = ImageFolderDataset(tmp_path / "data")
    res = vlm_tta.classify(ds, ds.classnames, model=tiny_openclip, cache=False)
    direct = vlm_tta.classify(ds.paths, ds.classnames, model=tiny_openclip, cache=False)
    assert len(res) == len(ds) == 6
    np.testing.assert_array_equal(res.logits, direct.logits)


def test_warm_runs_do_not_decode_image_files(tiny_openclip, tmp_path, monkeypatch):
    import vlm_tta.features as features

    paths = []
    for i, img in enumerate(_images(4)):
        paths.append(str(tmp_path / f"{i}.png"))
        img.save(paths[-1])
    decoded = []
    real = features.load_image
    monkeypatch.setattr(features, "load_image", lambda src, **kw: decoded.append(src) or real(src, **kw))
    cold = vlm_tta.classify(paths, CLASSES, model=tiny_openclip, cache_dir=tmp_path / "c")
    assert len(decoded) == 4
    warm = vlm_tta.classify(paths, CLASSES, model=tiny_openclip, cache_dir=tmp_path / "c")
    assert len(decoded) == 4, "a warm run must not decode image files"
    np.testing.assert_array_equal(cold.logits, warm.logits)
    # views not cached yet: only then is the file decoded, and the embeddings match a cold store
    store = FeatureStore(tiny_openclip, EmbeddingCache(tmp_path / "c"))
    lazy = store.open_images(paths[:1])
    assert len(decoded) == 4
    feats = store.view_features(lazy, ViewSet("crop_flip", 3))
    assert len(decoded) == 5
    fresh = FeatureStore(tiny_openclip).view_features([Image.open(paths[0]).convert("RGB")], ViewSet("crop_flip", 3))
    torch.testing.assert_close(feats, fresh, rtol=1e-5, atol=1e-6)


def test_a_rewritten_file_is_read_again(tiny_openclip, tmp_path):
    path = tmp_path / "x.png"
    a, b = _images(2, seed=5)
    a.save(path)
    first = vlm_tta.classify([str(path)], CLASSES, model=tiny_openclip, cache_dir=tmp_path / "c")
    b.save(path)  # same path, same size on disk, other bytes
    second = vlm_tta.classify([str(path)], CLASSES, model=tiny_openclip, cache_dir=tmp_path / "c")
    expected = vlm_tta.classify([b], CLASSES, model=tiny_openclip, cache=False)
    np.testing.assert_allclose(second.logits, expected.logits, rtol=1e-6)
    assert not np.allclose(first.logits, second.logits)
