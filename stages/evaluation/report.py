"""report: one self-contained HTML page (and the PNGs it embeds) that answers, at a glance, which hyperparameters
won, how sure we can be, and where the model fails."""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stages.common import storage
from stages.evaluation.metrics import ClassMetrics, EnsembleMetrics, RunMetrics, TrialSummary
from stages.training.tune_results import searched_hyperparameters

FIGURES = ("curves", "parallel", "hyperparameters", "confusion", "mistakes", "per_class")
MAX_MISTAKES_SHOWN = 40
_CAPTION_PIXELS, _GAP_PIXELS = 12, 6  # in image pixels, around each digit of the mistakes figure
_ACCENT, _MUTED, _STOPPED = "#d62728", "#9aa5b1", "#1f77b4"


@dataclass(frozen=True)
class ReportInputs:
    run_id: str
    metrics: RunMetrics
    stage_seconds: dict[str, float]
    epochs: int  # the most a trial could train: trials with fewer were stopped early
    test_images: np.ndarray  # (n, 28, 28) uint8
    test_labels: np.ndarray  # (n,)
    probabilities: np.ndarray  # (n, 10)
    importance: dict[str, float] = field(default_factory=dict)  # stages.evaluation.importance; empty: not measured
    time_budget_s: float | None = None  # train.time_budget_s


def write_report(inputs: ReportInputs, page_location: str, figures_location: str) -> None:
    """Draws the figures, writes them as PNGs into `figures_location`, and the page embedding them to
    `page_location` (a path or URI)."""
    pngs = {
        "curves": _curves(inputs),
        "parallel": _parallel_coordinates(inputs),
        "hyperparameters": _hyperparameters(inputs),
        "confusion": _confusion(inputs.metrics.confusion_matrix),
        "mistakes": _mistakes(inputs),
        "per_class": _per_class(inputs.metrics.per_class),
    }
    for name, png in pngs.items():
        storage.write_bytes(storage.join(figures_location, f"{name}.png"), png)
    storage.write_bytes(page_location, render_html(inputs, pngs).encode())


