"""What ``cgwgan main`` shows while it runs: one line per stage, bars on long stages, and the
whole Dagster event log in a file.

* :func:`main_job_logger`: a Dagster logger for the main job's stage runs. It writes every event
  and log message, in Dagster's own format, to a log file, and says one line per finished stage
  (asset step) with its wall time and key numbers from the materialisation metadata
  (:data:`STAGE_KEYS`), plus a line for a failed asset check or a failed step.
* :func:`progress_bar`: a tqdm bar for a long stage (training epochs, pre-screen, relaxation and
  phonon batches). Bars are off unless :func:`enable_bars` turned them on; ``cgwgan main`` does
  so when stderr is a terminal and ``--verbose`` is not given. Elsewhere (``dagster dev``, tests,
  a pipe) a bar is a no-op. The bars write to a duplicate of the terminal's stderr taken before
  the run starts, so Dagster's capture of a step's output does not swallow or record them.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import dagster as dg

#: Key numbers of each stage's line: ``asset -> [(metadata key, label)]``; assets not named here
#: show their row count (``rows`` or ``dagster/row_count``).
STAGE_KEYS: dict[str, list[tuple[str, str]]] = {
    "mp_structures": [("dagster/row_count", "structures"), ("n_rejects", "rejected")],
    "mp_symmetry": [("dagster/row_count", "rows"), ("round_trip_rate", "round trip")],
    "training_templates": [("dagster/row_count", "training rows")],
    "wgan_checkpoint": [("reused", "reused"), ("epochs", "epochs"), ("n_training_rows", "rows"),
                        ("final_wasserstein", "W"), ("checkpoint_id", "")],
    "templates": [("dagster/row_count", "templates"), ("n_samples", "samples"), ("validity", "validity"),
                  ("density_overlap", "density overlap")],
    "candidates": [("rows", "candidates"), ("n_templates", "templates")],
    "candidates_dedup": [("rows", "unique"), ("input_rows", "of"), ("mp_matches", "known in MP")],
    "prescreen": [("rows", "screened"), ("n_error", "errors"), ("structures_per_s", "structures/s"),
                  ("batches_skipped_resumed", "batches reused")],
    "relaxed": [("rows", "relaxed"), ("n_selected_compositions", "compositions"), ("n_converged", "converged"),
                ("convergence_rate", "share"), ("n_on_or_below_hull", "on/below hull"),
                ("relaxations_per_min", "per min")],
    "surrogate_models": [("n_surrogates", "surrogates")],
    "references": [("n_reference_phases", "reference phases"), ("n_reference_ok", "relaxed")],
    "phonons": [("rows", "screened"), ("n_stable", "stable"), ("n_skipped_size", "skipped (size)")],
    "shortlist": [("rows", "rows"), ("n_unique_structures", "unique"), ("n_novel", "novel"),
                  ("n_known", "known phases"), ("n_dynamically_stable", "stable"), ("n_below_0_1_ev", "< 0.1 eV/atom")],
    "dft_inputs": [("n_written", "folders written"), ("n_failed", "failed")],
    "xrd_patterns": [("n_patterns", "patterns")],
    "dft_runs": [("n_candidates", "candidates"), ("n_competing_phases", "phases"), ("n_ok", "ok"),
                 ("n_failed", "failed"), ("n_skipped", "skipped"), ("n_computed", "computed")],
    "dft_results": [("n_new", "ingested"), ("n_ok", "linked ok"), ("n_unlinked", "phases"), ("n_failed", "failed"),
                    ("n_already_ingested", "already ingested")],
    "discoveries": [("rows", "verdicts"), ("n_discovery", "discoveries"), ("n_rediscovery", "rediscoveries")],
    "surrogate_accuracy": [("n_pairs", "candidate x surrogate pairs"), ("rows", "rows")],
    "discovery_report": [("n_candidates_shown", "candidates shown"), ("n_plots", "plots")],
}

#: Metadata keys shown for an asset without an entry in :data:`STAGE_KEYS`.
_DEFAULT_KEYS = [("rows", "rows"), ("dagster/row_count", "rows")]


# ----------------------------------------------------------------------------- bars
@dataclass
class _BarSettings:
    stream: TextIO | None = None  # None: bars off


_BARS = _BarSettings()


def enable_bars(stream: TextIO | None) -> None:
    """Draw bars on ``stream`` (None: no bars)."""
    _BARS.stream = stream


def bars_enabled() -> bool:
    return _BARS.stream is not None


def terminal_stream(verbose: bool) -> TextIO | None:
    """A duplicate of stderr for the bars when it is a terminal and not ``verbose``, else None."""
    if verbose:
        return None
    try:
        if not sys.stderr.isatty():
            return None
        return os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)
    except (AttributeError, OSError, ValueError):  # a replaced stderr (pytest, notebooks)
        return None


def new_bar(total: int | None, desc: str, unit: str = "it") -> Any:
    """A tqdm bar on the configured stream (a disabled, silent tqdm when bars are off); close it."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=_BARS.stream, leave=False, dynamic_ncols=True,
                mininterval=0.5, disable=_BARS.stream is None)


