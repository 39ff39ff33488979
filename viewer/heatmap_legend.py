"""What the heatmap panel says about its model, colours and calls: the legend bar, the model's
line, the slide call and the agreement with the ground truth."""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QLinearGradient, QPainter, QPaintEvent
from PySide6.QtWidgets import QWidget

from inference.calls import FOUND, NOT_FOUND, call_text
from inference.heatmap import DEFAULT_COLORMAP, Heatmap, colormap_lut
from inference.model import LoadedModel, ModelMeta
from inference.truth import Agreement


class LegendBar(QWidget):
    """The colour map from probability 0 to 1."""

    def __init__(self) -> None:
        super().__init__()
        self.colormap = DEFAULT_COLORMAP
        self.positive = "IDC"  # the model's positive class, named at the end of the scale
        self.setMinimumHeight(34)

    def paintEvent(self, event: QPaintEvent) -> None:
        p = QPainter(self)
        lut = colormap_lut(self.colormap, 16)
        grad = QLinearGradient(0, 0, self.width(), 0)
        for i, (r, g, b) in enumerate(lut.tolist()):
            grad.setColorAt(i / 15, QColor(r, g, b))
        p.fillRect(0, 0, self.width(), 14, grad)
        p.setPen(QColor(40, 40, 40))
        for frac, text in ((0.0, "0"), (0.5, "0.5"), (1.0, f"1  P({self.positive})")):
            x = int(frac * (self.width() - 1))
            align = Qt.AlignmentFlag.AlignLeft if frac == 0 else (
                Qt.AlignmentFlag.AlignRight if frac == 1 else Qt.AlignmentFlag.AlignHCenter)
            left = x if frac == 0 else (x - 80 if frac == 1 else x - 40)
            p.drawText(left, 16, 80, 16, align, text)


def describe_model(model: LoadedModel) -> str:
    """One line on the model: patch, resolution, what it sees, and its threshold and slide call."""
    m = model.meta
    threshold = m.context_threshold if m.context_threshold is not None else m.threshold
    return (f"Model {model.model_id}: {m.patch_size}x{m.patch_size} px patches at {m.mpp:g} \u00b5m/px "
            f"({m.patch_size * m.mpp:.0f} \u00b5m{_field_of_view(m)}), threshold {threshold:.2f}"
            + (", adapted to each slide's scores" if m.adapt else "")
            + (" (never lower)" if m.adapt and m.adapt.min_shift == 0 else "")
            + (f"; a slide call from its {m.call_policy.top_cells} most confident cells" if m.call_policy else ""))


def _field_of_view(meta: ModelMeta) -> str:
    """What the network, or each network of an ensemble, sees around a patch."""
    def around(m: ModelMeta) -> str:
        view = f"with {m.margin * m.mpp:.0f} \u00b5m around it" if m.margin else "alone"
        return view if m.mpp == meta.mpp else f"at {m.mpp:g} \u00b5m/px {view}"

    if meta.members:
        # Networks with the same architecture and view are named once ("2 EfficientNet-Lite0 see ...").
        views: dict[tuple[str, str], list[float]] = {}
        for m, share in zip(meta.members, meta.shares, strict=True):
            views.setdefault((m.meta.arch.name, around(m.meta)), []).append(share)
        parts = []
        for (name, view), shares in views.items():
            who = f"{name} sees" if len(shares) == 1 else f"{len(shares)} {name} see"
            shown = [f"{s:.2g}" for s in shares]
            if len(set(shown)) > 1:
                weight = " / ".join(shown)
            else:
                weight = shown[0] + (" each" if len(shown) > 1 else "")
            parts.append(f"{who} the patch {view} (weight {weight})")
        return "; " + (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0])
    return f", each seen {around(meta)}" if meta.margin else ""


def describe_call(hm: Heatmap, positive: str, out_of_domain: bool) -> tuple[str, str]:
    """The slide's answer and its colour ("" while the heatmap is incomplete)."""
    if not hm.complete:
        return (f"Slide call ({positive} found, no {positive} found or uncertain): when the heatmap is complete.", "")
    call, score = hm.slide_call(out_of_domain), hm.slide_score
    text = f"Slide: {call_text(call, positive)} (slide score {score:.2f})"
    if out_of_domain:
        text += ": the slide lies outside the model's domain, so its score is not vouched for"
    elif call == NOT_FOUND:
        text += f"; no cell is called {positive}. Lower 'Show P \u2265' to see the probabilities."
    return text, {FOUND: "#a00000", NOT_FOUND: "#006000"}.get(call, "#805000")


def describe_agreement(a: Agreement, inner: Agreement | None, positive: str) -> str:
    """The map against the ground truth, over all labelled cells and away from region borders."""
    m = a.metrics
    at = f"at threshold {m.threshold:.2f}" if np.isfinite(m.threshold) else "with no cell called"
    text = (f"Agreement with the ground truth ({a.cells} labelled cells): AUC {m.auc:.3f}, "
            f"balanced accuracy {m.balanced_accuracy:.3f}, F1 {m.f1:.3f} {at}; "
            f"{m.fp:.0f} cells called {positive} against the truth, {m.fn:.0f} {positive} cells missed.")
    if inner is not None and 0 < inner.idc_cells < inner.cells and inner.cells < a.cells:
        text += (f" Away from region borders ({inner.cells} cells): AUC {inner.metrics.auc:.3f}, "
                 f"balanced accuracy {inner.metrics.balanced_accuracy:.3f}.")
    return text
