"""Training logs: a CSV with fixed columns, TensorBoard scalars, a loss plot and a console line."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from plait.train.metrics import COMM_COLUMNS, MOE_COLUMNS, OFFLOAD_COLUMNS

DEFAULT_COLUMNS: tuple[str, ...] = (
    "step",
    "loss",
    "val_loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "mfu",
    "state_bytes",
    "peak_rss",
    "step_s",
    *COMM_COLUMNS,
    *OFFLOAD_COLUMNS,
    *MOE_COLUMNS,
)


class MetricsLog:
    """One CSV row and one set of TensorBoard scalars per `log` call, under `out_dir`.

    The CSV columns are fixed up front (`columns`, starting with "step") so rows
    written before a metric first appears (val_loss) still line up; a missing
    value is an empty cell. With `enabled=False` (ranks other than 0) every
    method is a no-op and nothing is created.

    `start_step=0` starts a fresh `metrics.csv`; a resumed run passes the step it
    resumed from, which keeps the rows up to that step and drops the later ones
    (written after the checkpoint by the run that stopped).

    >>> log = MetricsLog(Path("runs/x"), enabled=rank == 0)  # doctest: +SKIP
    >>> log.log(10, {"loss": 5.1, "lr": 3e-4})  # doctest: +SKIP
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        enabled: bool,
        columns: Sequence[str] = DEFAULT_COLUMNS,
        start_step: int = 0,
    ) -> None:
        self.enabled = enabled
        self.columns = ["step", *(c for c in columns if c != "step")]
        self.csv_path = Path(out_dir) / "metrics.csv"
        self._file: Any = None
        self._writer: Any = None
        self._tb: Any = None
        if enabled:
            self._open(Path(out_dir), start_step=start_step)

    def _open(self, out_dir: Path, *, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported here: slow, and only rank 0 needs it

        out_dir.mkdir(parents=True, exist_ok=True)
        kept = self._rows_to_keep(start_step)
        self._file = self.csv_path.open("w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns)
        self._writer.writeheader()
        self._writer.writerows(kept)
        self._file.flush()
        self._tb = SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1 if start_step > 0 else None)

    def _rows_to_keep(self, start_step: int) -> list[dict[str, str]]:
        if start_step <= 0 or not self.csv_path.exists():
            return []
        with self.csv_path.open(newline="") as file:
            reader = csv.DictReader(file)
            if reader.fieldnames != self.columns:
                raise ValueError(
                    f"{self.csv_path} has columns {reader.fieldnames}, but this run logs {self.columns}; "
                    "resume with the same columns, or use a new out_dir"
                )
            return [row for row in reader if row["step"] and float(row["step"]) <= start_step]

    def log(self, step: int, values: Mapping[str, float | None]) -> None:
        """Append one row for `step` (values missing from `values` or None stay empty)."""
        if not self.enabled:
            return
        unknown = sorted(set(values) - set(self.columns))
        if unknown:
            raise ValueError(
                f"metrics {unknown} are not among the log's columns {self.columns}; add them to MetricsLog(columns=...)"
            )
        present = {key: float(value) for key, value in values.items() if value is not None and key != "step"}
        self._writer.writerow({"step": int(step), **present})
        self._file.flush()
        for key, value in present.items():
            self._tb.add_scalar(key, value, global_step=int(step))

    def close(self) -> None:
        """Flush and close the CSV and TensorBoard files."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(csv_path: Path) -> list[dict[str, float]]:
    """The rows of a metrics CSV as floats; empty cells are left out of a row."""
    with Path(csv_path).open(newline="") as file:
        return [{key: float(value) for key, value in row.items() if value} for row in csv.DictReader(file)]


def plot_loss_curve(csv_path: Path, png_path: Path) -> None:
    """Plot train loss per step (a line) and validation loss (points) from a metrics CSV into a PNG."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and touches no global pyplot state

    rows = read_metrics(csv_path)
    figure = Figure(figsize=(7, 4.5), dpi=100)
    axes = figure.add_subplot()
    train = [(row["step"], row["loss"]) for row in rows if "loss" in row]
    val = [(row["step"], row["val_loss"]) for row in rows if "val_loss" in row]
    if train:
        axes.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if val:
        axes.plot(*zip(*val, strict=True), "o", label="validation loss", markersize=5)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats / token)")
    axes.set_title(Path(csv_path).parent.name or "loss")
    axes.grid(alpha=0.3)
    if train or val:
        axes.legend()
    figure.tight_layout()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path, format="png")


