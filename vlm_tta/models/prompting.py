"""Learnable prompt context for every backbone's text encoder (CoOp, Zhou et al., IJCV 2022; TPT, Shu et
al., NeurIPS 2022).

The class prompts are ``[SOS] ctx_1 .. ctx_n <class tokens> . [EOS]`` (the class name at the end, as TPT
builds them): the ``n`` context vectors replace the word embeddings of a phrase (``"a photo of a"``, so
``n = 4``) and are the only thing gradients reach. With the context equal to the phrase's own word
embeddings, the text features are those of the plain prompt ``"a photo of a {name}."``, i.e.
``model.class_embeddings(names, ["a photo of a {}."])`` (:class:`PromptLearner` checks nothing of the
kind at run time; the tests do, per backend).

Backends (:func:`text_path`):

* open_clip ``CLIP`` / ``CustomTextCLIP`` (no CoCa class embedding): token embedding, absolute positions,
  the text transformer with its own mask (causal for CLIP, none for SigLIP-style towers), final LayerNorm,
  pooling by the model's ``text_pool_type`` (``argmax`` = the EOS token for OpenAI's vocabulary, ``eos``,
  ``last``, ``first``) and the projection. The transformer is fed batch-first when it has a
  ``batch_first`` attribute (open_clip >= 2.24 transposes inside), sequence-first otherwise (older
  open_clip, whose ``encode_text`` permuted itself).
* transformers ``CLIPModel`` / ``SiglipModel``: the model's own ``get_text_features`` runs, with a forward
  hook on the token embedding that writes the context into its output (so every transformers version's
  masks, positions and pooling are used as they are). SigLIP keeps its fixed 64-token padding, no mask
  and last-token pooling; its tokenizer has no start token, so the context starts at position 0.

The context is found in the token sequence by tokenizing the phrase alone (without special tokens) and
locating it in every class prompt; the number of context vectors is the phrase's number of tokens (its
number of words for CLIP's BPE and ``"a photo of a"``, which is TPT's ``n_ctx``).

Exact speed-up: with a causal mask and pooling at the EOS token, nothing after the longest EOS position
of a batch can change the pooled feature (positions are absolute, attention only looks back), so the
sequence is cut there (``truncate=True``; never for SigLIP), with the classes grouped by prompt length
(:meth:`PromptLearner.buckets`). For open_clip CLIP, the prefix ``[SOS] ctx_1..ctx_n`` is the same in every
class prompt and, under the causal mask, its hidden states do not depend on what follows: it is run once
per context and every class runs only its own tokens, attending to the prefix's keys and values
(``share_prefix=True``; open_clip's standard blocks only, else the full forward).

CoOp context files (:func:`load_context_vectors`): a ``.safetensors`` file with a tensor ``ctx``, or a
``torch.save`` file read with ``torch.load(weights_only=True)`` holding an ``n x width`` tensor, a dict
with ``ctx``, or CoOp's own checkpoint layout ``{"state_dict": {"ctx": ...}, ...}`` (the released
``prompt_learner/model.pth.tar-50`` files). Only a generic (``n x width``) context is accepted, not
CoOp's class-specific one.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import torch

from ..errors import MethodOptionError, UnsupportedBackboneError

DEFAULT_PHRASE = "a photo of a"  # TPT scripts: --ctx_init a_photo_of_a
PLACEHOLDER = "X"  # CoOp / TPT: the prompt prefix "X X X X" when the context is not a phrase
#: the cost of one more text forward, in prompts' worth of tokens (for grouping classes by length)
BUCKET_OVERHEAD = 16


def _project(tower: Any, x: torch.Tensor) -> torch.Tensor:
    """The text tower's projection of pooled features (a module, a matrix, or none)."""
    proj = getattr(tower, "text_projection", None)
    if isinstance(proj, torch.nn.Module):
        return proj(x)
    return x @ proj if proj is not None else x


