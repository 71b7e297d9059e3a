"""The backbone layer: open_clip and transformers behind one VisionLanguageModel.

Every number is checked against the backbone's own code path (open_clip's transform, encode_image,
build_zero_shot_classifier, get_logits; transformers' processor, get_*_features, forward).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiny_models
import torch
import torch.nn.functional as F
from PIL import Image

from vlm_tta.errors import ClassNamesError, ModelSpecError, TemplateError
from vlm_tta.models import PreprocessConfig, VisionLanguageModel, from_hf, from_open_clip, load_model

CLASSES = ["cat", "dog", "golden retriever"]
TEMPLATES = ["a photo of a {}.", "a sketch of a {}.", "art of the {}."]
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)


def _images(n=4, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(40, 30), (32, 32), (25, 50), (64, 48)]
    return [
        Image.fromarray(rng.integers(0, 256, (sizes[i % 4][1], sizes[i % 4][0], 3), dtype=np.uint8)) for i in range(n)
    ]


def _pixels(model, n=4):
    return torch.stack([model.preprocess(img) for img in _images(n)])


def _feat(out):
    """transformers 4 returns a tensor from get_*_features, transformers 5 an output object."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _manual_ensemble(text_features_fn, classes, templates):
    rows = []
    for c in classes:
        t = F.normalize(text_features_fn([tpl.format(c) for tpl in templates]), dim=-1)
        rows.append(F.normalize(t.mean(0), dim=-1))
    return torch.stack(rows)


# --------------------------------------------------------------------------- open_clip
def test_openclip_fixture_basics(tiny_openclip):
    m = tiny_openclip
    assert isinstance(m, VisionLanguageModel)
    assert m.kind == "clip" and m.logit_bias is None
    assert m.device.type == "cpu" and m.precision == "fp32"
    assert m.embed_dim == tiny_models.EMBED_DIM
    assert not m.model.training
    assert all(not p.requires_grad for p in m.model.parameters())
    assert all(p.dtype == torch.float32 for p in m.model.parameters())
    assert m.logit_scale == pytest.approx(float(m.model.logit_scale.exp()))


def test_openclip_preprocess_is_open_clip_transform(tiny_openclip):
    import open_clip

    m = tiny_openclip
    assert m.preprocess_cfg == PreprocessConfig(
        image_size=(32, 32),
        mean=OPENAI_MEAN,
        std=(0.26862954, 0.26130258, 0.27577711),
        interpolation="bicubic",
        resize_mode="shortest",
        fill_color=0,
    )
    cfg = open_clip.transform.PreprocessCfg(**m.model.visual.preprocess_cfg)
    transform = open_clip.transform.image_transform_v2(cfg, is_train=False)
    for img in _images():
        torch.testing.assert_close(m.preprocess(img), transform(img), rtol=0, atol=0)
        assert m.preprocess(img).shape == (3, 32, 32)


def test_openclip_encoders_equal_backbone(tiny_openclip):
    m = tiny_openclip
    px = _pixels(m)
    with torch.no_grad():
        own = m.model.encode_image(px)
        own_text = m.model.encode_text(m.tokenizer(["a photo of a cat.", "a dog"]))
    torch.testing.assert_close(m.encode_images(px, normalize=False), own)
    torch.testing.assert_close(m.encode_images(px), F.normalize(own, dim=-1))
    torch.testing.assert_close(m.encode_images(px, batch_size=3), F.normalize(own, dim=-1))
    torch.testing.assert_close(m.encode_texts(["a photo of a cat.", "a dog"]), F.normalize(own_text, dim=-1))