def format_bytes(num_bytes: float) -> str:
    """Decimal units: 120400000 -> '120.4 MB'."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(num_bytes) >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes:.0f} B"


_FORMATS: tuple[tuple[str, Any], ...] = (
    ("loss", lambda v: f"loss {v:.3f}"),
    ("val_loss", lambda v: f"val {v:.3f}"),
    ("val_acc", lambda v: f"top-1 {100 * v:.1f}%"),
    ("lr", lambda v: f"lr {v:.1e}"),
    ("grad_norm", lambda v: f"gnorm {v:.2f}"),
    ("tokens_per_s", lambda v: f"{v:.0f} tok/s"),
    ("images_per_s", lambda v: f"{v:.0f} img/s"),
    ("mfu", lambda v: f"MFU {100 * v:.1f}%"),
    ("state_bytes", lambda v: f"state {format_bytes(v)}"),
    ("peak_rss", lambda v: f"rss {format_bytes(v)}"),
    ("comm_bytes", lambda v: f"comm {format_bytes(v)}/step"),
    ("offload_disk_bytes", lambda v: f"disk {format_bytes(v)}"),
    ("offload_read_bytes", lambda v: f"io read {format_bytes(v)}"),
    ("offload_write_bytes", lambda v: f"written {format_bytes(v)}/step"),
    ("offload_hidden", lambda v: f"{100 * v:.0f}% of io hidden"),
    ("moe_aux_loss", lambda v: f"moe aux {v:.3f}"),
    ("moe_dropped", lambda v: f"dropped {100 * v:.1f}%"),
    ("moe_load_min", lambda v: f"expert load min {v:.0f}"),
    ("moe_load_max", lambda v: f"max {v:.0f}"),
)
_COMM_PARTS = tuple(column for column in COMM_COLUMNS if column != "comm_bytes")


def _comm_breakdown(values: Mapping[str, float | None]) -> str:
    """' (dp 1.2 MB, tp 3.4 MB, intra 4.6 MB)': the axes and links that moved bytes."""
    parts = [
        f"{key.removeprefix('comm_').removesuffix('_bytes')} {format_bytes(float(value))}"
        for key in _COMM_PARTS
        if (value := values.get(key))
    ]
    return f" ({', '.join(parts)})" if parts else ""


def format_metrics_line(step: int, total_steps: int, values: Mapping[str, float | None]) -> str:
    """A compact console line of the known metrics present in `values`.

    >>> format_metrics_line(40, 300, {"loss": 5.1234, "lr": 3e-4, "mfu": 0.123})
    'step 40/300 | loss 5.123 | lr 3.0e-04 | MFU 12.3%'
    >>> format_metrics_line(1, 2, {"comm_bytes": 3e6, "comm_dp_bytes": 1e6, "comm_tp_bytes": 2e6, "comm_intra_bytes": 3e6})
    'step 1/2 | comm 3.0 MB/step (dp 1.0 MB, tp 2.0 MB, intra 3.0 MB)'
    """
    parts = [f"step {step}/{total_steps}"]
    for key, render in _FORMATS:
        value = values.get(key)
        if value is not None:
            parts.append(render(float(value)) + (_comm_breakdown(values) if key == "comm_bytes" else ""))
    return " | ".join(parts)