def accuracy_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of an accuracy measured on n images."""
    if n == 0:
        return 0.0, 1.0
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    spread = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - spread), min(1.0, centre + spread)


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(width, height), dpi=100)
    return figure, plt


def _png(figure, plt) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _curves(inputs: ReportInputs) -> bytes:
    figure, plt = _figure(8, 4.5)
    axes = figure.add_subplot()
    best_id = inputs.metrics.best_trial_id
    for trial in sorted(inputs.metrics.trials, key=lambda t: t.trial_id == best_id):
        history = trial.val_accuracy_by_epoch
        if not history:
            continue
        epochs = range(1, len(history) + 1)
        best = trial.trial_id == best_id
        style = {"color": _ACCENT, "linewidth": 2.5, "zorder": 3} if best else {"color": _MUTED, "linewidth": 1}
        axes.plot(epochs, history, marker="o", markersize=3, label=f"{trial.trial_id} (best)" if best else None,
                  **style)
        if len(history) < inputs.epochs or trial.status == "ERROR":  # cut short: mark where it stopped
            axes.plot(len(history), history[-1], marker="x", markersize=9, color=_STOPPED if not best else _ACCENT,
                      zorder=4)
    axes.plot([], [], marker="x", linestyle="none", color=_STOPPED, label="stopped early (by the scheduler) or failed")
    axes.set_xlabel("epoch")
    axes.set_ylabel("validation accuracy")
    axes.set_xlim(0.5, max(inputs.epochs, 1) + 0.5)
    axes.set_xticks(range(1, max(inputs.epochs, 1) + 1, max(1, inputs.epochs // 12)))
    axes.set_title("Validation accuracy per epoch, every trial")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    return _png(figure, plt)


def _searched(trials: list[TrialSummary]) -> list[str]:
    """The hyperparameters that differ between trials (the ones the search explored)."""
    return searched_hyperparameters([t.hyperparameters for t in trials])


def _hyperparameters(inputs: ReportInputs) -> bytes:
    trials = [t for t in inputs.metrics.trials if t.best_val_accuracy is not None]
    names = _searched(trials) or list(inputs.metrics.hyperparameters)[:1]
    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    figure, plt = _figure(4 * columns, 3.2 * rows)
    best_id = inputs.metrics.best_trial_id
    for index, name in enumerate(names, start=1):
        axes = figure.add_subplot(rows, columns, index)
        values = [t.hyperparameters[name] for t in trials]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            positions = values
            if name in ("learning_rate", "weight_decay") and all(v > 0 for v in values):
                axes.set_xscale("log")
        else:
            categories = sorted({str(v) for v in values})
            positions = [categories.index(str(v)) for v in values]
            axes.set_xticks(range(len(categories)), categories)
        for trial, x in zip(trials, positions):
            best = trial.trial_id == best_id
            full = trial.epochs >= inputs.epochs
            axes.scatter(x, trial.best_val_accuracy, s=140 if best else 40, marker="*" if best else "o",
                         color=_ACCENT if best else (_MUTED if full else _STOPPED), zorder=3 if best else 2,
                         edgecolors="black" if best else "none")
        axes.set_title(name)
        axes.grid(alpha=0.3)
        if (index - 1) % columns == 0:
            axes.set_ylabel("best validation accuracy")
    figure.suptitle("Hyperparameters of every trial against its best validation accuracy "
                    "(★ winner, blue: stopped early)", fontsize=10)
    figure.tight_layout()
    return _png(figure, plt)


def parallel_axes(
    trials: list[TrialSummary], names: list[str]
) -> list[tuple[str, list[float], list[tuple[float, str]]]]:
    """One axis per hyperparameter, then the best validation accuracy: (name, each trial's position on it in [0, 1],
    ticks as (position, label)). Numbers keep their scale (learning rate and weight decay logarithmic), other values
    are spread evenly in sorted order."""
    axes = []
    for name in [*names, "best_val_accuracy"]:
        values = [t.best_val_accuracy if name == "best_val_accuracy" else t.hyperparameters.get(name)
                  for t in trials]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            logarithmic = name in ("learning_rate", "weight_decay") and all(v > 0 for v in values)
            scaled = [math.log10(v) if logarithmic else float(v) for v in values]
            low, high = min(scaled), max(scaled)
            span = (high - low) or 1.0
            positions = [(v - low) / span if high > low else 0.5 for v in scaled]
            ticks = [(0.0 if high > low else 0.5, f"{min(values):.4g}")] + (
                [(1.0, f"{max(values):.4g}")] if high > low else [])
        else:
            categories = sorted({str(v) for v in values})
            step = 1 / max(1, len(categories) - 1)
            positions = [categories.index(str(v)) * step if len(categories) > 1 else 0.5 for v in values]
            ticks = [(index * step if len(categories) > 1 else 0.5, category) for index, category in
                     enumerate(categories)]
        axes.append((name, positions, ticks))
    return axes


def _parallel_coordinates(inputs: ReportInputs) -> bytes:
    """Every trial as a line across its hyperparameters to its best validation accuracy, coloured by it: the view
    W&B, Optuna's dashboard and Katib open with."""
    trials = sorted((t for t in inputs.metrics.trials if t.best_val_accuracy is not None),
                    key=lambda t: t.best_val_accuracy)  # the best drawn last, on top
    names = _searched(trials) or list(inputs.metrics.hyperparameters)[:1]
    axes_data = parallel_axes(trials, names)
    figure, plt = _figure(max(6.0, 1.9 * len(axes_data)), 4.2)
    axes = figure.add_subplot()
    accuracies = [t.best_val_accuracy for t in trials]
    low, high = (min(accuracies), max(accuracies)) if accuracies else (0.0, 1.0)
    colours = plt.get_cmap("viridis")
    best_id = inputs.metrics.best_trial_id
    xs = list(range(len(axes_data)))
    for index, trial in enumerate(trials):
        ys = [positions[index] for _, positions, _ in axes_data]
        best = trial.trial_id == best_id
        shade = (trial.best_val_accuracy - low) / ((high - low) or 1.0)
        axes.plot(xs, ys, color=_ACCENT if best else colours(shade), linewidth=2.6 if best else 1.2,
                  alpha=1.0 if best else 0.8, zorder=3 if best else 2, marker="o", markersize=3)
    for x, (name, _, ticks) in zip(xs, axes_data):
        axes.axvline(x, color="#444444", linewidth=0.8, zorder=1)
        for position, label in ticks:
            axes.text(x + 0.04, position, label, fontsize=7, va="center", ha="left", color="#333333")
    axes.set_xticks(xs, [name.replace("_", " ") for name, _, _ in axes_data], fontsize=8)
    axes.set_yticks([])
    axes.set_xlim(-0.2, len(axes_data) - 0.4)
    axes.set_ylim(-0.08, 1.08)
    for side in ("top", "right", "left"):
        axes.spines[side].set_visible(False)
    if trials:
        mappable = plt.cm.ScalarMappable(cmap=colours, norm=plt.Normalize(low, high))
        figure.colorbar(mappable, ax=axes, fraction=0.03, label="best validation accuracy")
    axes.set_title(f"Every trial across its hyperparameters to its best validation accuracy ({len(trials)} trials; "
                   f"red: the winner, {best_id})", fontsize=10)
    return _png(figure, plt)


