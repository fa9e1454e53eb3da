"""Server-side SVG charts for the release and experiment pages (matplotlib, no browser-side library: the page works offline)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

from releasegate.contract import Mode

if TYPE_CHECKING:
    from matplotlib.figure import Figure

GOOD, BAD, UNDECIDED, GRID = "#2f855a", "#c53030", "#718096", "#e2e8f0"
RUNNING = "#2b6cb0"
# An experiment arm's colour by its status (releasegate.analysis.experiment.ArmStatus).
_ARM_COLOURS = {"winner": GOOD, "better": GOOD, "stopped": BAD, "futile": UNDECIDED}
_PERCENT_METRICS = {"error_rate", "latency_p99", "agreement", "accuracy"}
# What each analysis metric's estimate is (releasegate.analysis), as the chart's title says it.
_MEANING = {
    "error_rate": "candidate − champion, points of %",
    "accuracy": "candidate − champion, points of %",
    "latency_p99": "candidate − champion share of requests over the latency limit",
    "agreement": "% of mirrored requests where the arms agree",
}


def _figure(width: float, height: float) -> Figure:
    # The object API (no pyplot): figures are independent, so concurrent requests cannot share state.
    import matplotlib

    matplotlib.rcParams.update(
        {
            "svg.fonttype": "none",
            "font.size": 9,
            "font.family": "sans-serif",
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _svg(fig: Figure) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and doctype: the SVG is inlined in HTML


def traffic_svg(points: list[dict[str, Any]], started_at: float, until: float) -> str | None:
    """The candidate's share of served traffic from the release's start to `until`, as steps; shadow shaded."""
    if not points:
        return None
    end = until - started_at
    fig = _figure(10, 2.4)
    ax = fig.add_subplot()
    xs = [p["time"] - started_at for p in points] + [end]
    ys = [p["candidate_served_percent"] for p in points]
    ax.step(xs, ys + ys[-1:], where="post", color="#2b6cb0", linewidth=2)
    for start, stop, p in zip(xs, xs[1:], points):
        if p["mirrored"]:
            ax.axvspan(start, stop, color="#bee3f8", alpha=0.6, linewidth=0)
            ax.text((start + stop) / 2, 50, "shadow\n(mirror of 100%)", ha="center", va="center", color="#2c5282")
        else:
            label = f"{p['candidate_served_percent']}%" if p["mode"] == Mode.canary else str(p["stage"])
            ax.annotate(
                label,
                (start, p["candidate_served_percent"]),
                xytext=(3, 4),
                textcoords="offset points",
                color="#2d3748",
            )
    ax.set_ylim(-3, 105)
    ax.set_xlim(0, max(end, xs[-2] + 1e-3))
    ax.set_ylabel("candidate serves (%)")
    ax.set_xlabel("seconds since the release opened")
    ax.grid(True, color=GRID)
    return _svg(fig)


def metrics_svg(verdicts: list[dict[str, Any]]) -> str | None:
    """Per metric, each stage's estimate (candidate − champion) with its always-valid bounds against the limit."""
    names: list[str] = []
    for verdict in verdicts:
        for metric in verdict["metrics"]:
            if metric["name"] not in names:
                names.append(metric["name"])
    if not names:
        return None
    rows = {name: [(v["stage"], m) for v in verdicts for m in v["metrics"] if m["name"] == name] for name in names}
    fig = _figure(10, 0.3 + sum(0.75 + 0.3 * len(r) for r in rows.values()))
    axes = fig.subplots(len(names), 1, squeeze=False, height_ratios=[1 + len(rows[n]) for n in names])[:, 0]
    for ax, name in zip(axes, names):
        scale = 100 if name in _PERCENT_METRICS else 1
        limit, higher_is_better, kind = None, True, ""
        stages = [stage for stage, _ in rows[name]]
        for row, (_, metric) in enumerate(rows[name]):
            if metric.get("estimate") is None:
                continue
            limit = metric.get("limit") if metric.get("limit") is not None else limit
            higher_is_better, kind = metric.get("higher_is_better", True), metric.get("kind", "")
            color = {True: GOOD, False: BAD}.get(metric.get("passed"), UNDECIDED)
            estimate = metric["estimate"] * scale
            if metric.get("lower") is not None and metric.get("upper") is not None:
                ax.hlines(row, metric["lower"] * scale, metric["upper"] * scale, color=color, linewidth=3)
            ax.plot([estimate], [row], "o", color=color, markersize=6)
        if limit is not None:
            ax.axvline(limit * scale, color=BAD, linestyle="--", linewidth=1)
            # Shade the side of the limit where a bound means failure.
            lo, hi = ax.get_xlim()
            span = max(hi - lo, 1e-9)
            lo, hi = min(lo, limit * scale - 0.1 * span), max(hi, limit * scale + 0.1 * span)
            if higher_is_better:
                ax.axvspan(lo, limit * scale, color=BAD, alpha=0.07, linewidth=0)
            else:
                ax.axvspan(limit * scale, hi, color=BAD, alpha=0.07, linewidth=0)
            ax.set_xlim(lo, hi)
        ax.set_yticks(range(len(stages)), stages)
        ax.set_ylim(len(stages) - 0.5, -0.5)
        what = _MEANING.get(name, "candidate − champion")
        ax.set_title(f"{name} [{kind}]: {what}; dashed line: the limit", loc="left", fontsize=9)
        ax.grid(True, axis="x", color=GRID)
    return _svg(fig)


