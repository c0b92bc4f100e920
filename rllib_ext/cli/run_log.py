"""Where the output of a training run goes: the console gets progress, real warnings and errors;
everything else (vLLM, Ray workers, libraries) goes to ``rllib.log`` in the trial directory.

Ray streams every worker process's stdout/stderr to the driver, which prints it. ``RunLog``
replaces that printer (Ray's stream dispatcher handler ``ray_print_logs``) with one that writes
each line, prefixed with its actor and pid, to the log file, and echoes to the console only
lines that this project's own loggers mark as warnings or errors (see
:func:`setup_worker_logging`, run in every worker) and the raylet's own messages (out of
memory, dead workers). The driver's Python logging (Ray, Tune, libraries) and Python warnings
go to the same file. With ``-v`` Ray's printer stays as well: the console shows everything.

The file of a line: the trial directory of the one running trial; while several trials run at
once, the experiment directory; lines from before the first trial starts (Ray's start-up) wait
in memory and go to the first file opened.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

from ray.tune import Callback

LOG_FILE_NAME = "rllib.log"
# Worker lines starting with this reach the console (see setup_worker_logging).
CONSOLE_MARK = "[rllib-ext] "
# This project's packages: their loggers' warnings and errors are shown.
PROJECT_LOGGERS = ("rllib_ext", "envs")
_RAY_HANDLER = "ray_print_logs"
_OUR_HANDLER = "rllib_ext_run_log"


def setup_worker_logging() -> None:
    """Ray ``worker_process_setup_hook``: this project's warnings and errors in a worker are
    written with :data:`CONSOLE_MARK`, so that the driver shows them on the console."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter(CONSOLE_MARK + "%(levelname)s %(name)s: %(message)s"))
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.propagate = False


def worker_prefix(data: dict) -> str:
    """``(LLMEnvRunner pid=123) ``: the prefix Ray's own printer puts before a worker line."""
    name = data.get("actor_name") or data.get("task_name") or ""
    return f"({name} pid={data.get('pid')}) " if name else f"({data.get('pid')}) "


class RunLog(Callback):
    """Tune callback that owns the run's log file(s) (see the module docstring).

    Create it before ``ray.init`` (Ray's start-up messages are captured), call :meth:`attach`
    after it, pass it to ``tune.run(callbacks=...)`` with :meth:`start_experiment` before each
    experiment, and :meth:`close` at the end.
    """

    def __init__(self, verbose: int = 0, console=None):
        self.verbose = verbose
        self.console = console
        self.files: dict[str, object] = {}  # path -> open file
        self._pending: list[str] = []
        self._running: dict[str, str] = {}  # trial id -> its log path
        self._experiment_log: str | None = None
        self._last_path: str | None = None
        self._lock = threading.Lock()
        self._handler = _LineHandler(self)
        self._handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._saved_levels: list[tuple[logging.Handler, int]] = []
        self._capture_driver_logging()

    # ------------------------------------------------------------------ set-up

    def _capture_driver_logging(self) -> None:
        logging.captureWarnings(True)
        root = logging.getLogger()
        root.addHandler(self._handler)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        self._quiet_ray_console()
        console = logging.StreamHandler(self.console or sys.stderr)
        console.setLevel(logging.WARNING)
        console.setFormatter(logging.Formatter(
            CONSOLE_MARK + "%(levelname)s %(name)s: %(message)s"))
        self._console_handler = console
        for name in PROJECT_LOGGERS:
            logging.getLogger(name).addHandler(console)
    def _quiet_ray_console(self) -> None:
        """Ray's logger does not propagate to the root: it gets the file handler itself, and its
        console handlers are silenced (ray.init may add new ones: called again then). A failed
        trial is reported by the CLI itself, with the path of its error file."""
        ray_logger = logging.getLogger("ray")
        if self._handler not in ray_logger.handlers:
            ray_logger.addHandler(self._handler)
        if self.verbose:
            return
        for handler in ray_logger.handlers:
            if handler is not self._handler and handler.level < logging.CRITICAL:
                self._saved_levels.append((handler, handler.level))
                handler.setLevel(logging.CRITICAL)

    def attach(self) -> None:
        """After ``ray.init``: route worker output through this log."""
        from ray._private.ray_logging import global_worker_stdstream_dispatcher

        self._quiet_ray_console()
        if not self.verbose:
            global_worker_stdstream_dispatcher.remove_handler(_RAY_HANDLER)
        global_worker_stdstream_dispatcher.add_handler(_OUR_HANDLER, self.on_worker_output)

    def close(self) -> None:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher

        global_worker_stdstream_dispatcher.remove_handler(_OUR_HANDLER)
        root = logging.getLogger()
        root.removeHandler(self._handler)
        logging.getLogger("ray").removeHandler(self._handler)
        for name in PROJECT_LOGGERS:
            logging.getLogger(name).removeHandler(self._console_handler)
        for handler, level in self._saved_levels:
            handler.setLevel(level)
        logging.captureWarnings(False)
        with self._lock:
            if self._pending and self._experiment_log:
                self._write_locked(self._experiment_log, "")
            for f in self.files.values():
                f.close()
            self.files.clear()

    def start_experiment(self, experiment_dir: str) -> None:
        self._experiment_log = os.path.join(experiment_dir, LOG_FILE_NAME)

    # ------------------------------------------------------------------ routing

    def _target(self) -> str | None:
        if len(self._running) == 1:
            return next(iter(self._running.values()))
        if len(self._running) > 1:
            return self._experiment_log
        return self._last_path

    def write(self, line: str) -> None:
        with self._lock:
            target = self._target()
            if target is None:
                self._pending.append(line)
                return
            self._write_locked(target, line)

    def _write_locked(self, path: str, line: str) -> None:
        f = self.files.get(path)
        if f is None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            f = self.files[path] = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        if self._pending:
            f.write("\n".join(self._pending) + "\n")
            self._pending.clear()
        if line:
            f.write(line + "\n")
        self._last_path = path

    def on_worker_output(self, data: dict) -> None:
        """Ray stream-dispatcher handler: one batch of lines of one worker process."""
        prefix = worker_prefix(data)
        raylet = data.get("pid") == "raylet"
        stream = self.console or sys.stderr
        lines = data.get("lines", [])
        if data.get("pid") == "autoscaler":  # its status table every 5 s: events only
            from ray._private.worker import filter_autoscaler_events

            lines = list(filter_autoscaler_events(lines))
        for line in lines:
            self.write(prefix + line)
            if not self.verbose and (raylet or line.startswith(CONSOLE_MARK)):
                print(prefix + line, file=stream, flush=True)

    # ------------------------------------------------------------------ Tune callback

    def on_trial_start(self, iteration, trials, trial, **info):
        with self._lock:
            self._running[trial.trial_id] = os.path.join(trial.path, LOG_FILE_NAME)

    def _trial_ended(self, trial) -> None:
        with self._lock:
            path = self._running.pop(trial.trial_id, None)
            self._last_path = path or self._last_path

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._trial_ended(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._trial_ended(trial)

    def paths(self) -> list[str]:
        return sorted(self.files)


class _LineHandler(logging.Handler):
    """A logging handler that writes formatted records into a :class:`RunLog`."""

    def __init__(self, run_log: RunLog):
        super().__init__(level=logging.INFO)
        self.run_log = run_log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.run_log.write(self.format(record))
        except Exception:
            self.handleError(record)
