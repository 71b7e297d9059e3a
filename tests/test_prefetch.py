"""Decoding and view making ahead of the encoder (``prefetch``): an exact speed-up, so predictions,
cache statistics and the handling of unreadable images are the same with and without it."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

import vlm_tta
from vlm_tta.errors import ImageError
from vlm_tta.features import FeatureStore, prefetched
from vlm_tta.methods import Method, Prediction, register_method
from vlm_tta.methods.base import _REGISTRY
from vlm_tta.views import ViewSet

CLASSES = ["cat", "dog", "bird"]


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)) for i in range(n)]


def _files(tmp_path, n, bad_at=()):
    paths = []
    for i, img in enumerate(_images(n)):
        paths.append(str(tmp_path / f"{i}.png"))
        img.save(paths[-1])
    for k, pos in enumerate(bad_at):
        bad = tmp_path / f"bad{k}.png"
        bad.write_bytes(b"not an image")
        paths.insert(pos, str(bad))
    return paths


@dataclass
class _ViewsConfig:
    batch: int = 2


class _ManyViews(Method):
    """Feature-level online method reading 6 AugMix views; records its chunks and finish()."""

    config_class = _ViewsConfig
    episodic = False

    def reset(self):
        self.chunks, self.finished = [], 0

    def view_set(self):
        return ViewSet("augmix", 6, seed=3)

    def stream_batch_size(self):
        return self.config.batch

    def predict_batch(self, features):
        self.chunks.append(len(features))
        return [Prediction(self.ctx.logits(f.mean(0))) for f in features]

    def finish(self):
        self.finished += 1


@pytest.fixture
def many_views():
    cls = register_method("_many_views")(_ManyViews)
    yield cls
    _REGISTRY.pop("_many_views")


# --------------------------------------------------------------------------------- the helper
def test_prefetched_keeps_order_and_raises_at_the_failing_item():
    def fn(i):
        if i == 3:
            raise ValueError("three")
        return i * i

    items = [(i,) for i in range(6)]
    for depth in (0, 1, 3):
        assert list(prefetched(fn, items[:3], depth)) == [0, 1, 4]
        got = []
        with pytest.raises(ValueError, match="three"):
            for x in prefetched(fn, items, depth):
                got.append(x)
        assert got == [0, 1, 4]  # the items before the failing one still arrive, in order


def test_prefetched_runs_ahead_in_other_threads():
    seen = []
    gate = threading.Event()

    def fn(i):
        seen.append((i, threading.current_thread().name))
        if i == 0:
            gate.wait(5)  # item 0 blocks until item 1 has been started: proof that it runs ahead
        elif i == 1:
            gate.set()
        return i

    assert list(prefetched(fn, [(0,), (1,), (2,)], 2)) == [0, 1, 2]
    assert gate.is_set() and all(name.startswith("vlm_tta-prefetch") for _, name in seen)


# --------------------------------------------------------------------------------- the store
@pytest.mark.parametrize("encode_batch_size", [4, 6, 64])
def test_view_features_are_bit_identical_with_prefetch(tiny_openclip, encode_batch_size):
    imgs = _images(5)
    vs = ViewSet("augmix", 6, seed=1)
    ref = FeatureStore(tiny_openclip, encode_batch_size=encode_batch_size).view_features(imgs, vs, normalize=False)
    for prefetch, workers in ((1, 0), (3, 2)):
        store = FeatureStore(tiny_openclip, encode_batch_size=encode_batch_size, num_workers=workers, prefetch=prefetch)
        got = store.view_features(imgs, vs, normalize=False)
        assert torch.equal(got, ref)


def test_views_are_made_off_the_encoders_thread(tiny_openclip, monkeypatch):
    from vlm_tta.features import LazyImage

    threads = set()
    real = LazyImage.make_views

    def spy(self, *args, **kwargs):
        threads.add(threading.current_thread().name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LazyImage, "make_views", spy)
    FeatureStore(tiny_openclip, prefetch=2).view_features(_images(3), ViewSet("crop_flip", 3))
    assert threads and all(t.startswith("vlm_tta-prefetch-views") for t in threads)


def test_prefetch_is_checked(tiny_openclip):
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="prefetch"):
            FeatureStore(tiny_openclip, prefetch=bad)
    with pytest.raises(vlm_tta.errors.OptionError, match="prefetch"):
        vlm_tta.classify(_images(1), CLASSES, model=tiny_openclip, cache=False, prefetch=-1)


# --------------------------------------------------------------------------------- the stream
def test_predictions_are_identical_with_and_without_prefetch(tiny_openclip, many_views, tmp_path):
    paths = _files(tmp_path, 7)
    runs = {}
    for prefetch in (0, 1, 4):
        m = many_views()
        res = vlm_tta.classify(
            paths, CLASSES, method=m, model=tiny_openclip, cache=False, batch_size=3, prefetch=prefetch
        )
        runs[prefetch] = (res, m.chunks, res.info["cache"])
    ref, ref_chunks, ref_stats = runs[0]
    for prefetch in (1, 4):
        res, chunks, stats = runs[prefetch]
        np.testing.assert_array_equal(res.logits, ref.logits)
        assert chunks == ref_chunks and stats == ref_stats
    # the default (prefetch on) matches too, and so does the plain zero-shot path
    np.testing.assert_array_equal(
        vlm_tta.classify(paths, CLASSES, method=many_views(), model=tiny_openclip, cache=False, batch_size=3).logits,
        ref.logits,
    )
    zs = [
        vlm_tta.classify(paths, CLASSES, model=tiny_openclip, cache=False, batch_size=2, prefetch=p).logits
        for p in (0, 2)
    ]
    np.testing.assert_array_equal(zs[0], zs[1])


def test_warm_cache_reads_the_same_with_prefetch(tiny_openclip, many_views, tmp_path):
    paths = _files(tmp_path, 4)
    cold = vlm_tta.classify(
        paths, CLASSES, method=many_views(), model=tiny_openclip, cache_dir=tmp_path / "c", batch_size=3, prefetch=0
    )
    warm = vlm_tta.classify(
        paths, CLASSES, method=many_views(), model=tiny_openclip, cache_dir=tmp_path / "c", batch_size=3, prefetch=3
    )
    np.testing.assert_array_equal(cold.logits, warm.logits)
    assert warm.info["cache"]["view_misses"] == 0 and warm.info["cache"]["view_hits"] == 4 * 6


def test_unreadable_image_in_a_prefetched_chunk_is_skipped_as_before(tiny_openclip, many_views, tmp_path):
    paths = _files(tmp_path, 6, bad_at=(1, 5))  # one bad file in the first chunk, one in a prefetched chunk
    out = {}
    for prefetch in (0, 2):
        m = many_views()
        with pytest.warns(UserWarning, match="skipped 2"):
            res = vlm_tta.classify(
                paths, CLASSES, method=m, model=tiny_openclip, cache=False, batch_size=2, on_error="skip",
                prefetch=prefetch,
            )  # fmt: skip
        out[prefetch] = (res, m.chunks)
    (ref, ref_chunks), (got, chunks) = out[0], out[2]
    np.testing.assert_array_equal(got.logits, ref.logits)
    np.testing.assert_array_equal(got.positions, ref.positions)
    assert got.info["skipped"] == ref.info["skipped"] and [s["position"] for s in got.info["skipped"]] == [1, 5]
    assert chunks == ref_chunks == [2, 2, 2]


def test_unreadable_image_in_a_prefetched_chunk_raises_as_before(tiny_openclip, many_views, tmp_path):
    paths = _files(tmp_path, 6, bad_at=(5,))
    seen = {}
    for prefetch in (0, 2):
        m = many_views()
        with pytest.raises(ImageError, match="bad0.png"):
            vlm_tta.classify(
                paths, CLASSES, method=m, model=tiny_openclip, cache=False, batch_size=2, prefetch=prefetch
            )
        seen[prefetch] = (m.chunks, m.finished)
    # the chunks before the bad file were fed in both cases, and finish() ran once
    assert seen[0] == seen[2] == ([2, 2], 1)


# --------------------------------------------------------------------------------- model-level methods
class _PixelPeek(Method):
    """Model-level method reading its samples' views and their embeddings."""

    needs_pixels = True

    def predict_sample(self, sample):
        pixels = sample.views(ViewSet("augmix", 5, seed=2))
        feats = sample.view_features(ViewSet("crop_flip", 4, seed=1))
        self.sums = getattr(self, "sums", []) + [float(pixels.double().sum())]
        return Prediction(self.ctx.logits(feats.mean(0)))