def test_openclip_class_embeddings_are_the_prompt_ensemble(tiny_openclip):
    m = tiny_openclip
    with torch.no_grad():
        manual = _manual_ensemble(lambda texts: m.model.encode_text(m.tokenizer(texts)), CLASSES, TEMPLATES)
    got = m.class_embeddings(CLASSES, TEMPLATES)
    assert got.shape == (3, tiny_models.EMBED_DIM)
    torch.testing.assert_close(got, manual, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3))
    # averaging happens per template *after* normalisation: not the same as averaging raw embeddings
    raw = torch.stack([m.encode_texts([t.format(c) for t in TEMPLATES], normalize=False).mean(0) for c in CLASSES])
    assert not torch.allclose(F.normalize(raw, dim=-1), got, atol=1e-4)
    # one template: just that template's normalised embedding
    torch.testing.assert_close(
        m.class_embeddings(CLASSES, "a photo of a {}."), m.encode_texts([f"a photo of a {c}." for c in CLASSES])
    )


def test_openclip_class_embeddings_match_build_zero_shot_classifier(tiny_openclip):
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    m = tiny_openclip
    ref = build_zero_shot_classifier(m.model, m.tokenizer, CLASSES, TEMPLATES, num_classes_per_batch=2, device="cpu")
    torch.testing.assert_close(m.class_embeddings(CLASSES, TEMPLATES), ref.T, rtol=1e-5, atol=1e-6)


def test_openclip_logits_use_scale(tiny_openclip):
    m = tiny_openclip
    px = _pixels(m, 3)
    texts = [f"a photo of a {c}." for c in CLASSES]
    with torch.no_grad():
        ref, _ = m.model.get_logits(px, m.tokenizer(texts))
    logits = m.logits(m.encode_images(px), m.encode_texts(texts))
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-4)


def test_openclip_siglip_variant_has_bias():
    m = tiny_models.build_tiny_openclip(seed=1, siglip=True)
    assert m.kind == "siglip" and m.logit_bias == pytest.approx(-10.0)
    px = _pixels(m, 2)
    texts = ["a photo of a cat.", "a dog"]
    with torch.no_grad():
        ref, _ = m.model.get_logits(px, m.tokenizer(texts))
    torch.testing.assert_close(m.logits(m.encode_images(px), m.encode_texts(texts)), ref, rtol=1e-5, atol=1e-4)


def test_from_open_clip_reads_the_transform(tiny_openclip):
    import open_clip
    from torchvision import transforms as T

    m = tiny_openclip
    same = from_open_clip(m.model, m.transform, m.tokenizer)
    assert same.preprocess_cfg == m.preprocess_cfg and same.fingerprint == m.fingerprint
    built = from_open_clip(m.model, None, m.tokenizer)
    assert built.preprocess_cfg == m.preprocess_cfg
    squash = open_clip.transform.image_transform(
        32, is_train=False, mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode="squash", interpolation="bilinear"
    )
    other = from_open_clip(m.model, squash, m.tokenizer)
    assert other.preprocess_cfg.mean == (0.5, 0.5, 0.5) and other.preprocess_cfg.resize_mode == "squash"
    assert other.preprocess_cfg.interpolation == "bilinear"
    assert other.fingerprint != m.fingerprint
    custom = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize((0.1, 0.2, 0.3), (0.3, 0.3, 0.3))])
    assert from_open_clip(m.model, custom, m.tokenizer).preprocess_cfg.mean == (0.1, 0.2, 0.3)
    with pytest.raises(ModelSpecError, match="not an open_clip CLIP model"):
        from_open_clip(torch.nn.Linear(2, 2), None, m.tokenizer)


# --------------------------------------------------------------------------- open_clip loading
def test_load_openclip_checkpoint_files(tiny_openclip, tiny_openclip_config, tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in tiny_openclip.model.state_dict().items()}
    st, pt = tmp_path / "open_clip_model.safetensors", tmp_path / "weights.pt"
    save_file(sd, str(st))
    torch.save(sd, pt)
    px = _pixels(tiny_openclip, 2)
    ref = tiny_openclip.encode_images(px)
    for path in (st, pt, str(st)):
        m = load_model(tiny_openclip_config, pretrained=path, device="cpu")
        assert m.fingerprint == tiny_openclip.fingerprint  # same weights, preprocessing, precision
        torch.testing.assert_close(m.encode_images(px), ref)
    # "module." prefixes and {"state_dict": ...} wrappers (training checkpoints) are accepted
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "train.pt")
    assert load_model(tiny_openclip_config, pretrained=tmp_path / "train.pt").fingerprint == tiny_openclip.fingerprint


