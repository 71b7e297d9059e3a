"""The `vlm-tta datasets` verb, driven through an argparse parser as cli.py will."""

from __future__ import annotations

import argparse
import io

from fake_datasets import make_coop

import vlm_tta.data as D
from vlm_tta.data.cli import add_parser


def _run(*argv):
    parser = argparse.ArgumentParser(prog="vlm-tta")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    code = args.func(args, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_list_is_the_default():
    code, out, _ = _run("datasets")
    assert code == 0
    for name in D.list_datasets():
        assert name in out
    assert "30,300" in out and "NAME" in out
    code2, out2, _ = _run("datasets", "list")
    assert out2 == out
    _, ood, _ = _run("datasets", "list", "--kind", "ood")
    assert "inaturalist" in ood and "caltech101" not in ood


def test_info():
    code, out, _ = _run("datasets", "info", "V")
    assert code == 0 and "imagenet_v2" in out and "numeric order" in out and "coop_imagenet" in out


def test_check_reports_counts_and_missing_files(tmp_path):
    base = make_coop(tmp_path, "dtd", [0, 46], per_class=2)
    victim = next((base / "images").glob("test_*/img_1.jpg"))
    victim.unlink()
    code, out, _ = _run("datasets", "check", "dtd", "--root", str(tmp_path))
    assert code == 1
    assert "1,692" in out and "47" in out and victim.name in out and "NOT OK" in out
    assert str(base / "split_zhou_DescribableTextures.json") in out


def test_check_ok_when_counts_match(tmp_path, monkeypatch):
    make_coop(tmp_path, "eurosat", list(range(10)), per_class=1)
    monkeypatch.setattr(D.get_reader("eurosat"), "split_sizes", {"test": 10})
    code, out, _ = _run("datasets", "check", "eurosat", "--root", str(tmp_path))
    assert code == 0 and out.rstrip().endswith("OK") and "NOT OK" not in out


def test_check_unknown_dataset_and_missing_root(tmp_path):
    code, _, err = _run("datasets", "check", "nope", "--root", str(tmp_path))
    assert code == 2 and "unknown dataset" in err
    code, out, _ = _run("datasets", "check", "A", "--root", str(tmp_path / "missing"))
    assert code == 1 and "does not exist" in out
    code, _, err = _run("datasets", "check", "A", "--root", str(tmp_path), "--split", "train")
    assert code == 2 and "no split" in err


def test_check_lists_everything_with_all(tmp_path):
    import shutil

    base = make_coop(tmp_path, "food101", list(range(30)), per_class=1)
    shutil.rmtree(base / "images")
    base.joinpath("images").mkdir()
    code, out, _ = _run("datasets", "check", "food101", "--root", str(tmp_path))
    assert "and 10 more" in out
    code, out_all, _ = _run("datasets", "check", "food101", "--root", str(tmp_path), "--all")
    assert "more" not in out_all.split("missing (30)")[1].split("\n\n")[0]


def test_wired_into_the_main_cli(capsys):
    import pytest

    cli = pytest.importorskip("vlm_tta.cli")
    if not hasattr(cli, "main"):
        pytest.skip("vlm_tta.cli has no main yet")
    assert cli.main(["datasets", "list"]) == 0
    assert "imagenet_v2" in capsys.readouterr().out
