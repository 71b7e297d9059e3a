"""Reports: paper-shaped tables with the published numbers, mean +/- std over seeds, CSV, plots
and the HTML page, from hand-made rows and from a real run."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from vlm_tta.benchmark.report import build_tables, paper_rows, published, table_grid
from vlm_tta.benchmark.results import ResultStore, job_id
from vlm_tta.cli import main

NS = ["imagenet", "imagenet_a", "imagenet_v2", "imagenet_r", "imagenet_sketch"]


def add_row(store: ResultStore, **fields) -> dict:
    row = {
        "suite": "natural_shift",
        "protocol": "classification",
        "dataset": "imagenet",
        "method": "zeroshot",
        "method_label": "zeroshot",
        "options": {},
        "seed": None,
        "model": "open_clip:ViT-B-16@openai",
        "prompts": "single",
        "n_images": 10,
        "top1": 0.5,
        "seconds_per_image": 0.01,
        "subset": None,
    }
    row.update(fields)
    row["job_id"] = job_id({k: row[k] for k in ("suite", "dataset", "method_label", "seed", "model", "prompts")}
                           | {"extra": fields.get("ood") or fields.get("noisy_fraction")})  # fmt: skip
    arrays = None
    if row["protocol"] == "ood":
        rng = np.random.default_rng(0)
        labels = np.array([0] * 20 + [-1] * 20)
        arrays = {"labels": labels, "scores": np.where(labels >= 0, 1.0, 0.0) + rng.normal(0, 0.8, 40)}
    store.write(row, arrays)
    return row


def test_published_numbers_are_well_formed():
    pub = published()
    for entry in pub["top1"]:
        assert len(entry["values"]) == len(pub["columns"][entry["table"]]), entry
        assert entry["source"] and isinstance(entry["verified"], bool)
        assert all(0 < v < 100 for v in entry["values"])
    from vlm_tta.methods import list_methods

    known = set(list_methods())
    core = {e["method"] for e in pub["top1"]} & {"zeroshot"}
    assert core <= known


def test_paper_rows_match_backbone_prompts_and_subset():
    rows = paper_rows("tpt", "open_clip:ViT-B-16@openai", NS)
    assert len(rows) == 1 and rows[0]["values"]["imagenet_a"] == 54.77 and "TPT" in rows[0]["source"]
    assert paper_rows("tpt", "open_clip:ViT-B-16@random", NS) == []  # random weights: no paper row
    assert paper_rows("tpt", "hf:openai/clip-vit-base-patch16", NS) == []
    assert paper_rows("difftpt", "open_clip:ViT-B-16@openai", NS) == []  # published on 1,000-image subsets only
    assert (
        paper_rows("difftpt", "open_clip:ViT-B-16@openai", NS, subset={"size": 1000})[0]["values"]["imagenet"] == 70.3
    )
    assert {r["prompts"] for r in paper_rows("zeroshot", "open_clip:ViT-B-16@openai", NS)} == {"single", "clip80"}


def test_tables_have_means_stds_averages_and_paper_rows(tmp_path):
    store = ResultStore(tmp_path / "run")
    for d, acc in zip(NS, (0.6, 0.4, 0.5, 0.7, 0.3)):
        add_row(store, dataset=d, top1=acc)
        for seed, delta in ((0, 0.0), (1, 0.02), (2, 0.04)):
            add_row(store, dataset=d, method="tda", method_label="tda", seed=seed, top1=acc + delta)
    (t,) = build_tables([tmp_path / "run"])
    assert t.columns == NS and t.ood_average == NS[1:]
    header, body = table_grid(t)
    assert header == ["method", "prompts", *NS, "avg", "OOD avg"]
    tda = next(r for r in body if r[0] == "tda")
    assert tda[2] == "62.00 ± 2.00"  # mean and sample std over three seeds
    assert tda[-2] == "52.00" and tda[-1] == "49.50"  # avg over 5, OOD avg over the 4 shifts
    zs = body.index(next(r for r in body if r[0] == "zeroshot"))
    papers = [r for r in body[zs + 1 :] if r[0].startswith("↳")][:2]
    assert {p[1] for p in papers} == {"single", "clip80"} and papers[0][2] in ("66.73", "68.34")
    single = next(p for p in papers if p[1] == "single")
    assert single[-2] == f"{np.mean([66.73, 47.87, 60.86, 73.98, 46.09]):.2f}"


def test_report_writes_tables_plots_and_an_html_page(tmp_path, capsys):
    store = ResultStore(tmp_path / "run")
    for d in NS[:2]:
        add_row(store, dataset=d, top1=0.55)
    for ood in ("inaturalist", "textures"):
        for score in ("msp", "mcm"):
            add_row(store, suite="ood_detection", protocol="ood", dataset="imagenet", ood=ood,
                    method_label=f"zeroshot[score={score}]", fpr95=0.4, auroc=0.9, aupr=0.88, top1=0.6)  # fmt: skip
    add_row(store, suite="noisy_tta", protocol="ntta", noisy="sun", noisy_fraction=0.5, acc_s=0.5, acc_n=0.8,
            acc_h=2 * 0.4 / 1.3)  # fmt: skip
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr()
    assert "| zeroshot | single |" in out.out and "report.html" in out.err
    files = {p.name: p for p in (tmp_path / "rep").iterdir()}
    pngs = [p for n, p in files.items() if n.endswith(".png")]
    assert len(pngs) == 2 + 2  # accuracy and speed of the classification table, a ROC per OOD set
    assert all(p.stat().st_size > 1000 for p in pngs)
    page = files["report.html"].read_text()
    for p in pngs:
        assert f'href="{p.name}"' in page
    assert page.count("data:image/png;base64,") == 4 and page.count("<table>") == 3
    md = files["report.md"].read_text()
    assert "textures FPR95↓" in md and "imagenet + sun @50% Acc_H" in md
    with open(files["results.csv"]) as f:
        rows = list(csv.DictReader(f))
    paper = [r for r in rows if r["column"] == "imagenet_a" and r["metric"] == "top1"]
    assert paper and paper[0]["paper"] == "47.87" and paper[0]["mean"] == "55.0"


def test_report_of_an_empty_folder_says_what_to_do(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no finished rows" in capsys.readouterr().err


@pytest.mark.parametrize("protocol", ["classification"])
def test_rows_are_json_with_the_full_configuration(tmp_path, protocol):
    store = ResultStore(tmp_path)
    row = add_row(store, config={"method_options": {"alpha": 1}, "versions": {"torch": "x"}})
    data = json.loads((tmp_path / "rows" / f"{row['job_id']}.json").read_text())
    assert data["config"]["method_options"] == {"alpha": 1} and store.rows()[0]["job_id"] == row["job_id"]
