"""Prompt template sets shipped in prompts/templates."""

import pytest

from vlm_tta.errors import TemplateError
from vlm_tta.templates import get_templates, list_template_sets, template_set_id


def test_builtin_sets():
    assert get_templates("single") == ["a photo of a {}."]
    clip80 = get_templates("clip80")
    assert len(clip80) == 80 and len(set(clip80)) == 80
    assert clip80[0] == "a bad photo of a {}." and "itap of a {}." in clip80
    clip7 = get_templates("clip7")
    assert len(clip7) == 7 and set(clip7) <= set(clip80)
    assert {"single", "clip80", "clip7"} <= set(list_template_sets())
    assert get_templates(None) == ["a photo of a {}."]


def test_every_shipped_set_is_valid():
    for name in list_template_sets():
        temps = get_templates(name)
        assert temps and all(t.count("{}") == 1 for t in temps), name


def test_lists_files_and_single_strings(tmp_path):
    assert get_templates(["a {}.", "the {}!"]) == ["a {}.", "the {}!"]
    assert get_templates("a sketch of a {}.") == ["a sketch of a {}."]
    f = tmp_path / "mine.txt"
    f.write_text("a {} here.\n\n  a {} there.  \n")
    assert get_templates(str(f)) == ["a {} here.", "a {} there."]
    assert template_set_id("clip80") == "clip80" and template_set_id(["a {}"]) == "custom[1]"


@pytest.mark.parametrize("bad", [["a photo"], ["{} and {}"], [], [3]])
def test_bad_templates(bad):
    with pytest.raises(TemplateError):
        get_templates(bad)


def test_unknown_set_suggests():
    with pytest.raises(TemplateError, match="clip80"):
        get_templates("clip81")
    with pytest.raises(TemplateError, match="not found"):
        get_templates("/no/such/templates.txt")
