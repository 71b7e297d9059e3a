"""A CLIP vision transformer run block by block, for methods that work on its tokens (TCA).

:class:`SteppableViT` wraps the image tower of a loaded backbone (an open_clip ``VisionTransformer``
or a transformers ``CLIPModel``) without changing it: it reads the tower's own modules and weights
and runs the same mathematics in the same order, so that with no intervention its embedding equals
the backbone's ``encode_images`` to float tolerance (whether open_clip's transformer is batch-first
or not does not matter: only the weights are read). At chosen blocks (``blocks=``) it computes the
attention eagerly from the block's weights and offers two interventions:

* ``extra_tokens(index, tokens)`` may return residual-stream vectors (``B x E x D``) that join the
  block's attention as extra keys and values only: they are layer-normed by the block's ``ln_1``
  and projected to keys and values, but have no query and no output row (TCA's domain anchors);
* ``after_attention(state)`` receives the :class:`BlockState` between the attention residual and the
  MLP: the tokens and the class token's attention over them, per head. It returns the tokens the
  MLP runs on, any number of them, class token first (prune, merge, fuse).

Every forward records the class token after every block and counts the multiply-accumulates it ran
(:func:`block_macs`): ``4 D^2 N`` for the q/k/v and output projections, ``2 N^2 D`` for the two
attention products, ``2 D D_mlp N`` for the MLP (``8 D^2 N`` at the usual ratio 4), the patch
embedding and the final projection. LayerNorms, softmax, GELU and additions are not counted, as in
fvcore's convention that the TCA paper's "GFLOPs" follow: a full CLIP ViT-B/16 at 224 px counts
17.56 G (the paper reports 17.59).

Backbones without a class token to rank patches by (SigLIP's attention-pooling head, timm towers)
and convolutional towers (ResNets) raise :class:`~vlm_tta.errors.UnsupportedBackboneError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import UnsupportedBackboneError

SUPPORTED = (
    "open_clip VisionTransformer towers with a class token (pool_type 'tok', no attentional pooler, "
    "standard ResidualAttentionBlocks: ViT-B-16, ViT-B-32, ViT-L-14, ...) and transformers CLIPModel"
)


# --------------------------------------------------------------------------- counting
def block_macs(width: int, mlp_width: int, n_in: int, n_out: int | None = None, n_extra: int = 0) -> int:
    """Multiply-accumulates of one transformer block that attends over ``n_in`` tokens (plus
    ``n_extra`` key/value-only tokens) and runs its MLP on ``n_out`` tokens (default ``n_in``)."""
    n_out = n_in if n_out is None else n_out
    projections = 4 * width * width * n_in + 2 * width * width * n_extra  # q, k, v, out; k, v of the extras
    attention = 2 * n_in * (n_in + n_extra) * width  # Q K^T and A V
    return projections + attention + 2 * width * mlp_width * n_out


@dataclass(frozen=True)
class ViTShape:
    """The sizes that set a ViT image tower's cost."""

    width: int
    layers: int
    heads: int
    mlp_width: int
    num_patches: int
    patch_dim: int  # input values per patch: channels x patch height x patch width
    output_dim: int | None  # size of the final projection (None: no projection)

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 1

    def embed_macs(self) -> int:
        return self.num_patches * self.patch_dim * self.width

    def head_macs(self) -> int:
        return self.width * self.output_dim if self.output_dim else 0

    def macs(self, tokens_after: Sequence[int] | None = None, extra: Sequence[int] | None = None) -> int:
        """MACs of one image's forward in which block ``i`` ends with ``tokens_after[i]`` tokens
        (default: none removed) and attends over ``extra[i]`` extra key/value tokens (default 0)."""
        tokens_after = list(tokens_after) if tokens_after is not None else [self.num_tokens] * self.layers
        extra = list(extra) if extra is not None else [0] * self.layers
        if len(tokens_after) != self.layers or len(extra) != self.layers:
            raise ValueError(f"need one token count per block ({self.layers}); got {len(tokens_after)}, {len(extra)}")
        total, n = self.embed_macs() + self.head_macs(), self.num_tokens
        for n_out, e in zip(tokens_after, extra):
            total += block_macs(self.width, self.mlp_width, n, n_out, e)
            n = n_out
        return total


# --------------------------------------------------------------------------- what a forward exposes
@dataclass
class BlockState:
    """A chosen block between its attention residual and its MLP (what ``after_attention`` gets)."""

    index: int
    #: B x N x D residual stream after the attention residual; token 0 is the class token
    tokens: torch.Tensor
    #: B x H x N: the class token's attention probabilities over the N sequence tokens (itself
    #: included), per head; the softmax ran over these and any extra key/value tokens, so a row
    #: sums to 1 minus the share the extras took
    cls_attention: torch.Tensor


@dataclass
class SteppedForward:
    """The result of :meth:`SteppableViT.forward`."""

    embedding: torch.Tensor  # B x E, un-normalised, float32
    cls_tokens: torch.Tensor  # B x L x D: the class token after every block (before the final norm), float32
    tokens_after: list[int] = field(default_factory=list)  # sequence length after each block
    extra_tokens: list[int] = field(default_factory=list)  # extra key/value tokens each block attended over
    macs: int = 0  # multiply-accumulates per image