def test_model_level_methods_get_their_views_made_ahead(tiny_openclip, tmp_path, monkeypatch):
    from vlm_tta.features import LazyImage

    paths = _files(tmp_path, 5)
    threads = []
    real = LazyImage._make

    def spy(self, view_set, *args, **kwargs):
        threads.append((view_set.recipe, threading.current_thread().name))
        return real(self, view_set, *args, **kwargs)

    monkeypatch.setattr(LazyImage, "_make", spy)
    out = {}
    for prefetch in (0, 2):
        threads.clear()
        m = _PixelPeek()
        res = vlm_tta.classify(
            paths, CLASSES, method=m, model=tiny_openclip, cache_dir=tmp_path / f"c{prefetch}", prefetch=prefetch
        )
        out[prefetch] = (res.logits, m.sums, list(threads))
    np.testing.assert_array_equal(out[0][0], out[2][0])
    assert out[0][1] == out[2][1]
    ahead = [r for r, t in out[2][2] if t.startswith("vlm_tta-prefetch-samples")]
    assert ahead.count("augmix") == 4 and ahead.count("crop_flip") == 4  # every sample after the first
    assert not any(t.startswith("vlm_tta-prefetch-samples") for _, t in out[0][2])
    # a warm cache: the embeddings are read back and no crop_flip view is made, ahead or not
    threads.clear()
    warm = vlm_tta.classify(paths, CLASSES, method=_PixelPeek(), model=tiny_openclip, cache_dir=tmp_path / "c2")
    np.testing.assert_array_equal(warm.logits, out[0][0])
    assert not any(r == "crop_flip" for r, _ in threads)


