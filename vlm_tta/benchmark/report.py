"""Reports from run folders: paper-shaped tables (Markdown, CSV), plots (PNG) and one HTML page.

:func:`write_report` reads the rows of one or more run folders (``vlm-tta report runs/x runs/y``)
and writes into ``out``:

* ``report.md``: one table per (suite, model): methods as rows, datasets as columns, then the
  average and the suite's "OOD avg." columns (mean +/- std over seeds where a method ran several
  stream orders); below each of our rows, the paper's row for that method and backbone where one is
  published (``published.yaml``: source and prompt set named; unconfirmed numbers marked). OOD suites
  get FPR95 / AUROC / AUPR per OOD set, noisy-TTA suites Acc_S / Acc_N / Acc_H per noisy set and
  fraction;
* ``results.csv``: every aggregated figure in long form (suite, model, method, prompts, dataset,
  metric, mean, std, n, paper, source);
* ``*.png``: accuracy per dataset, accuracy against seconds per image, and ROC curves per OOD set;
* ``report.html``: the tables and the plots in one self-contained page (plots embedded, each linking
  its PNG file).
"""

from __future__ import annotations

import base64
import csv
import html
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .results import ResultStore, iter_rows


# --------------------------------------------------------------------------- published numbers
@lru_cache(maxsize=1)
def published() -> dict:
    """``published.yaml`` (shipped with the package) as a dict."""
    import yaml

    return yaml.safe_load((resources.files("vlm_tta.benchmark") / "published.yaml").read_text(encoding="utf-8"))


def _backbone_matches(backbone: str, model: str) -> bool:
    """``ViT-B-16@openai`` matches ``open_clip:ViT-B-16@openai`` (not random or other weights)."""
    return model.split(":", 1)[-1].replace("/", "-").lower() == backbone.lower()


def paper_rows(method: str, model: str, datasets: Sequence[str], subset: Any = None) -> list[dict]:
    """Published top-1 rows for ``method`` on ``model``'s backbone: ``{"prompts", "source",
    "verified", "values": {dataset: %}}``, for the datasets asked for (none when nothing matches)."""
    pub = published()
    out = []
    for entry in pub.get("top1", []):
        if entry["method"] != method or not _backbone_matches(entry["backbone"], model):
            continue
        if (entry.get("subset") is not None) != (subset is not None):
            continue
        values = dict(zip(pub["columns"][entry["table"]], entry["values"]))
        values = {d: v for d, v in values.items() if d in datasets}
        if values:
            out.append({k: entry.get(k) for k in ("prompts", "source", "verified")} | {"values": values})
    return out


# --------------------------------------------------------------------------- aggregation
@dataclass
class Cell:
    values: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else math.nan

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else 0.0

    def text(self, scale: float = 100.0) -> str:
        if not self.values:
            return "-"
        if len(self.values) > 1:
            return f"{scale * self.mean:.2f} ± {scale * self.std:.2f}"
        return f"{scale * self.mean:.2f}"


@dataclass
class Table:
    """One paper-shaped table: ``cells[(method label, prompts)][column][metric]``."""

    suite: str
    protocol: str
    model: str
    columns: list[str]
    cells: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(Cell))))
    seconds: dict = field(default_factory=lambda: defaultdict(list))
    rows: list[tuple[ResultStore, dict]] = field(default_factory=list)
    ood_average: list[str] = field(default_factory=list)
    subset: Any = None

    @property
    def title(self) -> str:
        return f"{self.suite} — {self.model}"

    @property
    def slug(self) -> str:
        keep = "".join(c if c.isalnum() else "_" for c in f"{self.suite}_{self.model}")
        return "_".join(filter(None, keep.split("_")))


def _suite_facts(name: str) -> tuple[list[str], list[str]]:
    """(dataset order, OOD-average datasets) of a built-in suite; empty when it is not one."""
    from .suites import SuiteError, load_suite

    try:
        suite = load_suite(name)
    except SuiteError:
        return [], []
    return suite.dataset_names, list(suite.ood_average)


def _column(row: dict) -> str:
    if row["protocol"] == "ood":
        return row["ood"]
    if row["protocol"] == "ntta":
        return f"{row['dataset']} + {row['noisy']} @{100 * row['noisy_fraction']:.0f}%"
    return row["dataset"]


def build_tables(folders: Iterable[str | os.PathLike]) -> list[Table]:
    tables: dict[tuple, Table] = {}
    for store, row in iter_rows(folders):
        key = (row["suite"], row["protocol"], row["model"])
        if key not in tables:
            order, ood_avg = _suite_facts(row["suite"])
            tables[key] = Table(row["suite"], row["protocol"], row["model"], [], ood_average=ood_avg)
            tables[key].columns = list(order) if row["protocol"] == "classification" else []
            tables[key].subset = row.get("subset")
        t = tables[key]
        t.rows.append((store, row))
        col = _column(row)
        if col not in t.columns:
            t.columns.append(col)
        label = (row["method_label"], row["prompts"])
        for metric in ("top1", "ece", "fpr95", "auroc", "aupr", "acc_s", "acc_n", "acc_h"):
            if row.get(metric) is not None:
                t.cells[label][col][metric].values.append(float(row[metric]))
        t.seconds[label].append(float(row.get("seconds_per_image", math.nan)))
    for t in tables.values():  # drop suite columns nobody ran
        used = {c for per in t.cells.values() for c in per}
        t.columns = [c for c in t.columns if c in used]
    return [tables[k] for k in sorted(tables)]


