"""Checks that every feature-level method's tests share: synthetic view embeddings, the end-to-end
run on a tiny model through the cache, and the ``vlm-tta methods`` listing."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import vlm_tta
from vlm_tta.cache import as_cache
from vlm_tta.features import FeatureStore, encoder_call_counter
from vlm_tta.methods import create_method, get_method_class


def synthetic_stream(n: int, c: int, d: int, v: int, seed: int, noise: float = 3.0):
    """``n`` images of ``c`` random unit classes in ``d`` dimensions: ``n x v x d`` unit view
    embeddings (the views of an image share its noise, plus their own when ``v > 1``), the class
    embeddings and the labels."""
    g = torch.Generator().manual_seed(seed)
    classes = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    y = torch.randint(0, c, (n,), generator=g)
    base = classes[y][:, None] + noise * torch.randn(n, 1, d, generator=g) / d**0.5
    views = base + (noise * torch.randn(n, v, d, generator=g) / d**0.5 if v > 1 else 0)
    return F.normalize(views, dim=-1), classes, y


def end_to_end(model, tmp_path, method: str, n_images: int = 5, seed: int = 0, **options):
    """Run ``method`` through :func:`vlm_tta.classify` on random images twice (the second time with
    another ``batch_size``) and through :func:`vlm_tta.classify_features` on the cached embeddings;
    asserts that the repeat and the embedding run call no image encoder and agree with the first run.
    Returns the first result."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)) for _ in range(n_images)]
    classes = ["cat", "dog", "bird"]
    calls = encoder_call_counter(model)
    first = vlm_tta.classify(images, classes, method=method, model=model, cache_dir=tmp_path, **options)
    encoded = calls()["images"]
    assert encoded > 0
    again = vlm_tta.classify(images, classes, method=method, model=model, cache_dir=tmp_path, batch_size=2, **options)
    assert calls()["images"] == encoded, "cached view embeddings must not run the image encoder"
    np.testing.assert_allclose(again.probs, first.probs, rtol=1e-5, atol=1e-6)
    store = FeatureStore(model, as_cache(tmp_path))
    feats = store.view_features(images, create_method(method, **options).view_set())
    res = vlm_tta.classify_features(
        feats, store.class_features(classes), method=method, logit_scale=model.logit_scale, **options
    )
    assert calls()["images"] == encoded
    np.testing.assert_allclose(res.probs, first.probs, rtol=1e-5, atol=1e-6)
    assert (res.indices == first.indices).all() and first.scores is not None
    return first


def check_cli_lists_options(method: str, capsys) -> None:
    """``vlm-tta methods`` shows every option of ``method`` with its default."""
    from vlm_tta.cli import main

    assert main(["methods"]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if row.startswith(f"{method} "))
    for f in dataclasses.fields(get_method_class(method).config_class):
        assert f"{f.name}={f.default!r}" in line