def test_load_openclip_config_json_and_directory(tiny_openclip, tiny_openclip_config, tmp_path):
    from safetensors.torch import save_file

    cfg_file = tmp_path / "my-tiny.json"
    cfg = dict(tiny_openclip_config)
    cfg.pop("name")
    cfg_file.write_text(json.dumps(cfg))
    m = load_model(cfg_file, pretrained=None)
    assert m.name == "open_clip:my-tiny" and m.embed_dim == tiny_models.EMBED_DIM
    assert load_model(str(cfg_file), pretrained=None).preprocess_cfg == m.preprocess_cfg
    with pytest.raises(ModelSpecError, match="without weights"):
        load_model(cfg_file)  # pretrained="default": a bare config has none

    # open_clip's own directory layout: open_clip_config.json + open_clip_model.safetensors
    d = tmp_path / "oc_dir"
    d.mkdir()
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {"mean": OPENAI_MEAN}}))
    save_file(
        {k: v.contiguous() for k, v in tiny_openclip.model.state_dict().items()}, str(d / "open_clip_model.safetensors")
    )
    for spec in (d, str(d), f"local-dir:{d}", f"open_clip:local-dir:{d}"):
        assert load_model(spec).fingerprint == tiny_openclip.fingerprint


def test_pretrained_none_gives_seeded_random_weights(tiny_openclip_config, tiny_hf_clip_dir):
    # The same seed gives the same weights (so runs agree and share cache entries), another seed
    # other weights, and the caller's global RNG is left exactly where it was.
    torch.manual_seed(1)
    state = torch.random.get_rng_state()
    a = load_model(tiny_openclip_config, pretrained=None)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = load_model(tiny_openclip_config, pretrained=None, seed=0)
    c = load_model(tiny_openclip_config, pretrained=None, seed=1)
    assert a.fingerprint == b.fingerprint and a.weights_digest != c.weights_digest
    hf = [load_model(f"hf:{tiny_hf_clip_dir}", pretrained=None, seed=s).fingerprint for s in (3, 3, 4)]
    assert hf[0] == hf[1] != hf[2]


def test_named_openclip_model_with_random_weights():
    """A built-in name with a tag: architecture, the tag's preprocessing and QuickGELU, the tokenizer."""
    from open_clip.transformer import QuickGELU

    m = load_model("open_clip:ViT-B/32@openai", pretrained=None, device="cpu")
    assert m.name == "open_clip:ViT-B-32@random" and m.kind == "clip" and m.embed_dim == 512
    assert m.preprocess_cfg.image_size == (224, 224) and m.preprocess_cfg.mean == OPENAI_MEAN
    assert any(isinstance(mod, QuickGELU) for mod in m.model.modules())  # OpenAI weights were trained with it
    assert m.tokenizer(["a photo of a cat."]).shape == (1, 77)


def test_fingerprint_changes_with_weights_precision_and_preprocessing(tiny_openclip, tiny_openclip_config, tmp_path):
    torch.save(tiny_openclip.model.state_dict(), tmp_path / "w.pt")
    m = load_model(tiny_openclip_config, pretrained=tmp_path / "w.pt")
    again = load_model(tiny_openclip_config, pretrained=tmp_path / "w.pt")
    fp = m.fingerprint
    assert again.fingerprint == fp and m.refresh_fingerprint() == fp  # stable across loads and refreshes

    amp = load_model(tiny_openclip_config, pretrained=tmp_path / "w.pt", precision="amp")
    assert amp.precision == "amp" and amp.fingerprint != fp
    assert load_model(tiny_openclip_config, pretrained=tmp_path / "w.pt", precision="amp_bf16").fingerprint not in (
        fp,
        amp.fingerprint,
    )

    mean = load_model(tiny_openclip_config, pretrained=tmp_path / "w.pt", preprocess_cfg={"mean": (0.5, 0.5, 0.5)})
    assert mean.preprocess_cfg.mean == (0.5, 0.5, 0.5) and mean.fingerprint != fp
    assert not torch.equal(mean.preprocess(_images(1)[0]), m.preprocess(_images(1)[0]))

    quick = dict(tiny_openclip_config, quick_gelu=True)  # same state dict, other activation
    assert load_model(quick, pretrained=tmp_path / "w.pt").fingerprint != fp

    with torch.no_grad():
        m.model.logit_scale.add_(0.5)
    assert m.fingerprint == fp  # the digest is cached at load time ...
    assert m.refresh_fingerprint() != fp  # ... and recomputed on request
    assert m.fingerprint != fp