# --------------------------------------------------------------------------- backbone adapters
@dataclass
class _Block:
    """One block's parts, as callables over batch-first tensors (B x N x D)."""

    ln_1: Callable
    qkv: Callable  # normed tokens -> (q, k, v), each B x N x D
    kv: Callable  # normed tokens -> (k, v)
    out: Callable  # the attention output projection
    ls_1: Callable
    ln_2: Callable
    mlp: Callable
    ls_2: Callable


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class _OpenClipTower:
    """An open_clip ``VisionTransformer``: the parts of its forward (open_clip 3.x)."""

    def __init__(self, visual: torch.nn.Module) -> None:
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        name = type(visual).__name__
        if not isinstance(visual, VisionTransformer):
            what = "a ResNet" if "ResNet" in name else f"a {name} (e.g. a timm or SigLIP tower)"
            raise UnsupportedBackboneError(f"this open_clip image tower is {what}; block stepping supports {SUPPORTED}")
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            pooling = "an attentional pooler" if visual.attn_pool is not None else f"pool_type {visual.pool_type!r}"
            raise UnsupportedBackboneError(
                f"this open_clip ViT pools with {pooling}, not its class token; block stepping supports {SUPPORTED}"
            )
        for i, blk in enumerate(visual.transformer.resblocks):
            attn = getattr(blk, "attn", None)
            if (
                not isinstance(blk, ResidualAttentionBlock)
                or not isinstance(attn, torch.nn.MultiheadAttention)
                or not attn._qkv_same_embed_dim
                or attn.bias_k is not None
                or attn.add_zero_attn
            ):
                raise UnsupportedBackboneError(
                    f"block {i} of this open_clip ViT is a {type(blk).__name__} (custom attention: qk-norm, scaled "
                    f"cosine or head scaling); block stepping supports {SUPPORTED}"
                )
        self.visual = visual
        first = visual.transformer.resblocks[0]
        width = visual.conv1.out_channels
        kh, kw = visual.conv1.kernel_size
        self.shape = ViTShape(
            width=width,
            layers=len(visual.transformer.resblocks),
            heads=first.attn.num_heads,
            mlp_width=first.mlp.c_fc.out_features,
            num_patches=visual.positional_embedding.shape[0] - 1,
            patch_dim=visual.conv1.in_channels * kh * kw,
            output_dim=visual.proj.shape[1] if visual.proj is not None else None,
        )
        self.blocks = [self._block(b) for b in visual.transformer.resblocks]

    @staticmethod
    def _block(blk) -> _Block:
        attn = blk.attn
        width = attn.embed_dim
        weight, bias = attn.in_proj_weight, attn.in_proj_bias
        kv_bias = bias[width:] if bias is not None else None
        return _Block(
            ln_1=blk.ln_1,
            qkv=lambda x: F.linear(x, weight, bias).chunk(3, dim=-1),
            kv=lambda x: F.linear(x, weight[width:], kv_bias).chunk(2, dim=-1),
            out=attn.out_proj,
            ls_1=blk.ls_1,
            ln_2=blk.ln_2,
            mlp=blk.mlp,
            ls_2=blk.ls_2,
        )

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.conv1(pixels).flatten(2).transpose(1, 2)  # B x patches x D
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(v.patch_dropout(x))

    def pool(self, cls: torch.Tensor) -> torch.Tensor:
        x = self.visual.ln_post(cls)  # per-token norm: the same before or after taking the class token
        return x @ self.visual.proj if self.visual.proj is not None else x


class _HFClipTower:
    """The vision half of a transformers ``CLIPModel`` (embeddings, pre-norm, layers, post-norm, projection)."""

    def __init__(self, model: torch.nn.Module) -> None:
        vision = model.vision_model
        self.vision, self.projection = vision, model.visual_projection
        cfg = model.config.vision_config
        emb = vision.embeddings
        kh, kw = emb.patch_embedding.kernel_size
        self.shape = ViTShape(
            width=cfg.hidden_size,
            layers=len(vision.encoder.layers),
            heads=cfg.num_attention_heads,
            mlp_width=cfg.intermediate_size,
            num_patches=emb.num_patches,
            patch_dim=emb.patch_embedding.in_channels * kh * kw,
            output_dim=model.visual_projection.out_features,
        )
        self.blocks = [self._block(layer) for layer in vision.encoder.layers]

    @staticmethod
    def _block(layer) -> _Block:
        a = layer.self_attn
        return _Block(
            ln_1=layer.layer_norm1,
            qkv=lambda x: (a.q_proj(x), a.k_proj(x), a.v_proj(x)),
            kv=lambda x: (a.k_proj(x), a.v_proj(x)),
            out=a.out_proj,
            ls_1=_identity,
            ln_2=layer.layer_norm2,
            mlp=layer.mlp,
            ls_2=_identity,
        )

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision.pre_layrnorm(self.vision.embeddings(pixels))

    def pool(self, cls: torch.Tensor) -> torch.Tensor:
        return self.projection(self.vision.post_layernorm(cls))


