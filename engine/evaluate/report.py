"""``report.md`` and a self-contained ``report.html`` (figures inline as base64 PNG)."""

from __future__ import annotations

import base64
import html
from typing import Any

import numpy as np

from engine import plots


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if np.isfinite(v) else "n/a"
    return str(v)


def _table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = list(rows[0]) if rows else []
    return head, [[_fmt(r.get(h, "")) for h in head] for r in rows]


def sections(result: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(title, table rows) of the report, in order; the same tables in markdown and HTML."""
    out: list[tuple[str, list[dict[str, Any]]]] = [
        ("Summary", [{"metric": k, "value": v} for k, v in result["scalars"].items()])
    ]
    m = result["metrics"]
    if result["task"] == "classification":
        out.append(("Per class", m["per_class"]))
        out.append(("Averages", [{"average": a, **m[a]} for a in ("macro", "weighted")]))
        names = [r["class"] for r in m["per_class"]]
        out.append(
            (
                "Confusion matrix (counts; row = target)",
                [
                    {"target": names[i], **{names[j]: v for j, v in enumerate(row)}}
                    for i, row in enumerate(m["confusion_matrix"])
                ],
            )
        )
        if "binary" in m:
            out.append(("Threshold maximising F1", [m["binary"]["best_f1"]]))
    elif result["task"] == "regression":
        out.append(
            (
                "Error by target quantile",
                [
                    {
                        "range": f"{b['range'][0]:.4g} .. {b['range'][1]:.4g}",
                        "rows": b["rows"],
                        "mae": b["mae"],
                        "rmse": b["rmse"],
                    }
                    for b in m["by_target_quantile"]
                ],
            )
        )
    if "latency" in result:
        lat = result["latency"]
        out.append(
            (
                f"Latency on {lat['device_name']} ({lat['device']}, {lat['threads']} "
                f"threads, {lat['precision']})",
                lat["batches"],
            )
        )
    if "slices" in result:
        s = result["slices"]
        out.append((f"Groups by {result['group_by']}", s["groups"]))
        out.append(
            (
                "Largest gap between groups",
                [{"metric": k, "gap": v} for k, v in s["largest_gap"].items()],
            )
        )
        if "fairness" in s:
            out.append(("Fairness", [s["fairness"]]))
        if s["too_small"]:
            out.append((f"Too small (< {s['min_group_size']} rows, not scored)", s["too_small"]))
    return out


def _provenance(result: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("Run", result["run"]),
        ("Rows", f"{result['rows']} from {result['source']}"),
        ("Checkpoint", result["checkpoint"]),
        ("Checkpoint SHA-256", result["checkpoint_sha256"]),
        ("Data card fingerprint", result.get("data_fingerprint") or "n/a"),
    ]


def markdown(result: dict[str, Any], images: dict[str, np.ndarray]) -> str:
    lines = [f"# Evaluation: {result['name']}", ""]
    lines += [f"- {k}: `{v}`" for k, v in _provenance(result)]
    lines += [f"- Data card: [data_card.md]({result['data_card']})", ""]
    for title, rows in sections(result):
        head, body = _table(rows)
        lines += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        lines.append("")
    lines += [f"Figures (`{name}`) are in report.html and TensorBoard (`tb/`)." for name in images]
    return "\n".join(lines) + "\n"


def page(result: dict[str, Any], images: dict[str, np.ndarray]) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Evaluation: {esc(result['name'])}</title><style>",
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #999;padding:2px 8px;text-align:right}"
        "img{image-rendering:pixelated;width:384px;margin:8px}</style></head><body>",
        f"<h1>Evaluation: {esc(result['name'])}</h1><ul>",
    ]
    parts += [f"<li>{esc(k)}: <code>{esc(str(v))}</code></li>" for k, v in _provenance(result)]
    parts.append(f"<li>Data card: <a href='{esc(result['data_card'])}'>data_card.md</a></li></ul>")
    for title, rows in sections(result):
        head, body = _table(rows)
        parts.append(f"<h2>{esc(title)}</h2><table><tr>")
        parts += [f"<th>{esc(h)}</th>" for h in head]
        parts.append("</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in body]
        parts.append("</table>")
    parts.append("<h2>Figures</h2>")
    for name, img in images.items():
        data = base64.b64encode(plots.png_bytes(img)).decode()
        parts.append(
            f"<figure><img alt='{esc(name)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{esc(name)}</figcaption></figure>"
        )
    parts.append("</body></html>")
    return "".join(parts)
