"""The vlmrl dashboard: processes, logs, GPUs, metrics and rollouts of one run.

The app reads only the run directory (through :class:`~vlmrl_tui.watch.RunFeed`)
and the server's health URL, and drives a run only through the supervisor's control
channel (:mod:`vlmrl_tui.control`). Slow work runs in named thread workers that post
typed messages; one batch of run-directory data is in flight at a time.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from textual import events, on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Footer, Header, TabbedContent, TabPane
from textual.worker import Worker, WorkerState, get_current_worker

from backend.records import PROC_TRAINER, RunInfo
from backend.rundir import RunDirectory
from vlmrl_tui.panes.gpus import GpuReport, GpusPane, start_sampler
from vlmrl_tui.panes.commands import CommandsMixin
from vlmrl_tui.panes.compare import ComparePane, CompareUpdated
from vlmrl_tui.panes.logs import LogsPane, LogView
from vlmrl_tui.panes.messages import (
    CommandDone,
    GpuUpdated,
    ProcessSelected,
    ProcStatsUpdated,
    RunUpdated,
)
from vlmrl_tui.panes.metrics import MetricsPane
from vlmrl_tui.panes.summary import RunSummary
from vlmrl_tui.panes.picker import RunPickerScreen
from vlmrl_tui.panes.processes import ProcessesPane
from vlmrl_tui.panes.rollouts import RolloutsPane, probe_graphics
from vlmrl_tui.panes.screens import ConfirmScreen, QuitScreen
from vlmrl_tui.proctree import record_lost, supervisor_alive
from vlmrl_tui.watch import DEFAULT_SCROLLBACK, ProcessSampler, RunFeed, display_path

if TYPE_CHECKING:
    from vlmrl_tui.gpu import Nvml, GpuSampler
    from vlmrl_tui.launch import LaunchedRun

SendCommand = Callable[..., dict]

TABS = {"logs": "tab-logs", "metrics": "tab-metrics", "rollouts": "tab-rollouts"}
PROCESSES_WIDTH = 84  # the processes pane (app.tcss); the GPU pane shares the row when it fits
GPU_TABLE_WIDTH = 62  # what the GPU table needs; the no-GPU sentence wraps into less
BUSY_LINES = 100  # log lines in one poll from which the feed polls every poll_s, not idle_poll_s
MIN_BATCH_GAP_S = 0.02  # the reader worker's shortest pause after posting a batch
SIGNAL_EXIT_S = 5.0  # after SIGTERM/SIGHUP/SIGINT, the longest the app takes to leave
LIVENESS_S = 5.0  # how often a live-looking run's supervisor is checked (a SLURM run asks squeue)
BULK_RECORDS = 500  # metric records in one batch from which the app freezes its heap (_settle_heap)


def _default_send_command(run_dir: Path, cmd: str, proc: str | None = None, timeout: float = 5.0) -> dict:
    from vlmrl_tui.control import send_command

    return send_command(run_dir, cmd, proc=proc, timeout=timeout)


class VlmrlApp(CommandsMixin, App[str | None]):
    """Dashboard for one run directory (attached, or launched by ``vlmrl-tui CONFIG``).

    ``exit`` results: ``"stopped"`` (the app stopped the run it started), ``"left"`` (the
    run it started keeps going headless), None otherwise.
    """

    TITLE = "vlmrl"
    CSS_PATH = Path(__file__).parent / "app.tcss"

    BINDINGS = [
        Binding("q", "quit", "Quit", id="app.quit"),
        Binding("question_mark,f1", "help", "Help", key_display="?", id="app.help"),
        Binding("1", "show_tab('logs')", "Logs", id="app.tab_logs"),
        Binding("2", "show_tab('metrics')", "Metrics", id="app.tab_metrics"),
        Binding("3", "show_tab('rollouts')", "Rollouts", id="app.tab_rollouts"),
        Binding("p", "focus_processes", "Processes", id="app.focus_processes"),
        Binding("r", "restart_process", "Restart", id="app.restart"),
        Binding("K", "kill_process", "Kill", key_display="K", id="app.kill"),
        Binding("x", "stop_run", "Stop run", id="app.stop"),
        Binding("t", "toggle_dark", "Dark/light", id="app.theme"),
        Binding("c", "toggle_compare", "Compare runs", id="app.compare"),
    ]

    def __init__(
        self,
        run_dir: Path | None = None,
        *,
        output_dir: Path = Path("runs"),
        launched: "LaunchedRun | None" = None,
        scrollback: int = DEFAULT_SCROLLBACK,
        poll_s: float = 0.5,
        idle_poll_s: float | None = None,
        stats_s: float = 2.0,
        health_s: float = 5.0,
        gpu_s: float = 2.0,
        redraw_s: float = 2.0,
        nvml: "Nvml | None" = None,
        gpu: bool = True,
        clock: Callable[[], float] = time.time,
        send_command: SendCommand = _default_send_command,
        own_process: bool = False,
        compare: Sequence[Path] = (),
    ) -> None:
        super().__init__()
        # vlmrl-tui: the app is the process (signals, the heap); Pilot tests and
        # benchmarks share theirs with other apps
        self._own_process = own_process
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.compare_dirs = [Path(p) for p in compare]  # runs compared with run_dir
        self.output_dir = output_dir
        self.launched = launched
        self.scrollback = scrollback
        self.poll_s = poll_s
        self.idle_poll_s = 2 * poll_s if idle_poll_s is None else idle_poll_s
        self.stats_s = stats_s
        self.health_s = health_s
        self.gpu_s = gpu_s
        self.redraw_s = redraw_s
        self._nvml = nvml
        self._gpu_enabled = gpu
        self._clock = clock
        self._send_command = send_command
        self.run_view: RunInfo | None = None
        self._pids: dict[str, int] = {}
        self._health: dict[str, str] = {}
        self._feed_ack = threading.Event()
        self._gpu_sampler: "GpuSampler | None" = None
        self.batches = 0  # run-directory batches handled (tests wait on it)
        self._exiting = False
        self.commands: list[CommandDone] = []  # control replies, newest last
        self._launch_warned = False
        self._graphics = probe_graphics()  # asks the terminal, which answers only until Textual runs

    # ---- layout -----------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        # Panes are kept as attributes: App.query_one searches the *active* screen, which
        # is a modal (help, confirm, picker) at times.
        self.processes = ProcessesPane(clock=self._clock, id="processes")
        self.processes.border_title = "Processes"
        self.gpus = GpusPane(id="gpus")
        self.gpus.border_title = "GPUs"
        self.logs = LogsPane(scrollback=self.scrollback, id="logs")
        self.metrics = MetricsPane(redraw_s=self.redraw_s, id="metrics")
        self.compare = ComparePane(self.metrics, redraw_s=self.redraw_s, poll_s=self.idle_poll_s, id="compare")
        self.rollouts = RolloutsPane(self.run_dir, redraw_s=self.redraw_s, graphics=self._graphics, id="rollouts")
        yield Header(show_clock=False, icon="◆")
        self.summary = RunSummary(self.metrics.store, clock=self._clock, id="summary")
        yield self.summary  # right under the (docked) header: on every tab
        self._top = Horizontal(id="top")
        with self._top:
            yield self.processes
            yield self.gpus
        self.tabs = TabbedContent(id="main", initial=TABS["logs"])
        with self.tabs:
            with TabPane("Logs", id=TABS["logs"]):
                yield self.logs
            with TabPane("Metrics", id=TABS["metrics"]):
                yield self.metrics
                yield self.compare
            with TabPane("Rollouts", id=TABS["rollouts"]):
                yield self.rollouts
        yield Footer()

    def on_mount(self) -> None:
        # SIGTERM/SIGHUP/SIGINT (`kill`, a closed terminal; Ctrl-C itself is a key here): leave
        # with the terminal restored; a run this app launched lives in its own session and
        # keeps going (main() says how to attach)
        if self._own_process:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                loop.add_signal_handler(sig, lambda sig=sig: self._signalled(sig))
        if self._gpu_enabled:
            self._gpu_sampler = start_sampler(
                lambda report: self.post_message(GpuUpdated(report)),
                lambda: dict(self._pids),
                nvml=self._nvml,
                interval_s=self.gpu_s,
            )
        if self.run_dir is not None:
            self.attach(self.run_dir, self.compare_dirs)
        else:
            self.push_screen(RunPickerScreen(self.output_dir), self._picked)
        self._settle_heap()

    def _settle_heap(self, records: int | None = None) -> None:
        """Move what is alive now (modules, the widget tree, the records read so far) out of
        the cyclic collector's full passes; at start, then after a batch of ``records`` of at
        least BULK_RECORDS (a run read from its beginning). The dashboard keeps its records for
        good, and a full pass over them and Textual's caches paused a redraw for ~130 ms with
        3 runs of 2,000 steps compared (benchmarks/compare_redraw.py). Only where the app owns
        the process: frozen objects that later form unreachable cycles are never collected."""
        if self._own_process and (records is None or records >= BULK_RECORDS):
            gc.freeze()

    def _signalled(self, sig: int) -> None:
        self.exit("signal", return_code=128 + sig)
        # With its terminal gone, Textual's shutdown can hang writing the last frame to it
        # (seen when a pty's reader died: the output thread and close() each wait on the
        # other); the dashboard holds nothing to save, so it must not outlive the terminal.
        timer = threading.Timer(SIGNAL_EXIT_S, os._exit, (128 + sig,))
        timer.daemon = True
        timer.start()

    def on_resize(self, event: events.Resize) -> None:
        self._arrange_top()

    def _arrange_top(self) -> None:
        """GPUs beside the processes when the GPU table fits, else below them."""
        if not hasattr(self, "_top"):
            return  # not composed yet
        report = self.gpus.report
        need = GPU_TABLE_WIDTH if report is not None and report.snapshot.gpus else 36
        self._top.set_class(self.size.width < PROCESSES_WIDTH + need, "-narrow")

    def _picked(self, paths: list[Path] | None) -> None:
        if not paths:
            self.exit()
        else:
            self.attach(paths[0], paths[1:])

    def on_unmount(self) -> None:
        if self._gpu_sampler is not None:
            self._gpu_sampler.stop(timeout=0.5)

    # ---- attaching and reading --------------------------------------------------------
    def attach(self, run_dir: Path, compare: Sequence[Path] = ()) -> None:
        """Watch ``run_dir`` (live or finished), compared with the runs in ``compare``; replaces any previous run."""
        self.run_dir = Path(run_dir)
        self.sub_title = display_path(self.run_dir)
        self.rollouts.run_dir = self.run_dir
        self._feed_ack.set()
        self._feed_worker(RunFeed(self.run_dir, scrollback=self.scrollback))
        self._stats_worker()
        if not self.compare.start(self.run_dir, compare):  # two runs or more: the comparison shows, focused
            self.logs.query_one(LogView).focus()

    @work(thread=True, exclusive=True, group="feed", name="run-feed")
    def _feed_worker(self, feed: RunFeed) -> None:
        """Poll the run directory; post one batch, wait until the UI took it, repeat."""
        worker = get_current_worker()
        while not worker.is_cancelled:
            started = time.monotonic()
            update = feed.poll()
            if update:
                self._feed_ack.clear()
                self.post_message(RunUpdated(update))
                while not self._feed_ack.wait(0.2):  # one batch in flight
                    if worker.is_cancelled:
                        return
            # Sleep out the poll interval, and always a little after a batch: a flood of
            # batches must leave the UI idle moments to paint in. A trickle of log lines
            # (a run going well) is polled half as often: each batch repaints the log.
            busy = update.line_count >= BUSY_LINES  # lines read, skipped ones included
            left = (self.poll_s if busy else self.idle_poll_s) - (time.monotonic() - started)
            if update:
                left = max(left, MIN_BATCH_GAP_S)
            if left > 0:
                worker.cancelled_event.wait(left)

    def _live(self) -> bool:
        """False once the app is closing (late worker messages are then dropped)."""
        return self.is_running and not self._exiting and self.processes.is_attached

    @on(RunUpdated)
    def _run_updated(self, message: RunUpdated) -> None:
        update = message.update
        try:
            if not self._live():
                return
            if update.info is not None:
                self._apply_info(update.info)
            if update.info_error is not None:
                self.notify(update.info_error, severity="error", timeout=30)
            for proc in update.new_procs:
                self.logs.view_for(proc)
            if update.logs:
                self.logs.ingest(update.logs)
            if update.metrics:
                self.metrics.add(update.metrics)
                self._settle_heap(len(update.metrics))
            if update.evals:
                self.metrics.add_evals(update.evals)
            self.compare.primary_updated(update)
            if update.rollouts:
                self.rollouts.add(update.rollouts)
            self.batches += 1
        finally:
            self._feed_ack.set()

    @on(CompareUpdated)
    def _compared(self, message: CompareUpdated) -> None:
        # bubbled up once the comparison pane has added the records
        self._settle_heap(sum(len(d.metrics) for d in message.deltas))

    def _apply_info(self, run: RunInfo) -> None:
        self.run_view = run
        self.processes.update_info(run)
        self._pids = run.pids()
        self._health = {p.name: p.health_url for p in run.procs() if p.health_url and p.alive}
        self.metrics.set_run(run.max_steps, run.finished)
        self.summary.set_run(run)
        if run.name:
            self.title = f"vlmrl · {run.name}"

    @work(thread=True, exclusive=True, group="stats", name="process-stats")
    def _stats_worker(self) -> None:
        """Sample CPU/RSS/health of the live processes every ``stats_s``."""
        worker = get_current_worker()
        sampler = ProcessSampler(health_every_s=self.health_s)
        checked = time.monotonic()
        while not worker.is_cancelled:
            pids, health = dict(self._pids), dict(self._health)
            if pids:
                self.post_message(ProcStatsUpdated(sampler.sample(pids, health)))
            run = self.run_view
            if run is not None and not run.finished and time.monotonic() - checked >= LIVENESS_S:
                checked = time.monotonic()
                self._check_supervisor(run)
            launched = self.launched
            if launched is not None and not self._launch_warned:
                code = launched.process.poll()
                if code not in (None, 0):
                    self._launch_warned = True
                    self.call_from_thread(
                        self.notify,
                        f"`vlmrl run` exited with code {code}: see the supervisor log tab.",
                        severity="error", timeout=15,
                    )
            worker.cancelled_event.wait(self.stats_s)

    def _check_supervisor(self, run: RunInfo) -> None:
        """(stats thread) A run whose supervisor died unfinished (kill -9, its SLURM job or node
        lost) would look live forever: record its end in run.json, which the feed then shows."""
        if self.run_dir is None or supervisor_alive(run):
            return
        ended, ours = record_lost(RunDirectory(self.run_dir), run)  # the feed shows it from run.json
        if ours:  # our account, not the supervisor's own last words
            self.call_from_thread(self.notify, f"run {ended.status}: {ended.reason}", severity="error", timeout=30)

    @on(ProcStatsUpdated)
    def _stats_updated(self, message: ProcStatsUpdated) -> None:
        if self._live():
            self.processes.apply_stats(message.samples)

    @on(GpuUpdated)
    def _gpu_updated(self, message: GpuUpdated) -> None:
        if isinstance(message.snapshot, GpuReport) and self._live():
            self.gpus.show(message.snapshot)
            self._arrange_top()

    @on(ProcessSelected)
    def _process_selected(self, message: ProcessSelected) -> None:
        self.logs.show_proc(message.proc)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            self.notify(f"{event.worker.name} failed: {event.worker.error!r}", severity="error", timeout=20)

    # ---- control channel --------------------------------------------------------------
    def _target_proc(self) -> str | None:
        proc = self.processes.selected_proc
        if proc is None:
            self.notify("No process to act on yet.", severity="warning")
        return proc

    def send(self, cmd: str, proc: str | None = None) -> None:
        """Send a command to the supervisor (in a worker); the reply is notified."""
        if self.run_dir is None:
            return
        self._control_worker(cmd, proc)

    @work(thread=True, group="control", name="control")
    def _control_worker(self, cmd: str, proc: str | None) -> None:
        assert self.run_dir is not None
        try:
            reply = self._send_command(self.run_dir, cmd, proc=proc, timeout=5.0)
            self.post_message(CommandDone(cmd, proc, reply, None))
        except Exception as e:  # noqa: BLE001 - any failure becomes a notification
            self.post_message(CommandDone(cmd, proc, None, f"{type(e).__name__}: {e}"))

    @on(CommandDone)
    def _command_done(self, message: CommandDone) -> None:
        self.commands.append(message)
        what = message.cmd + (f" {message.proc}" if message.proc else "")
        if message.error is not None:
            self.notify(f"{what}: the supervisor did not answer ({message.error})", severity="error", timeout=10)
        elif message.reply is not None and message.reply.get("ok") is False:
            self.notify(f"{what}: {message.reply.get('error', 'refused')}", severity="error", timeout=10)
        else:
            self.notify(f"{what}: sent to the supervisor")

    def action_restart_process(self) -> None:
        proc = self._target_proc()
        if proc is not None:
            self.send("restart", proc)

    def action_kill_process(self) -> None:
        proc = self._target_proc()
        if proc is None:
            return

        def answer(yes: bool | None) -> None:
            if yes:
                self.send("kill", proc)

        if proc == PROC_TRAINER:
            question = "Kill the trainer now (SIGKILL)? It stays down until you restart it (r)."
        else:
            question = f"Kill {proc} now (SIGKILL)? The trainer needs it: this ends the whole run at once."
        self.push_screen(ConfirmScreen(question, yes="Kill"), answer)

    def action_stop_run(self) -> None:
        def answer(yes: bool | None) -> None:
            if yes:
                self.send("stop")

        self.push_screen(ConfirmScreen("Stop the run (trainer, then server)?", yes="Stop"), answer)

    # ---- navigation (help and palette: CommandsMixin) -----------------------------------
    def action_show_tab(self, name: str) -> None:
        self.tabs.active = TABS[name]
        target = {"logs": self.logs.active_view, "metrics": self.compare.shown, "rollouts": self.rollouts}[name]
        if name == "rollouts":
            self.rollouts.table.focus()
        elif target is not None:
            target.focus()

    def action_toggle_compare(self) -> None:
        self.compare.toggle()

    def action_focus_processes(self) -> None:
        self.processes.table.focus()

    # ---- quitting ---------------------------------------------------------------------
    def exit(self, result: str | None = None, return_code: int = 0, message: Any = None) -> None:
        self._exiting = True
        for group in ("feed", "stats"):
            self.workers.cancel_group(self, group)
        super().exit(result, return_code, message)

    def _launched_alive(self) -> bool:
        return self.launched is not None and self.launched.process.poll() is None

    async def action_quit(self) -> None:
        if not self._launched_alive():
            self.exit(None)
            return

        def choice(answer: str | None) -> None:
            if answer == "stop":
                self.notify("Stopping the run…", timeout=30)
                self._stop_and_exit()
            elif answer == "leave":
                self.exit("left")

        self.push_screen(QuitScreen(str(self.run_dir)), choice)

    @work(thread=True, exclusive=True, group="quit", name="stop-run")
    def _stop_and_exit(self) -> None:
        """Ask the supervisor to stop, wait for it; SIGTERM it if it does not answer."""
        launched = self.launched
        assert launched is not None and self.run_dir is not None
        try:
            self._send_command(self.run_dir, "stop", proc=None, timeout=5.0)
            launched.process.wait(timeout=launched.stop_timeout_s)
        except Exception:  # noqa: BLE001 - no answer or too slow: signal the supervisor
            launched.process.terminate()
            try:
                launched.process.wait(timeout=launched.stop_timeout_s)
            except Exception:  # noqa: BLE001
                launched.process.kill()
        self.call_from_thread(self.exit, "stopped")
