"""Parity of vlm_tta's TPT and DiffTPT with the authors' own code, on identical inputs.

A script, not a test: it needs the authors' repositories checked out OUTSIDE this repository
(azshue/TPT, Shu et al., NeurIPS 2022; chunmeifeng/DiffTPT, Feng et al., ICCV 2023), e.g.::

    git clone https://github.com/azshue/TPT /tmp/tpt_ref
    git clone https://github.com/chunmeifeng/DiffTPT /tmp/difftpt_ref
    python benchmarks/parity_tpt.py --ref-dir /tmp/tpt_ref --difftpt-ref-dir /tmp/difftpt_ref

What is compared, per case (seed x number of classes): a tiny random CLIP in OpenAI's state-dict format
(full 49,408-token vocabulary so that both BPE tokenizers give the same ids; 64-wide towers, as OpenAI's
``build_model`` reads ``heads = width // 64``; logit scale exp = 100) is loaded into the authors'
``clip/model.py`` ``build_model`` and into :meth:`vlm_tta.models.OpenClipModel.from_openai_state_dict`
(QuickGELU, as OpenAI's). Both get the same preprocessed views (random tensors): TPT ``1 x 64`` (the
original first), DiffTPT ``1 x 128`` (original, 64 conventional, 63 "generated"), the same class names
and ``ctx_init = "a photo of a"``. The reference side runs the authors' own ``ClipTestTimeTuning`` /
``PromptLearner`` / ``TextEncoder``, their ``test_time_tuning`` (TPT, ``selection_p 0.1``, ``tta_steps 1``)
or ``difftpt_utils.test_time_tuning_difftpt`` (``--selection_cosine 0.8 --selection_selfentro 0.3
--tta_steps 4``), with AdamW(lr 5e-3) reset from its saved state as in ``test_time_adapt_eval``, then the
original view's logits with the tuned prompt. Reported: the selected views (as sets; the reference's
``torch.argsort`` is unstable, so only the order may differ), max |logit difference| of the original
view's tuned logits, and whether the predictions agree. Ours runs twice: the default fast path and
``reference_compute=True``.

Patches applied to the authors' code at run time (nothing is copied into this repository):

1. ``clip.custom_clip.load`` is replaced by a function that runs their ``clip.model.build_model`` on
   our state dict, on CPU, in fp32 (their ``load`` downloads by name; with a state-dict file path it
   fails on ``model.state_dict()`` before assignment).
2. ``torch.cuda.amp.autocast`` -> a no-op context while the reference runs (fp32 on CPU; on a
   CPU-only machine torch disables it anyway).
3. ``GradScaler(init_scale=1000)`` is made with ``enabled=False`` (what torch does without CUDA):
   ``scaler.step`` is then a plain ``optimizer.step()``.
4. Observation only: ``select_confident_samples`` / ``select_confident_samples_cosine`` are wrapped to
   record the indices they return; their results are passed through unchanged.
5. ``--fp64`` only: their ``LayerNorm`` subclass (which casts its input to fp32) runs in float64.

``--fp64`` also runs both codes in float64 (ours through float64 copies of the tuning core,
:func:`fp64_tuning`). Float32 differences come from round-off that AdamW turns into different steps: its
first step is about ``lr * sign(g)`` per context number, so a number whose gradient is below the gradient's
float32 error moves differently, and DiffTPT's 4 steps compound it. If both codes then agree to 1e-9 with
the same selection, a float32 difference beyond the tolerance is round-off, not a difference in the maths
(the ``ok`` column). ``ref_fp32_vs_fp64`` shows the reference's own float32 error.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import math
import sys
import textwrap
import time
from argparse import Namespace
from copy import deepcopy
from pathlib import Path

import torch

import vlm_tta
import vlm_tta.methods.tpt as tpt_module
import vlm_tta.models.prompting as prompting_module
from vlm_tta.methods import create_method
from vlm_tta.methods.difftpt import select_views
from vlm_tta.methods.tpt import PromptTuner
from vlm_tta.models import OpenClipModel

FP64_TOLERANCE = 1e-9
REF_MODULES = ("clip", "data", "utils", "tpt_classification", "difftpt_utils")
IMAGE_SIZE = 32
TINY_OPENAI_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": 8, "width": 64, "layers": 2, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
}


# --------------------------------------------------------------------------- inputs
def tiny_openai_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """An OpenAI-format CLIP state dict (open_clip's CLIP uses OpenAI's key names) with seeded random
    weights, the full BPE vocabulary and logit scale exp = 100 (OpenAI's trained value)."""
    from vlm_tta.models import load_model

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        src = load_model(TINY_OPENAI_CONFIG, pretrained=None)
    sd = {k: v.detach().clone().float() for k, v in src.model.state_dict().items()}
    sd["logit_scale"] = torch.tensor(math.log(100.0))
    return sd


def class_names(n: int) -> list[str]:
    from vlm_tta.data.resources import imagenet_classnames

    names = imagenet_classnames()
    step = max(1, len(names) // n)
    return [names[i * step] for i in range(n)]  # spread over the list: names of many token lengths


def random_views(n_views: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n_views, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)


# --------------------------------------------------------------------------- the authors' code
def _purge_reference_modules() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in REF_MODULES:
            del sys.modules[name]


@contextlib.contextmanager
def reference_import(ref_dir: Path):
    """Import the authors' top-level packages from ``ref_dir`` (and forget them afterwards)."""
    _purge_reference_modules()
    sys.path.insert(0, str(ref_dir))
    try:
        yield
    finally:
        sys.path.remove(str(ref_dir))
        _purge_reference_modules()


@contextlib.contextmanager
def no_cuda_autocast():
    saved = torch.cuda.amp.autocast
    torch.cuda.amp.autocast = lambda *a, **k: contextlib.nullcontext()  # patch 2
    try:
        yield
    finally:
        torch.cuda.amp.autocast = saved


def _reference_model(sd: dict, names: list[str], dtype: torch.dtype = torch.float32):
    """The authors' ClipTestTimeTuning (their main_worker's set-up, non-CoOp branch), in ``dtype``."""
    custom_clip = importlib.import_module("clip.custom_clip")
    clip_model = importlib.import_module("clip.model")
    if dtype == torch.float64:  # patch 5 (fp64 only): their LayerNorm casts its input to fp32
        clip_model.LayerNorm.forward = lambda self, x: torch.nn.LayerNorm.forward(self, x)

    def load(name, device="cpu", jit=False, download_root=None):  # patch 1
        model = clip_model.build_model({k: v.clone() for k, v in sd.items()}).to("cpu", dtype)
        return model, sd["text_projection"].shape[1], None

    custom_clip.load = load
    with contextlib.redirect_stdout(io.StringIO()):
        model = custom_clip.ClipTestTimeTuning("cpu", names, None, arch="tiny", n_ctx=4, ctx_init="a_photo_of_a")
        for name, param in model.named_parameters():
            if "prompt_learner" not in name:
                param.requires_grad_(False)
        model.reset_classnames(names, "tiny")
    return model


def run_reference(
    ref_dir: Path,
    kind: str,
    sd: dict,
    names: list[str],
    views: torch.Tensor,
    steps: int,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """One image through the authors' code: selected pool indices, the original view's tuned logits,
    the tuned context."""
    views = views.to(dtype)
    with reference_import(ref_dir), no_cuda_autocast():
        model = _reference_model(sd, names, dtype)
        recorded: dict = {}
        if kind == "tpt":
            module = importlib.import_module("tpt_classification")
            original_select = module.select_confident_samples

            def select(logits, top):  # patch 4 (observation)
                out, idx = original_select(logits, top)
                recorded["selected"] = idx.clone()
                return out, idx

            module.select_confident_samples = select
            tune = module.test_time_tuning
            args = Namespace(cocoop=False, tta_steps=steps, selection_p=0.1, lr=5e-3)
        else:
            module = importlib.import_module("difftpt_utils")
            original_cos = module.select_confident_samples_cosine

            def select(logits, selection_cosine, selection_selfentro):  # patch 4 (observation)
                out, (idx_cos, idx), dist = original_cos(logits, selection_cosine, selection_selfentro)
                kept = torch.cat([torch.zeros(1, dtype=idx_cos.dtype), idx_cos])
                recorded["selected"] = kept[idx].clone()
                return out, [idx_cos, idx], dist

            module.select_confident_samples_cosine = select
            tune = module.test_time_tuning_difftpt
            args = Namespace(cocoop=False, tta_steps=steps, selection_cosine=0.8, selection_selfentro=0.3, lr=5e-3)
        optimizer = torch.optim.AdamW(model.prompt_learner.parameters(), args.lr)
        optim_state = deepcopy(optimizer.state_dict())
        scaler = torch.cuda.amp.GradScaler(init_scale=1000, enabled=False)  # patch 3
        images = views[0]  # V x 3 x H x W, view 0 the original (their torch.cat(images) of [orig, aug...])
        model.eval()
        with torch.no_grad():
            model.reset()
            zero_shot = model(images[:1])
        optimizer.load_state_dict(optim_state)
        tune(model, images, optimizer, scaler, args)
        with torch.no_grad():
            logits = model(images[:1])
    return {
        "selected": recorded["selected"],
        "logits": logits[0].double(),
        "zero_shot": zero_shot[0].double(),
        "ctx": model.prompt_learner.ctx.detach().double(),
    }


# --------------------------------------------------------------------------- ours
def run_ours(kind: str, sd: dict, names: list[str], views: torch.Tensor, steps: int, reference_compute: bool) -> dict:
    model = OpenClipModel.from_openai_state_dict({k: v.clone() for k, v in sd.items()}, quick_gelu=True)
    selected: list[torch.Tensor] = []
    original_tune = PromptTuner.tune

    def tune(self, *a, **k):
        result = original_tune(self, *a, **k)
        selected.append(result)
        return result

    opts = dict(tta_steps=steps, reference_compute=reference_compute)
    if kind == "tpt":
        opts["n_views"] = views.shape[1]
    method = create_method(kind, **opts)
    PromptTuner.tune = tune
    try:
        res = vlm_tta.classify(views, names, method=method, model=model, cache=False, progress=False)
    finally:
        PromptTuner.tune = original_tune
    chosen = selected[-1].selected[0].cpu()
    if kind == "difftpt":  # what DiffTPT exposes for comparisons: the pool indices of the loss's views
        assert torch.equal(method.last_selected[0].cpu(), chosen)
    return {
        "selected": chosen,
        "logits": torch.as_tensor(res.logits[0]).double(),
        "ctx": selected[-1].ctx[0].cpu().double(),
    }


@contextlib.contextmanager
def fp64_tuning():
    """Diagnostic only: float64 copies of PromptTuner.tune / PromptTuner.text_features /
    PromptLearner.text_features (their source with float32 -> float64), restored afterwards. vlm_tta computes
    in float32 by design; this shows whether a float32 difference is round-off or a difference in the maths."""
    swaps = [
        (tpt_module.PromptTuner, "tune", tpt_module, False),
        (tpt_module.PromptTuner, "text_features", tpt_module, True),
        (prompting_module.PromptLearner, "text_features", prompting_module, False),
    ]
    saved = [(cls, name, cls.__dict__[name]) for cls, name, _, _ in swaps]
    try:
        for cls, name, module, no_grad in swaps:
            src = textwrap.dedent(inspect.getsource(cls.__dict__[name]))
            src = src.replace("@torch.no_grad()\n", "").replace("torch.float32", "torch.float64")
            namespace = dict(vars(module))
            exec(src.replace(".float()", ".double()"), namespace)
            setattr(cls, name, torch.no_grad()(namespace[name]) if no_grad else namespace[name])
        yield
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)


def run_ours_fp64(kind: str, sd: dict, names: list[str], views: torch.Tensor, steps: int, fast: bool) -> dict:
    """Ours in float64 (see :func:`fp64_tuning`): the tuning core on the model's fp64 view embeddings."""
    model = OpenClipModel.from_openai_state_dict({k: v.clone() for k, v in sd.items()}, quick_gelu=True)
    model.model.double()
    with fp64_tuning():
        learner = prompting_module.PromptLearner(model, names, truncate=fast, share_prefix=fast)
        learner.ctx_init = learner.ctx_init.double()
        with torch.no_grad():
            feats = torch.nn.functional.normalize(model.model.encode_image(views[0].double()), dim=-1)[None]
        select = None if kind == "tpt" else (lambda logits: select_views(logits).selected)
        scale = float(model.model.logit_scale.detach().double().exp())
        result = PromptTuner(learner, scale, steps=steps, select=select).tune(feats)
    return {"selected": result.selected[0], "logits": result.logits[0], "ctx": result.ctx[0]}


# --------------------------------------------------------------------------- the comparison
def compare(ref: dict, ours: dict, tolerance: float, ref64: dict | None = None, ours64: dict | None = None) -> dict:
    ctx_diff = (ref["ctx"] - ours["ctx"]).abs()
    row = {
        "k": int(len(ref["selected"])),
        "same_selection": sorted(ref["selected"].tolist()) == sorted(ours["selected"].tolist()),
        "same_order": ref["selected"].tolist() == ours["selected"].tolist(),
        "max_abs_logit_diff": float((ref["logits"] - ours["logits"]).abs().max()),
        "same_prediction": int(ref["logits"].argmax()) == int(ours["logits"].argmax()),
        "ref_prediction": int(ref["logits"].argmax()),
        # how far the reference's adaptation moved the logits (the size of what is being compared)
        "ref_adaptation_shift": float((ref["logits"] - ref["zero_shot"]).abs().max()),
        "max_abs_ctx_diff": float(ctx_diff.max()),
        # context numbers that moved differently by more than 1e-3 (a 5e-3 AdamW step of another sign or size)
        "ctx_coords_off": int((ctx_diff > 1e-3).sum()),
    }
    row["within_tolerance"] = row["max_abs_logit_diff"] <= tolerance
    if ref64 is not None:
        row["ref_fp32_vs_fp64"] = float((ref["logits"] - ref64["logits"]).abs().max())
        row["ours_vs_ref_fp64"] = float((ours["logits"] - ref64["logits"]).abs().max())
        row["ref_fp64_same_selection"] = sorted(ref64["selected"].tolist()) == sorted(ref["selected"].tolist())
    if ours64 is not None and ref64 is not None:
        # both codes in float64: the same maths gives ~1e-13 here, whatever the float32 round-off
        row["fp64_logit_diff"] = float((ours64["logits"] - ref64["logits"]).abs().max())
        row["fp64_same_selection"] = sorted(ours64["selected"].tolist()) == sorted(ref64["selected"].tolist())
        row["fp64_same_maths"] = row["fp64_same_selection"] and row["fp64_logit_diff"] <= FP64_TOLERANCE
    row["ok"] = (
        row["same_selection"] and row["same_prediction"] and (row["within_tolerance"] or row.get("fp64_same_maths"))
    )
    return row


def run_cases(args) -> list[dict]:
    rows = []
    plans = [("tpt", args.ref_dir, 64, args.tpt_steps)]
    if args.difftpt_ref_dir is not None:
        plans.append(("difftpt", args.difftpt_ref_dir, 128, args.difftpt_steps))
    for kind, ref_dir, n_views, steps in plans:
        for n_classes in args.classes:
            for seed in args.seeds:
                sd = tiny_openai_state_dict(seed)
                names = class_names(n_classes)
                views = random_views(n_views, 1000 + seed)
                t0 = time.perf_counter()
                ref = run_reference(Path(ref_dir), kind, sd, names, views, steps)
                ref64 = (
                    run_reference(Path(ref_dir), kind, sd, names, views, steps, torch.float64) if args.fp64 else None
                )
                for variant, rc in (("fast", False), ("reference_compute", True)):
                    ours = run_ours(kind, sd, names, views, steps, rc)
                    ours64 = run_ours_fp64(kind, sd, names, views, steps, not rc) if args.fp64 else None
                    row = {"method": kind, "classes": n_classes, "seed": seed, "ours": variant, "steps": steps}
                    row.update(compare(ref, ours, args.tolerance, ref64, ours64))
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
                rows[-1]["seconds"] = round(time.perf_counter() - t0, 1)
    return rows


FLOAT_COLUMNS = (
    "max_abs_logit_diff",
    "ref_adaptation_shift",
    "max_abs_ctx_diff",
    "ref_fp32_vs_fp64",
    "ours_vs_ref_fp64",
    "fp64_logit_diff",
)


def markdown(rows: list[dict]) -> str:
    cols = ["method", "classes", "seed", "ours", "steps", "k", "same_selection", "same_order", "same_prediction",
            "max_abs_logit_diff", "ref_adaptation_shift", "max_abs_ctx_diff", "ctx_coords_off", "ref_fp32_vs_fp64",
            "ours_vs_ref_fp64", "fp64_logit_diff", "ok"]  # fmt: skip
    cols = [c for c in cols if c in rows[0]]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:.2e}" if c in FLOAT_COLUMNS else str(r[c]) for c in cols]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref-dir", required=True, help="azshue/TPT checked out outside this repository")
    p.add_argument("--difftpt-ref-dir", default=None, help="chunmeifeng/DiffTPT checked out outside this repository")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--classes", type=int, nargs="+", default=[5, 50])
    p.add_argument("--tpt-steps", type=int, default=1)
    p.add_argument("--difftpt-steps", type=int, default=4)
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--format", choices=("markdown", "json"), default="markdown")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--fp64",
        action="store_true",
        help="also run both codes in float64 (the reference with patch 5, ours through fp64_tuning): the same maths "
        "agrees there to ~1e-13, so a float32 difference beyond --tolerance with fp64_same_maths is round-off",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for d in filter(None, (args.ref_dir, args.difftpt_ref_dir)):
        if Path(d).resolve().is_relative_to(Path(__file__).resolve().parents[1]):
            p.error(f"{d}: keep the authors' code outside this repository")
    rows = run_cases(args)
    ok = all(r["ok"] for r in rows)
    strict = all(r["within_tolerance"] for r in rows)
    if args.format == "json":
        summary = {"all_ok": ok, "all_within_tolerance": strict, "tolerance": args.tolerance}
        print(json.dumps({"rows": rows, **summary}, indent=1))
    else:
        print(markdown(rows))
        same = all(r["same_selection"] and r["same_prediction"] for r in rows)
        print(f"\nsame selections and predictions in every case: {same}")
        print(f"every logit difference within {args.tolerance:g}: {strict}")
        print(
            f"every case ok (same selection and prediction; within {args.tolerance:g}, or --fp64: fp64 logits within "
            f"{FP64_TOLERANCE:g}): {ok}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
