"""Learnable prompt context per backend (vlm_tta.models.prompting) and the OpenAI state-dict loader."""

import pytest
import torch
from tiny_models import CLASSNAMES, build_tiny_hf_clip, build_tiny_hf_siglip, build_tiny_openclip

from vlm_tta.errors import MethodOptionError, ModelSpecError
from vlm_tta.models import from_hf
from vlm_tta.models.openclip import OpenClipModel
from vlm_tta.models.prompting import PromptLearner, load_context_vectors

NAMES = list(CLASSNAMES)


@pytest.fixture(scope="module", params=["open_clip", "open_clip_siglip", "hf_clip", "hf_siglip"])
def backbone(request, tmp_path_factory):
    if request.param == "open_clip":
        return build_tiny_openclip()
    if request.param == "open_clip_siglip":
        return build_tiny_openclip(siglip=True)
    if request.param == "hf_clip":
        return from_hf(*build_tiny_hf_clip())
    return from_hf(*build_tiny_hf_siglip(tmp_path_factory.mktemp("sp")))


def test_phrase_context_reproduces_class_embeddings(backbone):
    learner = PromptLearner(backbone, NAMES)
    expected = backbone.class_embeddings(NAMES, ["a photo of a {}."])
    with torch.no_grad():
        got = learner.text_features(learner.ctx_init)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the untruncated sequence gives the same features (exactness of the EOS cut)
    learner.truncate = False
    with torch.no_grad():
        torch.testing.assert_close(learner.text_features(learner.ctx_init), expected, atol=1e-5, rtol=0)


def test_batched_contexts_are_independent_and_gradients_reach_only_the_context(backbone):
    learner = PromptLearner(backbone, NAMES)
    ctx = torch.stack([learner.ctx_init, learner.ctx_init + 0.05]).requires_grad_(True)
    feats = learner.text_features(ctx)
    assert feats.shape == (2, len(NAMES), backbone.embed_dim)
    with torch.no_grad():
        one = learner.text_features(learner.ctx_init + 0.05)
        part = learner.text_features(learner.ctx_init + 0.05, classes=slice(2, 5))
    torch.testing.assert_close(feats[1].detach(), one, atol=1e-5, rtol=0)
    torch.testing.assert_close(part, one[2:5], atol=1e-5, rtol=0)
    feats[1].sum().backward()
    assert ctx.grad[0].abs().max() == 0 and ctx.grad[1].abs().max() > 0
    assert all(p.grad is None for p in backbone.model.parameters())


def test_context_from_vectors_and_coop_files(tmp_path):
    model = build_tiny_openclip()
    phrase = PromptLearner(model, NAMES)
    vectors = phrase.ctx_init.cpu() + 0.01
    coop = tmp_path / "model.pth.tar-50"
    torch.save({"state_dict": {"ctx": vectors, "token_prefix": torch.zeros(3, 1, 32)}, "epoch": 50}, coop)
    from safetensors.torch import save_file

    st = tmp_path / "ctx.safetensors"
    save_file({"ctx": vectors}, str(st))
    for source in (vectors, coop, st):
        learner = PromptLearner(model, NAMES, ctx_vectors=source)
        assert learner.n_ctx == 4 and learner.phrase == "X X X X"
        torch.testing.assert_close(learner.ctx_init, vectors)
        with torch.no_grad():  # same context, same positions: the placeholder words never reach the encoder
            torch.testing.assert_close(learner.text_features(vectors), phrase.text_features(vectors), atol=1e-5, rtol=0)
    with pytest.raises(MethodOptionError, match="width"):
        PromptLearner(model, NAMES, ctx_vectors=torch.zeros(4, 7))
    with pytest.raises(MethodOptionError, match="n x width"):
        load_context_vectors(torch.zeros(3, 4, 32))
    with pytest.raises(MethodOptionError, match="not found"):
        load_context_vectors(tmp_path / "missing.pt")
    with pytest.raises(MethodOptionError, match="n_ctx=3"):
        PromptLearner(model, NAMES, n_ctx=3)
    random = PromptLearner(model, NAMES, phrase=None, n_ctx=2, seed=1)
    assert random.ctx_init.shape == (2, 32) and random.phrase == "X X"