def _avg(cells: dict, columns: Sequence[str], metric: str) -> Cell:
    """Mean over columns of the per-column means; empty unless every column has a value."""
    means = [cells[c][metric].mean for c in columns if c in cells and cells[c][metric].values]
    return Cell([float(np.mean(means))]) if columns and len(means) == len(columns) else Cell()


# --------------------------------------------------------------------------- rendering
def _method_key(label: str) -> str:
    return label.split("[", 1)[0]


def table_grid(t: Table) -> tuple[list[str], list[list[str]]]:
    """Header and body of a table as text cells (the same grid feeds Markdown, HTML and CSV)."""
    if t.protocol == "classification":
        header = ["method", "prompts", *t.columns, "avg"]
        ood_cols = [c for c in t.ood_average if c in t.columns]
        if ood_cols:
            header.append("OOD avg")
        body = []
        for (label, prompts), cells in sorted(t.cells.items()):
            line = [
                label,
                prompts,
                *(cells[c]["top1"].text() for c in t.columns),
                _avg(cells, t.columns, "top1").text(),
            ]
            if ood_cols:
                line.append(_avg(cells, ood_cols, "top1").text())
            body.append(line)
            for paper in paper_rows(_method_key(label), t.model, t.columns, t.subset):
                vals = paper["values"]
                mark = "" if paper["verified"] else " (unconfirmed)"
                pline = [f"↳ paper{mark}: {paper['source']}", str(paper["prompts"])]
                pline += [f"{vals[c]:.2f}" if c in vals else "" for c in t.columns]
                pline.append(
                    f"{np.mean([vals[c] for c in t.columns]):.2f}" if all(c in vals for c in t.columns) else ""
                )
                if ood_cols:
                    pline.append(
                        f"{np.mean([vals[c] for c in ood_cols]):.2f}" if all(c in vals for c in ood_cols) else ""
                    )
                body.append(pline)
        return header, body
    metrics = ("fpr95", "auroc", "aupr") if t.protocol == "ood" else ("acc_s", "acc_n", "acc_h")
    names = {
        "fpr95": "FPR95↓",
        "auroc": "AUROC↑",
        "aupr": "AUPR↑",
        "acc_s": "Acc_S",
        "acc_n": "Acc_N",
        "acc_h": "Acc_H",
    }
    header = ["method", "prompts"] + [f"{c} {names[m]}" for c in t.columns for m in metrics]
    header += [f"avg {names[m]}" for m in metrics]
    if t.protocol == "ood":
        header.append("ID top-1")
    body = []
    for (label, prompts), cells in sorted(t.cells.items()):
        line = [label, prompts] + [cells[c][m].text() for c in t.columns for m in metrics]
        line += [_avg(cells, t.columns, m).text() for m in metrics]
        if t.protocol == "ood":
            line.append(Cell([v for c in t.columns for v in cells[c]["top1"].values[:1]]).text())
        body.append(line)
    return header, body


def to_markdown(header: list[str], body: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in body]
    return "\n".join(lines)


def to_html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = []
    for r in body:
        cls = ' class="paper"' if r and str(r[0]).startswith("↳") else ""
        rows.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def csv_rows(t: Table) -> list[dict]:
    out = []
    for (label, prompts), cells in sorted(t.cells.items()):
        papers = paper_rows(_method_key(label), t.model, t.columns, t.subset) if t.protocol == "classification" else []
        for col, per in cells.items():
            for metric, cell in per.items():
                paper = next((p for p in papers if col in p["values"]), None) if metric == "top1" else None
                out.append(
                    {
                        "suite": t.suite,
                        "protocol": t.protocol,
                        "model": t.model,
                        "method": label,
                        "prompts": prompts,
                        "column": col,
                        "metric": metric,
                        "mean": round(100 * cell.mean, 4),
                        "std": round(100 * cell.std, 4),
                        "n": len(cell.values),
                        "paper": paper["values"][col] if paper else "",
                        "paper_source": paper["source"] if paper else "",
                    }
                )
    return out


