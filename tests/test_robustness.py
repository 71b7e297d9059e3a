"""Newcomer robustness (issue 13): CLI errors in CLI terms, no tracebacks, no silent wrong answers,
what the cache did, repeatable random weights."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tiny_models
import torch
from PIL import Image

import vlm_tta
from vlm_tta.cli import main
from vlm_tta.errors import ClassNamesError, ImageError, ModelSpecError, OptionError
from vlm_tta.models.base import PromptTruncatedWarning

CLASSES = ["cat", "dog", "bird"]


def _image(seed=0, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def img_path(tmp_path):
    path = tmp_path / "x.png"
    _image().save(path)
    return str(path)


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_models.tiny_openclip_config()))
    return str(path)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and "Traceback" not in err, err
    errors = [ln for ln in lines if ": error:" in ln]
    assert len(errors) == 1, err
    return errors[0]


# --------------------------------------------------------------------------- 1. the CLI speaks CLI
def test_missing_weights_name_the_cli_flag(capsys, img_path):
    rc, _, err = run_cli(capsys, "classify", img_path, "--classes", "cat,dog", "--no-cache")
    line = one_line_error(err)
    assert rc == 2 and "--pretrained /path/to/" in line and "load_model(" not in line and "pretrained='" not in line


def test_missing_weights_name_the_python_option():
    with pytest.raises(ModelSpecError) as err:
        vlm_tta.load_model("ViT-B-16@openai")
    assert "load_model('ViT-B-16@openai', pretrained='/path/to/" in str(err.value)


def test_duplicate_classes_name_the_cli_flag(capsys, img_path, cfg_file):
    rc, _, err = run_cli(
        capsys, "classify", img_path, "--classes", "cat,cat", "--model", cfg_file, "--pretrained", "none"
    )
    line = one_line_error(err)
    assert rc == 2 and "--allow-duplicate-classes" in line and "allow_duplicate_classnames" not in line
    rc, out, _ = run_cli(
        capsys, "classify", img_path, "--classes", "cat,cat", "--model", cfg_file, "--pretrained", "none",
        "--allow-duplicate-classes", "--no-cache",
    )  # fmt: skip
    assert rc == 0 and "cat" in out


def test_custom_config_without_weights(capsys, img_path, cfg_file):
    rc, _, err = run_cli(capsys, "classify", img_path, "--classes", "cat,dog", "--model", cfg_file)
    line = one_line_error(err)
    assert rc == 2 and "--pretrained /path/to/checkpoint.safetensors" in line and "pretrained=None" not in line
    # In Python, classify() takes the same pretrained= that load_model takes.
    res = vlm_tta.classify([_image()], CLASSES, model=tiny_models.tiny_openclip_config(), pretrained=None, cache=False)
    assert len(res) == 1
    with pytest.raises(ModelSpecError, match="pretrained='/path/to/checkpoint.safetensors'"):
        vlm_tta.classify([_image()], CLASSES, model=tiny_models.tiny_openclip_config(), cache=False)


def test_loading_options_with_a_loaded_model_are_an_error(tiny_openclip):
    with pytest.raises(OptionError, match="already loaded"):
        vlm_tta.classify([_image()], CLASSES, model=tiny_openclip, pretrained=None, cache=False)


def test_every_loading_option_has_a_flag(capsys, img_path, cfg_file, tmp_path):
    # --tokenizer, --precision, --download-dir, --seed reach load_model (a bad tokenizer dir is reported)
    rc, _, err = run_cli(
        capsys, "classify", img_path, "--classes", "cat,dog", "--model", cfg_file, "--pretrained", "none",
        "--tokenizer", str(tmp_path / "no-such-dir"),
    )  # fmt: skip
    assert rc == 2 and "tokenizer directory not found" in one_line_error(err)
    rc, out, _ = run_cli(
        capsys, "classify", img_path, "--classes", "cat,dog", "--model", cfg_file, "--pretrained", "none",
        "--precision", "fp32", "--download-dir", str(tmp_path / "dl"), "--seed", "3", "--num-workers", "0",
        "--no-cache", "--json", "--ignore-exif", "--on-error", "skip", "--top-k", "1",
    )  # fmt: skip
    assert rc == 0 and json.loads(out)["predictions"][0]["label"] in ("cat", "dog")


# --------------------------------------------------------------------------- 2. no tracebacks
INVALID = [
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "x"], "--batch-size"),
    (["--num-workers", "-1"], "--num-workers"),
    (["--seed", "-2"], "--seed"),
    (["--top-k", "0"], "--top-k"),
    (["--top-k", "-1"], "--top-k"),
    (["--precision", "fp8"], "--precision"),
    (["--on-error", "ignore"], "--on-error"),
    (["--device", "gpu"], "unknown device"),
    (["--method", "nope"], "unknown method"),
    (["-o", "mcm_temperature=hot"], "expects float"),
    (["-o", "mcm_temperature"], "key=value"),
    (["-o", "no_such_option=1"], "unknown option"),
    (["-o", "score=bogus"], "score must be one of"),
    (["--templates", "no-such-set"], "unknown template set"),
    (["--classes-file", "/no/such/file.txt"], "class file not found"),
    (["--model", "no-such-model"], "unknown model"),
    (["--pretrained", "/no/such/ckpt.safetensors"], "checkpoint file not found"),
]


@pytest.mark.parametrize("extra,expect", INVALID, ids=[" ".join(x) for x, _ in INVALID])
def test_every_flag_with_an_invalid_value_gives_one_line(capsys, img_path, cfg_file, extra, expect):
    argv = ["classify", img_path, "--classes", "cat,dog", "--no-cache", "--model", cfg_file, "--pretrained", "none"]
    if "--model" in extra:
        argv = argv[:5] + argv[7:]  # the invalid model instead
    rc, out, err = run_cli(capsys, *argv, *extra) if "--pretrained" not in extra else run_cli(capsys, *argv[:7], *extra)
    line = one_line_error(err)
    assert rc != 0 and expect in line, line
    assert out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda(capsys, img_path, cfg_file):
    rc, _, err = run_cli(
        capsys, "classify", img_path, "--classes", "cat,dog", "--model", cfg_file, "--pretrained", "none",
        "--device", "cuda",
    )  # fmt: skip
    line = one_line_error(err)
    assert rc == 2 and "CUDA is not available" in line and "--device cpu" in line


def test_real_entry_point_prints_no_traceback(img_path, cfg_file):
    proc = subprocess.run(
        [sys.executable, "-m", "vlm_tta", "classify", img_path, "--classes", "cat,dog", "--batch-size", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "--batch-size" in proc.stderr


def test_python_arguments_get_the_projects_errors(tiny_openclip):
    for bad in (dict(batch_size=1.5), dict(batch_size=0), dict(batch_size=True), dict(num_workers=-1),
                dict(progress="yes"), dict(on_error="ignore"), dict(exif_transpose=None)):  # fmt: skip
        with pytest.raises(OptionError):
            vlm_tta.classify([_image()], CLASSES, model=tiny_openclip, cache=False, **bad)
    with pytest.raises(OptionError):
        vlm_tta.classify_features(np.eye(3, 4, dtype=np.float32), np.eye(3, 4, dtype=np.float32), batch_size=0)
    res = vlm_tta.classify([_image()], CLASSES, model=tiny_openclip, cache=False)
    with pytest.raises(OptionError):
        res.to_rows(top_k=0)


def test_device_that_cannot_apply_to_a_loaded_model_warns(tiny_openclip):
    with pytest.warns(UserWarning, match="already loaded on cpu"):
        vlm_tta.classify([_image()], CLASSES, model=tiny_openclip, cache=False, device="meta")


def test_unexpected_errors_are_one_line_unless_debug(capsys, monkeypatch, img_path):
    import vlm_tta.cli as cli

    def boom(args):
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(cli, "_cmd_templates", boom)
    rc, _, err = run_cli(capsys, "templates")
    assert rc == 1 and "unexpected RuntimeError: something broke" in one_line_error(err)
    with pytest.raises(RuntimeError):
        main(["--debug", "templates"])


# --------------------------------------------------------------------------- 3. no silent wrong answers
@pytest.mark.parametrize("fixture", ["tiny_openclip", "tiny_hf_clip"])
def test_classes_the_tokenizer_cannot_tell_apart(request, fixture):
    model = request.getfixturevalue(fixture)
    with pytest.raises(ClassNamesError, match=r"'Cat' \(#0\) = 'cat' \(#2\)"):
        vlm_tta.classify([_image()], ["Cat", "dog", "cat"], model=model, cache=False)
    long_a, long_b = "cat " + "very " * 80 + "a", "cat " + "very " * 80 + "b"
    with pytest.raises(ClassNamesError, match="identical prompts"):  # differ only after the context length
        vlm_tta.classify([_image()], [long_a, long_b], model=model, cache=False)
    with pytest.warns(PromptTruncatedWarning, match="context length"):
        vlm_tta.classify([_image()], [long_a, "dog"], model=model, cache=False)
    res = vlm_tta.classify([_image()], ["Cat", "cat"], model=model, cache=False, allow_duplicate_classnames=True)
    assert res.probs[0, 0] == pytest.approx(res.probs[0, 1])  # the tie the check warns about


def test_no_false_alarm_for_distinct_names(tiny_hf_siglip):
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        vlm_tta.classify([_image()], ["cat", "dog", "golden retriever"], model=tiny_hf_siglip, cache=False)


def test_byte_order_marks_are_not_part_of_the_first_name(capsys, tmp_path, img_path, cfg_file):
    classes = tmp_path / "classes.txt"
    classes.write_bytes("\ufeffcat\ndog\n".encode())
    templates = tmp_path / "templates.txt"
    templates.write_bytes("\ufeffa photo of a {}.\n".encode())
    rc, out, _ = run_cli(
        capsys, "classify", img_path, "--classes-file", str(classes), "--templates", str(templates),
        "--model", cfg_file, "--pretrained", "none", "--json", "--no-cache", "--top-k", "2",
    )  # fmt: skip
    assert rc == 0
    labels = {t["label"] for t in json.loads(out)["predictions"][0]["top"]}
    assert labels == {"cat", "dog"}
    assert vlm_tta.get_templates(str(templates)) == ["a photo of a {}."]
    from vlm_tta.data import read_classnames

    assert read_classnames(classes) == ["cat", "dog"]


def _rotated_jpeg(path, orientation=6):
    img = _image(3, size=(48, 24))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif, quality=95)
    return path


def test_exif_orientation_is_applied_and_kept_apart_in_the_cache(tiny_openclip, tmp_path):
    path = str(_rotated_jpeg(tmp_path / "phone.jpg"))
    upright = vlm_tta.images.load_image(path)
    raw = vlm_tta.images.load_image(path, exif_transpose=False)
    assert upright.size == (24, 48) and raw.size == (48, 24)
    cache = tmp_path / "c"
    on = vlm_tta.classify([path], CLASSES, model=tiny_openclip, cache_dir=cache)
    off = vlm_tta.classify([path], CLASSES, model=tiny_openclip, cache_dir=cache, exif_transpose=False)
    on2 = vlm_tta.classify([path], CLASSES, model=tiny_openclip, cache_dir=cache)  # warm
    ref_on = vlm_tta.classify([upright], CLASSES, model=tiny_openclip, cache=False)
    ref_off = vlm_tta.classify([raw], CLASSES, model=tiny_openclip, cache=False, exif_transpose=False)
    np.testing.assert_allclose(on.logits, ref_on.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(off.logits, ref_off.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(on.logits, on2.logits)
    assert not np.allclose(on.logits, off.logits)
    # a PIL image opened from the file carries its EXIF too
    with Image.open(path) as im:
        assert vlm_tta.images.load_image(im).size == (24, 48)


def test_a_dataset_skips_unreadable_files_and_says_which(tiny_openclip, tmp_path):
    from fake_datasets import write_corrupt, write_image

    from vlm_tta.data import ImageFolderDataset

    root = tmp_path / "ds"
    for c in ("cat", "dog"):
        for i in range(2):
            write_image(root / c / f"{i}.png", label=i)
    write_corrupt(root / "dog" / "bad.png")
    ds = ImageFolderDataset(root)
    bad = ds.paths.index(str(root / "dog" / "bad.png"))
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\): .*bad.png"):
        res = vlm_tta.classify(ds, ds.classnames, model=tiny_openclip, cache=False, batch_size=2)
    assert len(res) == len(ds) - 1 and bad not in res.positions
    assert [s["position"] for s in res.info["skipped"]] == [bad] and "bad.png" in res.info["skipped"][0]["image"]
    # a plain list keeps raising by default, and skips on request
    paths = list(ds.paths)
    with pytest.raises(ImageError, match="bad.png"):
        vlm_tta.classify(paths, ds.classnames, model=tiny_openclip, cache=False)
    with pytest.warns(UserWarning, match="skipped 1"):
        listed = vlm_tta.classify(paths, ds.classnames, model=tiny_openclip, cache=False, on_error="skip")
    np.testing.assert_array_equal(listed.positions, res.positions)
    rows = listed.to_rows(names=paths)
    assert [r["image"] for r in rows] == [p for i, p in enumerate(paths) if i != bad]


# --------------------------------------------------------------------------- 4. what the cache did
def test_cache_hits_and_misses_are_reported(tiny_openclip, tmp_path, capsys, cfg_file, img_path):
    imgs = [_image(i) for i in range(3)]
    cold = vlm_tta.classify(imgs, CLASSES, model=tiny_openclip, cache_dir=tmp_path / "c")
    warm = vlm_tta.classify(imgs, CLASSES, model=tiny_openclip, cache_dir=tmp_path / "c")
    assert cold.info["cache"] == {"class_hits": 0, "class_misses": 1, "view_hits": 0, "view_misses": 3}
    assert warm.info["cache"] == {"class_hits": 1, "class_misses": 0, "view_hits": 3, "view_misses": 0}
    argv = ["classify", img_path, "--classes", "cat,dog", "--model", cfg_file, "--pretrained", "none"]
    argv += ["--cache-dir", str(tmp_path / "cli")]
    _, _, err1 = run_cli(capsys, *argv)
    _, _, err2 = run_cli(capsys, *argv)
    assert "view embeddings 0 cached, 1 computed" in err1
    assert "class embeddings 1 cached, 0 computed; view embeddings 1 cached, 0 computed" in err2
    _, _, err3 = run_cli(capsys, *argv, "--quiet")
    assert err3 == ""


def test_random_weights_are_repeatable_and_share_the_cache(tmp_path, cfg_file, capsys):
    imgs = [_image(i) for i in range(2)]
    a = vlm_tta.classify(imgs, CLASSES, model=cfg_file, pretrained=None, cache_dir=tmp_path / "c")
    b = vlm_tta.classify(imgs, CLASSES, model=cfg_file, pretrained=None, cache_dir=tmp_path / "c")
    c = vlm_tta.classify(imgs, CLASSES, model=cfg_file, pretrained=None, seed=1, cache=False)
    np.testing.assert_array_equal(a.logits, b.logits)
    assert b.info["cache"]["view_misses"] == 0 and b.info["cache"]["class_misses"] == 0
    assert not np.allclose(a.logits, c.logits)


def test_json_output_is_valid_json(capsys, img_path, cfg_file):
    rc, out, _ = run_cli(
        capsys, "classify", img_path, "--classes", "cat,dog", "--model", cfg_file, "--pretrained", "none",
        "--json", "--no-cache",
    )  # fmt: skip
    data = json.load(io.StringIO(out))
    assert rc == 0 and data["info"]["cache"]["view_misses"] == 1 and data["info"]["skipped"] == []


def test_cache_info_on_a_file_says_it_is_not_a_directory(tmp_path, capsys):
    path = tmp_path / "not-a-dir"
    path.write_text("x")
    for verb in (["cache", "info"], ["cache", "clear", "--yes"]):
        rc, out, err = run_cli(capsys, *verb, "--cache-dir", str(path))
        assert rc == 2 and "is a file, not a directory" in one_line_error(err) and out == ""
