"""`import vlm_tta`, the cache module and the light `vlm-tta` verbs must not import torch: they run
in a fraction of a second instead of the seconds torch takes to load. Each check runs in a fresh
interpreter (this test process has torch loaded already)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "torchvision", "open_clip", "transformers", "diffusers")


def _run(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it leaves its result in ``out`` (a dict)."""
    script = (
        "import json, sys\nout = {}\n"
        + code
        + f"\nout['heavy'] = sorted(m for m in {HEAVY!r} if m in sys.modules)\nprint(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_package_cache_and_cli_is_light():
    out = _run(
        "import vlm_tta, vlm_tta.cache, vlm_tta.cli, vlm_tta.templates, vlm_tta.errors, vlm_tta.validation\n"
        "out['version'] = vlm_tta.__version__\n"
        "out['dir'] = dir(vlm_tta)"
    )
    assert out["heavy"] == []
    assert out["version"]
    assert {"classify", "classify_features", "load_model", "EmbeddingCache", "list_methods"} <= set(out["dir"])


@pytest.mark.parametrize(
    "argv",
    [
        ["cache", "info", "--json"],
        ["cache", "clear"],  # without --yes: says what it would delete
        ["templates"],
        ["datasets"],
        ["datasets", "info", "imagenet_a"],
    ],
)
def test_light_cli_verbs_do_not_import_torch(argv, tmp_path):
    if argv[0] == "cache":
        argv = argv + ["--cache-dir", str(tmp_path)]
    out = _run(
        "import contextlib, io\n"
        "from vlm_tta.cli import main\n"
        "buf = io.StringIO()\n"
        f"with contextlib.redirect_stdout(buf):\n    out['rc'] = main({argv!r})\n"
        "out['stdout'] = buf.getvalue()"
    )
    assert out["heavy"] == [], out
    assert out["rc"] in (0, 1) and out["stdout"].strip()  # clear without --yes exits 1 and explains


def test_light_public_names_stay_light():
    out = _run(
        "import vlm_tta\n"
        "from vlm_tta import EmbeddingCache, VlmTtaError, get_templates\n"
        "import vlm_tta.cache as cache\n"
        "out['same'] = EmbeddingCache is cache.EmbeddingCache and vlm_tta.get_templates is get_templates\n"
        "out['templates'] = get_templates('single')"
    )
    assert out["heavy"] == [] and out["same"] and out["templates"] == ["a photo of a {}."]


def test_public_names_resolve_on_first_use():
    """In this process (torch is loaded already): every public name, and the submodules, resolve."""
    import vlm_tta
    import vlm_tta.api
    from vlm_tta import classify, load_model

    assert classify is vlm_tta.api.classify and vlm_tta.classify is classify
    assert vlm_tta.models.load_model is load_model  # a submodule by attribute access, as before
    assert all(getattr(vlm_tta, name) is not None for name in vlm_tta.__all__)
    assert set(vlm_tta.__all__) <= set(dir(vlm_tta))
    assert set(vlm_tta.__all__) == set(vlm_tta._EXPORTS) | {"__version__"}  # the two lists agree
    with pytest.raises(AttributeError, match="no_such_name"):
        vlm_tta.no_such_name  # noqa: B018