# --------------------------------------------------------------------------- context files
def load_context_vectors(source: Any) -> torch.Tensor:
    """An ``n x width`` float32 context from a tensor, a ``.safetensors`` file (tensor ``ctx``) or a
    ``torch.save`` file (a tensor, ``{"ctx": ...}`` or CoOp's ``{"state_dict": {"ctx": ...}}``), read with
    ``torch.load(weights_only=True)``."""
    if isinstance(source, torch.Tensor):
        ctx = source
    else:
        path = os.path.expanduser(os.fspath(source))
        if not os.path.isfile(path):
            raise MethodOptionError(f"context file not found: {path}")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            data: Any = load_file(path)
        else:
            try:
                data = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:
                raise MethodOptionError(
                    f"could not read the context file {path} with torch.load(weights_only=True) "
                    f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); re-save only the "
                    "context: "
                    "torch.save(checkpoint['state_dict']['ctx'], 'ctx.pt')"
                ) from err
        if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]
        if isinstance(data, dict):
            if "ctx" not in data:
                raise MethodOptionError(
                    f"the context file {path} has no 'ctx' entry (keys: {', '.join(map(str, list(data)[:10]))})"
                )
            data = data["ctx"]
        ctx = data
    if not isinstance(ctx, torch.Tensor) or ctx.ndim != 2 or not ctx.is_floating_point():
        shape = tuple(ctx.shape) if isinstance(ctx, torch.Tensor) else type(ctx).__name__
        raise MethodOptionError(
            f"a context must be an n x width float tensor (CoOp's generic context); got {shape}. "
            "Class-specific contexts (C x n x width) are not supported"
        )
    if not torch.isfinite(ctx).all():
        raise MethodOptionError("the context contains NaN or infinite values")
    return ctx.detach().to("cpu", torch.float32).clone()


# --------------------------------------------------------------------------- backend text paths
def _splice(emb: torch.Tensor, ctx: torch.Tensor, start: int) -> torch.Tensor:
    """``emb`` (M x L x W) with positions ``start .. start + n`` replaced by ``ctx`` (M x n x W)."""
    n = ctx.shape[1]
    return torch.cat([emb[:, :start], ctx.to(emb.dtype), emb[:, start + n :]], dim=1)


class TextPath:
    """One backend's text encoder, run on token ids with a context spliced into the token embeddings."""

    #: a causal mask and pooling at the EOS token: cutting after the longest EOS is exact
    can_truncate: bool = False
    width: int

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, dict]:
        """(token ids M x L, extra keyword inputs such as an attention mask) on the model's device."""
        raise NotImplementedError

    def phrase_tokens(self, phrase: str) -> list[int]:
        """The ids of ``phrase`` without special tokens."""
        raise NotImplementedError

    def token_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pool_positions(self, ids: torch.Tensor) -> torch.Tensor | None:
        """The position each sequence is pooled at (M,), when it depends on the ids; None otherwise."""
        return None

    def encode(self, ids: torch.Tensor, extra: dict, ctx: torch.Tensor, start: int) -> torch.Tensor:
        """Un-normalised text features (M x D) of ``ids`` with ``ctx`` (M x n x W) at ``start``."""
        raise NotImplementedError


