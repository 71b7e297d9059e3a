"""Encoder speed-ups: inference mode (exact: predictions do not change), bf16 autocast on the CPU as
an opt-in precision, and the optional ``compile()``."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

import vlm_tta
from vlm_tta.models import base as B

CLASSES = ["cat", "dog", "bird"]


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("fixture", ["tiny_openclip", "tiny_hf_clip", "tiny_hf_siglip"])
def test_inference_mode_changes_no_embedding_and_returns_normal_tensors(request, fixture, monkeypatch):
    model = request.getfixturevalue(fixture)
    pixels = torch.randn(5, 3, 32, 32)
    fast_i, fast_t = model.encode_images(pixels), model.encode_texts(["a photo of a cat.", "a dog"])
    assert not fast_i.is_inference() and not fast_t.is_inference() and not fast_i.requires_grad
    w = torch.ones(fast_i.shape[-1], requires_grad=True)
    (fast_i @ w).sum().backward()  # usable in autograd (TPT's loss reads image embeddings)
    monkeypatch.setattr(B, "_INFERENCE", torch.no_grad)  # the previous path
    assert torch.equal(model.encode_images(pixels), fast_i)
    assert torch.equal(model.encode_texts(["a photo of a cat.", "a dog"]), fast_t)


def test_inference_mode_changes_no_prediction(tiny_openclip, monkeypatch):
    imgs = _images(4)
    kw = dict(model=tiny_openclip, cache=False, templates="clip7")
    fast = [vlm_tta.classify(imgs, CLASSES, **kw), vlm_tta.classify(imgs, CLASSES, method="zero", n_views=6, **kw)]
    monkeypatch.setattr(B, "_INFERENCE", torch.no_grad)
    slow = [vlm_tta.classify(imgs, CLASSES, **kw), vlm_tta.classify(imgs, CLASSES, method="zero", n_views=6, **kw)]
    for a, b in zip(fast, slow):
        np.testing.assert_array_equal(a.logits, b.logits)


def test_bf16_autocast_on_the_cpu_is_opt_in():
    import tiny_models

    fp32 = tiny_models.build_tiny_openclip(seed=0)
    bf16 = tiny_models.build_tiny_openclip(seed=0, precision="amp_bf16")
    assert fp32.precision == "fp32" and bf16.precision == "amp_bf16"
    assert bf16.fingerprint != fp32.fingerprint  # never shares cached embeddings with fp32
    with bf16.autocast():
        assert torch.is_autocast_cpu_enabled() and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with fp32.autocast():
        assert not torch.is_autocast_cpu_enabled()
    pixels = torch.randn(6, 3, 32, 32)
    a, b = fp32.encode_images(pixels), bf16.encode_images(pixels)
    assert a.dtype == b.dtype == torch.float32
    assert not torch.equal(a, b) and torch.nn.functional.cosine_similarity(a, b).min() > 0.98


def test_compile_is_callable():
    import tiny_models

    model = tiny_models.build_tiny_openclip(seed=0)
    pixels = torch.randn(4, 3, 32, 32)
    ref = model.encode_images(pixels)
    fp = model.fingerprint
    # The "eager" backend checks the plumbing (graph capture, call path) without a C++ toolchain;
    # inductor's code generation takes tens of seconds, too slow for the test run.
    assert model.compile(backend="eager") is model
    t0 = time.perf_counter()
    try:
        got = model.encode_images(pixels)
    except Exception as exc:  # noqa: BLE001 - torch.compile unsupported here
        pytest.skip(f"torch.compile could not trace the tiny model here: {type(exc).__name__}: {exc}")
    if time.perf_counter() - t0 > 30:
        pytest.skip("torch.compile took over 30 s to trace the tiny model (loaded machine)")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert model.fingerprint == fp
