"""What a stage prints while it runs: one live line per phase (fit, validate, test, predict).

:class:`StageProgress` is the progress bar of every stage (``trainer.enable_progress_bar: false`` turns it
off). On a terminal it rewrites one line in place::

       fit  [########----]  1200/1500  loss 0.412  acc 71.3  val/acc 78.3 (best 80.1)  1:32 < 0:23

and leaves the last state of each phase on screen. When stderr is not a terminal (CI, a log file) it
prints that line at most every ``refresh_s`` seconds (default 20) and once at the end of each phase,
so a log of a long run stays short. The metrics shown are those a stage logs with ``prog_bar=True``
(``train/`` dropped from the name); "best" is the checkpoint's monitored metric.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from typing import Any, TextIO

from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

_ACTIVE: StageProgress | None = None  # the bar whose live line is on screen (cleared before a log line)


def duration(seconds: float) -> str:
    """``42 s``, ``3:05``, ``1:02:03``."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(max(seconds, 0)))
    if s < 60:
        return f"{s} s"
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def count(n: float) -> str:
    """``950``, ``36.4K``, ``1.2M``."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def clear_line() -> None:
    """Erase the live line, if one is on screen, so a log message starts at the left margin."""
    if _ACTIVE is not None:
        _ACTIVE._clear()


def _number(v: Any) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f"{v:.4g}" if abs(v) < 10 else f"{v:.1f}"


class StageProgress(ProgressBar):
    """One line per phase: steps (or batches), the prog-bar metrics, elapsed time and an estimate of the
    time left. ``live``: rewrite the line in place (default: when the stream is a terminal); ``refresh_s``:
    the least time between two updates (default 0.5 s live, 20 s otherwise)."""

    def __init__(
        self, refresh_s: float | None = None, live: bool | None = None, stream: TextIO | None = None
    ):
        super().__init__()
        self._stream = stream
        self._live = live
        self._refresh = refresh_s
        self._enabled = True
        self._shown = 0  # characters of the live line on screen
        self._last = -math.inf
        self._phase: str | None = None
        self._t0 = 0.0
        self._start_step = 0
        self._total = math.inf
        self._done = 0
        self._validating: tuple[int, float] | None = None

    # --- where and how often ------------------------------------------------------------------------
    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stderr

    @property
    def live(self) -> bool:
        if self._live is not None:
            return self._live
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    @property
    def refresh_s(self) -> float:
        return self._refresh if self._refresh is not None else (0.5 if self.live else 20.0)

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args: Any, **kwargs: Any) -> None:
        self._clear()
        print(*args, **kwargs)

    def _clear(self) -> None:
        global _ACTIVE
        if self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self.stream.flush()
            self._shown = 0
        if _ACTIVE is self:
            _ACTIVE = None

    def _emit(self, text: str, final: bool = False) -> None:
        global _ACTIVE
        if not self._enabled:
            return
        now = time.monotonic()
        if not final and now - self._last < self.refresh_s:
            return
        self._last = now
        if self.live:
            width = max(20, shutil.get_terminal_size((120, 24)).columns - 1)
            text = text[:width]
            pad = " " * max(0, self._shown - len(text))
            self.stream.write("\r" + text + pad + ("\n" if final else ""))
            self._shown = 0 if final else len(text)
            _ACTIVE = None if final else self
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    # --- the line -------------------------------------------------------------------------------------
    def _start(self, phase: str, total: float) -> None:
        self._phase, self._t0, self._done, self._total = phase, time.monotonic(), 0, total
        self._last = -math.inf if self.live else time.monotonic()  # a log prints nothing at 0 %

    def _timing(self, done: float, total: float, final: bool) -> str:
        elapsed = time.monotonic() - self._t0
        if final:
            return f"in {duration(elapsed)}"
        if done > 0 and math.isfinite(total):
            return f"{duration(elapsed)} < {duration(elapsed / done * max(total - done, 0))}"
        return duration(elapsed)

    def _position(self, done: int, total: float, unit: str) -> str:
        if not math.isfinite(total) or total <= 0:
            return f"{done} {unit}"
        text = f"{done}/{total:.0f} {unit}"
        if self.live:
            filled = int(12 * min(done / total, 1.0))
            text = f"[{'#' * filled}{'-' * (12 - filled)}] " + text
        return text

    def _metrics(self, trainer) -> str:
        ckpt = trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_score", None)
        monitor = getattr(ckpt, "monitor", None) if best is not None else None
        items = []
        for k, v in trainer.progress_bar_metrics.items():
            item = f"{k.removeprefix('train/')} {_number(v)}"
            items.append(item + (f" (best {_number(best)})" if k == monitor else ""))
        if monitor and monitor not in trainer.progress_bar_metrics:
            items.append(f"best {monitor} {_number(best)}")
        return "  ".join(items)

    def _fit_line(self, trainer, final: bool = False) -> str:
        step = trainer.global_step
        parts = [f"   {'fit':>8}", self._position(step, self._total, "steps")]
        metrics = self._metrics(trainer)
        if metrics:
            parts.append(metrics)
        if self._validating is not None and not final:
            done, total = self._validating
            parts.append(f"validating {done}/{total:.0f}" if math.isfinite(total) else "validating")
        parts.append(self._timing(step - self._start_step, self._total - self._start_step, final))
        return "  ".join(parts)

    def _eval_line(self, final: bool = False) -> str:
        parts = [f"   {self._phase:>8}", self._position(self._done, self._total, "batches")]
        parts.append(self._timing(self._done, self._total, final))
        return "  ".join(parts)

    # --- fit ------------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else math.inf
        if not math.isfinite(total):
            try:
                total = float(trainer.estimated_stepping_batches)
            except (RuntimeError, ValueError, TypeError):
                total = math.inf
        self._start("fit", total)
        self._start_step = trainer.global_step
        self._emit(self._fit_line(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._emit(self._fit_line(trainer))

    def on_train_end(self, trainer, pl_module) -> None:
        self._validating = None
        line = self._fit_line(trainer, final=True)
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        self._emit(f"{line}  ({count(trainable)} trained parameters)", final=True)
        self._phase = None

    # --- validation (inside fit: part of the fit line; `validate`: its own) ----------------------------
    def _in_fit(self, trainer) -> bool:
        return self._phase == "fit" and trainer.state.fn == "fit"

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        total = float(sum(trainer.num_val_batches)) if trainer.num_val_batches else math.inf
        if self._in_fit(trainer):
            self._validating = (0, total)
        else:
            self._start("validate", total)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if trainer.sanity_checking:
            return
        if self._in_fit(trainer):
            done, total = self._validating or (0, math.inf)
            self._validating = (done + 1, total)
            self._emit(self._fit_line(trainer))
        else:
            self._done += 1
            self._emit(self._eval_line())

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        if self._in_fit(trainer):
            self._validating = None
            self._emit(self._fit_line(trainer))
        else:
            self._finish_eval()

    # --- test and predict -----------------------------------------------------------------------------
    def on_test_start(self, trainer, pl_module) -> None:
        self._start("test", float(sum(trainer.num_test_batches)) if trainer.num_test_batches else math.inf)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._done += 1
        self._emit(self._eval_line())

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        # before the stage's own on_test_epoch_end, which prints the results table
        self._finish_eval()

    def on_predict_start(self, trainer, pl_module) -> None:
        batches = trainer.num_predict_batches
        self._start("predict", float(sum(batches)) if batches else math.inf)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._done += 1
        self._emit(self._eval_line())

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self._finish_eval()

    def _finish_eval(self) -> None:
        if self._phase is not None:
            self._emit(self._eval_line(final=True), final=True)
            self._phase = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._shown:  # end the live line, so the error starts on its own
            self.stream.write("\n")
            self.stream.flush()
            self._shown = 0