def test_an_error_in_a_view_made_ahead_is_raised_at_its_sample(tiny_openclip):
    from vlm_tta.features import LazyImage, Sample

    imgs = _images(4)

    def load(i):
        if i == 2:
            raise ImageError("image #2: cannot decode")
        return imgs[i]

    store = FeatureStore(tiny_openclip, prefetch=3)
    samples = [Sample(i, LazyImage(lambda i=i: load(i), f"h{i}"), store) for i in range(4)]
    Sample.link(samples)
    vs = ViewSet("crop_flip", 3)
    got = [samples[0].views(vs), samples[1].views(vs)]  # sample 0 starts samples 1-3 in the background
    with pytest.raises(ImageError, match="#2"):
        samples[2].views(vs)
    got.append(samples[3].views(vs))
    ref = [vs.make(imgs[i], tiny_openclip.preprocess_cfg, image_hash=f"h{i}") for i in (0, 1, 3)]
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_cli_prefetch_flag(capsys, cfg_file, tmp_path):
    import json

    from vlm_tta.cli import main

    paths = _files(tmp_path, 2)
    base = ["classify", *paths, "--classes", "cat,dog", "--model", cfg_file, "--pretrained", "none", "--no-cache"]
    outs = []
    for value in ("0", "3"):
        assert main([*base, "--json", "--prefetch", value]) == 0
        outs.append(json.loads(capsys.readouterr().out)["predictions"])
    assert outs[0] == outs[1]
    assert main([*base, "--prefetch", "-1"]) != 0
    assert "--prefetch" in capsys.readouterr().err
