"""Decoding every image kind to 8-bit RGB, and content hashes."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_tta import images as images_mod
from vlm_tta.errors import ImageError
from vlm_tta.images import content_hash, load_image, to_rgb


def px(img, xy=(0, 0)):
    return img.getpixel(xy)


def test_modes_convert_to_the_right_rgb():
    assert px(to_rgb(Image.new("L", (2, 2), 77))) == (77, 77, 77)
    # alpha composited onto white: half-transparent black -> mid grey, fully transparent -> white
    assert px(to_rgb(Image.new("LA", (2, 2), (0, 128)))) == (127, 127, 127)
    assert px(to_rgb(Image.new("RGBA", (2, 2), (255, 0, 0, 0)))) == (255, 255, 255)
    assert px(to_rgb(Image.new("RGBA", (2, 2), (255, 0, 0, 255)))) == (255, 0, 0)
    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    assert px(to_rgb(pal)) == (10, 20, 30)
    pal.info["transparency"] = 0
    assert px(to_rgb(pal)) == (255, 255, 255)
    assert px(to_rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 0)))) == (255, 255, 255)


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 65535], [32768, 257]], dtype=np.uint16)
    img = Image.fromarray(arr)  # mode I;16
    rgb = to_rgb(img)
    assert [px(rgb, (x, y))[0] for y in range(2) for x in range(2)] == [0, 255, 128, 1]
    path = tmp_path / "deep.png"
    img.save(path)
    loaded = load_image(path)  # PNG 16-bit often decodes as mode "I"
    assert [px(loaded, (x, y))[0] for y in range(2) for x in range(2)] == [0, 255, 128, 1]


def test_float_mode_F():
    assert px(to_rgb(Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32)))) == (128, 128, 128)
    assert px(to_rgb(Image.fromarray(np.full((2, 2), 200.0, dtype=np.float32)))) == (200, 200, 200)


@pytest.mark.parametrize(
    "arr, expected",
    [
        (np.full((3, 4), 9, np.uint8), (9, 9, 9)),
        (np.full((3, 4, 3), [1, 2, 3], np.uint8), (1, 2, 3)),
        (np.full((3, 4, 1), 5, np.uint8), (5, 5, 5)),
        (np.full((3, 3, 4), 0.5, np.float32).transpose(2, 0, 1)[:3], (128, 128, 128)),  # CHW float
        (np.full((3, 4), 65535, np.uint16), (255, 255, 255)),
        (np.ones((3, 4), bool), (255, 255, 255)),
        (np.full((3, 4, 4), [255, 0, 0, 255], np.uint8), (255, 0, 0)),
    ],
)
def test_arrays(arr, expected):
    assert px(load_image(arr)) == expected


def test_tensors_chw_and_hwc():
    chw = torch.zeros(3, 5, 6)
    chw[0] = 1.0
    assert px(load_image(chw)) == (255, 0, 0) and load_image(chw).size == (6, 5)
    hwc = torch.full((5, 6, 3), 7, dtype=torch.uint8)
    assert px(load_image(hwc)) == (7, 7, 7)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
        (np.full((4, 4, 3), 2.0, np.float32), r"\[0, 1\]"),
        (np.zeros((2, 4, 4, 3), np.uint8), "shape"),
        (np.zeros((0, 4), np.uint8), "empty"),
        (np.full((4, 4), 300, np.int32), "0..255"),
        ("not-a-file.png", "not found"),
        (12, "type int"),
    ],
)
def test_bad_arrays_and_objects(bad, match):
    with pytest.raises(ImageError, match=match):
        load_image(bad)


def test_corrupt_and_truncated_files(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    with pytest.raises(ImageError, match="bad.jpg"):
        load_image(bad)
    good = tmp_path / "t.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ImageError, match="trunc.png"):
        load_image(trunc)


def test_tiny_and_too_large(monkeypatch):
    assert load_image(Image.new("RGB", (1, 1), (4, 5, 6))).size == (1, 1)
    monkeypatch.setattr(images_mod, "MAX_PIXELS", 100)
    with pytest.raises(ImageError, match="downscale"):
        load_image(Image.new("RGB", (11, 10)))


def test_content_hash_is_about_pixels_not_source(tmp_path):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8))
    path = tmp_path / "a.png"
    img.save(path)
    h = content_hash(img)
    assert h == content_hash(load_image(path)) == content_hash(load_image(np.asarray(img)))
    other = img.copy()
    other.putpixel((0, 0), (0, 0, 0) if img.getpixel((0, 0)) != (0, 0, 0) else (1, 1, 1))
    assert content_hash(other) != h
    # same bytes, different shape: different hash
    flat = Image.fromarray(np.asarray(img).reshape(7, 5, 3))
    assert content_hash(flat) != h