# --------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(t: Table, path: Path) -> Path:
    plt = _plt()
    labels = sorted(t.cells)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(t.columns) * max(1, len(labels)) / 2), 4))
    width = 0.8 / max(len(labels), 1)
    x = np.arange(len(t.columns))
    for k, label in enumerate(labels):
        cells = t.cells[label]
        means = [100 * cells[c]["top1"].mean if cells[c]["top1"].values else 0 for c in t.columns]
        stds = [100 * cells[c]["top1"].std for c in t.columns]
        ax.bar(x + k * width - 0.4 + width / 2, means, width, yerr=stds, label=f"{label[0]} ({label[1]})")
    ax.set_xticks(x, t.columns, rotation=30, ha="right")
    top = max([100 * c["top1"].mean for per in t.cells.values() for c in per.values() if c["top1"].values] + [0])
    ax.set_ylim(0, min(100, max(10, top * 1.15)))
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(t.title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_speed(t: Table, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in sorted(t.cells):
        acc = _avg(t.cells[label], t.columns, "top1")
        means = [t.cells[label][c]["top1"].mean for c in t.columns if t.cells[label][c]["top1"].values]
        y = 100 * (acc.mean if acc.values else float(np.mean(means)))
        secs = float(np.nanmean(t.seconds[label]))
        ax.scatter([secs], [y])
        ax.annotate(label[0], (secs, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("seconds per image (log)")
    ax.set_ylabel("mean top-1 accuracy (%)")
    ax.set_title(f"accuracy vs cost — {t.title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_roc(t: Table, column: str, path: Path) -> Path | None:
    """ROC curves (ID positive) of every method on one OOD set, from the rows' per-image scores."""
    from sklearn.metrics import roc_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    drawn = 0
    for store, row in t.rows:
        if row.get("ood") != column:
            continue
        arrays = store.arrays(row["job_id"])
        if not arrays or "scores" not in arrays:
            continue
        is_id = arrays["labels"] >= 0
        if is_id.all() or not is_id.any():
            continue
        fpr, tpr, _ = roc_curve(is_id.astype(int), arrays["scores"])
        label = row["method_label"] + (f" seed {row['seed']}" if row.get("seed") is not None else "")
        ax.plot(fpr, tpr, label=f"{label} (AUROC {100 * row['auroc']:.1f})")
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate (OOD accepted)")
    ax.set_ylabel("true positive rate (ID accepted)")
    ax.set_title(f"ROC: {column} vs ID — {t.model}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- the report
def write_report(folders: Sequence[str | os.PathLike], out: str | os.PathLike | None = None) -> dict[str, list[Path]]:
    """Write the report of ``folders`` into ``out`` (default: the first folder's ``report/``)."""
    from .._atomic import atomic_write

    folders = [Path(f).expanduser() for f in folders]
    tables = build_tables(folders)
    if not tables:
        from .runner import BenchmarkError

        raise BenchmarkError(
            f"no finished rows in {', '.join(map(str, folders))} (rows/*.json); run `vlm-tta bench` first"
        )
    out = Path(out).expanduser() if out is not None else folders[0] / "report"
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {"md": [], "csv": [], "png": [], "html": []}
    md, html_parts, csv_all = [f"# vlm-tta report\n\nRuns: {', '.join(map(str, folders))}\n"], [], []
    for t in tables:
        header, body = table_grid(t)
        plots: list[Path] = []
        if t.protocol == "classification":
            plots.append(plot_accuracy(t, out / f"{t.slug}_accuracy.png"))
            plots.append(plot_speed(t, out / f"{t.slug}_speed.png"))
        elif t.protocol == "ood":
            for col in t.columns:
                p = plot_roc(t, col, out / f"{t.slug}_roc_{col}.png")
                if p is not None:
                    plots.append(p)
        written["png"] += plots
        unit = "top-1 accuracy (%)" if t.protocol == "classification" else "%"
        md.append(f"## {t.title}\n\n{t.protocol}, {unit}; mean ± std over seeds where several ran.\n")
        md.append(to_markdown(header, body) + "\n")
        md += [f"![{p.stem}]({p.name})\n" for p in plots]
        figs = "".join(
            f'<a href="{html.escape(p.name)}"><img src="data:image/png;base64,'
            f'{base64.b64encode(p.read_bytes()).decode()}" alt="{html.escape(p.stem)}"></a>'
            for p in plots
        )
        html_parts.append(
            f"<h2>{html.escape(t.title)}</h2><p>{t.protocol}, {unit}</p>{to_html_table(header, body)}{figs}"
        )
        csv_all += csv_rows(t)
    md_path = out / "report.md"
    atomic_write(md_path, lambda f: f.write("\n".join(md).encode()))
    csv_path = out / "results.csv"

    def write_csv(f):
        import io

        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(csv_all[0]) if csv_all else ["suite"])
        writer.writeheader()
        writer.writerows(csv_all)
        f.write(text.getvalue().encode())

    atomic_write(csv_path, write_csv)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>vlm-tta report</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:first-child,th:first-child{text-align:left}"
        "tr.paper td{color:#666;font-style:italic}img{max-width:48%;margin:4px}</style></head><body>"
        f"<h1>vlm-tta report</h1><p>Runs: {html.escape(', '.join(map(str, folders)))}</p>"
        + "".join(html_parts)
        + "</body></html>"
    )
    html_path = out / "report.html"
    atomic_write(html_path, lambda f: f.write(page.encode()))
    written["md"].append(md_path)
    written["csv"].append(csv_path)
    written["html"].append(html_path)
    return written