def _tower(backbone) -> _OpenClipTower | _HFClipTower:
    module = getattr(backbone, "model", None)
    if module is None:
        raise UnsupportedBackboneError(
            f"{type(backbone).__name__} does not expose its torch module (.model); block stepping supports {SUPPORTED}"
        )
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "model_type"):  # transformers
        if config.model_type != "clip":
            raise UnsupportedBackboneError(
                f"transformers {type(module).__name__} has no class token (SigLIP pools with an attention head); "
                f"block stepping supports {SUPPORTED}"
            )
        return _HFClipTower(module)
    visual = getattr(module, "visual", None)
    if visual is None:
        raise UnsupportedBackboneError(
            f"{type(module).__name__} has no image tower (.visual); block stepping supports {SUPPORTED}"
        )
    return _OpenClipTower(visual)


# --------------------------------------------------------------------------- the stepper
class SteppableViT:
    """Block-by-block forward of a backbone's image tower (see the module docstring).

    ``backbone`` is a :class:`~vlm_tta.models.VisionLanguageModel` from :func:`~vlm_tta.load_model`
    (open_clip or transformers); it is only read, never changed.
    """

    def __init__(self, backbone) -> None:
        self.backbone = backbone
        self._tower = _tower(backbone)
        self.shape: ViTShape = self._tower.shape
        self.scale = (self.shape.width // self.shape.heads) ** -0.5

    @property
    def num_blocks(self) -> int:
        return self.shape.layers

    @torch.no_grad()
    def forward(
        self,
        pixels: torch.Tensor,
        blocks: Sequence[int] = (),
        extra_tokens: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
        after_attention: Callable[[BlockState], torch.Tensor] | None = None,
    ) -> SteppedForward:
        """Run preprocessed ``pixels`` (B x 3 x H x W) through the tower.

        At the blocks in ``blocks`` the attention is computed eagerly (with the class token's
        attention exposed), ``extra_tokens`` may add key/value tokens and ``after_attention`` may
        replace the tokens before the MLP; other blocks run as the backbone does.
        """
        if pixels.ndim != 4:
            raise ValueError(f"pixels must be B x 3 x H x W; got shape {tuple(pixels.shape)}")
        hooked = set(int(b) for b in blocks)
        bad = sorted(b for b in hooked if not 0 <= b < self.num_blocks)
        if bad:
            raise ValueError(f"block indices {bad} out of range: this tower has blocks 0..{self.num_blocks - 1}")
        shape = self.shape
        pixels = pixels.to(self.backbone.device)
        with self.backbone.autocast():
            x = self._tower.embed(pixels)
            macs = shape.embed_macs() + shape.head_macs()
            cls_tokens, tokens_after, extras = [], [], []
            for i, blk in enumerate(self._tower.blocks):
                n_in = x.shape[1]
                n_extra = 0
                if i in hooked:
                    extra = extra_tokens(i, x) if extra_tokens is not None else None
                    n_extra = 0 if extra is None else extra.shape[1]
                    out, cls_attn = self._eager_attention(blk, x, extra)
                    x = x + blk.ls_1(out)
                    if after_attention is not None:
                        x = after_attention(BlockState(i, x, cls_attn))
                else:
                    x = x + blk.ls_1(self._attention(blk, x))
                x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
                macs += block_macs(shape.width, shape.mlp_width, n_in, x.shape[1], n_extra)
                cls_tokens.append(x[:, 0])
                tokens_after.append(x.shape[1])
                extras.append(n_extra)
            embedding = self._tower.pool(x[:, 0])
        return SteppedForward(embedding.float(), torch.stack(cls_tokens, 1).float(), tokens_after, extras, macs)

    # -- attention, from the block's own weights
    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.shape.heads, d // self.shape.heads).transpose(1, 2)  # B x H x N x d_head

    def _merge_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, h, n, d = t.shape
        return t.transpose(1, 2).reshape(b, n, h * d)

    def _attention(self, blk: _Block, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self._heads(t) for t in blk.qkv(blk.ln_1(x)))
        return blk.out(self._merge_heads(F.scaled_dot_product_attention(q, k, v)))

    def _eager_attention(
        self, blk: _Block, x: torch.Tensor, extra: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = blk.qkv(blk.ln_1(x))
        n_extra = 0
        if extra is not None:
            k_e, v_e = blk.kv(blk.ln_1(extra.to(x.dtype)))
            k, v = torch.cat([k_e, k], dim=1), torch.cat([v_e, v], dim=1)  # extras first, as TCA prepends its anchor
            n_extra = extra.shape[1]
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        probs = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        out = blk.out(self._merge_heads(probs @ v))
        return out, probs[:, :, 0, n_extra:]


__all__ = ["SUPPORTED", "BlockState", "SteppableViT", "SteppedForward", "ViTShape", "block_macs"]