class OpenClipTextPath(TextPath):
    def __init__(self, backbone) -> None:
        model = backbone.model
        tower = model.text if hasattr(getattr(model, "text", None), "token_embedding") else model
        if getattr(tower, "cls_emb", None) is not None:
            raise UnsupportedBackboneError("prompt tuning does not support open_clip text towers with a class token")
        for attr in ("token_embedding", "positional_embedding", "transformer", "ln_final"):
            if not hasattr(tower, attr):
                raise UnsupportedBackboneError(
                    f"this open_clip text tower ({type(tower).__name__}) has no {attr}: prompt tuning needs "
                    "open_clip's CLIP text transformer (an HF text tower is not supported)"
                )
        self.backbone = backbone
        self.tower = tower
        self.pool_type = getattr(model, "text_pool_type", None) or getattr(tower, "pool_type", "argmax")
        self.eos_id = getattr(model, "text_eos_id", None) or getattr(tower, "eos_id", None)
        if self.pool_type not in ("argmax", "eos", "last", "first"):
            raise UnsupportedBackboneError(f"text pooling {self.pool_type!r} is not supported by prompt tuning")
        self.attn_mask = getattr(tower, "attn_mask", None)
        self.can_truncate = self.attn_mask is not None and self.pool_type in ("argmax", "eos")
        self.width = int(tower.token_embedding.weight.shape[1])
        self.can_share_prefix = self.can_truncate and _plain_blocks(tower.transformer)

    def tokenize(self, texts):
        return self.backbone.tokenize(texts), {}

    def phrase_tokens(self, phrase):
        tok = self.backbone.tokenizer
        if hasattr(tok, "encode") and not hasattr(tok, "tokenizer"):  # open_clip SimpleTokenizer
            return list(tok.encode(phrase))
        inner = getattr(tok, "tokenizer", None)
        if inner is not None:  # open_clip HFTokenizer
            return list(inner(phrase, add_special_tokens=False)["input_ids"])
        raise UnsupportedBackboneError(f"cannot tokenize a phrase without special tokens with {type(tok).__name__}")

    def token_embedding(self, ids):
        return self.tower.token_embedding(ids)

    def pool_positions(self, ids):
        if self.pool_type == "argmax":
            return ids.argmax(-1)
        if self.pool_type == "eos":
            return (ids == self.eos_id).int().argmax(-1)
        return None

    def encode(self, ids, extra, ctx, start):
        tower = self.tower
        length = ids.shape[1]
        x = _splice(tower.token_embedding(ids), ctx, start)
        x = x + tower.positional_embedding[:length].to(x.dtype)
        mask = None if self.attn_mask is None else self.attn_mask[:length, :length]
        transformer = tower.transformer
        if hasattr(transformer, "batch_first"):
            x = transformer(x, attn_mask=mask)
        else:  # older open_clip: the transformer takes L x N x D
            x = transformer(x.permute(1, 0, 2), attn_mask=mask).permute(1, 0, 2)
        x = tower.ln_final(x)
        rows = torch.arange(x.shape[0], device=x.device)
        if self.pool_type == "last":
            x = x[:, -1]
        elif self.pool_type == "first":
            x = x[:, 0]
        else:
            x = x[rows, self.pool_positions(ids)]
        return _project(tower, x)

    # -- the shared prefix: [SOS] ctx_1..ctx_n is the same for every class prompt of one context, and under a
    # causal mask its hidden states depend on nothing after it, so they (and their keys and values) are
    # computed once per context and attended to by every class's suffix.
    def prefix_states(self, ctx: torch.Tensor, head_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per block, the keys and values (``B x heads x p x head_dim``) of the prefix ``head_ids`` + ``ctx``
        (the start token(s) every prompt begins with, then the context; ``p = len(head_ids) + n``) for
        contexts ``B x n x W``."""
        tower = self.tower
        b, n = ctx.shape[0], ctx.shape[1]
        start = len(head_ids)
        first = head_ids.to(ctx.device).expand(b, start)
        x = torch.cat([tower.token_embedding(first), ctx.to(tower.token_embedding.weight.dtype)], dim=1)
        p = start + n
        x = x + tower.positional_embedding[:p].to(x.dtype)
        causal = torch.ones(p, p, dtype=torch.bool, device=x.device).tril()
        out = []
        for block in tower.transformer.resblocks:
            h = block.ln_1(x)
            q, k, v = _qkv(block.attn, h)
            out.append((k, v))
            x = x + block.ls_1(_attend(block.attn, q, k, v, causal))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return out

    def encode_suffix(self, ids: torch.Tensor, prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Features (``B x C x D``) of the class prompts ``ids`` (``C x L``) whose first ``p`` tokens are the
        prefix of :meth:`prefix_states` (one per context), computing only positions ``p .. L``."""
        tower = self.tower
        k0 = prefix[0][0]
        b, p = k0.shape[0], k0.shape[2]
        c, length = ids.shape
        s = length - p
        x = tower.token_embedding(ids[:, p:]) + tower.positional_embedding[p:length].to(k0.dtype)
        x = x.unsqueeze(0).expand(b, c, s, x.shape[-1])
        allowed = torch.ones(s, p + s, dtype=torch.bool, device=x.device)
        allowed[:, p:] = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        for block, (kp, vp) in zip(tower.transformer.resblocks, prefix):
            h = block.ln_1(x)
            q, k, v = _qkv(block.attn, h.reshape(b * c, s, -1))
            heads, dh = kp.shape[1], kp.shape[3]
            q, k, v = (t.reshape(b, c, heads, s, dh) for t in (q, k, v))
            k = torch.cat([kp.unsqueeze(1).expand(b, c, heads, p, dh), k], dim=3)
            v = torch.cat([vp.unsqueeze(1).expand(b, c, heads, p, dh), v], dim=3)
            x = x + block.ls_1(_attend(block.attn, q, k, v, allowed))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        x = tower.ln_final(x)
        pos = self.pool_positions(ids) - p
        x = x[:, torch.arange(c, device=x.device), pos.to(x.device)]
        return _project(tower, x)


def _plain_blocks(transformer) -> bool:
    """Whether every block is open_clip's standard pre-norm block with a plain ``nn.MultiheadAttention``
    (what :meth:`OpenClipTextPath.encode_suffix` re-implements); anything else uses the full forward."""
    blocks = getattr(transformer, "resblocks", None)
    if blocks is None or not hasattr(transformer, "batch_first") or not transformer.batch_first:
        return False
    for block in blocks:
        attn = getattr(block, "attn", None)
        if not (
            type(block).__name__ == "ResidualAttentionBlock"
            and not hasattr(block, "ln_1_kv")
            and isinstance(attn, torch.nn.MultiheadAttention)
            and attn._qkv_same_embed_dim
            and attn.bias_k is None
            and not attn.add_zero_attn
            and all(hasattr(block, a) for a in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2"))
        ):
            return False
    return True


def _qkv(attn: torch.nn.MultiheadAttention, x: torch.Tensor):
    """Queries, keys and values (``... x heads x L x head_dim``) of ``x`` (``... x L x W``)."""
    q, k, v = torch.nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    heads = attn.num_heads

    def split(t):
        return t.unflatten(-1, (heads, t.shape[-1] // heads)).transpose(-3, -2)

    return split(q), split(k), split(v)


def _attend(attn: torch.nn.MultiheadAttention, q, k, v, allowed: torch.Tensor) -> torch.Tensor:
    """``nn.MultiheadAttention``'s output (``... x L x W``) for split queries, keys and values."""
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    out = out.transpose(-3, -2).flatten(-2)
    return attn.out_proj(out)


class HFTextPath(TextPath):
    def __init__(self, backbone) -> None:
        self.backbone = backbone
        text_model = backbone.model.text_model
        self.embedding = text_model.embeddings.token_embedding
        self.width = int(self.embedding.weight.shape[1])
        self.siglip = backbone.kind == "siglip"
        self.can_truncate = not self.siglip  # CLIP: causal mask, pooled at EOS; SigLIP: no mask, last token
        config = getattr(backbone.model.config, "text_config", None)
        self.eos_id = getattr(config, "eos_token_id", None)
        self.full_length = False  # CLIP only: pad to 77 as OpenAI's tokenizer does (the reference computation)

    def tokenize(self, texts):
        bb = self.backbone
        if self.full_length and not self.siglip:
            enc = bb.tokenizer(
                list(texts), padding="max_length", truncation=True, max_length=bb.max_length, return_tensors="pt"
            )
            inputs = {k: enc[k].to(bb.device) for k in ("input_ids", "attention_mask") if k in enc}
        else:
            inputs = bb.tokenize(texts)
        ids = inputs.pop("input_ids")
        return ids, inputs

    def phrase_tokens(self, phrase):
        return list(self.backbone.tokenizer(phrase, add_special_tokens=False)["input_ids"])

    def pool_positions(self, ids):
        if self.siglip:
            return None
        if self.eos_id is None or self.eos_id == 2:  # transformers' legacy rule: the highest id
            return ids.argmax(-1)
        return (ids == self.eos_id).int().argmax(-1)

    def token_embedding(self, ids):
        return self.embedding(ids)

    def encode(self, ids, extra, ctx, start):
        from .huggingface import _features

        def hook(module, inputs, output):
            return _splice(output, ctx, start)

        handle = self.embedding.register_forward_hook(hook)
        try:
            return _features(self.backbone.model.get_text_features(input_ids=ids, **extra))
        finally:
            handle.remove()


def text_path(backbone) -> TextPath:
    """The :class:`TextPath` of a backbone (open_clip or transformers)."""
    from .huggingface import HFModel
    from .openclip import OpenClipModel

    if isinstance(backbone, OpenClipModel):
        return OpenClipTextPath(backbone)
    if isinstance(backbone, HFModel):
        return HFTextPath(backbone)
    raise UnsupportedBackboneError(
        f"prompt tuning needs an open_clip or transformers backbone; got {type(backbone).__name__}"
    )


# --------------------------------------------------------------------------- the prompt learner
def _find(seq: list[int], sub: list[int]) -> int:
    for i in range(len(seq) - len(sub) + 1):
        if seq[i : i + len(sub)] == sub:
            return i
    return -1


class PromptLearner:
    """Class prompts ``[SOS] ctx_1..ctx_n <name> . [EOS]`` of one backbone with a learnable context.

    ``phrase`` (default ``"a photo of a"``) sets the initial context to its token embeddings (``n`` = its
    number of tokens); ``ctx_vectors`` (an ``n x width`` tensor or a CoOp context file, see
    :func:`load_context_vectors`) replaces them, the prompt text then holding ``n`` placeholder words;
    ``phrase=None`` without vectors draws ``n_ctx`` vectors from N(0, 0.02²) (CoOp's generic init) with
    ``seed``. ``ctx_init`` is the initial context (``n x width``, float32, on the model's device).

    :meth:`text_features` takes a context ``n x W`` (-> ``C x D``) or a batch of contexts ``B x n x W``
    (-> ``B x C x D``: one independent problem per context in one forward), optionally for some of the
    classes (a slice or class indices), L2-normalised; gradients flow into the context only (frozen weights).
    """

    def __init__(
        self,
        backbone,
        classnames: Sequence[str],
        phrase: str | None = DEFAULT_PHRASE,
        ctx_vectors: Any = None,
        n_ctx: int | None = None,
        truncate: bool = True,
        seed: int = 0,
        share_prefix: bool = True,
    ) -> None:
        self.backbone = backbone
        self.path = text_path(backbone)
        self.classnames = list(classnames)
        if not self.classnames:
            raise MethodOptionError("prompt tuning needs at least one class name")
        device = backbone.device
        given = None if ctx_vectors is None else load_context_vectors(ctx_vectors)
        if given is not None:
            if given.shape[1] != self.path.width:
                raise MethodOptionError(
                    f"the context has width {given.shape[1]} but {backbone.name}'s text encoder has width "
                    f"{self.path.width}: it was learnt for another backbone"
                )
            if n_ctx is not None and n_ctx != given.shape[0]:
                raise MethodOptionError(f"n_ctx={n_ctx} but the given context has {given.shape[0]} vectors")
            n = given.shape[0]
            phrase_text = self._placeholder(n)
        elif phrase is not None:
            phrase_text = " ".join(str(phrase).replace("_", " ").split())
            if not phrase_text:
                raise MethodOptionError("the context phrase (ctx_init) is empty")
            n = len(self.path.phrase_tokens(phrase_text))
            if n_ctx is not None and n_ctx != n:
                raise MethodOptionError(
                    f"n_ctx={n_ctx} but the phrase {phrase_text!r} has {n} token(s); the phrase sets the context "
                    "length (leave n_ctx unset, or set ctx_init=None for a random context of n_ctx vectors)"
                )
        else:
            if n_ctx is None or isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
                raise MethodOptionError(f"a random context needs n_ctx, an integer >= 1; got {n_ctx!r}")
            n = n_ctx
            phrase_text = self._placeholder(n)
        self.n_ctx = n
        self.phrase = phrase_text
        self.prompts = [f"{phrase_text} {name}." for name in self.classnames]
        phrase_ids = self.path.phrase_tokens(phrase_text)
        if len(phrase_ids) != n:
            raise MethodOptionError(f"the context phrase {phrase_text!r} gives {len(phrase_ids)} tokens, not {n}")
        if isinstance(self.path, HFTextPath):  # without truncation: 77 tokens, as OpenAI's tokenizer pads
            self.path.full_length = not truncate
        self.ids, self.extra = self.path.tokenize(self.prompts)
        starts = {_find(row, phrase_ids) for row in self.ids.tolist()}
        if len(starts) != 1 or -1 in starts or next(iter(starts)) > 1:
            raise UnsupportedBackboneError(
                f"the phrase {phrase_text!r} is not tokenized the same way at the start of every class prompt "
                f"({sorted(starts)}); prompt tuning cannot place the context"
            )
        self.start = starts.pop()
        if self.start + n >= self.ids.shape[1]:
            raise MethodOptionError("the prompts are longer than the text encoder's context length")
        with torch.no_grad():
            if given is not None:
                ctx0 = given
            elif phrase is not None:
                ctx0 = self.path.token_embedding(self.ids[:1])[0, self.start : self.start + n]
            else:
                gen = torch.Generator().manual_seed(seed)
                ctx0 = torch.randn(n, self.path.width, generator=gen) * 0.02
        self.ctx_init = ctx0.detach().to(device, torch.float32).clone()
        self.truncate = bool(truncate)
        self.share_prefix = bool(share_prefix)
        #: tokens each class prompt needs (up to its pooled EOS) where cutting there is exact, else the full length
        pool = self.path.pool_positions(self.ids) if self.path.can_truncate else None
        self.lengths = (
            (pool + 1).cpu() if pool is not None else torch.full((len(self.classnames),), int(self.ids.shape[1]))
        )

    def _placeholder(self, n: int) -> str:
        for word in (PLACEHOLDER, "a", "x"):
            text = " ".join([word] * n)
            if len(self.path.phrase_tokens(text)) == n:
                return text
        raise UnsupportedBackboneError(f"no placeholder word of one token for a context of {n} vectors")

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def _index(self, classes: slice | torch.Tensor | Sequence[int] | None) -> torch.Tensor:
        full = torch.arange(self.num_classes)
        if classes is None:
            return full
        if isinstance(classes, slice):
            return full[classes]
        return torch.as_tensor(classes, dtype=torch.long).reshape(-1).cpu()

    def buckets(self, index: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        """``index``'s classes grouped into runs of similar prompt length, each run cut after its longest
        EOS (exact under a causal mask), as ``(class indices, length)``; the runs cover ``index`` sorted by
        length. The grouping minimises ``sum((size + BUCKET_OVERHEAD) x length)`` (a small dynamic
        programme over the distinct lengths). One run of the full length when cutting is off or inexact."""
        if not (self.truncate and self.path.can_truncate) or len(index) == 0:
            return [(index, int(self.ids.shape[1]))]
        lengths = self.lengths[index]
        order = torch.argsort(lengths, stable=True)
        index, lengths = index[order], lengths[order]
        values, counts = torch.unique_consecutive(lengths, return_counts=True)
        values, counts = values.tolist(), counts.tolist()
        g = len(values)
        best = [0.0] + [math.inf] * g  # best[j]: cost of the first j groups
        cut = [0] * (g + 1)
        for j in range(1, g + 1):
            size = 0
            for i in range(j, 0, -1):  # last run = groups i..j (1-based)
                size += counts[i - 1]
                cost = best[i - 1] + (size + BUCKET_OVERHEAD) * values[j - 1]
                if cost < best[j]:
                    best[j], cut[j] = cost, i - 1
        runs, j = [], g
        while j > 0:
            runs.append((cut[j], j))
            j = cut[j]
        out, start = [], 0
        for i, j in reversed(runs):
            size = sum(counts[i:j])
            out.append((index[start : start + size], int(values[j - 1])))
            start += size
        return out

    def class_chunks(self, size: int | None) -> list[torch.Tensor | None]:
        """The classes in chunks of at most ``size`` (sorted by prompt length so that each chunk is cut
        short); ``[None]`` (all classes at once) when ``size`` is None or covers every class."""
        if size is None or size >= self.num_classes:
            return [None]
        order = torch.argsort(self.lengths, stable=True)
        return [order[s : s + size] for s in range(0, self.num_classes, size)]

    def text_features(
        self, ctx: torch.Tensor, classes: slice | torch.Tensor | Sequence[int] | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """Text features of the class prompts with context ``ctx`` (``n x W`` -> ``C x D``; ``B x n x W`` ->
        ``B x C x D``), for all classes or for ``classes`` (a slice or class indices, in that order)."""
        single = ctx.ndim == 2
        ctxb = ctx.unsqueeze(0) if single else ctx
        if ctxb.ndim != 3 or ctxb.shape[1:] != self.ctx_init.shape:
            raise ValueError(f"context must be {tuple(self.ctx_init.shape)} or B x that; got {tuple(ctx.shape)}")
        index = self._index(classes)
        b = ctxb.shape[0]
        parts, covered = [], []
        prefix = None
        if self.share_prefix and getattr(self.path, "can_share_prefix", False):
            prefix = self.path.prefix_states(ctxb, self.ids[0, : self.start])
        for sub, length in self.buckets(index):
            dev = sub.to(self.ids.device)
            if prefix is not None:
                parts.append(self.path.encode_suffix(self.ids[dev, :length], prefix).float())
                covered.append(sub)
                continue
            ids = self.ids[dev, :length].repeat(b, 1)
            extra = {k: v[dev, :length].repeat(b, 1) for k, v in self.extra.items()}
            c = len(sub)
            rows = ctxb.unsqueeze(1).expand(b, c, *ctxb.shape[1:]).reshape(b * c, *ctxb.shape[1:])
            parts.append(self.path.encode(ids, extra, rows, self.start).float().view(b, c, -1))
            covered.append(sub)
        feats = torch.cat(parts, dim=1)
        order = torch.cat(covered)
        if not torch.equal(order, index):  # back to the order asked for
            where = torch.empty(self.num_classes, dtype=torch.long)
            where[order] = torch.arange(len(order))
            feats = feats[:, where[index].to(feats.device)]
        if normalize:
            feats = torch.nn.functional.normalize(feats, dim=-1)
        return feats[0] if single else feats


__all__: list[str] = [
    "DEFAULT_PHRASE",
    "HFTextPath",
    "OpenClipTextPath",
    "PromptLearner",
    "TextPath",
    "load_context_vectors",
    "text_path",
]
