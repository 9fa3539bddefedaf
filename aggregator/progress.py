"""What ``aggregate`` and ``simulate`` print while rounds run: one line per evaluated (or troubled) round,
with the training loss and an ETA; on a terminal a live bar (tqdm, where installed: the ``server`` extra),
in a log a plain line at least every ``PLAIN_LINE_EVERY_S`` seconds, so a long large-batch run never
looks hung."""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, TextIO

from .round_state import Progress

PLAIN_LINE_EVERY_S = 30.0  # without a terminal: the longest silence between progress lines


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class EtaClock:
    """Remaining time from the mean pace of the rounds seen so far (a resumed run counts from its first)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started: float | None = None
        self.first_round = 0

    def saw(self, round_id: int) -> None:
        """A round is running: the clock starts with the first one seen."""
        if self.started is None:
            self.started, self.first_round = self.clock(), round_id - 1

    def eta_s(self, round_done: int, rounds: int) -> float | None:
        self.saw(round_done)
        assert self.started is not None
        done = round_done - self.first_round
        return (self.clock() - self.started) / done * (rounds - round_done) if done > 0 else None


def _tqdm_bar(rounds: int, unit: str, stream: TextIO) -> Any | None:
    try:
        from tqdm import tqdm
    except ImportError:  # optional (the server extra); plain lines instead
        return None
    return tqdm(total=rounds, unit=unit, file=stream, dynamic_ncols=True, leave=False)


def round_printer(unit: str = "round", stream: TextIO | None = None, live: bool | None = None,
                  clock: Callable[[], float] = time.monotonic) -> Callable[[Progress], None]:
    """A progress callback: a live bar on a terminal (``live``, default: stderr is one), one line per
    evaluated (or troubled) round and, without a terminal, one at least every PLAIN_LINE_EVERY_S; the
    byte and time figures on a line are summed since the previous line."""
    return RoundPrinter(unit, stream or sys.stdout, sys.stderr.isatty() if live is None else live, clock)


class RoundPrinter:
    """``round_printer``'s state: the bar (tqdm, when live and installed), the figures since the last line."""

    def __init__(self, unit: str, out: TextIO, live: bool, clock: Callable[[], float]) -> None:
        self.unit, self.out, self.live, self.clock = unit, out, live, clock
        self.since = {"up": 0, "down": 0, "wall": 0.0, "rejected": 0}
        self.eta = EtaClock(clock)
        self.bar: Any = None
        self.last_line = clock()

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.out)
        else:
            print(line, file=self.out, flush=True)
        self.last_line = self.clock()

    def __call__(self, progress: Progress) -> None:
        self.eta.saw(progress.round_id)
        if progress.record is None:
            self._waiting(progress)
            return
        r = progress.record
        remaining = self.eta.eta_s(r.round_id, progress.rounds)
        loss = r.extra.get("train_loss")
        self.since["up"] += r.bytes_up
        self.since["down"] += r.bytes_down
        self.since["wall"] += r.round_wall_s
        self.since["rejected"] += sum(r.devices_rejected.values())
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(("" if loss is None else f"loss {loss:.4f}  ")
                                     + ("" if remaining is None else f"ETA {format_duration(remaining)}"),
                                     refresh=False)
        last = r.round_id == progress.rounds
        quiet_too_long = not self.live and self.clock() - self.last_line >= PLAIN_LINE_EVERY_S
        if r.accuracy is None and not r.retried and not r.devices_rejected and not last and not quiet_too_long:
            return
        self.write(self._line(r, progress.rounds, loss, None if last else remaining))
        self.since.update(up=0, down=0, wall=0.0, rejected=0)
        if last and self.bar is not None:
            self.bar.close()
            self.bar = None

    def _waiting(self, progress: Progress) -> None:
        """A round still collecting: start the bar, or (live without tqdm) overwrite one status line."""
        if self.live and self.bar is None:
            self.bar = _tqdm_bar(progress.rounds, self.unit, sys.stderr)
            if self.bar is not None:
                self.bar.update(progress.round_id - 1)
        if self.bar is None and self.live:
            print(f"\r{self.unit} {progress.round_id}/{progress.rounds}: {progress.reported}/{progress.chosen} "
                  "updates", end="", file=sys.stderr, flush=True)

    def _line(self, r: Any, rounds: int, loss: float | None, remaining: float | None) -> str:
        acc = "   -  " if r.accuracy is None else f"{100 * r.accuracy:5.2f}%"
        since = self.since
        return (("\r" if self.live and self.bar is None else "") + f"{self.unit} {r.round_id:3d}/{rounds}  acc {acc}"
                + ("" if loss is None else f"  loss {loss:.4f}")
                + f"  updates {r.devices_reported}/{r.devices_chosen}  rejected {since['rejected']}"
                f"  up {since['up'] / 1e6:7.2f} MB  down {since['down'] / 1e6:7.2f} MB  {since['wall']:6.1f} s"
                + ("" if remaining is None else f"  ETA {format_duration(remaining)}")
                + ("  (retried)" if r.retried else ""))