def test_openclip_bad_specs(tiny_openclip_config, tmp_path):
    with pytest.raises(ModelSpecError, match="ViT-B-16"):
        load_model("ViT-B-61")  # close match suggested
    with pytest.raises(ModelSpecError, match="hf:openai/clip-vit-base-patch16"):
        load_model("openai/clip-vit-base-patch16")  # a hub id without hf:
    with pytest.raises(ModelSpecError, match="laion2b_s34b_b79k"):
        load_model("ViT-B-32@laion2b_s34b_b79", pretrained=None)  # unknown tag: known tags listed
    with pytest.raises(ModelSpecError, match="checkpoint file not found"):
        load_model(tiny_openclip_config, pretrained=tmp_path / "missing.safetensors")
    with pytest.raises(ModelSpecError, match="checkpoint file not found"):
        load_model("ViT-B-32", pretrained="/nonexistent/open_clip_pytorch_model.bin")
    with pytest.raises(ModelSpecError, match="neither a known tag"):
        load_model("ViT-B-32", pretrained="laion2b")
    with pytest.raises(ModelSpecError, match="config file not found"):
        load_model(tmp_path / "nope.json")
    with pytest.raises(ModelSpecError, match="vision_cfg"):
        load_model({"embed_dim": 8, "text_cfg": {}}, pretrained=None)
    with pytest.raises(ModelSpecError, match="precision"):
        load_model(tiny_openclip_config, pretrained=None, precision="fp16")
    with pytest.raises(ModelSpecError, match="empty model spec"):
        load_model("  ")
    with pytest.raises(ModelSpecError):
        load_model(42)


