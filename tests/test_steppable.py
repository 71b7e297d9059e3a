"""SteppableViT: the block-by-block forward equals each backbone's own, exposes the class token's
attention and the class token after every block, takes extra key/value tokens and token
replacement, counts its multiply-accumulates, and refuses towers without a class token."""

import copy

import pytest
import torch
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import Transformer, VisionTransformer
from tiny_models import tower_backbone, vit_b16_shape

from vlm_tta.errors import UnsupportedBackboneError
from vlm_tta.models.openclip import from_open_clip
from vlm_tta.models.steppable import SteppableViT, block_macs

VIT_B16 = vit_b16_shape()


def _pixels(n=3, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _seq_first_copy(backbone):
    """A private copy of an open_clip backbone whose image transformer runs sequence-first (L x N x D)."""
    # a fresh wrapper around a copy of the module (tests may have wrapped the shared fixture's encoders)
    twin = from_open_clip(copy.deepcopy(backbone.model), None, backbone.tokenizer, device="cpu")
    visual = twin.model.visual
    old = visual.transformer
    first = old.resblocks[0]
    new = Transformer(
        old.width,
        old.layers,
        first.attn.num_heads,
        first.mlp.c_fc.out_features / old.width,
        act_layer=type(first.mlp.gelu),
        batch_first=False,
    )
    new.load_state_dict(old.state_dict())
    visual.transformer = new.eval()
    return twin


@pytest.fixture(params=["tiny_openclip", "tiny_hf_clip", "seq_first_openclip"])
def backbone(request, tiny_openclip):
    if request.param == "seq_first_openclip":
        twin = _seq_first_copy(tiny_openclip)
        assert twin.model.visual.transformer.batch_first is False
        return twin
    model = request.getfixturevalue(request.param)
    if request.param == "tiny_openclip":
        assert model.model.visual.transformer.batch_first is True
    return model


def test_unmodified_forward_equals_encode_images(backbone):
    pixels = _pixels()
    expected = backbone.encode_images(pixels, normalize=False)
    stepper = SteppableViT(backbone)
    fast = stepper.forward(pixels)
    every_block_eager = stepper.forward(pixels, blocks=range(stepper.num_blocks), after_attention=lambda s: s.tokens)
    torch.testing.assert_close(fast.embedding, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(every_block_eager.embedding, expected, rtol=1e-5, atol=1e-5)
    assert fast.tokens_after == [stepper.shape.num_tokens] * stepper.num_blocks
    assert fast.macs == every_block_eager.macs == stepper.shape.macs()


def _block_inputs_and_outputs(backbone, pixels):
    """The backbone's own residual stream entering and leaving every block (forward hooks), batch-first."""
    ins, outs = [], []
    if hasattr(backbone.model, "vision_model"):
        layers = backbone.model.vision_model.encoder.layers
    else:
        layers = backbone.model.visual.transformer.resblocks
    seq_first = getattr(getattr(backbone.model, "visual", None), "transformer", None) is not None and not (
        backbone.model.visual.transformer.batch_first
    )

    def fix(t):
        t = t[0] if isinstance(t, tuple) else t
        return t.transpose(0, 1) if seq_first else t

    handles = [layer.register_forward_pre_hook(lambda m, a: ins.append(fix(a[0]))) for layer in layers]
    handles += [layer.register_forward_hook(lambda m, a, o: outs.append(fix(o))) for layer in layers]
    try:
        backbone.encode_images(pixels)
    finally:
        for h in handles:
            h.remove()
    return ins, outs


def test_class_token_after_every_block_is_the_backbones(backbone):
    pixels = _pixels(2)
    _, outs = _block_inputs_and_outputs(backbone, pixels)
    out = SteppableViT(backbone).forward(pixels)
    assert out.cls_tokens.shape == (2, len(outs), outs[0].shape[-1])
    for i, o in enumerate(outs):
        torch.testing.assert_close(out.cls_tokens[:, i], o[:, 0], rtol=1e-5, atol=1e-5)


def test_class_attention_is_the_blocks_own_attention(tiny_openclip):
    pixels = _pixels(2)
    ins, _ = _block_inputs_and_outputs(tiny_openclip, pixels)
    seen = {}
    SteppableViT(tiny_openclip).forward(pixels, blocks=[1], after_attention=lambda s: seen.setdefault(1, s).tokens)
    blk = tiny_openclip.model.visual.transformer.resblocks[1]
    h = blk.ln_1(ins[1])
    attn_out, weights = blk.attn(h, h, h, need_weights=True, average_attn_weights=False)  # B x H x N x N
    state = seen[1]
    assert state.index == 1 and state.cls_attention.shape == (2, 2, 17)
    torch.testing.assert_close(state.cls_attention, weights[:, :, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state.cls_attention.sum(-1), torch.ones(2, 2))
    torch.testing.assert_close(state.tokens, ins[1] + attn_out, rtol=1e-5, atol=1e-5)


def test_an_extra_token_is_a_key_and_value_only(tiny_openclip):
    """Joining as a key/value gives what TCA's code computes: prepend the token, attend over N + 1,
    drop the extra row and column."""
    pixels = _pixels(2)
    ins, _ = _block_inputs_and_outputs(tiny_openclip, pixels)
    extra = torch.randn(2, 1, 64, generator=torch.Generator().manual_seed(3))
    seen = {}
    out = SteppableViT(tiny_openclip).forward(
        pixels,
        blocks=[1],
        extra_tokens=lambda i, x: extra,
        after_attention=lambda s: seen.setdefault(1, s).tokens,
    )
    blk = tiny_openclip.model.visual.transformer.resblocks[1]
    h = blk.ln_1(torch.cat([extra, ins[1]], dim=1))
    attn_out, weights = blk.attn(h, h, h, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(seen[1].tokens, ins[1] + attn_out[:, 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen[1].cls_attention, weights[:, :, 1, 1:], rtol=1e-5, atol=1e-6)
    assert bool((seen[1].cls_attention.sum(-1) < 1).all())  # the extra key took its share
    assert out.extra_tokens == [0, 1]
    shape = SteppableViT(tiny_openclip).shape
    assert out.macs == shape.macs(extra=[0, 1]) == shape.macs() + 2 * 64 * 64 + 2 * 17 * 64


def test_tokens_replaced_between_attention_and_mlp(tiny_hf_clip):
    stepper = SteppableViT(tiny_hf_clip)
    out = stepper.forward(_pixels(2), blocks=[0], after_attention=lambda s: s.tokens[:, :5])
    assert out.tokens_after == [5, 5]
    width, mlp = stepper.shape.width, stepper.shape.mlp_width
    expected = (
        16 * 192 * width  # patch embedding
        + width * 32  # final projection
        + (4 * width * width * 17 + 2 * 17 * 17 * width + 2 * width * mlp * 5)  # block 0: MLP on 5 tokens
        + (4 * width * width * 5 + 2 * 5 * 5 * width + 2 * width * mlp * 5)
    )
    assert out.macs == expected == stepper.shape.macs([5, 5])
    assert out.macs < stepper.forward(_pixels(2)).macs


def test_vit_b16_counts_17_56_gmacs():
    full = VIT_B16.macs()
    assert abs(full / 1e9 - 17.56) / 17.56 < 0.01
    assert full == 196 * 768 * 768 + 768 * 512 + 12 * block_macs(768, 3072, 197)
    fewer = VIT_B16.macs([197] * 3 + [180] * 3 + [163] * 3 + [149] * 3)
    assert fewer < full


def test_towers_without_a_class_token_are_refused(tiny_hf_siglip):
    with pytest.raises(UnsupportedBackboneError, match="CLIPModel"):
        SteppableViT(tiny_hf_siglip)
    resnet = ModifiedResNet(layers=[1, 1, 1, 1], output_dim=8, heads=1, image_size=32, width=8)
    with pytest.raises(UnsupportedBackboneError, match="ResNet"):
        SteppableViT(tower_backbone(resnet))
    pooled = VisionTransformer(32, 8, 16, 1, 2, 2.0, attentional_pool=True, attn_pooler_heads=2, output_dim=8)
    with pytest.raises(UnsupportedBackboneError, match="attentional pooler"):
        SteppableViT(tower_backbone(pooled))
    custom = VisionTransformer(32, 8, 16, 1, 2, 2.0, qk_norm=True, output_dim=8)
    with pytest.raises(UnsupportedBackboneError, match="CustomResidualAttentionBlock"):
        SteppableViT(tower_backbone(custom))


def test_a_tower_alone_steps_like_its_own_forward():
    torch.manual_seed(0)
    visual = VisionTransformer(32, 8, 16, 2, 2, 2.0, output_dim=8)
    backbone = tower_backbone(visual)
    pixels = _pixels(2)
    torch.testing.assert_close(SteppableViT(backbone).forward(pixels).embedding, visual(pixels), rtol=1e-5, atol=1e-5)


def test_block_indices_are_checked(tiny_openclip):
    with pytest.raises(ValueError, match="blocks 0..1"):
        SteppableViT(tiny_openclip).forward(_pixels(1), blocks=[2])
