"""What the heatmap panel says about its model and colours: the legend bar and the model's line."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QLinearGradient, QPainter, QPaintEvent
from PySide6.QtWidgets import QWidget

from inference.heatmap import DEFAULT_COLORMAP, colormap_lut
from inference.model import LoadedModel, ModelMeta


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