def _confusion(matrix: list[list[int]]) -> bytes:
    counts = np.array(matrix)
    errors = counts.copy()
    np.fill_diagonal(errors, 0)
    figure, plt = _figure(6, 5.2)
    axes = figure.add_subplot()
    image = axes.imshow(errors, cmap="Reds")
    for true in range(counts.shape[0]):
        for predicted in range(counts.shape[1]):
            count = counts[true, predicted]
            if count:
                colour = "black" if true == predicted or errors[true, predicted] < errors.max() / 2 else "white"
                axes.text(predicted, true, str(count), ha="center", va="center", fontsize=8, color=colour,
                          fontweight="bold" if true != predicted else "normal")
    axes.set_xticks(range(10))
    axes.set_yticks(range(10))
    axes.set_xlabel("predicted digit")
    axes.set_ylabel("true digit")
    axes.set_title("Confusion matrix on the test set (colour: mistakes only)")
    figure.colorbar(image, ax=axes, fraction=0.046, label="mistakes")
    return _png(figure, plt)


def mistakes(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Indices of wrongly classified images, the most confident mistakes first."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    return wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")]


def _mistakes(inputs: ReportInputs) -> bytes:
    wrong = mistakes(inputs.test_labels, inputs.probabilities)[:MAX_MISTAKES_SHOWN]
    columns = 10
    rows = max(1, math.ceil(len(wrong) / columns))
    figure, plt = _figure(columns * 1.1, rows * 1.35 + 0.4)
    axes = figure.add_axes((0, 0, 1, 0.93))
    axes.axis("off")
    if not len(wrong):
        figure.text(0.5, 0.5, "no mistakes on the test set", ha="center")
    else:
        # one image with every digit in its cell and the captions as text: an axes per digit took seconds to draw
        height, width = inputs.test_images.shape[1:3]
        cell_height, cell_width = height + _CAPTION_PIXELS, width + _GAP_PIXELS
        mosaic = np.zeros((rows * cell_height, columns * cell_width), dtype=inputs.test_images.dtype)
        predicted = inputs.probabilities.argmax(axis=1)
        for position, index in enumerate(wrong):
            top, left = (position // columns) * cell_height + _CAPTION_PIXELS, (position % columns) * cell_width
            mosaic[top:top + height, left:left + width] = inputs.test_images[index]
            axes.text(
                left + width / 2, top - 1,
                f"{inputs.test_labels[index]}→{predicted[index]} {inputs.probabilities[index, predicted[index]]:.0%}",
                fontsize=8, color=_ACCENT, ha="center", va="bottom",
            )
        axes.imshow(mosaic, cmap="gray_r", interpolation="nearest", aspect="equal")
    figure.suptitle(f"Test images the model got wrong (true→predicted, confidence); "
                    f"{len(wrong)} most confident shown", fontsize=10)
    return _png(figure, plt)


def _per_class(per_class: list[ClassMetrics]) -> bytes:
    digits = [c.digit for c in per_class]
    precision = [c.precision for c in per_class]
    recall = [c.recall for c in per_class]
    figure, plt = _figure(8, 3.5)
    axes = figure.add_subplot()
    width = 0.4
    axes.bar([d - width / 2 for d in digits], precision, width, label="precision", color="#1f77b4")
    axes.bar([d + width / 2 for d in digits], recall, width, label="recall", color="#ff7f0e")
    lowest = min(precision + recall)
    axes.set_ylim(max(0.0, lowest - 0.02), 1.0)
    axes.set_xticks(digits)
    axes.set_xlabel("digit")
    axes.set_title("Precision and recall per digit (axis zoomed)")
    axes.legend(loc="lower right")
    axes.grid(axis="y", alpha=0.3)
    return _png(figure, plt)


def render_html(inputs: ReportInputs, pngs: dict[str, bytes]) -> str:
    metrics = inputs.metrics
    accuracy, n = metrics.test_accuracy, metrics.test_images
    low, high = accuracy_interval(accuracy, n)
    trials = metrics.trials
    ranked = sorted((t for t in trials if t.best_val_accuracy is not None), key=lambda t: -t.best_val_accuracy)
    runner_up = ranked[1].best_val_accuracy if len(ranked) > 1 else None
    searched = _searched(trials)
    worst = sorted(metrics.per_class, key=lambda c: c.f1)[:2]
    confusion = np.array(metrics.confusion_matrix)
    np.fill_diagonal(confusion, 0)
    true, predicted = np.unravel_index(confusion.argmax(), confusion.shape)

    def image(name: str, alt: str) -> str:
        data = base64.b64encode(pngs[name]).decode()
        return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return html.escape(str(value))

    best_rows = "".join(
        f"<tr{' class=searched' if name in searched else ''}><th>{html.escape(name)}</th><td>{cell(value)}</td></tr>"
        for name, value in metrics.hyperparameters.items()
    )
    trial_rows = "".join(
        "<tr{cls}><td>{id}</td><td>{status}</td><td>{epochs}</td><td>{val}</td>{hps}</tr>".format(
            cls=" class=best" if t.trial_id == metrics.best_trial_id else "",
            id=html.escape(t.trial_id),
            status=html.escape("failed: " + (t.error or "") if t.status == "ERROR" else _how_it_ended(t, inputs)),
            epochs=t.epochs,
            val=f"{t.best_val_accuracy:.4f}" if t.best_val_accuracy is not None else "–",
            hps="".join(f"<td>{cell(t.hyperparameters.get(name))}</td>" for name in searched),
        )
        for t in sorted(trials, key=lambda t: -(t.best_val_accuracy or 0))
    )
    top = metrics.top_trials
    top_names = list(dict.fromkeys(name for t in top for name in t.hyperparameters))
    top_rows = "".join(
        "<tr{cls}><td>{rank}</td><td>{id}</td><td>{val:.4f}</td><td>{epoch}</td><td>{epochs}</td>{hps}</tr>".format(
            cls=" class=best" if t.trial_id == metrics.best_trial_id else "",
            rank=rank, id=html.escape(t.trial_id), val=t.best_val_accuracy, epoch=t.best_epoch,
            epochs=t.epochs, hps="".join(f"<td>{cell(t.hyperparameters.get(name))}</td>" for name in top_names),
        )
        for rank, t in enumerate(top, start=1)
    )
    class_rows = "".join(
        f"<tr><td>{c.digit}</td><td>{c.precision:.4f}</td><td>{c.recall:.4f}</td><td>{c.f1:.4f}</td>"
        f"<td>{c.support}</td></tr>"
        for c in metrics.per_class
    )
    timing_rows = "".join(
        f"<tr><th>{html.escape(stage)}</th><td>{_duration(seconds)}</td></tr>"
        for stage, seconds in inputs.stage_seconds.items()
    )
    margin = (
        f" The runner-up trial reached {runner_up:.2%} on validation "
        f"({(metrics.val_accuracy - runner_up) * 100:+.2f} points)." if runner_up is not None else ""
    )
    headline = (
        f"Test accuracy <b>{accuracy:.2%}</b> on {n:,} images (95% interval {low:.2%}–{high:.2%}); "
        f"{n - round(accuracy * n)} mistakes. Best of {len(trials)} trials: <b>{html.escape(metrics.best_trial_id)}"
        f"</b>, validation accuracy {metrics.val_accuracy:.2%} at epoch {metrics.best_epoch}.{margin} "
        f"Most confused: true {true} predicted as {predicted} ({confusion[true, predicted]}×); weakest digits "
        f"by F1: {', '.join(str(c.digit) for c in worst)}."
        + _ensemble_sentence(metrics.ensemble, accuracy)
        + (f" The search stopped early: {html.escape(metrics.stop_reason)}." if metrics.stop_reason else "")
        + (f" The search took {_duration(inputs.stage_seconds['train'])} of its {_duration(inputs.time_budget_s)} "
           "budget." if inputs.time_budget_s is not None and "train" in inputs.stage_seconds else "")
    )
    importance_rows = "".join(
        f"<tr><th>{html.escape(name)}</th><td>{share:.0%}</td></tr>" for name, share in inputs.importance.items()
    )
    return _PAGE.format(
        run_id=html.escape(inputs.run_id),
        headline=headline,
        best_rows=best_rows,
        trial_header="".join(f"<th>{html.escape(name)}</th>" for name in searched),
        trial_rows=trial_rows,
        top_header="".join(f"<th>{html.escape(name)}</th>" for name in top_names),
        top_rows=top_rows,
        importance=(
            "<h2>What mattered</h2><table><tr><th>hyperparameter</th><th>share of the variance</th></tr>"
            f"{importance_rows}</table><p class=\"note\">fANOVA (Optuna's evaluator) of validation accuracy at the "
            "epoch every trial reached (with halving: the first rung), over the trials inside the search space.</p>"
            if importance_rows else ""
        ),
        class_rows=class_rows,
        timing_rows=timing_rows,
        curves=image("curves", "validation accuracy per epoch for every trial"),
        parallel=image("parallel", "parallel coordinates: every trial's hyperparameters and validation accuracy"),
        hyperparameters=image("hyperparameters", "hyperparameters against validation accuracy"),
        confusion=image("confusion", "confusion matrix"),
        mistakes=image("mistakes", "misclassified test images"),
        per_class=image("per_class", "precision and recall per digit"),
    )


def _how_it_ended(trial: TrialSummary, inputs: ReportInputs) -> str:
    """completed / stopped early, and with halving the rungs it was promoted through."""
    if len(trial.rungs) > 1:
        return f"promoted at epoch{'s' if len(trial.rungs) > 2 else ''} " + ", ".join(
            str(end) for end in trial.rungs[:-1]) + f"; trained to {trial.epochs}"
    if trial.rungs:
        return f"stopped at the first rung (epoch {trial.rungs[0]})" if trial.epochs <= trial.rungs[0] else "completed"
    return "stopped early" if trial.epochs < inputs.epochs else "completed"


def _ensemble_sentence(ensemble: EnsembleMetrics | None, single_accuracy: float) -> str:
    if not ensemble:
        return ""
    members = ", ".join(html.escape(trial_id) for trial_id in ensemble.trial_ids)
    chosen = ""
    if ensemble.val_accuracy is not None and ensemble.single_val_accuracy is not None:
        by_k = ", ".join(f"{k}: {accuracy:.2%}" for k, accuracy in enumerate(ensemble.val_accuracy_by_k, start=1))
        chosen = (f" k was chosen on the validation split (members: validation accuracy {by_k}; of equal ones, the "
                  "most); `predict` uses "
                  f"{'the ensemble' if ensemble.preferred else 'the single best model'}, the better of the two "
                  "there (the ensemble where they are equal).")
    return (
        f" An ensemble averaging the {ensemble.k} best trials by validation accuracy ({members}) reached "
        f"<b>{ensemble.test_accuracy:.2%}</b> on test "
        f"({(ensemble.test_accuracy - single_accuracy) * 100:+.2f} points; exported as model/ensemble.keras)."
        + chosen
    )


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>mnist-pipeline run {run_id}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #1a1a1a; padding: 0 1rem; }}
h1 {{ font-size: 1.5rem; margin-bottom: .2rem; }} h2 {{ font-size: 1.15rem; margin-top: 2rem; }}
.headline {{ background: #f4f6f8; border-left: 4px solid #d62728; padding: .8rem 1rem; line-height: 1.5; }}
table {{ border-collapse: collapse; font-size: .9rem; margin: .5rem 0; }}
th, td {{ border-bottom: 1px solid #e1e4e8; padding: .25rem .7rem; text-align: left; }}
tr.best td {{ background: #fdecea; font-weight: 600; }} tr.searched th {{ color: #d62728; }}
img {{ max-width: 100%; }} .row {{ display: flex; gap: 2rem; flex-wrap: wrap; align-items: flex-start; }}
.note {{ color: #57606a; font-size: .85rem; }}
</style></head><body>
<h1>mnist-pipeline — run {run_id}</h1>
<p class="headline">{headline}</p>
<div class="row">
<div><h2>Winning hyperparameters</h2><table>{best_rows}</table>
<p class="note">Red: searched by Tune; the others were fixed.</p></div>
<div><h2>Timings</h2><table>{timing_rows}</table></div>
</div>
<h2>How the trials learned</h2>{curves}
<h2>What the search found</h2>{parallel}
{hyperparameters}
{importance}
<h2>Top trials</h2>
<table><tr><th>#</th><th>trial</th><th>best val accuracy</th><th>at epoch</th><th>epochs</th>{top_header}</tr>{top_rows}
</table>
<p class="note">Ranked by the validation accuracy of each trial's best checkpoint; the test set plays no part.</p>
<h2>All trials</h2>
<table><tr><th>trial</th><th>status</th><th>epochs</th><th>best val accuracy</th>{trial_header}</tr>{trial_rows}</table>
<h2>Where the model fails</h2>
<div class="row"><div>{confusion}</div><div>{per_class}
<table><tr><th>digit</th><th>precision</th><th>recall</th><th>F1</th><th>images</th></tr>{class_rows}</table></div></div>
{mistakes}
<p class="note">Generated by mnist-pipeline; everything on this page is embedded (no network needed).</p>
</body></html>
"""
