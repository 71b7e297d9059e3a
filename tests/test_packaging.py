"""The installed package carries every prompt file and the console script."""

import shutil
from importlib import metadata, resources
from pathlib import Path

import pytest

REPO_PROMPTS = Path(__file__).resolve().parents[1] / "prompts"


def _installed_files(root) -> set[str]:
    out = set()
    stack = [(root, "")]
    while stack:
        node, prefix = stack.pop()
        for child in node.iterdir():
            rel = f"{prefix}{child.name}"
            if child.is_dir():
                if child.name != "__pycache__":
                    stack.append((child, rel + "/"))
            elif not child.name.endswith(".pyc"):
                out.add(rel)
    return out


def test_every_prompt_file_is_installed():
    if not REPO_PROMPTS.is_dir():
        pytest.skip("not running from a source checkout")
    repo = {
        str(p.relative_to(REPO_PROMPTS))
        for p in REPO_PROMPTS.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    installed = _installed_files(resources.files("vlm_tta.prompts"))
    missing = sorted(repo - installed)
    assert not missing, f"prompt files missing from the installed package: {missing[:10]}"
    assert {"templates/clip80.txt", "templates/single.txt", "templates/clip7.txt"} <= installed


def test_console_script_is_declared():
    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
    assert scripts.get("vlm-tta") == "vlm_tta.cli:main"


def test_console_script_runs():
    exe = shutil.which("vlm-tta")
    if exe is None:
        pytest.skip("vlm-tta is not on PATH in this environment")
    import subprocess

    out = subprocess.run([exe, "methods"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "zeroshot" in out.stdout


def test_every_suite_file_is_installed_and_parses():
    from vlm_tta.benchmark.suites import list_suites, load_suite

    repo_eval = REPO_PROMPTS.parent / "eval"
    names = list_suites()
    assert {"natural_shift", "cross_dataset", "difftpt_subsets", "ood_detection", "noisy_tta"} <= set(names)
    if repo_eval.is_dir():
        assert sorted(p.stem for p in repo_eval.glob("*.yaml")) == names
    for name in names:
        assert load_suite(name).datasets


def test_shipped_folders_are_found_from_a_source_checkout(monkeypatch):
    """Python started in the repository root imports the checkout's vlm_tta/, which has no
    vlm_tta.prompts or vlm_tta.eval subpackage: the folders beside vlm_tta/ must be read instead."""
    import vlm_tta
    from vlm_tta import _shipped
    from vlm_tta.benchmark.suites import list_suites
    from vlm_tta.templates import list_template_sets

    if Path(vlm_tta.__file__).resolve().parents[1] != REPO_PROMPTS.parent:
        pytest.skip("vlm_tta is imported from an installed wheel, not from this source checkout")

    def not_installed(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(_shipped.resources, "files", not_installed)
    assert _shipped.shipped_folder("prompts") == REPO_PROMPTS
    assert "natural_shift" in list_suites()
    assert {"clip80", "single"} <= set(list_template_sets())