@contextmanager
def progress_bar(total: int | None, desc: str, unit: str = "it") -> Iterator[Any]:
    """:func:`new_bar` as a context manager (the bar is closed on leaving)."""
    bar = new_bar(total, desc, unit)
    try:
        yield bar
    finally:
        bar.close()


# ----------------------------------------------------------------------------- stage lines
def _value(v: Any) -> Any:
    return getattr(v, "value", v)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def key_numbers(asset: str, metadata: dict[str, Any]) -> str:
    """``"rows 12 · converged 2"``: the numbers of :data:`STAGE_KEYS` found in ``metadata``."""
    parts: list[str] = []
    seen_labels: set[str] = set()
    for key, label in STAGE_KEYS.get(asset, _DEFAULT_KEYS):
        if key not in metadata or label in seen_labels:
            continue
        v = _value(metadata[key])
        if v is None or isinstance(v, dict | list):
            continue
        if key == "reused":
            if v:
                parts.append("reused")
            continue
        seen_labels.add(label)
        parts.append(f"{label} {_fmt(v)}" if label else _fmt(v))
    return " · ".join(parts)


@dataclass
class _Step:
    started: float = 0.0
    assets: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


class StageLines(logging.Handler):
    """Turns the Dagster events of a run into one line per finished asset step (see module doc)."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        super().__init__(level=logging.DEBUG)
        self._emit = emit
        self._steps: dict[str, _Step] = {}
        self.lines: list[str] = []

    def _say(self, line: str) -> None:
        self.lines.append(line)
        self._emit(line)

    def emit(self, record: logging.LogRecord) -> None:
        meta = getattr(record, "dagster_meta", None) or {}
        event = meta.get("dagster_event")
        if event is None:
            return
        kind = event.event_type_value
        step = event.step_key or ""
        if kind == "STEP_START":
            self._steps[step] = _Step(started=time.perf_counter())
        elif kind == "ASSET_MATERIALIZATION":
            m = event.event_specific_data.materialization
            self._steps.setdefault(step, _Step()).assets.append(
                (m.asset_key.to_user_string(), dict(m.metadata)))
        elif kind == "ASSET_CHECK_EVALUATION":
            ev = event.event_specific_data
            if not ev.passed:
                self._say(f"  ! check {ev.asset_key.to_user_string()}:{ev.check_name} failed")
        elif kind == "STEP_SUCCESS":
            info = self._steps.pop(step, _Step())
            if not info.assets:
                return  # an asset check's own step: said only when it fails
            seconds = (event.event_specific_data.duration_ms or 0.0) / 1000.0
            # a step materialising several assets: the line is the one with key numbers to show
            main = next((a for a in info.assets if a[0] in STAGE_KEYS), info.assets[0])
            name, metadata = main
            numbers = key_numbers(name, metadata)
            others = [a for a, _ in info.assets if a != name]
            line = f"  {name:<20} {seconds:7.1f} s  {numbers}"
            if others:
                line += f"  (+ {', '.join(others)})"
            self._say(line.rstrip())
        elif kind == "STEP_FAILURE":
            err = event.event_specific_data.error
            while err is not None and err.cause is not None:  # the user's exception, not Dagster's wrapper
                err = err.cause
            msg = (err.message.strip().splitlines() or [""])[0][:200] if err is not None else ""
            self._say(f"  {step:<20} FAILED  {msg}")


@dataclass
class MainJobLog:
    """The Dagster logger of the main job's stage runs, its stage lines and its log file."""

    logger_def: dg.LoggerDefinition
    stages: StageLines
    logger: logging.Logger
    path: Path

    def close(self) -> None:
        for h in list(self.logger.handlers):
            h.close()
            self.logger.removeHandler(h)


def main_job_logger(log_file: Path, *, emit: Callable[[str], None]) -> MainJobLog:
    """A Dagster logger writing every event to ``log_file`` (appended) and stage lines to ``emit``."""
    from dagster._utils.log import default_date_format_string, default_format_string

    log_file.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(log_file, encoding="utf-8")
    file_handler.setLevel(logging.DEBUG)
    file_handler.setFormatter(logging.Formatter(default_format_string(), default_date_format_string()))
    stages = StageLines(emit)
    logger = logging.Logger("dagster", level=logging.DEBUG)
    logger.addHandler(file_handler)
    logger.addHandler(stages)

    def _init(_context: dg.InitLoggerContext) -> logging.Logger:
        return logger

    defn = dg.LoggerDefinition(_init, description="cgwgan main: event log file and stage lines")
    return MainJobLog(defn, stages, logger, log_file)
