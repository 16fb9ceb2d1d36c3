"""Run the segmentation in a child process, so the Slicer GUI never waits on the network.

Plain Python (no Qt, no Slicer): the panel polls ``ChildRun.poll()`` from a QTimer; tests and
scripts call ``wait()``. A reader thread turns the child's stdout into events: ``Progress``
(from ``PROGRESS {json}`` lines, see ``livertumorseg segment --progress-lines``), ``Log`` (any
other line) and, last, ``Finished``. ``cancel()`` kills the child's whole process tree.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from LiverTumorSegLib.cli import PROGRESS_PREFIX

MODULE_DIR = Path(__file__).resolve().parents[1]  # holds LiverTumorSegLib


@dataclass(frozen=True)
class Progress:
    fraction: float
    message: str


@dataclass(frozen=True)
class Log:
    line: str


@dataclass(frozen=True)
class Finished:
    returncode: int
    cancelled: bool
    error: str | None  # the child's "error: ..." line, or a summary when it failed without one


def segment_command(python: str, ct_file: Path, out_dir: Path, *, model: str, device: str, fast: bool,
                    tta: bool = True) -> list[str]:
    """The child's command: raw network labels + cached probabilities + report, progress as lines.

    Post-processing is left to the parent, which keeps it live on the cached output.
    """
    cmd = [python, "-m", "LiverTumorSegLib.cli", "segment", str(ct_file), "-o", str(out_dir / "labels.nii.gz"),
           "--no-postprocess", "--probabilities", str(out_dir / "probabilities.npz"),
           "--report", str(out_dir / "report.json"), "--model", model, "--device", device, "--progress-lines"]
    return cmd + (["--fast"] if fast else []) + (["--tta"] if tta else ["--no-tta"])


def child_environment(threads: int | None = None) -> dict:
    """The parent's environment with the core importable; ``threads`` caps the child's CPU threads
    (leave a core to the GUI: measured, torch slows ~20x when another process loads every core)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(MODULE_DIR), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"  # as the parent decodes it (Windows pipes default to the ANSI code page)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def default_threads() -> int:
    """All cores but one for the child (at least one)."""
    return max(1, (os.cpu_count() or 2) - 1)


class ChildRun:
    """One child process; events come from ``poll()`` (non-blocking) or ``wait()``."""

    def __init__(self, cmd: list[str], env: dict | None = None, cwd: str | None = None):
        self.cmd, self._events = cmd, queue.Queue()
        self._cancelled, self._last_error, self._last_line, self.log = False, None, None, []
        kwargs = {"start_new_session": True} if os.name == "posix" else {  # no console window on Windows
            "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        text=True, encoding="utf-8", errors="replace", bufsize=1, env=env, cwd=cwd, **kwargs)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.process.stdout:
            line = raw.rstrip("\n")
            if line.startswith(PROGRESS_PREFIX):
                try:
                    data = json.loads(line[len(PROGRESS_PREFIX):])
                    self._events.put(Progress(float(data["fraction"]), str(data["message"])))
                    continue
                except (ValueError, KeyError, TypeError):
                    pass
            error = re.match(r"^(?:\S+: )?error: (.*)", line)  # ours, or argparse's "livertumorseg: error: ..."
            if error:
                self._last_error = error.group(1)
            if line.strip():
                self._last_line = line.strip()
            self._events.put(Log(line))
        code = self.process.wait()
        self._events.put(Finished(code, self._cancelled, None if code == 0 or self._cancelled else self._failure(code)))

    def _failure(self, code: int) -> str:
        """One sentence for a failed child: its error line, else how it ended and the last thing it printed."""
        if self._last_error:
            return self._last_error
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            how = f"the segmentation process was killed ({name})" + (
                ", most likely for lack of memory" if -code == 9 else "")  # SIGKILL: the OOM killer
        else:
            how = f"the segmentation process stopped with exit code {code}"
        return how + (f"; its last line: {self._last_line}" if self._last_line else "")

    def poll(self) -> list:
        """Events since the last call (never blocks)."""
        events = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return events
            if isinstance(event, Log):
                self.log.append(event.line)
            events.append(event)

    def wait(self, timeout: float | None = None) -> list:
        """All remaining events, up to and including ``Finished`` (TimeoutError after ``timeout`` s)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        events = []
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                event = self._events.get(timeout=remaining)
            except queue.Empty:
                raise TimeoutError(f"the child process did not finish within {timeout} s") from None
            if isinstance(event, Log):
                self.log.append(event.line)
            events.append(event)
            if isinstance(event, Finished):
                return events

    def running(self) -> bool:
        return self.process.poll() is None

    def cancel(self) -> None:
        """Kill the child and everything it started (its process group / job tree)."""
        if self.process.poll() is not None:
            return
        self._cancelled = True
        if os.name == "posix":
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:  # Windows: taskkill ends the whole tree
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)], capture_output=True, check=False)


def python_for_child() -> str:
    """Slicer's ``PythonSlicer`` (on the PATH inside Slicer, or next to this interpreter), else this Python."""
    found = shutil.which("PythonSlicer")
    if found:
        return found
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        candidate = Path(sys.executable).with_name(name)
        if candidate.is_file():
            return str(candidate)
    return sys.executable
