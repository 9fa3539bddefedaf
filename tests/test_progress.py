"""The progress lines of aggregate / simulate: training loss and an ETA; without a terminal, a plain line at
least every PLAIN_LINE_EVERY_S even between evaluations (a 600-step large-batch run evaluates every 50)."""
from __future__ import annotations

import io

from edgetrain.aggregator.progress import PLAIN_LINE_EVERY_S, format_duration, round_printer
from edgetrain.aggregator.results import RoundRecord
from edgetrain.aggregator.round_state import Progress, RoundTally


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _record(round_id: int, accuracy: float | None, loss: float | None = 0.5) -> RoundRecord:
    return RoundRecord(round_id=round_id, model_version=round_id, accuracy=accuracy, loss=None, devices_chosen=3,
                       devices_reported=3, devices_rejected={}, rejected_detail=(), bytes_up=1000, bytes_down=2000,
                       round_wall_s=2.0, extra={} if loss is None else {"train_loss": loss})


def test_lines_carry_the_training_loss_and_an_eta_and_never_go_quiet_for_long() -> None:
    clock, out = FakeClock(), io.StringIO()
    show = round_printer("step", stream=out, live=False, clock=clock)
    show(Progress(1, 100, 0, 3))  # step 1 starts: the clock starts
    for step in range(1, 11):
        clock.now += 2.0  # 2 s a step
        show(Progress(step, 100, 3, 3, _record(step, accuracy=0.8 if step == 10 else None, loss=1.0 / step)))
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 1  # only the evaluated step within 20 s
    assert "step  10/100" in lines[0] and "acc 80.00%" in lines[0] and "loss 0.1000" in lines[0]
    assert lines[0].endswith("ETA 3m00s")  # 90 steps left at 2 s each
    for step in range(11, 11 + int(PLAIN_LINE_EVERY_S // 2) + 1):  # no evaluation, but time passes
        clock.now += 2.0
        show(Progress(step, 100, 3, 3, _record(step, accuracy=None)))
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 2 and "acc    -" in lines[1] and "ETA" in lines[1]


def test_the_last_line_has_no_eta_and_a_record_without_loss_shows_none() -> None:
    clock, out = FakeClock(), io.StringIO()
    show = round_printer("round", stream=out, live=False, clock=clock)
    show(Progress(1, 1, 0, 3))
    clock.now += 5
    show(Progress(1, 1, 3, 3, _record(1, accuracy=0.5, loss=None)))
    line = out.getvalue().strip()
    assert "round   1/1" in line and "ETA" not in line and "loss" not in line


def test_a_terminal_gets_a_tqdm_bar_and_the_lines_still_reach_the_stream(capsys) -> None:
    clock, out = FakeClock(), io.StringIO()
    show = round_printer("step", stream=out, live=True, clock=clock)
    for step in (1, 2):
        show(Progress(step, 2, 0, 3))
        clock.now += 1
        show(Progress(step, 2, 3, 3, _record(step, accuracy=0.9 if step == 2 else None)))
    assert "step   2/2" in out.getvalue()
    assert "0/2" in capsys.readouterr().err  # the bar, on stderr (tqdm redraws it at most every 0.1 s)


def test_format_duration() -> None:
    assert (format_duration(59), format_duration(61), format_duration(3725)) == ("0m59s", "1m01s", "1h02m")


def test_the_round_train_loss_is_the_example_weighted_mean_of_finite_reports() -> None:
    tally = RoundTally()
    for loss, examples in ((1.0, 100), (2.0, 300), (float("nan"), 50), ("x", 50), (True, 10), (5.0, 0)):
        tally.add_train_loss(loss, examples)
    assert tally.train_loss() == 1.75
    assert RoundTally().train_loss() is None
