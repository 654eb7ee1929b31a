"""Page rendering for medpipe's self-contained HTML pages (the report, the comparison):
sections, tables, inline images and Plotly figures (Plotly's JavaScript inlined once, so a
page opens with no network). Every user-controlled string goes through `html.escape`."""

from __future__ import annotations

import base64
import html
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from stages.lib import paths
from stages.lib.io import safe_name

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1100px;
padding:0 24px 48px;color:#1f2933;line-height:1.45}
h1{margin-top:28px}h2{border-bottom:1px solid #d9e2ec;padding-bottom:4px;margin-top:36px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:14px}
td,th{border:1px solid #d9e2ec;padding:4px 10px;text-align:right}
th{background:#f0f4f8}td:first-child,th:first-child{text-align:left}
.meta{color:#52606d;font-size:14px}.grid{display:grid;grid-template-columns:1fr 1fr;gap:12px}
pre{background:#f5f7fa;padding:12px;overflow:auto;font-size:13px}
.ok{color:#207b3c;font-weight:600}.bad{color:#b42318;font-weight:600}
img{max-width:100%}
"""


class Page:
    """Collects sections; inlines plotly.js with the first figure only."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.toc: list[tuple[str, str]] = []
        self._plotly_included = False

    def section(self, anchor: str, title: str) -> None:
        self.toc.append((anchor, title))
        self.parts.append(f'<h2 id="{anchor}">{html.escape(title)}</h2>')

    def add(self, markup: str) -> None:
        self.parts.append(markup)

    def figure(self, fig: go.Figure, div_id: str) -> None:
        fig.update_layout(margin={"l": 40, "r": 20, "t": 40, "b": 40}, template="plotly_white")
        self.parts.append(
            fig.to_html(
                full_html=False,
                include_plotlyjs=not self._plotly_included,
                div_id=div_id,
                config={"displaylogo": False},
            )
        )
        self._plotly_included = True

    def pair(self, left: tuple[go.Figure, str], right: tuple[go.Figure, str]) -> None:
        """Two (figure, div id) side by side."""
        self.add('<div class="grid"><div>')
        self.figure(*left)
        self.add("</div><div>")
        self.figure(*right)
        self.add("</div></div>")


def class_curves(
    plots_dir: Path, kind: str, classes: list[str], x: str, y: str, label: Callable[[str], str]
) -> go.Figure:
    """One line per class from its `kind` curve file in `plots_dir` (paths.curve_file;
    classes without a file are left out)."""
    fig = go.Figure()
    for c in classes:
        path = paths.curve_file(plots_dir, kind, safe_name(c))
        if path.is_file():
            curve = pd.read_csv(path)
            fig.add_scatter(x=curve[x], y=curve[y], name=f"{c} ({label(c)})")
    return fig


def table(frame: pd.DataFrame, floats: str = "{:.3f}") -> str:
    """HTML table with escaped cells."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for row in frame.itertuples(index=False):
        cells = "".join(
            f"<td>{html.escape(floats.format(v) if isinstance(v, float) else str(v))}</td>"
            for v in row
        )
        rows.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def image_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def environment() -> str:
    import dvc
    import timm
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return (
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"timm {timm.__version__}, dvc {dvc.__version__}, {device}"
    )


def interval(ci: list[float] | None) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def render(page: Page, title: str, header: str) -> str:
    toc = " · ".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in page.toc)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f'<h1>{html.escape(title)}</h1><p class="meta">{header}</p><p>{toc}</p>'
        f"{''.join(page.parts)}</body></html>"
    )