def experiment_svg(metrics: list[dict[str, Any]]) -> str | None:
    """Per metric, each arm's always-valid interval of arm − control around 0, and the non-inferiority margin."""
    drawn = [m for m in metrics if any(a.get("difference") is not None for a in m["arms"])]
    if not drawn:
        return None
    fig = _figure(10, 0.3 + sum(0.75 + 0.3 * len(m["arms"]) for m in drawn))
    axes = fig.subplots(len(drawn), 1, squeeze=False, height_ratios=[1 + len(m["arms"]) for m in drawn])[:, 0]
    for ax, metric in zip(axes, drawn):
        labels = []
        for row, arm in enumerate(metric["arms"]):
            labels.append(f"v{arm['version']} ({arm['status']})")
            if arm.get("difference") is None:
                continue
            color = _ARM_COLOURS.get(arm["status"], RUNNING)
            if arm.get("lower") is not None and arm.get("upper") is not None:
                ax.hlines(row, arm["lower"], arm["upper"], color=color, linewidth=3)
            ax.plot([arm["difference"]], [row], "o", color=color, markersize=6)
        ax.axvline(0, color="#2d3748", linewidth=1)
        sign = 1 if metric["goal"] == "increase" else -1
        note = "solid line: no difference"
        if metric["test"] == "non_inferiority":
            # Worse than the control by more than the margin: the shaded side.
            margin = -sign * metric["mde"]
            ax.axvline(margin, color=BAD, linestyle="--", linewidth=1)
            lo, hi = ax.get_xlim()
            span = max(hi - lo, 1e-9)
            lo, hi = min(lo, margin - 0.1 * span), max(hi, margin + 0.1 * span)
            if sign > 0:
                ax.axvspan(lo, margin, color=BAD, alpha=0.07, linewidth=0)
            else:
                ax.axvspan(margin, hi, color=BAD, alpha=0.07, linewidth=0)
            ax.set_xlim(lo, hi)
            note += "; dashed: the non-inferiority margin"
        ax.set_yticks(range(len(labels)), labels)
        ax.set_ylim(len(labels) - 0.5, -0.5)
        ax.set_title(
            f"{metric['name']} [{metric['role']}, {'higher' if sign > 0 else 'lower'} is better]: arm − control; {note}",
            loc="left",
            fontsize=9,
        )
        ax.grid(True, axis="x", color=GRID)
    return _svg(fig)
