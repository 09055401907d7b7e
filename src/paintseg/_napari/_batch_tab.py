"""The Batch tab: segment every matching file of a folder with the Segment tab's settings."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from ._jobs import Progress
from ._segment_tab import SegmentTab
from ._session import Session, UserError, run_stop_row

__all__ = ["BatchTab"]


class BatchTab(QWidget):
    """Run :func:`~paintseg.batch.iter_batch` (the CLI's batch) over a folder, one row per
    file in a table as it finishes."""

    def __init__(self, session: Session, segment_tab: SegmentTab) -> None:
        super().__init__()
        self.session, self.segment_tab = session, segment_tab
        form = QFormLayout(self)
        self.input = QLineEdit()
        self.input.setPlaceholderText("folder of TIFF images")
        form.addRow("Input folder", self._with_browse(self.input))
        self.output = QLineEdit()
        self.output.setPlaceholderText("where the labels go")
        form.addRow("Output folder", self._with_browse(self.output))
        self.pattern = QLineEdit("*.tif*")
        form.addRow("Pattern", self.pattern)
        self.overwrite = QCheckBox("Redo files that are already done")
        form.addRow(self.overwrite)
        form.addRow(QLabel("Uses the Segment tab's tile size, output and sizes."))
        self.batch_btn, self.stop_btn, row = run_stop_row(session.jobs, "Run batch",
                                                          self.run_batch)
        form.addRow(row)
        self.files_bar = QProgressBar()
        self.files_bar.setFormat("files %v/%m")
        form.addRow(self.files_bar)
        self.tiles_bar = QProgressBar()
        self.tiles_bar.setFormat("tiles %p%")
        form.addRow(self.tiles_bar)
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["File", "Result", "Details"])
        self.table.horizontalHeader().setSectionResizeMode(2, QHeaderView.ResizeMode.Stretch)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setMinimumHeight(140)
        form.addRow(self.table)

    def _with_browse(self, edit: QLineEdit) -> QWidget:
        w = QWidget()
        row = QHBoxLayout(w)
        row.setContentsMargins(0, 0, 0, 0)
        btn = QPushButton("…")
        btn.setMaximumWidth(30)
        btn.clicked.connect(lambda: self._browse_folder(edit))
        row.addWidget(edit, 1)
        row.addWidget(btn)
        return w

    def _browse_folder(self, edit: QLineEdit) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a folder", edit.text())
        if folder:
            edit.setText(folder)

    def run_batch(self) -> bool:
        """Segment every matching file of the input folder into the output folder."""
        from ..batch import collect_inputs, iter_batch
        from ..io import check_output_folder

        s = self.session
        try:
            model = s.require_model()
            src, dst = self.input.text().strip(), self.output.text().strip()
            if not src or not Path(src).is_dir():
                raise UserError(f"Choose an input folder (got {src!r}).")
            if not dst:
                raise UserError("Choose an output folder.")
            jobs = collect_inputs([src], pattern=self.pattern.text().strip() or "*.tif*")
            out_dir = check_output_folder(dst)
            # the batch writes labels only; "Show class probabilities" is for the viewer
            settings = self.segment_tab.settings().replace(probabilities=False)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            s.refuse(exc)
            return False
        device, overwrite = s.device, self.overwrite.isChecked()
        self.table.setRowCount(0)
        self.files_bar.setMaximum(len(jobs))
        self.files_bar.setValue(0)
        self.tiles_bar.setValue(0)

        def job(report, should_stop):
            net = copy.deepcopy(model)  # here: no torch on the GUI thread (see _jobs.py)
            results = []
            for r in iter_batch(jobs, net, out_dir=out_dir, settings=settings, device=device,
                                overwrite=overwrite, should_stop=should_stop,
                                progress=lambda d, t: report(Progress(d, t))):
                results.append(r)
                yield r
            return results

        s.say(f"Batch: {len(jobs)} file(s) from {src}…")
        return s.jobs.start("batch", job, on_progress=self._progress,
                            on_done=lambda res: self._done(res, len(jobs)),
                            on_error=s.failed("Batch"))

    def _progress(self, item: Any) -> None:
        if isinstance(item, Progress):
            self.tiles_bar.setMaximum(max(item.total, 1))
            self.tiles_bar.setValue(item.done)
            return
        r = item  # a FileResult
        row = self.table.rowCount()
        self.table.insertRow(row)
        reason = r.reason[len(r.source) + 2:] if r.reason.startswith(f"{r.source}: ") \
            else r.reason  # the file is in the first column
        detail = reason or (f"{r.objects} objects, " if r.objects is not None else "") + \
            f"{r.seconds:.1f} s"
        for col, text in enumerate((Path(r.source).name, r.status, detail)):
            cell = QTableWidgetItem(text)
            cell.setToolTip(r.source if col == 0 else r.reason or text)
            self.table.setItem(row, col, cell)
        self.files_bar.setValue(row + 1)

    def _done(self, results: list[Any], total: int) -> None:
        counts = {k: sum(r.status == k for r in results) for k in ("done", "skipped", "failed")}
        left = total - len(results)
        msg = (f"Batch finished: {counts['done']} written, {counts['skipped']} already done, "
               f"{counts['failed']} failed" + (f", {left} not started (stopped)" if left else "")
               + ".")
        self.session.notify(msg, "warning" if counts["failed"] else "info")