def test_openai_state_dict_round_trip(tmp_path):
    from vlm_tta.models import load_model

    # OpenAI's builder reads heads as width // 64: a tiny CLIP with 64-wide towers (open_clip's CLIP uses
    # OpenAI's key names, so its state dict is an OpenAI-format one)
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 64},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
    }
    torch.manual_seed(0)
    src = load_model(cfg, pretrained=None)
    sd = {k: v.clone() for k, v in src.model.state_dict().items()}
    model = OpenClipModel.from_openai_state_dict(sd, quick_gelu=False)
    for k, v in src.model.state_dict().items():
        assert torch.equal(model.model.state_dict()[k], v), k
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.encode_images(pixels), src.encode_images(pixels))
    torch.testing.assert_close(model.class_embeddings(NAMES), src.class_embeddings(NAMES))
    assert model.preprocess_cfg.image_size == (32, 32)
    torch.save(sd, tmp_path / "sd.pt")
    again = OpenClipModel.from_openai_state_dict(tmp_path / "sd.pt", quick_gelu=False)
    assert again.fingerprint == model.fingerprint
    with pytest.raises(ModelSpecError, match="OpenAI-format"):
        OpenClipModel.from_openai_state_dict({"visual.proj": torch.zeros(2, 2)})


def test_length_buckets_are_exact_and_keep_the_class_order(backbone, monkeypatch):
    import vlm_tta.models.prompting as prompting

    monkeypatch.setattr(prompting, "BUCKET_OVERHEAD", 0)  # one run per distinct prompt length
    learner = PromptLearner(backbone, NAMES)
    runs = learner.buckets(torch.arange(len(NAMES)))
    if backbone.kind == "clip":
        assert len(runs) > 1 and sorted(torch.cat([r[0] for r in runs]).tolist()) == list(range(len(NAMES)))
        assert all(length == int(learner.lengths[idx].max()) for idx, length in runs)
    else:  # SigLIP: no causal mask, pooled at the last token: never cut
        assert runs[0][1] == learner.ids.shape[1]
    expected = backbone.class_embeddings(NAMES, ["a photo of a {}."])
    ctx = learner.ctx_init.clone().requires_grad_(True)
    feats = learner.text_features(ctx)
    torch.testing.assert_close(feats.detach(), expected, atol=1e-5, rtol=0)
    picked = learner.text_features(ctx, torch.tensor([5, 0, 3]))
    torch.testing.assert_close(picked.detach(), expected[[5, 0, 3]], atol=1e-5, rtol=0)
    chunks = learner.class_chunks(3)
    assert sorted(torch.cat(chunks).tolist()) == list(range(len(NAMES))) and learner.class_chunks(None) == [None]
    (feats[:, 0].sum() + picked[0, 1]).backward()
    assert ctx.grad.abs().sum() > 0


def test_sequence_first_transformer_of_older_open_clip():
    """open_clip before batch-first transformers: ``transformer`` takes L x N x D and has no batch_first."""

    class SequenceFirst(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, attn_mask=None):  # x: L x N x D
            return self.inner(x.permute(1, 0, 2), attn_mask=attn_mask).permute(1, 0, 2)

    model = build_tiny_openclip()
    expected = model.class_embeddings(NAMES, ["a photo of a {}."])
    model.model.transformer = SequenceFirst(model.model.transformer)
    learner = PromptLearner(model, NAMES)
    with torch.no_grad():
        torch.testing.assert_close(learner.text_features(learner.ctx_init), expected, atol=1e-5, rtol=0)


def test_shared_prefix_gives_the_same_features_and_gradients():
    model = build_tiny_openclip()
    shared, full = PromptLearner(model, NAMES), PromptLearner(model, NAMES, share_prefix=False, truncate=False)
    assert shared.path.can_share_prefix
    ctx = torch.stack([shared.ctx_init, shared.ctx_init + 0.05]).requires_grad_(True)
    weights = torch.randn(2, len(NAMES), model.embed_dim)
    grads, feats = [], []
    for learner in (shared, full):
        f = learner.text_features(ctx)
        (f * weights).sum().backward()
        feats.append(f.detach())
        grads.append(ctx.grad.clone())
        ctx.grad = None
    torch.testing.assert_close(feats[0], feats[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)
    assert not PromptLearner(build_tiny_openclip(siglip=True), NAMES).path.can_share_prefix
