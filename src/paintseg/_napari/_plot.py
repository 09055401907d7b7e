"""A small live plot of the training loss and validation IoU, drawn with QPainter (no
matplotlib dependency)."""

from __future__ import annotations

import math

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

__all__ = ["LossPlot"]

_LOSS = QColor(255, 170, 60)
_VAL = QColor(90, 200, 255)


class LossPlot(QWidget):
    """Training loss (log scale, left) and validation IoU (0..1, right) against steps."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setMinimumHeight(120)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.loss: list[tuple[int, float]] = []
        self.iou: list[tuple[int, float]] = []
        self.best_step: int | None = None

    def clear(self) -> None:
        self.loss.clear()
        self.iou.clear()
        self.best_step = None
        self.update()

    def add_loss(self, step: int, loss: float) -> None:
        if math.isfinite(loss) and loss > 0:
            self.loss.append((step, loss))
            self.update()

    def add_validation(self, step: int, iou: float, best_step: int | None) -> None:
        self.iou.append((step, iou))
        self.best_step = best_step
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt override
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        w, h = self.width(), self.height()
        left, right, top, bottom = 8, 8, 18, 16
        area = QRectF(left, top, max(1, w - left - right), max(1, h - top - bottom))
        p.fillRect(self.rect(), QColor(38, 41, 48))
        p.setPen(QPen(QColor(90, 94, 102), 1))
        p.drawRect(area)
        p.setPen(_LOSS)
        p.drawText(QPointF(left, 13), "loss")
        p.setPen(_VAL)
        p.drawText(QPointF(left + 40, 13), "validation IoU")
        if not self.loss:
            p.setPen(QColor(160, 160, 160))
            p.drawText(area, Qt.AlignmentFlag.AlignCenter, "the loss appears here while training")
            p.end()
            return
        last = max(s for s, _ in self.loss + self.iou)
        first = min(s for s, _ in self.loss + self.iou)
        span = max(1, last - first)

        def x(step: int) -> float:
            return area.left() + area.width() * (step - first) / span

        logs = [math.log10(v) for _, v in self.loss]
        lo, hi = min(logs), max(logs)
        if hi - lo < 1e-6:
            lo, hi = lo - 0.5, hi + 0.5
        poly = QPolygonF([QPointF(x(s), area.bottom() - area.height() * (math.log10(v) - lo) /
                                  (hi - lo)) for s, v in self.loss])
        p.setPen(QPen(_LOSS, 1.5))
        p.drawPolyline(poly)
        if self.iou:
            pts = [QPointF(x(s), area.bottom() - area.height() * v) for s, v in self.iou]
            p.setPen(QPen(_VAL, 1.5))
            p.drawPolyline(QPolygonF(pts))
            for pt in pts:
                p.drawEllipse(pt, 2.5, 2.5)
        if self.best_step is not None and self.iou:
            p.setPen(QPen(QColor(120, 220, 120), 1, Qt.PenStyle.DashLine))
            bx = x(self.best_step)
            p.drawLine(QPointF(bx, area.top()), QPointF(bx, area.bottom()))
        p.setPen(QColor(170, 170, 170))
        p.drawText(QPointF(left, h - 3), f"step {first}")
        label = f"step {last}  loss {self.loss[-1][1]:.3f}"
        p.drawText(QRectF(0, h - 15, w - right, 14), Qt.AlignmentFlag.AlignRight, label)
        p.end()
