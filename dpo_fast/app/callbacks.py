"""``dpo-fast train``'s TrainerCallbacks: a progress bar showing loss, reward accuracy and
margin; the training-curves PNG; saving a checkpoint and stopping on SIGINT / SIGTERM."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from transformers import ProgressCallback, TrainerCallback

CURVES_FILE = "training_curves.png"
# (log key, plot title): what the summary, the progress bar and the plot show
CURVES = (("loss", "loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin"))


def train_points(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``key`` in the training logs of ``log_history``."""
    rows = [row for row in log_history if key in row and "step" in row]
    return [row["step"] for row in rows], [row[key] for row in rows]


def write_curves(log_history: list[dict], path: Path) -> bool:
    """Plot loss, reward accuracy and margin per logged step (evaluation points as markers) to
    ``path``, written whole then renamed into place; False when nothing was logged yet."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not train_points(log_history, "loss")[0]:
        return False
    figure = Figure(figsize=(13, 3.6), layout="constrained")
    for axes, (key, title) in zip(figure.subplots(1, len(CURVES)), CURVES, strict=True):
        axes.plot(*train_points(log_history, key), label="training batches", linewidth=1.2)
        steps, values = train_points(log_history, f"eval_{key}")
        if steps:
            axes.plot(steps, values, "o-", label="evaluation", markersize=4)
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    axes.legend()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    FigureCanvasAgg(figure).print_png(temporary)
    os.replace(temporary, path)
    return True


class TrainingCurves(TrainerCallback):
    """Writes ``<output_dir>/training_curves.png`` at every save and at the end."""

    def _write(self, args, state) -> None:
        if state.is_world_process_zero:
            write_curves(state.log_history, Path(args.output_dir) / CURVES_FILE)

    def on_save(self, args, state, control, **kwargs):
        self._write(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self._write(args, state)


class MetricsProgress(ProgressCallback):
    """transformers' progress bar with the latest loss, reward accuracy and margin on it instead
    of a printed dict per log; evaluations print one line each."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        short = {"loss": "loss", "rewards/accuracies": "acc", "rewards/margins": "margin"}
        if "loss" in logs:
            self.training_bar.set_postfix(
                {name: f"{logs[key]:.3f}" for key, name in short.items() if key in logs}
            )
        elif "eval_loss" in logs:
            values = ", ".join(
                f"{name} {logs['eval_' + key]:.3f}" for key, name in short.items() if "eval_" + key in logs
            )
            self.training_bar.write(f"evaluation at step {state.global_step}: {values}")


class SaveOnSignal(TrainerCallback):
    """On the first SIGINT or SIGTERM during training: finish the step, save a checkpoint and
    stop (``received`` holds the signal). A second one stops at once (KeyboardInterrupt): the
    checkpoints on disk are complete either way."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            self._restore()
            raise KeyboardInterrupt
        self.received = signum
        print(
            f"\ndpo-fast: {signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
            "(again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self._restore()
