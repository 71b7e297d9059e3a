"""The benchmark runner end to end on tiny fake datasets in their real layouts and a tiny model:
suites, resumable rows, shards, OOD and noisy-TTA protocols, the cache across runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from bench_worker import tiny_suite  # (also registers the test methods _running and _slow)

from vlm_tta.benchmark.results import ResultStore
from vlm_tta.benchmark.runner import BenchmarkError, Runner, parse_methods
from vlm_tta.benchmark.suites import SuiteError, load_suite, parse_suite
from vlm_tta.cli import main
from vlm_tta.features import encoder_call_counter

WORKER = Path(__file__).parent / "bench_worker.py"


def write_suite(path: Path, **overrides) -> Path:
    suite = tiny_suite(**overrides)
    path.write_text(yaml.safe_dump(suite))
    return path


def table(out: Path) -> list[tuple]:
    """The comparable content of a run folder: one tuple per row, sorted."""
    return sorted(
        (r["dataset"], r.get("ood") or r.get("noisy") or "", r["method_label"], r["seed"], r["n_images"],
         round(r.get("top1") or 0, 6), round(r.get("auroc") or 0, 6), round(r.get("acc_h") or 0, 6))
        for r in ResultStore(out).rows()
    )  # fmt: skip


def bench_args(suite, data_root, out, cfg_file, *extra):
    return ["bench", "--suite", str(suite), "--data-root", str(data_root), "--out", str(out), "--model", cfg_file,
            "--pretrained", "none", "--no-progress", *extra]  # fmt: skip


# --------------------------------------------------------------------------- suites
def test_built_in_suites_parse_and_name_their_protocols():
    ns = load_suite("natural_shift")
    assert ns.protocol == "classification" and ns.dataset_names[0] == "imagenet" and len(ns.datasets) == 5
    assert {d.views for d in ns.datasets} == {"crop_flip"} and {d.templates for d in ns.datasets} == {"single"}
    cd = load_suite("cross_dataset")
    assert len(cd.datasets) == 10 and {d.views for d in cd.datasets} == {"augmix"}
    sub = load_suite("difftpt_subsets")
    assert sub.subset == {"size": 1000, "seed": 0} and len(sub.datasets) == 15
    assert load_suite("ood_detection").ood == ("inaturalist", "sun", "places", "textures")
    assert load_suite("noisy_tta").protocol == "ntta"


def test_suite_views_and_presets_reach_the_methods_that_take_them():
    from vlm_tta.benchmark.runner import options_for

    ns, cd = load_suite("natural_shift"), load_suite("cross_dataset")
    (tpt, dmn, zero, difftpt) = parse_methods("tpt,dmn,zero,difftpt")
    assert options_for(tpt, ns.datasets[1]) == {"view_recipe": "crop_flip", "preset": "imagenet_a"}
    assert options_for(difftpt, cd.datasets[0])["view_recipe"] == "augmix"
    assert options_for(parse_methods("tpt[view_recipe=augmix]")[0], ns.datasets[0])["view_recipe"] == "augmix"
    assert "view_recipe" not in options_for(dmn, ns.datasets[0])  # DMN keeps its own (crop_flip_dmn) views
    assert options_for(zero, ns.datasets[0]) == {}


def test_bad_suites_are_reported(tmp_path):
    with pytest.raises(SuiteError, match="unknown suite 'natural_shfit'.*natural_shift"):
        load_suite("natural_shfit")
    for raw, msg in (
        ({"datasets": ["eurosat"], "protocl": "x"}, "unknown key"),
        ({"datasets": []}, "at least one dataset"),
        ({"datasets": ["no_such_set"]}, "unknown dataset"),
        ({"datasets": ["eurosat"], "protocol": "ood"}, "lists its OOD sets"),
        ({"datasets": ["eurosat"], "seeds": ["a"]}, "list of int"),
    ):
        with pytest.raises(SuiteError, match=msg):
            parse_suite(raw)


def test_method_specs():
    specs = parse_methods("zeroshot,zeroshot[score=mcm;mcm_temperature=2],_running", {"_running": {"weight": "1"}})
    assert [s.label for s in specs] == ["zeroshot", "zeroshot[mcm_temperature=2.0;score=mcm]", "_running[weight=1.0]"]
    with pytest.raises(Exception, match="unknown method"):
        parse_methods("nope")
    with pytest.raises(Exception, match="expects float"):
        parse_methods("zeroshot[mcm_temperature=hot]")
    with pytest.raises(BenchmarkError, match="not in the run"):
        parse_methods("zeroshot", {"tda": {"alpha": "1"}})


# --------------------------------------------------------------------------- runs
def test_a_suite_runs_end_to_end_through_the_cli(tmp_path, data_root, cfg_file, capsys):
    suite = write_suite(tmp_path / "tiny.yaml")
    assert main(bench_args(suite, data_root, tmp_path / "run", cfg_file)) == 0
    err = capsys.readouterr().err
    rows = ResultStore(tmp_path / "run").rows()
    # zeroshot is episodic: one row per dataset; _running is online: one row per dataset and seed
    assert sorted((r["dataset"], r["method"], r["seed"]) for r in rows) == [
        ("eurosat", "_running", 0), ("eurosat", "_running", 1), ("eurosat", "zeroshot", None),
        ("oxford_pets", "_running", 0), ("oxford_pets", "_running", 1), ("oxford_pets", "zeroshot", None),
    ]  # fmt: skip
    row = next(r for r in rows if r["method"] == "zeroshot" and r["dataset"] == "eurosat")
    assert row["n_images"] == 9 and 0 <= row["top1"] <= 1 and 0 <= row["ece"] <= 1
    assert row["prompts"] and row["config"]["versions"]["torch"] and row["seconds_per_image"] > 0
    assert row["peak_memory_mb"] > 0 and row["memory_kind"] == "process_peak_rss"
    assert err.count("done: ") == 6 and "6 row(s) written" in err
    arrays = ResultStore(tmp_path / "run").arrays(row["job_id"])
    assert arrays["labels"].shape == (9,) and (arrays["pred"] == arrays["logits"].astype(np.float32).argmax(1)).all()
    # the online method's two seeds saw two orders
    running = [r for r in rows if r["method"] == "_running" and r["dataset"] == "eurosat"]
    a, b = (ResultStore(tmp_path / "run").arrays(r["job_id"])["index"] for r in running)
    assert sorted(a) == sorted(b) and list(a) != list(b)
    # a second run finds everything done
    assert main(bench_args(suite, data_root, tmp_path / "run", cfg_file)) == 0
    assert "0 row(s) written, 6 already done" in capsys.readouterr().err


def test_eval_entry_script_runs_the_same(tmp_path, data_root, cfg_file):
    suite = write_suite(tmp_path / "s.yaml", seeds=[0], datasets=["eurosat"], methods=["zeroshot"])
    script = Path(__file__).resolve().parents[1] / "eval" / "natural_shift.py"
    if not script.is_file():
        pytest.skip("not running from a source checkout")
    # the script fixes --suite natural_shift; a later --suite on the command line overrides it
    proc = subprocess.run(
        [sys.executable, str(script), *bench_args(suite, data_root, tmp_path / "run", cfg_file)[1:]],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert len(ResultStore(tmp_path / "run").rows()) == 1


def test_missing_datasets_are_named_before_any_work(tmp_path, data_root, cfg_file, capsys):
    suite = write_suite(tmp_path / "s.yaml", datasets=["eurosat", "dtd", "food101"], methods=["zeroshot"])
    assert main(bench_args(suite, data_root, tmp_path / "run", cfg_file)) == 2
    err = capsys.readouterr().err
    assert "2 dataset(s)" in err and "- dtd:" in err and "- food101:" in err and "--skip-missing" in err
    assert not (tmp_path / "run" / "rows").exists()
    assert main(bench_args(suite, data_root, tmp_path / "run", cfg_file, "--skip-missing")) == 0
    assert [r["dataset"] for r in ResultStore(tmp_path / "run").rows()] == ["eurosat"]


def test_killed_run_resumes_to_the_same_table(tmp_path, data_root, cfg_file):
    suite = write_suite(tmp_path / "s.yaml", methods=["_slow"], seeds=[0, 1, 2])
    args = [*bench_args(suite, data_root, tmp_path / "killed", cfg_file), "-o", "_slow.delay=0.15"]
    proc = subprocess.Popen([sys.executable, str(WORKER), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rows_dir = tmp_path / "killed" / "rows"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(rows_dir.glob("*.json"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # in the middle of the next pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(list(rows_dir.glob("*.json")))
    assert 0 < partial < 6, "the run must be killed in the middle"
    assert not list(rows_dir.glob("*.tmp")) or all(p.name.startswith(".") for p in rows_dir.iterdir())
    resumed = subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{6 - partial} row(s) written, {partial} already done" in resumed.stderr
    straight = subprocess.run(
        [sys.executable, str(WORKER), *bench_args(suite, data_root, tmp_path / "straight", cfg_file), "-o",
         "_slow.delay=0"], capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert straight.returncode == 0, straight.stderr
    rows = [r for r in table(tmp_path / "killed")]
    assert len(rows) == 6 and len({r["job_id"] for r in ResultStore(tmp_path / "killed").rows()}) == 6
    strip = lambda t: [x[:2] + x[3:] for x in t]  # noqa: E731  (same rows; only the delay option differs)
    assert strip(rows) == strip(table(tmp_path / "straight"))


def test_two_shards_into_one_folder_equal_one_process(tmp_path, data_root, cfg_file):
    suite = write_suite(tmp_path / "s.yaml")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                *bench_args(suite, data_root, tmp_path / "sharded", cfg_file, "--shard", f"{i}/2"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for i in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read().decode()
    assert main(bench_args(suite, data_root, tmp_path / "single", cfg_file)) == 0
    assert table(tmp_path / "sharded") == table(tmp_path / "single") and len(table(tmp_path / "single")) == 6


def test_adding_a_method_reads_every_embedding_from_the_cache(tmp_path, data_root, cfg_file):
    from vlm_tta.models import load_model

    suite = load_suite(write_suite(tmp_path / "s.yaml", seeds=[0]))
    model = load_model(cfg_file, pretrained=None)
    cache = tmp_path / "cache"
    Runner(suite, parse_methods("zeroshot"), model, data_root, tmp_path / "run", cache=cache, log=lambda _: None).run()
    calls = encoder_call_counter(model)
    counts = Runner(
        suite, parse_methods("zeroshot,_running,zeroshot[score=mcm]"), model, data_root, tmp_path / "run",
        cache=cache, log=lambda _: None,
    ).run()  # fmt: skip
    assert counts["ran"] == 4 and counts["already_done"] == 2
    assert calls() == {"images": 0, "texts": 0}


def test_tpt_runs_in_a_suite_on_the_suite_s_views(tmp_path, data_root, cfg_file):
    """A model-level method through the runner: TPT on eurosat with the suite's AugMix views, then a
    second run of the same job on the warm cache encodes no image."""
    from vlm_tta.models import load_model

    suite = load_suite(
        write_suite(tmp_path / "s.yaml", datasets=[{"name": "eurosat", "views": "augmix"}], seeds=[0], methods=[])
    )
    model = load_model(cfg_file, pretrained=None)
    spec = parse_methods("tpt[n_views=10]")
    Runner(suite, spec, model, data_root, tmp_path / "a", cache=tmp_path / "c", log=lambda _: None).run()
    (row,) = ResultStore(tmp_path / "a").rows()
    assert (
        row["method"] == "tpt" and row["n_images"] == 9 and row["config"]["method_options"]["view_recipe"] == "augmix"
    )
    calls = encoder_call_counter(model)
    Runner(suite, spec, model, data_root, tmp_path / "b", cache=tmp_path / "c", log=lambda _: None).run()
    assert calls()["images"] == 0
    again = ResultStore(tmp_path / "b")
    np.testing.assert_allclose(again.arrays(again.rows()[0]["job_id"])["logits"],
                               ResultStore(tmp_path / "a").arrays(row["job_id"])["logits"], atol=1e-5)  # fmt: skip


def test_limit_takes_the_same_images_for_every_seed(tmp_path, data_root, cfg_file):
    suite = write_suite(tmp_path / "s.yaml", datasets=["eurosat"], methods=["_running"], seeds=[0, 1])
    assert main(bench_args(suite, data_root, tmp_path / "run", cfg_file, "--limit", "4")) == 0
    store = ResultStore(tmp_path / "run")
    rows = store.rows()
    assert [r["n_images"] for r in rows] == [4, 4] and all(r["limit"] == 4 for r in rows)
    a, b = (store.arrays(r["job_id"]) for r in rows)
    assert sorted(a["labels"]) == sorted(b["labels"])


# --------------------------------------------------------------------------- protocols
def test_ood_protocol(tmp_path, data_root, cfg_file):
    suite = write_suite(
        tmp_path / "ood.yaml", protocol="ood", datasets=["eurosat"], ood=["textures"], seeds=[0],
        methods=["zeroshot[score=msp]", "zeroshot[score=mcm]", "zeroshot[score=none]"],
    )  # fmt: skip
    args = bench_args(suite, data_root, tmp_path / "ood", cfg_file)
    assert main(["ood", *args[1:]]) == 0
    rows = {r["method_label"]: r for r in ResultStore(tmp_path / "ood").rows()}
    for label in ("zeroshot[score=msp]", "zeroshot[score=mcm]"):
        r = rows[label]
        assert r["ood"] == "textures" and 0 <= r["auroc"] <= 1 and 0 <= r["fpr95"] <= 1 and 0 <= r["aupr"] <= 1
        assert r["n_images"] == 9 + 9 and r["id_top1"] == r["top1"]
    assert "no score" in rows["zeroshot[score=none]"]["note"]
    # the verb refuses a suite of another protocol
    assert main(["ood", *bench_args(write_suite(tmp_path / "c.yaml"), data_root, tmp_path / "x", cfg_file)[1:]]) == 2


def test_noisy_tta_protocol(tmp_path, data_root, cfg_file):
    suite = write_suite(
        tmp_path / "ntta.yaml", protocol="ntta", datasets=["eurosat"], noisy=["textures"], seeds=[0],
        methods=["zeroshot"],
    )  # fmt: skip
    args = bench_args(suite, data_root, tmp_path / "ntta", cfg_file, "--noisy-fractions", "0,0.5")
    assert main(["ntta", *args[1:]]) == 0
    rows = {r["noisy_fraction"]: r for r in ResultStore(tmp_path / "ntta").rows()}
    assert set(rows) == {0.0, 0.5}
    r = rows[0.5]
    assert r["noise_rule"] == "zs_ntta_otsu" and 0 <= r["acc_s"] <= 1 and 0 <= r["acc_n"] <= 1
    assert r["acc_h"] == pytest.approx(2 * r["acc_s"] * r["acc_n"] / (r["acc_s"] + r["acc_n"]))
    assert rows[0.0]["acc_n"] is None and rows[0.0]["n_images"] == 9


def test_bad_runner_arguments(tmp_path, data_root, cfg_file, capsys):
    suite = write_suite(tmp_path / "s.yaml")
    for extra, msg in ((["--shard", "2/2"], "--shard"), (["--limit", "0"], "--limit"), (["--seeds", "a"], "--seeds")):
        assert main(bench_args(suite, data_root, tmp_path / "r", cfg_file, *extra)) == 2
        assert msg in capsys.readouterr().err
    assert main(bench_args(tmp_path / "nope.yaml", data_root, tmp_path / "r", cfg_file)) == 2
    assert "suite file not found" in capsys.readouterr().err
    assert os.path.exists(tmp_path / "r") is False
