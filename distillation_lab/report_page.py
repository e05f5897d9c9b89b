"""report.html: one self-contained page of a report (no server, nothing fetched when opened, pictures inline).

On it: the lab plan's table (teacher, student, distilled student per family); per family one picture of test
accuracy against parameters, MACs and batch-1 latency with every method in it (seeds as error bars); each
run's training curves (from the per-epoch history its checkpoint holds); and each model's card (what it
is, its data, teacher and layer surgery, its checkpoint, its metrics, when and where it was trained).
Readable on a laptop and printable. A few lines of script mark the page once every picture is drawn
(`data-pictures="drawn/total"` on the body), which the tests read in a headless browser.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Optional

import pandas as pd

from pruning_lab.checkpoint import load_checkpoint

STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 1.5em auto; max-width: 70em;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { font-size: 1.3em; border-bottom: 1px solid #ccc; margin-top: 2em; }
h3 { font-size: 1.05em; margin-bottom: 0.3em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
img { max-width: 100%; height: auto; }
.wide { overflow-x: auto; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(22em, 1fr)); gap: 1em; }
.card { border: 1px solid #ccc; border-radius: 4px; padding: 0.5em 0.8em; break-inside: avoid; }
.card table { font-size: 0.8em; width: 100%; }
.muted { color: #666; font-size: 0.85em; }
details pre { font-size: 0.75em; white-space: pre-wrap; }
@media print { body { max-width: none; } h2 { break-before: page; } .card { page-break-inside: avoid; } }
"""

# Marks the body once every picture is decoded (a picture that fails to load counts as not drawn).
CHECK_PICTURES = """
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var drawn = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-pictures', drawn + '/' + images.length);
});
"""


def picture(fig) -> str:
    """A matplotlib figure as an inline PNG <img> (closed afterwards)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="" src="data:image/png;base64,{data}">'


def family_picture(points: pd.DataFrame, family: str) -> str:
    """Test accuracy against parameters, MACs and batch-1 latency, one colour and marker per method."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = points[points["family"] == family]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    methods = list(dict.fromkeys(points["method"]))
    style = {m: (f"C{i % 10}", "osD^v<>ph*"[i % 10]) for i, m in enumerate(methods)}
    for ax, x, label in zip(axes, ("parameters", "macs", "latency"),
                            ("parameters", "MACs per example", "latency, batch 1 (ms)")):
        for method, group in mine.groupby("method", sort=False):
            colour, marker = style[method]
            ax.errorbar(group[x], group["acc"], yerr=group["std"], fmt=marker, color=colour, capsize=3, label=method)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on narrow ranges
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    if len(mine):
        axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{family}: test accuracy against size and latency (error bars: std over seeds)")
    fig.tight_layout()
    return picture(fig)


def curves_picture(name: str, histories: dict) -> Optional[str]:
    """A run's training loss and validation accuracy per epoch, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(histories.values()):
        return None
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 2.6))
    for seed, history in histories.items():
        epochs = [row["epoch"] for row in history]
        label = f"seed {seed}" if seed is not None else "run"
        loss_ax.plot(epochs, [row.get("train_loss") for row in history], marker=".", label=label)
        if any("val_acc" in row for row in history):
            acc_ax.plot(epochs, [row.get("val_acc") for row in history], marker=".", label=label)
    loss_ax.set_title(f"{name}: training loss", fontsize=9)
    acc_ax.set_title(f"{name}: validation accuracy", fontsize=9)
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    loss_ax.legend(fontsize=7)
    fig.tight_layout()
    return picture(fig)


def cell(value) -> str:
    """A table cell's text."""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return html.escape("" if value is None else str(value))


def key_values(rows: list[tuple[str, object]]) -> str:
    """A two-column table."""
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{cell(v)}</td></tr>" for k, v in rows) + "</table>"


