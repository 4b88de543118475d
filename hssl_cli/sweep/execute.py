"""`hssl sweep`'s work, apart from its options and its printing: the cells asked for and their status, the
cells run in order (each under its progress bar), the report files written beside the cells."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from hssl_cli.errors import HsslError
from hssl_cli.files import write_text_atomically
from hssl_cli.render import TrainingProgress
from hssl_cli.sweep.report import (
    Report,
    claim_rows,
    collect,
    markdown,
    plot,
    plot_curve,
    protocol_line,
    table_rows,
    write_csv,
)
from hssl_cli.sweep.run import cell_folder, read_result
from hssl_cli.sweep.suite import Cell, LoadedSuite


def select_cells(loaded: LoadedSuite, index: int | None) -> list[Cell]:
    """Every cell of the suite, or only cell `index` (--cell)."""
    if index is None:
        return loaded.cells
    if not 0 <= index < len(loaded.cells):
        raise HsslError(f"--cell {index}: {loaded.path} has cells 0 to {len(loaded.cells) - 1} (see --list)")
    return [loaded.cells[index]]


def cell_statuses(loaded: LoadedSuite, cells: list[Cell], output: Path) -> list[dict]:
    """One row per cell for --list: its index, id, status (pending, started, finished, diverged), folder and
    overrides."""
    rows = []
    for cell in cells:
        folder = cell_folder(output, loaded, cell)
        result = read_result(folder, loaded, cell)
        state = result["status"] if result is not None else "started" if folder.exists() else "pending"
        rows.append({"index": cell.index, "cell": cell.id, "status": state, "folder": str(folder),
                     "overrides": cell.overrides})
    return rows


def run_cells(loaded: LoadedSuite, cells: list[Cell], output: Path, device: str, console: Console) -> bool:
    """Run (or skip) the cells in order, each under a progress bar with status lines on `console`; True when
    a stop signal interrupted one (it resumes on the next run), and the cells after it were not started."""
    from hssl_cli.evaluate.measures.spectrum import training_diagnostics
    from hssl_cli.sweep.run import run_cell

    for number, cell in enumerate(cells, start=1):
        prefix = f"[{number}/{len(cells)}] cell {cell.index} {cell.id}"

        def status(text: str, prefix: str = prefix) -> None:
            console.print(f"{prefix}: {text}", highlight=False, soft_wrap=True, markup=False)

        with TrainingProgress(console, prefix) as progress:
            result = run_cell(loaded, cell, output, device, progress=progress.update,
                              diagnostics=training_diagnostics, status=status)
        if result is not None and result["status"] == "interrupted":
            status("interrupted: run the same command again to continue this cell")
            return True
    return False


@dataclass
class WrittenReport:
    """The report of a suite's finished cells, as written beside them and as `hssl sweep` prints it."""

    report: Report
    folder: Path
    files: list[str]  # the names written into folder
    cells: int  # cells the suite defines
    curve_missing: str | None  # report.curve when no finished cell logged it

    @property
    def table(self) -> tuple[list[str], list[list[str]]]:
        """Header and rows: mean ± std per variant (and swept value)."""
        return table_rows(self.report)

    @property
    def claims(self) -> tuple[list[str], list[list[str]]] | None:
        """Header and rows of the decided claims, if the suite declares any."""
        return claim_rows(self.report) if self.report.claims else None

    @property
    def protocol(self) -> str:
        return protocol_line(self.report)

    @property
    def finished(self) -> int:
        """Cells with a result (finished or diverged)."""
        return len(self.report.results)

    @property
    def cell_seconds(self) -> float:
        """The finished cells' time in all."""
        return self.report.cell_seconds


def write_report(loaded: LoadedSuite, output: Path, command: str) -> WrittenReport:
    """report.md (made by `command`), report.csv and, once a cell finished, report.png (and
    report-curve.png when the suite asks for a curve) in the suite's folder."""
    report = collect(loaded, output)
    folder = output / loaded.name
    write_text_atomically(folder / "report.md", markdown(report, command))
    write_csv(report, folder / "report.csv")
    files = ["report.md", "report.csv"]
    curve_missing = None
    if report.results:
        plot(report, folder / "report.png")
        files.append("report.png")
        if loaded.suite.report.curve:
            if plot_curve(report, loaded.suite.report.curve, folder / "report-curve.png"):
                files.append("report-curve.png")
            else:
                curve_missing = loaded.suite.report.curve
    return WrittenReport(report, folder, files, len(loaded.cells), curve_missing)