def test_unsafe_or_mismatched_checkpoints_are_refused(tiny_openclip_config, tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": _Pickled()}, tmp_path / "unsafe.pt")
    with pytest.raises(ModelSpecError, match="weights_only=True"):
        load_model(tiny_openclip_config, pretrained=tmp_path / "unsafe.pt")
    torch.save({"visual.conv1.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ModelSpecError, match="does not fit"):
        load_model(tiny_openclip_config, pretrained=tmp_path / "other.pt")


class _Pickled:
    pass


def test_missing_openclip_weights_offline_say_what_to_pass(tmp_path, monkeypatch):
    import open_clip.pretrained as ocp

    calls = []

    def no_network(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("no network")

    monkeypatch.setattr(ocp, "download_pretrained_from_hf", no_network)
    monkeypatch.setattr(ocp, "download_pretrained_from_url", no_network)
    with pytest.raises(ModelSpecError) as err:
        load_model("ViT-B-32@laion2b_s34b_b79k", cache_dir=tmp_path)
    msg = str(err.value)
    assert calls, "the download path was not exercised"
    assert "open_clip_model.safetensors" in msg and "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in msg
    assert "load_model('ViT-B-32@laion2b_s34b_b79k', pretrained='/path/to/open_clip_model.safetensors')" in msg


def test_missing_openclip_weights_offline_without_patching(tmp_path):
    """The real download path fails fast offline (HF_HUB_OFFLINE=1 and the network guard)."""
    with pytest.raises(ModelSpecError, match="pretrained='/path/to/"):
        load_model("ViT-B-16-SigLIP@webli", cache_dir=tmp_path)


# --------------------------------------------------------------------------- transformers CLIP
def test_hf_clip_preprocess_and_encoders(tiny_hf_clip):
    m = tiny_hf_clip
    assert m.kind == "clip" and m.logit_bias is None and m.embed_dim == tiny_models.EMBED_DIM
    assert m.preprocess_cfg == PreprocessConfig(
        image_size=(32, 32),
        mean=OPENAI_MEAN,
        std=(0.26862954, 0.26130258, 0.27577711),
        interpolation="bicubic",
        resize_mode="shortest",
    )
    assert not m.model.training and all(not p.requires_grad for p in m.model.parameters())
    imgs = _images()
    ref_px = m.processor(images=imgs, return_tensors="pt")["pixel_values"]
    px = _pixels(m)
    torch.testing.assert_close(px, ref_px, rtol=0, atol=0)
    with torch.no_grad():
        own = _feat(m.model.get_image_features(pixel_values=px))
    torch.testing.assert_close(m.encode_images(px), F.normalize(own, dim=-1))
    torch.testing.assert_close(m.encode_images(px, normalize=False), own)


def test_hf_clip_class_embeddings_and_logits(tiny_hf_clip):
    m = tiny_hf_clip

    def text_features(texts):
        enc = m.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        return _feat(m.model.get_text_features(**enc))

    with torch.no_grad():
        manual = _manual_ensemble(text_features, CLASSES, TEMPLATES)
    torch.testing.assert_close(m.class_embeddings(CLASSES, TEMPLATES), manual, rtol=1e-5, atol=1e-6)
    # the model's own forward: logits_per_image = exp(logit_scale) * cos
    texts = [f"a photo of a {c}." for c in CLASSES]
    px = _pixels(m, 2)
    enc = m.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = m.model(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=px
        ).logits_per_image
    torch.testing.assert_close(m.logits(m.encode_images(px), m.encode_texts(texts)), ref, rtol=1e-5, atol=1e-4)
    # long texts are truncated to CLIP's 77 tokens instead of failing
    assert m.encode_texts(["cat " * 200]).shape == (1, tiny_models.EMBED_DIM)


# --------------------------------------------------------------------------- transformers SigLIP
def test_hf_siglip_preprocess_text_and_logits(tiny_hf_siglip):
    m = tiny_hf_siglip
    assert m.kind == "siglip" and m.logit_bias == pytest.approx(-10.0) and m.logit_scale == pytest.approx(10.0)
    assert m.preprocess_cfg == PreprocessConfig(
        image_size=(32, 32),
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        interpolation="bicubic",
        resize_mode="squash",
    )
    imgs = _images()
    px = _pixels(m)
    torch.testing.assert_close(px, m.processor(images=imgs, return_tensors="pt")["pixel_values"], rtol=0, atol=0)
    with torch.no_grad():
        own_img = _feat(m.model.get_image_features(pixel_values=px))
    torch.testing.assert_close(m.encode_images(px), F.normalize(own_img, dim=-1))

    tokens = m.tokenize(["a photo of a cat.", "a dog"])
    assert set(tokens) == {"input_ids"} and tokens["input_ids"].shape == (2, 64)  # padded to 64, no mask

    def text_features(texts):
        ids = m.tokenizer(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")["input_ids"]
        return _feat(m.model.get_text_features(input_ids=ids))

    with torch.no_grad():
        manual = _manual_ensemble(text_features, CLASSES, TEMPLATES)
    torch.testing.assert_close(m.class_embeddings(CLASSES, TEMPLATES), manual, rtol=1e-5, atol=1e-6)

    texts = [f"a photo of a {c}." for c in CLASSES]
    ids = m.tokenizer(texts, padding="max_length", max_length=64, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = m.model(input_ids=ids, pixel_values=px).logits_per_image  # scale * cos + bias
    logits = m.logits(m.encode_images(px), m.encode_texts(texts))
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(logits, 10.0 * m.encode_images(px) @ m.encode_texts(texts).T - 10.0)


# --------------------------------------------------------------------------- transformers loading
@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_load_hf_from_local_dir(which, request):
    fixture = request.getfixturevalue(f"tiny_hf_{which}")
    d = request.getfixturevalue(f"tiny_hf_{which}_dir")
    m = load_model(f"hf:{d}", device="cpu")
    assert m.kind == fixture.kind and m.name == f"hf:{d}" and m.precision == "fp32"
    assert m.fingerprint == fixture.fingerprint  # same weights, preprocessing, precision
    assert load_model(f"hf:{d}").fingerprint == m.fingerprint
    assert load_model(d).fingerprint == m.fingerprint  # a transformers directory works without "hf:"
    px = _pixels(m, 2)
    torch.testing.assert_close(m.encode_images(px), fixture.encode_images(px))
    torch.testing.assert_close(m.class_embeddings(CLASSES, TEMPLATES), fixture.class_embeddings(CLASSES, TEMPLATES))
    assert not m.model.training and all(not p.requires_grad for p in m.model.parameters())

    rnd = load_model(f"hf:{d}", pretrained=None, seed=1)  # seed 0 would rebuild the fixture itself
    assert rnd.weights_digest != m.weights_digest and rnd.preprocess_cfg == m.preprocess_cfg


def test_hf_fingerprint_weights_precision_preprocessing(tiny_hf_clip_dir):
    m = load_model(f"hf:{tiny_hf_clip_dir}")
    fp = m.fingerprint
    assert load_model(f"hf:{tiny_hf_clip_dir}", precision="amp").fingerprint != fp
    shifted = load_model(f"hf:{tiny_hf_clip_dir}", preprocess_cfg={"mean": (0.5, 0.5, 0.5)})
    assert shifted.preprocess_cfg.mean == (0.5, 0.5, 0.5) and shifted.fingerprint != fp
    img = _images(1)[0]
    assert not torch.allclose(shifted.preprocess(img), m.preprocess(img))
    m.image_processor.image_mean = [0.1, 0.1, 0.1]  # editing the processor, then wrapping it again
    assert from_hf(m.model, m.processor).fingerprint != fp
    with torch.no_grad():
        m.model.visual_projection.weight[0, 0] += 1.0
    assert m.refresh_fingerprint() != fp


def test_hf_bad_specs(tmp_path, tiny_openclip):
    with pytest.raises(ModelSpecError, match="hf:/path/to/DIR"):
        load_model("hf:google/siglip-base-patch16-224", cache_dir=tmp_path)  # offline, not cached
    with pytest.raises(ModelSpecError, match="directory not found.*config.json"):
        load_model(f"hf:{tmp_path / 'missing'}")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelSpecError, match="model_type 'bert'.*clip \\(CLIPModel\\), siglip \\(SiglipModel\\)"):
        load_model(f"hf:{tmp_path / 'bert'}")
    with pytest.raises(ModelSpecError, match="model_type 'bert'"):
        load_model(tmp_path / "bert")
    with pytest.raises(ModelSpecError, match="not supported"):
        from_hf(tiny_openclip.model, None)
    with pytest.raises(ModelSpecError, match="pretrained weights"):
        load_model("hf:google/siglip-base-patch16-224", pretrained="webli")


def test_hf_dir_without_weights_says_what_to_pass(tiny_hf_clip_dir, tmp_path):
    import shutil

    d = tmp_path / "noweights"
    shutil.copytree(tiny_hf_clip_dir, d)
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelSpecError, match="model.safetensors"):
        load_model(f"hf:{d}")
    assert load_model(f"hf:{d}", pretrained=None).kind == "clip"  # random weights need only the config


# --------------------------------------------------------------------------- class names and templates
@pytest.mark.parametrize("fixture", ["tiny_openclip", "tiny_hf_clip", "tiny_hf_siglip"])
def test_bad_classnames_and_templates(fixture, request):
    m = request.getfixturevalue(fixture)
    for bad in ([], ["cat", "  "], ["cat", "dog", "cat"], ["cat", ""], "cat"):
        with pytest.raises(ClassNamesError):
            m.class_embeddings(bad)
    for bad in (["a photo of a cat."], ["{} and {}"], []):
        with pytest.raises(TemplateError):
            m.class_embeddings(["cat", "dog"], bad)
    assert isinstance(ClassNamesError("x"), ValueError) and isinstance(TemplateError("x"), ValueError)
    assert m.class_embeddings(["cat", "dog"]).shape == (2, m.embed_dim)


def test_openclip_tokenizer_argument(tiny_openclip_config, tiny_hf_clip_dir, tiny_openclip):
    from open_clip.tokenizer import HFTokenizer

    m = load_model(
        tiny_openclip_config, pretrained=None, tokenizer=tiny_hf_clip_dir
    )  # a directory of HF tokenizer files
    assert isinstance(m.tokenizer, HFTokenizer) and m.tokenizer(["a cat"]).shape == (1, 77)
    assert m.encode_texts(["a cat"]).shape == (1, tiny_models.EMBED_DIM)
    same = load_model(tiny_openclip_config, pretrained=None, tokenizer=tiny_openclip.tokenizer)  # an object
    assert same.tokenizer is tiny_openclip.tokenizer
    with pytest.raises(ModelSpecError, match="tokenizer directory not found"):
        load_model(tiny_openclip_config, pretrained=None, tokenizer="/nonexistent/tok")


def test_load_model_is_reexported():
    import vlm_tta

    assert vlm_tta.load_model is load_model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("which", ["openclip", "clip", "siglip"])
def test_cuda_defaults_to_amp_and_matches_cpu(which, request):
    cpu = request.getfixturevalue("tiny_openclip" if which == "openclip" else f"tiny_hf_{which}")
    if which == "openclip":
        gpu = tiny_models.build_tiny_openclip(seed=0, device="cuda")
    else:
        gpu = load_model(f"hf:{request.getfixturevalue(f'tiny_hf_{which}_dir')}", device="cuda")
    assert gpu.device.type == "cuda" and gpu.precision == "amp" and gpu.fingerprint != cpu.fingerprint
    assert all(p.dtype == torch.float32 for p in gpu.model.parameters())  # fp32 weights, fp16 autocast
    px = _pixels(cpu, 3)
    img = gpu.encode_images(px)
    assert img.device.type == "cpu" and img.dtype == torch.float32
    torch.testing.assert_close(img, cpu.encode_images(px), rtol=0, atol=2e-2)
    torch.testing.assert_close(
        gpu.class_embeddings(CLASSES, TEMPLATES), cpu.class_embeddings(CLASSES, TEMPLATES), rtol=0, atol=2e-2
    )
    fp32 = tiny_models.build_tiny_openclip(seed=0, device="cuda", precision="fp32") if which == "openclip" else None
    if fp32 is not None:
        torch.testing.assert_close(fp32.encode_images(px), cpu.encode_images(px), rtol=1e-4, atol=1e-4)


def test_openclip_hf_hub_spec_uses_the_repo_files(tiny_openclip, tiny_openclip_config, tmp_path, monkeypatch):
    """hf-hub:org/repo reads open_clip_config.json and the weights through open_clip's downloader."""
    import open_clip.pretrained as ocp
    from safetensors.torch import save_file

    cfg = dict(tiny_openclip_config)
    cfg.pop("name")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file(
        {k: v.contiguous() for k, v in tiny_openclip.model.state_dict().items()},
        str(tmp_path / "open_clip_model.safetensors"),
    )
    asked = []

    def fake_download(repo, filename=None, revision=None, cache_dir=None):
        asked.append((repo, filename))
        return str(tmp_path / (filename or "open_clip_model.safetensors"))

    monkeypatch.setattr(ocp, "download_pretrained_from_hf", fake_download)
    m = load_model("hf-hub:someone/tiny-clip")
    assert m.name == "open_clip:hf-hub:someone/tiny-clip" and m.fingerprint == tiny_openclip.fingerprint
    assert asked == [("someone/tiny-clip", "open_clip_config.json"), ("someone/tiny-clip", None)]
    assert load_model("open_clip:hf-hub:someone/tiny-clip", pretrained=None, seed=1).weights_digest != m.weights_digest
