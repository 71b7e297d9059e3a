"""Tiny random-weight backbones and their tokenizers, built offline (no downloads, a few seconds).

* open_clip: a custom model config (32 px images, patch 8, two layers per tower, embed dim 32) with
  open_clip's SimpleTokenizer;
* transformers CLIP: ``CLIPModel`` from a small ``CLIPConfig``; its ``CLIPTokenizer`` is built from the
  BPE vocabulary that open_clip ships (the same byte-level BPE as OpenAI CLIP), truncated to the first
  merges (every text still tokenises: the 512 byte symbols stay in the vocabulary);
* transformers SigLIP: ``SiglipModel`` from a small ``SiglipConfig``; its ``SiglipTokenizer`` is a
  sentencepiece model trained here on a short corpus (needs ``sentencepiece`` and ``protobuf``).

Everything is seeded, so two builds give identical weights and tokenizers.
"""

from __future__ import annotations

import copy
import gzip
import io
import math
import os
from pathlib import Path

import torch

IMAGE_SIZE = 32
#: The vision tower shared by the tiny HF CLIP and SigLIP models.
HF_TINY_VISION = dict(
    image_size=IMAGE_SIZE,
    patch_size=8,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
)
EMBED_DIM = 32

#: Words the tiny SigLIP tokenizer is trained on (tests' class names and templates come from these).
CORPUS_WORDS = (
    "a photo of a {}. a bad photo of the {}. a sketch of a {}. an origami {}. itap of my {}. "
    "a photo of the small {}. a blurry photo of a {}. art of the {}."
)
CLASSNAMES = ("cat", "dog", "airplane", "golden retriever", "tree frog", "sports car", "apple", "truck")

TINY_OPENCLIP_CONFIG = {
    "name": "tiny-openclip",
    "embed_dim": EMBED_DIM,
    "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def tiny_openclip_config(siglip: bool = False) -> dict:
    """A fresh copy of the tiny open_clip config; ``siglip=True`` gives a SigLIP-style variant
    (logit bias, no causal mask, last-token pooling)."""
    cfg = copy.deepcopy(TINY_OPENCLIP_CONFIG)
    if siglip:
        cfg["name"] = "tiny-openclip-siglip"
        cfg["init_logit_bias"] = -10.0
        cfg["text_cfg"].update({"no_causal_mask": True, "pool_type": "last", "proj_bias": True})
    return cfg


def build_tiny_openclip(seed: int = 0, siglip: bool = False, device="cpu", **kwargs):
    """A tiny open_clip :class:`~vlm_tta.models.VisionLanguageModel` with seeded random weights
    (``kwargs`` go to :func:`~vlm_tta.models.load_model`)."""
    from vlm_tta.models import load_model

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return load_model(tiny_openclip_config(siglip), pretrained=None, device=device, **kwargs)


# --------------------------------------------------------------------------- transformers CLIP
def clip_bpe_vocab(num_merges: int = 2000) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of OpenAI CLIP's BPE, read from open_clip's ``bpe_simple_vocab_16e6.txt.gz`` and
    cut to the first ``num_merges`` merges. Token ids follow open_clip's SimpleTokenizer order: 256 byte
    symbols, the same with ``</w>``, one id per merge, then ``<|startoftext|>``, ``<|endoftext|>``."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + num_merges]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_tiny_hf_clip(seed: int = 0):
    """(CLIPModel, CLIPProcessor) with seeded random weights."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab, merges = clip_bpe_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=77)
    eos = vocab["<|endoftext|>"]
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=eos,
            pad_token_id=eos,
        ),
        vision_config=dict(HF_TINY_VISION),
        projection_dim=EMBED_DIM,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPModel(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return model.eval(), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


# --------------------------------------------------------------------------- transformers SigLIP
def train_tiny_sentencepiece(path: str | os.PathLike, vocab_size: int = 120) -> Path:
    """Train a tiny unigram sentencepiece model (T5 / SigLIP ids: pad 0, eos 1, unk 2) on a corpus made
    of :data:`CORPUS_WORDS` and :data:`CLASSNAMES`; returns the ``.model`` file's path."""
    import sentencepiece as spm

    sentences = [CORPUS_WORDS.replace("{}", name) for name in CLASSNAMES] * 4
    sentences += ["the quick brown fox jumps over the lazy dog", "bird ship horse deer frog automobile"]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="unigram",
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
        character_coverage=1.0,
    )
    path = Path(path)
    path.write_bytes(buf.getvalue())
    return path


def build_tiny_hf_siglip(workdir: str | os.PathLike, seed: int = 0):
    """(SiglipModel, SiglipProcessor) with seeded random weights; the sentencepiece model is written to
    ``workdir/spiece.model``."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor, SiglipTokenizer

    sp_path = train_tiny_sentencepiece(Path(workdir) / "spiece.model")
    tokenizer = SiglipTokenizer(vocab_file=str(sp_path), model_max_length=64)
    config = SiglipConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
            pad_token_id=1,
            eos_token_id=1,
            bos_token_id=None,
        ),
        vision_config=dict(HF_TINY_VISION),
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SiglipModel(config)
        # SigLIP's own initialisation (Zhai et al. 2023): t' = log 10, b = -10 (transformers' random init is 0, 0).
        model.logit_scale.data.fill_(math.log(10.0))
        model.logit_bias.data.fill_(-10.0)
    image_processor = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return model.eval(), SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def save_hf(model, processor, directory: str | os.PathLike) -> Path:
    """``save_pretrained`` the model (safetensors) and processor into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


#: Output size of the tiny image-variation pipeline (UNet sample 16 x VAE factor 2).
TINY_SD_SIZE = 32


def build_tiny_image_variation_pipeline(seed: int = 0):
    """A ``StableDiffusionImageVariationPipeline`` with random tiny components (a two-block UNet
    and VAE, the tiny CLIP vision tower with a 16-d projection, the checkpoint's PNDM scheduler settings),
    no safety checker. It makes 32 x 32 images; 2 inference steps take a few milliseconds."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionImageVariationPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_SD_SIZE // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=TINY_SD_SIZE,
    )
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**HF_TINY_VISION, projection_dim=16))
    crop = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=crop)
    # lambdalabs/sd-image-variations-diffusers' scheduler_config.json (PNDM, scaled-linear betas)
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionImageVariationPipeline(
        vae=vae.eval(),
        image_encoder=encoder.eval(),
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=processor,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- an image tower alone
def tower_backbone(visual: torch.nn.Module):
    """A minimal stand-in backbone around an open_clip image tower alone, for code that only reads
    the tower (``SteppableViT``: ``.model.visual``, ``.device``, ``.autocast()``), e.g. a ViT-B/16-shaped
    tower (224 px, patch 16, 197 tokens) of tiny width, without building a text tower."""
    import types

    holder = torch.nn.Module()
    holder.visual = visual.eval()
    return types.SimpleNamespace(
        model=holder, device=torch.device("cpu"), autocast=lambda: torch.autocast("cpu", enabled=False)
    )


def vit_b16_shape():
    """The sizes of CLIP ViT-B/16 at 224 px (197 tokens, width 768, 12 blocks, output 512), for MAC counts."""
    from vlm_tta.models.steppable import ViTShape

    return ViTShape(width=768, layers=12, heads=12, mlp_width=3072, num_patches=196, patch_dim=768, output_dim=512)
