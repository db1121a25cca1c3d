"""Plots for notebooks (matplotlib, the optional extra `plot`): score histograms, top-k image
grids, ELITE's training curve and LANCET's accuracy-vs-labels curve. Each returns a matplotlib
Figure; the web page (metaql.web) draws its pictures with the same functions.

    import metaql, metaql.plot
    con = metaql.connect("metaql-demo.mq")
    top = con.sql("SELECT TOPK(24) train FROM SELF_INFLUENCE(layers=*) ORDER BY DESC")
    metaql.plot.score_histogram(con.sql("SELECT * FROM SELF_INFLUENCE(layers=*)").arrow()["score"],
                                marked=top.arrow()["score"])
    metaql.plot.topk_grid(con, top)
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from metaql.errors import InvalidInputException


def _pyplot():
    try:
        # Figure without pyplot draws off-screen and leaves the user's backend (a notebook's) alone
        from matplotlib.figure import Figure
    except ImportError:
        raise InvalidInputException("metaql.plot needs matplotlib: pip install 'metaql[plot]'") from None
    return Figure


def _values(x: Any, what: str) -> np.ndarray:
    if hasattr(x, "to_numpy"):
        x = x.to_numpy()
    try:
        a = np.asarray(x, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InvalidInputException(f"{what} must be numbers; pick a numeric column to plot") from None
    if a.size and not np.isfinite(a).any():
        raise InvalidInputException(f"{what} has no finite value to plot")
    return a[np.isfinite(a)]


def score_histogram(scores: Any, marked: Any = None, bins: int = 40, title: str = "score distribution",
                    xlabel: str = "score"):
    """A histogram of `scores`; each value of `marked` (the selected rows' scores) drawn as a
    vertical line on it."""
    Figure = _pyplot()
    values = _values(scores, "scores")
    fig = Figure(figsize=(6, 3), dpi=100)
    ax = fig.add_subplot()
    ax.hist(values, bins=max(1, min(int(bins), max(1, values.size))), color="#7a9cc6")
    for v in (_values(marked, "marked scores") if marked is not None else []):
        ax.axvline(v, color="#d0463b", linewidth=0.8, alpha=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    n_marked = 0 if marked is None else _values(marked, "marked scores").size
    ax.set_title(f"{title} ({values.size} samples" + (f", {n_marked} marked)" if n_marked else ")"),
                 fontsize=10)
    fig.tight_layout()
    return fig


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str] | None = None, ncols: int = 8):
    """2-D arrays (or (C, H, W) / (H, W, C) with 3 channels) as a grid of grey or colour images."""
    Figure = _pyplot()
    if len(images) == 0:
        raise InvalidInputException("no images to draw")
    ncols = max(1, min(int(ncols), len(images)))
    nrows = -(-len(images) // ncols)
    fig = Figure(figsize=(1.4 * ncols, 1.6 * nrows), dpi=100)
    for i, img in enumerate(images):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(img, cmap="gray_r" if np.ndim(img) == 2 else None, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=7)
    fig.tight_layout()
    return fig


def topk_grid(con: Any, ranking: Any, ncols: int = 8, limit: int = 64):
    """The samples of a ranking (a relation, an Arrow table or a DataFrame with sample_id and
    score columns, e.g. a TOPK query) drawn from their stored inputs, titled id, given label ->
    prediction and score."""
    from metaql.web.images import image_of
    table = ranking.arrow() if hasattr(ranking, "arrow") else ranking
    if hasattr(table, "column_names"):
        ids = table.column("sample_id").to_numpy()
        scores = table.column("score").to_numpy() if "score" in table.column_names else None
    else:
        ids = np.asarray(table["sample_id"])
        scores = np.asarray(table["score"]) if "score" in table else None
    ids = np.asarray(ids[:limit], dtype=np.int64)
    if ids.size == 0:
        raise InvalidInputException("the ranking has no rows to draw")
    cols = con.store.sample_columns(ids, ["label", "pred"])
    images = [image_of(x) for x in _rows(con.store.inputs(ids), ids.size)]
    titles = [f"{i}: {y}->{'?' if p is None or p != p else int(p)}" + ("" if scores is None else f"\n{scores[k]:.3g}")
              for k, (i, y, p) in enumerate(zip(ids.tolist(), cols["label"].tolist(), cols["pred"].tolist()))]
    return image_grid(images, titles, ncols)


def _rows(inputs: Any, n: int) -> list:
    import torch
    if not isinstance(inputs, torch.Tensor):
        raise InvalidInputException("only samples registered with one input tensor can be drawn as images")
    return [inputs[i] for i in range(n)]


def elite_curve(detector: Any):
    """ELITE's training: the weighted training loss per step and the validation loss L^v per
    epoch (a fitted EliteDetector, or its `history_` list of dicts)."""
    Figure = _pyplot()
    history = getattr(detector, "history_", detector)
    if not history:
        raise InvalidInputException("the detector has no training history: fit it first")
    steps = np.asarray([h["step"] for h in history])
    fig = Figure(figsize=(6, 3), dpi=100)
    ax = fig.add_subplot()
    ax.plot(steps, [h["train_loss"] for h in history], label="training loss (weighted)", linewidth=0.8)
    ax.plot(steps, [h["val_loss"] for h in history], label="validation loss L^v", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("ELITE training", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def lancet_curve(n_labels: Any, accuracy: Any = None, ylabel: str = "accuracy"):
    """LANCET's curve: the propagated labels' accuracy (or another quality) after each round
    against the number of human labels it had. lancet_curve(con, "pool") draws the rounds the web
    page ran on that set, as recorded in the store (table lancet_rounds): their accuracy against
    the column named on the page, or their mean confidence unless every round measured one."""
    if hasattr(n_labels, "execute"):
        if not isinstance(accuracy, str):
            raise InvalidInputException("lancet_curve(con, set_name): name the sample set whose rounds to draw")
        from metaql.web.rounds import curve_points, recorded_rounds
        n_labels, accuracy, ylabel = curve_points(recorded_rounds(n_labels, accuracy))
        if not n_labels:
            raise InvalidInputException("no LANCET round with human labels is recorded for that set: run "
                                        "rounds from the web page's Labeling tab (metaql serve STORE)")
    elif accuracy is None:
        raise InvalidInputException("lancet_curve takes (n_labels, accuracy) or (con, set_name)")
    Figure = _pyplot()
    n, acc = np.asarray(n_labels, dtype=np.float64), np.asarray(accuracy, dtype=np.float64)
    if n.shape != acc.shape:
        raise InvalidInputException(f"{n.size} label count(s) but {acc.size} accuracy value(s)")
    fig = Figure(figsize=(6, 3), dpi=100)
    ax = fig.add_subplot()
    ax.plot(n, acc, marker="o")
    ax.set_xlabel("human labels")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    ax.set_title("LANCET: labels propagated per round", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes (what the web page serves)."""
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