def model_card(run: dict, ckpt: dict) -> str:
    """One model's card: what it is, its data, teacher, surgery, checkpoint, metrics, when and where."""
    config, data = ckpt.get("config", {}), ckpt.get("data", {})
    written = ckpt.get("written") or {}
    surgery = ", ".join(s.get("kind", "?") + (f" {s['layer']}" if "layer" in s else "")
                        for s in ckpt.get("surgery", [])) or "none"
    rows = [("model", f"{run.get('model')} {json.dumps(config.get('model_args') or {})}"),
            ("how it was made", run.get("method")), ("seed", run.get("seed")),
            ("data", f"{data.get('dataset')}: {data.get('num_classes')} classes, input {data.get('channels')}x"
                     f"{data.get('input_size', data.get('image_size'))}"),
            ("teacher", run.get("teacher") or (ckpt.get("teacher") or {}).get("name") or "none"),
            ("layer surgery", surgery),
            ("test accuracy", run.get("test_accuracy")), ("test loss", run.get("test_loss")),
            ("macro F1", run.get("test_f1_macro")), ("MCC", run.get("test_mcc")),
            ("Pearson / Spearman", f"{run['test_pearson']} / {run['test_spearman']}" if "test_pearson" in run else None),
            ("agreement with teacher", run.get("teacher_agreement")),
            ("parameters", run.get("parameters")), ("MACs", run.get("macs")),
            ("latency ms (batch 1 / 256)", f"{run.get('latency_ms_batch1')} / {run.get('latency_ms_batch256')}"),
            ("best epoch / epochs", f"{ckpt.get('best_epoch')} / {len(ckpt.get('history') or [])}"),
            ("checkpoint", f"{run.get('checkpoint')} ({run.get('file_megabytes')} MB)"),
            ("trained", f"{written.get('utc', '?')} on {written.get('host', '?')} ({written.get('device', '?')})"),
            ("code revision", (ckpt.get("code_revision") or "?")[:12])]
    full = html.escape(json.dumps(config, indent=1, default=str))
    return (f'<div class="card"><h3>{html.escape(str(run.get("run", "")))}</h3>{key_values(rows)}'
            f"<details><summary>configuration</summary><pre>{full}</pre></details></div>")


def all_runs(details: dict) -> list[dict]:
    """Every evaluated checkpoint of the report, each with its run name (family runs, other runs, converted)."""
    runs = []
    for family, entry in details.items():
        if not isinstance(entry, dict) or "other_runs" not in entry:
            continue
        for e in [*(v for k, v in entry.items() if isinstance(v, dict) and "runs" in v), *entry["other_runs"]]:
            runs += [{**r, "run": e["run"]} for r in e.get("runs", [])]
    return runs + [r for r in details.get("converted", []) if "checkpoint" in r]


def write_page(details: dict, frame: pd.DataFrame, points: pd.DataFrame, lab: dict, path: Path) -> str:
    """The page's HTML (also written to `path` by the caller)."""
    shown = frame.drop(columns=[c for c in ("acc", "std", "n_params", "latency", "n_macs") if c in frame.columns])
    shown = shown.astype(object).fillna("")
    runs = all_runs(details)
    checkpoints = {r["checkpoint"]: load_checkpoint(r["checkpoint"]) for r in runs if Path(r["checkpoint"]).exists()}
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>distill-lab report: {html.escape(path.parent.name or 'report')}</title>",
             f"<style>{STYLE}</style></head><body>", "<h1>distill-lab report</h1>",
             f'<p class="muted">{len(runs)} checkpoints re-evaluated on their test splits; the same figures as '
             "report.json, report_details.json and report.md beside this page.</p>",
             "<h2>The lab plan's table</h2>",
             key_table(lab),
             "<h2>Every model</h2>", f'<div class="wide">{shown.to_html(index=False, border=0, escape=True)}</div>']
    for family in dict.fromkeys(points["family"]):
        parts += [f"<h2>{html.escape(family)}: accuracy against size and latency</h2>", family_picture(points, family)]
    parts.append("<h2>Training curves</h2>")
    by_run: dict[str, dict] = {}
    for r in runs:
        ckpt = checkpoints.get(r["checkpoint"], {})
        by_run.setdefault(r["run"], {})[r.get("seed")] = ckpt.get("history") or []
    for name, histories in by_run.items():
        image = curves_picture(name, histories)
        parts.append(image or f'<p class="muted">{html.escape(name)}: no training history (a conversion or '
                                                  "pruning step's own output).</p>")
    parts += ["<h2>Model cards</h2>", '<div class="cards">',
              *(model_card(r, checkpoints.get(r["checkpoint"], {})) for r in runs), "</div>"]
    if details.get("unreadable"):
        parts += ["<h2>Not evaluated</h2>", "<ul>",
                  *(f"<li>{html.escape(u['run'])}: {html.escape('; '.join(u['errors']))}</li>"
                    for u in details["unreadable"]), "</ul>"]
    parts += [f"<script>{CHECK_PICTURES}</script>", "</body></html>"]
    return "\n".join(parts)


def key_table(lab: dict) -> str:
    """report.json as a table: one row per family, the three lab keys as columns."""
    keys = ("teacher_accuracy", "student_accuracy_without_kd", "student_accuracy_with_kd")
    head = "".join(f"<th>{k.replace('_', ' ')}</th>" for k in keys)
    rows = "".join(f"<tr><th>{html.escape(family)}</th>" + "".join(f"<td>{cell(values.get(k))}</td>" for k in keys)
                   + "</tr>" for family, values in lab.items())
    return f"<table><tr><th>family</th>{head}</tr>{rows}</table>"
