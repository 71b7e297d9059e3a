"""vlm_tta.diffusion: DiffTPT's image variations, their cache and the ``vlm-tta generate`` verb.

Everything runs on a tiny random image-variation pipeline built here (32 px, 2 denoising steps);
nothing is downloaded.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from tiny_models import TINY_SD_SIZE, build_tiny_image_variation_pipeline
from torchvision.transforms import InterpolationMode

from vlm_tta.cache import EmbeddingCache
from vlm_tta.cli import main
from vlm_tta.diffusion import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_MODEL,
    DiffusionOptionError,
    DiffusionWeightsError,
    GenerationsMissingError,
    ImageVariations,
    VariationSettings,
    conditioning_pixels,
    finish_generation,
    pipeline_identity,
)
from vlm_tta.images import content_hash
from vlm_tta.models.base import PreprocessConfig
from vlm_tta.views import original_view

#: Fast settings for the tiny pipeline: raw pixels unless a test asks for the reference's JPEG.
FAST = dict(count=3, steps=2, height=TINY_SD_SIZE, width=TINY_SD_SIZE, jpeg_quality=None, store_size=None)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny pipeline's kernels are too small for OpenMP: on a shared 2-core machine one thread
    is ~20x faster than two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_image_variation_pipeline(seed=0)


@pytest.fixture(scope="module")
def pipe_dir(pipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_sd")
    pipe.save_pretrained(d)
    return d


def noise_image(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def images():
    return [noise_image(i) for i in range(3)]


def variations(pipe, tmp_path, **kw):
    options = {**FAST, **kw}
    cache = options.pop("cache", EmbeddingCache(tmp_path / "cache"))
    return ImageVariations(pipe, cache=cache, **options)


# ------------------------------------------------------------------------------------------ settings


def test_settings_validation():
    with pytest.raises(DiffusionOptionError, match="conditioning"):
        VariationSettings(conditioning="clip")
    with pytest.raises(DiffusionOptionError, match="multiples of 8"):
        VariationSettings(height=500)
    with pytest.raises(DiffusionOptionError, match="jpeg_quality"):
        VariationSettings(jpeg_quality=0)
    with pytest.raises(DiffusionOptionError, match="count"):
        VariationSettings(count=0)
    with pytest.raises(DiffusionOptionError, match="guidance"):
        VariationSettings(guidance_scale=float("nan"))
    d = VariationSettings()  # the reference's values
    assert (d.count, d.steps, d.guidance_scale, d.height, d.conditioning, d.jpeg_quality) == (
        63,
        50,
        3.0,
        512,
        "reference",
        75,
    )
    assert "count" not in d.key_dict()


def test_keys_change_with_every_setting_but_count(pipe, tmp_path):
    base = variations(pipe, tmp_path)
    key = base.keys("h", [0])[0]
    assert base.keys("h", [0, 1])[1] != key and base.keys("h2", [0])[0] != key
    assert variations(pipe, tmp_path, count=7).keys("h", [0])[0] == key
    for change in (
        dict(steps=3),
        dict(guidance_scale=2.0),
        dict(height=40),
        dict(scheduler="DDIMScheduler"),
        dict(conditioning="feature_extractor"),
        dict(seed=1),
        dict(jpeg_quality=75),
        dict(store_size=16),
    ):
        assert variations(pipe, tmp_path, **change).keys("h", [0])[0] != key, change


def test_pipeline_identity(pipe, pipe_dir, tmp_path):
    assert pipeline_identity("owner/model", "v1") == "hub:owner/model@v1"
    assert pipeline_identity(DEFAULT_MODEL, "v2.0") == f"hub:{DEFAULT_MODEL}@v2.0"
    folder = pipeline_identity(pipe_dir)
    assert folder.startswith("folder-sha256:") and pipeline_identity(str(pipe_dir)) == folder
    obj = pipeline_identity(pipe)
    other = build_tiny_image_variation_pipeline(seed=1)
    assert obj.startswith("object-sha256:") and pipeline_identity(build_tiny_image_variation_pipeline(seed=0)) == obj
    assert pipeline_identity(other) != obj
    other.save_pretrained(tmp_path / "other")
    assert pipeline_identity(tmp_path / "other") != folder


# ------------------------------------------------------------------------------------------ pixels


def test_reference_conditioning_is_a_squashing_resize_without_antialias(pipe):
    # A constant image stays constant: every pixel is (c / 255 - mean) / std after normalisation.
    flat = Image.new("RGB", (50, 20), (200, 100, 0))
    cond = conditioning_pixels([flat], "reference", pipe)
    assert cond.shape == (1, 3, 32, 32)  # the encoder's input size, aspect ratio not kept
    for c, v in enumerate((200, 100, 0)):
        assert torch.allclose(cond[0, c], torch.full((32, 32), (v / 255 - CLIP_MEAN[c]) / CLIP_STD[c]), atol=1e-6)
    # On a detailed image, antialias=False is what the reference does (and it differs from antialiasing).
    img = noise_image(0, (96, 64))
    ref = conditioning_pixels([img], "reference", pipe)[0]
    t = TF.to_tensor(img)
    no_aa = TF.normalize(TF.resize(t, [32, 32], InterpolationMode.BICUBIC, antialias=False), CLIP_MEAN, CLIP_STD)
    aa = TF.normalize(TF.resize(t, [32, 32], InterpolationMode.BICUBIC, antialias=True), CLIP_MEAN, CLIP_STD)
    assert torch.equal(ref, no_aa) and not torch.allclose(ref, aa, atol=1e-2)
    fe = conditioning_pixels([img], "feature_extractor", pipe)[0]
    assert torch.equal(fe, pipe.feature_extractor(images=[img], return_tensors="pt").pixel_values[0])
    assert not torch.allclose(fe, ref, atol=1e-2)


def test_finish_generation_jpeg_round_trip_and_stored_size():
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(raw).save(buf, format="JPEG")  # what the reference's `image.save("x_0.jpg")` writes
    expected = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert np.array_equal(finish_generation(raw, VariationSettings(jpeg_quality=75, store_size=None)), expected)
    assert np.array_equal(finish_generation(raw, VariationSettings(jpeg_quality=None, store_size=None)), raw)
    small = finish_generation(raw, VariationSettings(jpeg_quality=None, store_size=32))
    assert small.shape == (32, 32, 3) and small.dtype == np.uint8
    assert np.array_equal(small, np.asarray(TF.resize(Image.fromarray(raw), 32, InterpolationMode.BICUBIC)))
    # never enlarged
    assert finish_generation(raw, VariationSettings(jpeg_quality=None, store_size=128)).shape == (64, 64, 3)


def test_stored_224_gives_the_same_clip_views_as_the_512_original():
    """The reason for store_size=224: a 224 px CLIP (bicubic shorter-side resize + centre crop)
    sees exactly the same pixels whether the generation was kept at 512 px or stored at 224 px."""
    rng = np.random.default_rng(1)
    cfg = PreprocessConfig(image_size=(224, 224), mean=CLIP_MEAN, std=CLIP_STD)
    for shape in ((512, 512, 3), (512, 640, 3)):
        full = rng.integers(0, 256, shape, dtype=np.uint8)
        stored = finish_generation(full, VariationSettings(jpeg_quality=None, store_size=224))
        assert min(stored.shape[:2]) == 224
        assert torch.equal(original_view(Image.fromarray(stored), cfg), original_view(Image.fromarray(full), cfg))


# ------------------------------------------------------------------------------------------ generation


def test_generation_shapes_and_determinism_in_any_batch(pipe, images, tmp_path):
    """Generation i of an image is a function of (seed, image, i): the same in any batch."""
    a = variations(pipe, tmp_path / "a", batch_size=4)(images)  # 9 generations in batches of 4, mixed images
    assert [x.shape for x in a] == [(3, TINY_SD_SIZE, TINY_SD_SIZE, 3)] * 3 and a[0].dtype == np.uint8
    b = variations(pipe, tmp_path / "b", batch_size=1)([images[2], images[0]])
    for got, want in ((b[0], a[2]), (b[1], a[0])):
        diff = np.abs(got.astype(int) - want.astype(int))
        # bit-equal but for float rounding that depends on the batch size (CPU kernels): <= 1 grey level, rarely
        assert diff.max() <= 1 and (diff == 0).mean() > 0.999
    assert np.abs(a[0][0].astype(int) - a[0][1].astype(int)).mean() > 5  # generations of one image differ
    assert np.abs(a[0][0].astype(int) - a[1][0].astype(int)).mean() > 5  # and so do images
    c = variations(pipe, tmp_path / "c", seed=1)([images[0]])
    assert np.abs(c[0].astype(int) - a[0].astype(int)).mean() > 5  # another seed, other images


def test_second_run_reads_the_cache_and_never_loads_the_pipeline(pipe_dir, images, tmp_path):
    first = ImageVariations(pipe_dir, cache=EmbeddingCache(tmp_path / "c"), batch_size=2, **FAST)
    report = first.generate(images, progress=False)
    assert (report.images, report.generated, report.cached, report.images_generated) == (3, 9, 0, 3)
    assert first.calls == 5 and report.seconds > 0
    second = ImageVariations(str(pipe_dir), cache=EmbeddingCache(tmp_path / "c"), **FAST)
    again = second.generate(images, progress=False)
    assert (again.generated, again.cached, again.seconds) == (0, 9, 0.0)
    assert second.calls == 0 and second._pipe is None  # weights never loaded
    got = second.load([content_hash(im) for im in images])
    assert all(np.array_equal(x, y) for x, y in zip(got, first(images)))
    assert first.calls == 5
    # one more generation per image: only the new index is made
    more = ImageVariations(pipe_dir, cache=EmbeddingCache(tmp_path / "c"), **{**FAST, "count": 4})
    r = more.generate(images + [images[0]], progress=False)  # a repeated image is made once
    assert (r.images, r.generated, r.cached) == (4, 3, 9)


def test_resume_after_an_interruption(pipe, images, tmp_path):
    gen = variations(pipe, tmp_path, batch_size=2)
    real = gen._run_batch

    def interrupted(*args):
        if gen.calls == 2:
            raise KeyboardInterrupt
        return real(*args)

    gen._run_batch = interrupted
    with pytest.raises(KeyboardInterrupt):
        gen.generate(images, progress=False)
    hashes = [content_hash(im) for im in images]
    assert len(gen.missing(hashes)) == 9 - 4  # two whole batches committed, nothing of the third
    gen._run_batch = real
    gen.calls = 0
    report = gen.generate(images, progress=False)
    assert (report.generated, report.cached, gen.calls) == (5, 4, 3)
    assert gen.missing(hashes) == []
    resumed = gen.load(hashes)
    fresh = variations(pipe, tmp_path / "fresh", batch_size=2)(images)
    assert all(np.abs(x.astype(int) - y.astype(int)).max() <= 1 for x, y in zip(resumed, fresh))


def test_without_a_cache_everything_is_generated_and_returned(pipe, images, tmp_path):
    gen = variations(pipe, tmp_path, cache=False)
    out = gen(images[:2])
    assert len(out) == 2 and gen.calls > 0
    with pytest.raises(GenerationsMissingError):
        gen.load([content_hash(images[0])])


def test_reference_jpeg_and_stored_size_in_the_pipeline(pipe, images, tmp_path):
    raw = variations(pipe, tmp_path / "raw")([images[0]])[0]
    stored = variations(pipe, tmp_path / "ref", jpeg_quality=75, store_size=16)([images[0]])[0]
    assert stored.shape == (3, 16, 16, 3)
    for r, s in zip(raw, stored):
        assert np.array_equal(s, finish_generation(r, VariationSettings(jpeg_quality=75, store_size=16)))


def test_user_pipeline_is_left_as_it_was(pipe, images, tmp_path):
    scheduler = pipe.scheduler
    bar = dict(pipe._progress_bar_config)
    gen = variations(pipe, tmp_path, scheduler="DDIMScheduler", count=1)
    ddim = gen(images[:1])[0]
    assert pipe.scheduler is scheduler and pipe.safety_checker is None and pipe._progress_bar_config == bar
    pndm = variations(pipe, tmp_path, count=1)(images[:1])[0]
    assert not np.array_equal(ddim, pndm)
    with pytest.raises(DiffusionOptionError, match="unknown diffusers scheduler"):
        variations(pipe, tmp_path, scheduler="NoSuchScheduler")(images[:1])


def test_feature_extractor_conditioning_changes_the_generation(pipe, images, tmp_path):
    ref = variations(pipe, tmp_path, count=1)(images[:1])[0]
    fe = variations(pipe, tmp_path, count=1, conditioning="feature_extractor")(images[:1])[0]
    assert fe.shape == ref.shape and not np.array_equal(fe, ref)


# ------------------------------------------------------------------------------------------ errors


def test_clear_errors_without_weights(tmp_path, images):
    gen = ImageVariations("vlm-tta-tests/no-such-pipeline", cache=EmbeddingCache(tmp_path), **FAST)
    with pytest.raises(DiffusionWeightsError, match="hf download vlm-tta-tests/no-such-pipeline") as err:
        gen.check_available()  # HF_HUB_OFFLINE=1 in the tests
    # the fix in each interface's terms: diffusion='...' in Python, --diffusion ... on the command line
    assert "diffusion='/path/to/sd-variations'" in str(err.value)
    assert "--diffusion /path/to/sd-variations" in err.value.render("cli")
    with pytest.raises(DiffusionWeightsError):
        gen.generate(images[:1], progress=False)
    with pytest.raises(GenerationsMissingError, match="vlm-tta generate"):
        gen.load([content_hash(images[0])])  # the cache-only path needs no weights and says what to do
    with pytest.raises(DiffusionWeightsError, match="not found"):
        ImageVariations(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffusionWeightsError, match="model_index.json"):
        ImageVariations(tmp_path / "empty")


# ------------------------------------------------------------------------------------------ CLI


def test_cli_generate_folder_resumes_and_reports(pipe_dir, tmp_path, capsys):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(("a.png", "b.jpg", "sub/c.png")):
        noise_image(10 + i).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    args = ["generate", str(folder), "--diffusion", str(pipe_dir), "--count", "2", "--steps", "2"]
    args += ["--height", "32", "--width", "32", "--cache-dir", str(tmp_path / "c"), "--batch-size", "3", "--json"]
    assert main(args) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert (out["images"], out["generated"], out["cached"], out["skipped"]) == (3, 6, 0, 1)
    assert "skipping an unreadable image" in captured.err and "broken.png" in captured.err
    assert out["seconds_per_image"] > 0 and out["pipeline"].startswith("folder-sha256:")
    assert main(args + ["--limit", "2"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["images"], again["generated"], again["cached"]) == (2, 0, 4)
    assert main(args[:-1]) == 0
    text = capsys.readouterr().out
    assert "0 generated, 6 already cached" in text
    # the stored images are the defaults' (JPEG round trip, store size 224 > 32: kept at 32)
    gen = ImageVariations(pipe_dir, cache=EmbeddingCache(tmp_path / "c"), count=2, steps=2, height=32, width=32)
    assert gen.load([content_hash(Image.open(folder / "a.png").convert("RGB"))])[0].shape == (2, 32, 32, 3)


def test_cli_generate_dataset_subset(pipe_dir, tmp_path, capsys):
    from fake_datasets import make_coop

    make_coop(tmp_path / "data", "dtd", [0, 1, 2], per_class=2)  # 3 distinct colours, 6 files
    args = ["generate", "--dataset", "dtd", "--data-root", str(tmp_path / "data"), "--subset", "4", "--seed", "0"]
    args += ["--subset-file", str(tmp_path / "subset.json"), "--diffusion", str(pipe_dir), "--count", "1"]
    args += ["--steps", "2", "--height", "32", "--width", "32", "--cache-dir", str(tmp_path / "c"), "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 4 and out["generated"] + out["cached"] == out["images_generated"] <= 3
    assert (tmp_path / "subset.json").is_file()


def test_cli_generate_errors_before_any_work(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    noise_image(0).save(folder / "a.png")
    args = [
        "generate",
        str(folder),
        "--diffusion",
        "vlm-tta-tests/no-such-pipeline",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "not in the local Hugging Face cache" in err and "--diffusion /path/to/sd-variations" in err
    assert EmbeddingCache(tmp_path / "c").info()["entries"] == 0
    assert main(["generate", "--cache-dir", str(tmp_path / "c")]) == 2
    assert "give image files/folders" in capsys.readouterr().err


def test_exif_choice_decides_the_image_hash(pipe, tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    noise_image(5, (40, 24)).save(path, exif=exif)
    raw = Image.open(path).convert("RGB")  # what the reference decodes: EXIF ignored
    for exif_transpose, expected in ((False, raw), (True, raw.transpose(Image.Transpose.ROTATE_270))):
        gen = variations(pipe, tmp_path / str(exif_transpose), count=1, exif_transpose=exif_transpose)
        gen.generate([path], progress=False)
        assert gen.missing([content_hash(expected)]) == []
