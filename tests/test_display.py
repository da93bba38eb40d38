"""What a run shows: the live panel on a terminal, plain lines elsewhere, and `drlora-mlx plot`."""

import io
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import time
import zlib
from types import SimpleNamespace

import numpy as np
import pytest

import drlora_mlx.display.progress as progress
from drlora_mlx.display.progress import Progress

from .helpers import read_metrics, run_cli

# ----- a PNG decoder and a terminal, written here independently of the code under test ----------------------------


def decode_png(path) -> np.ndarray:
    """(H, W, 3) uint8 pixels of an 8-bit RGB PNG whose rows all use filter 0 (none)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(kind + body)
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour_type = header[:4]
    assert (depth, colour_type) == (8, 2)
    rows = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, 1 + 3 * width)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(height, width, 3)


class Terminal(io.StringIO):
    """A screen that a tty-like stream draws on: text, CR, LF (as CR LF, like a
    tty), cursor up (CSI n A), erase to the end of the screen (CSI J) and SGR
    colours (ignored). Any other control sequence fails the test, so a display
    that hides the cursor or switches modes (and could leave them so) is caught."""

    def __init__(self):
        super().__init__()
        self.rows, self.row, self.col = [[]], 0, 0

    def isatty(self):
        return True

    def write(self, s):
        for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b|.|\n", s, flags=re.S):
            if token.startswith("\x1b"):
                assert token[-1] in "AJm" and "?" not in token, f"unexpected control sequence {token!r}"
                if token[-1] == "A":
                    self.row = max(self.row - int(token[2:-1] or 1), 0)
                elif token[-1] == "J":
                    assert token == "\x1b[J"
                    self.rows[self.row] = self.rows[self.row][: self.col]
                    del self.rows[self.row + 1 :]
            elif token == "\r":
                self.col = 0
            elif token == "\n":
                self.row, self.col = self.row + 1, 0
            else:
                while len(self.rows) <= self.row:
                    self.rows.append([])
                line = self.rows[self.row]
                line.extend(" " * (self.col - len(line)))
                line[self.col : self.col + 1] = [token]
                self.col += 1
            while len(self.rows) <= self.row:
                self.rows.append([])
        return super().write(s)

    def screen(self) -> list[str]:
        """The lines on the screen, trailing spaces and the empty last line left out."""
        lines = ["".join(r).rstrip() for r in self.rows]
        while lines and not lines[-1]:
            lines.pop()
        return lines


@pytest.fixture
def clock(monkeypatch):
    """A settable time.perf_counter for progress.py; a real-looking terminal."""
    now = [0.0]
    monkeypatch.setattr(progress, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.delenv("NO_COLOR", raising=False)
    return now


SHOWN = dict(loss=2.25, tokens_per_second=1234.4, peak_memory_gb=1.5, lr=2e-4, mean_rank=3.5)
LINES = ["No --data given: using the bundled tasks", "iter 2: loss 2.300"]


def run_display(p: Progress, clock) -> None:
    """A short run shown through ``p``: a line, two iterations at 5 s and 7 s, a report line."""
    p.log(LINES[0])
    clock[0] = 5.0
    p.update(1, loss=2.5)
    clock[0] = 7.0
    p.update(2, **SHOWN)
    p.log(LINES[1])


# ----- the live panel -------------------------------------------------------------------------------------------------


def test_live_panel_shows_iteration_eta_and_metrics_below_the_report_lines(clock):
    term = Terminal()
    p = Progress(20, stream=term, lines=term)
    run_display(p, clock)
    screen = term.screen()
    assert screen[:2] == LINES
    panel = screen[2:]
    assert len(panel) == 4 and panel[0].startswith("╭─ drlora-mlx train ") and panel[-1].startswith("╰")
    # 2 of 20 done: 3 of 30 cells. Elapsed 7 s since the start; ETA: the pace since the first update,
    # (7 - 5) s per iteration, times the 18 iterations left.
    assert f"│ {'█' * 3}{'░' * 27}  10%  2/20  elapsed 0m07s  ETA 0m36s" in panel[1]
    assert "loss 2.250  tok/s 1,234  peak 1.50 GB  lr 2.0e-04  mean rank 3.50" in panel[2]
    assert all(len(line) == 88 for line in panel)  # the fixed width: the border does not move
    p.close()
    assert term.screen() == LINES and (term.row, term.col) == (2, 0)
    p.log("saved the adapter")  # after close, plain lines: no control sequence follows
    assert term.screen() == [*LINES, "saved the adapter"]
    assert term.getvalue().endswith("\x1b[J" + "saved the adapter\n")


def test_live_panel_shows_the_trainers_status_string_and_no_eta_before_a_second_update(clock):
    term = Terminal()
    p = Progress(300, stream=term, lines=term)
    clock[0] = 3.0
    p.update(150, "loss 1.234 | 2,000 tok/s | 0.50 GB | lr 1.0e-04 | rank 4.00")
    panel = term.screen()
    assert f"{'█' * 15}{'░' * 15}  50%  150/300  elapsed 0m03s  ETA --" in panel[1]
    assert "│ loss 1.234 | 2,000 tok/s | 0.50 GB | lr 1.0e-04 | rank 4.00 " in panel[2]


@pytest.mark.parametrize("case", ["pipe", "dumb terminal", "other rank"])
def test_off_a_terminal_only_the_plain_report_lines(clock, monkeypatch, case):
    stream = io.StringIO() if case == "pipe" else Terminal()
    lines = io.StringIO()
    if case == "dumb terminal":
        monkeypatch.setenv("TERM", "dumb")
    p = Progress(20, stream=stream, lines=lines, enabled=case != "other rank")
    run_display(p, clock)
    p.close()
    expected = "" if case == "other rank" else "".join(line + "\n" for line in LINES)
    assert lines.getvalue() == expected and stream.getvalue() == ""


def test_bar_fills_to_an_eighth_of_a_cell():
    assert progress.bar(0.0, 4) == ("", "░░░░")
    assert progress.bar(0.5, 4) == ("██", "░░")
    assert progress.bar(0.4, 10) == ("████", "░░░░░░")
    assert progress.bar(0.3125, 4) == ("█\u258e", "░░")  # 1.25 cells: one full, then LEFT ONE QUARTER BLOCK
    assert progress.bar(0.96875, 4) == ("███\u2589", "")  # 3.875 cells: three, then LEFT SEVEN EIGHTHS BLOCK
    assert progress.bar(1.0, 4) == ("████", "")


# ----- drlora-mlx plot ------------------------------------------------------------------------------------------------

TRAIN_LOSS, VALID_LOSS, MEAN_RANK, BLACK = (31, 119, 180), (255, 127, 14), (44, 160, 44), (0, 0, 0)

STEPS = list(range(10, 101, 10))
LOSSES = [3.0, 2.6, 2.3, 2.0, 1.8, 1.6, 1.5, 1.4, 1.3, 1.2]
RANKS = [2, 2, 2, 3, 3, 3, 4, 4, 4, 4]  # growth at steps 40 and 70
VALID = {1: 3.4, 50: 2.2, 100: 1.6}

# The chart's documented geometry: steps over columns 96..776, the loss panel on rows 40..340 and the rank
# panel on rows 396..536. Their ranges, worked out by hand from the 1-2-5 tick rule: steps 0..100 (ticks of
# 20: ticks of 10 would need 10 intervals, more than 8); loss 1.2..3.4 -> 1.0..3.5 (ticks of 0.5, 5 intervals;
# of 0.2 it would need 11, more than 6); rank 2..4 -> 2..4 (ticks of 0.5, 4 intervals, the most allowed).


def col(step):
    return round(96 + 680 * step / 100)


def loss_row(v):
    return round(40 + (3.5 - v) / 2.5 * 300)


def rank_row(r):
    return round(396 + (4 - r) / 2 * 140)


def write_metrics(folder, lines):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


def hand_written_metrics():
    lines = [json.dumps({"kind": "val", "step": 1, "val_loss": VALID[1]})]  # the first evaluation, before iteration 1
    for step, loss, rank in zip(STEPS, LOSSES, RANKS):
        if step in VALID:
            lines.append(json.dumps({"kind": "val", "step": step, "val_loss": VALID[step]}))
        if step in (40, 70):
            lines.append(json.dumps({"kind": "growth", "step": step, "optimizer_step": step, "grown": 8,
                                     "mean_rank": rank}))
        lines.append(json.dumps({"kind": "train", "step": step, "loss": loss, "lr": 1e-4, "tokens_per_second": 900.0,
                                 "peak_memory_gb": 0.1, "mean_rank": rank, "trained_tokens": step * 64}))
    lines.append(json.dumps({"kind": "test", "step": 100, "test_loss": 1.7}))
    return lines


def rows_of(image, column, colour):
    return np.nonzero((image[:, column] == colour).all(axis=1))[0]


def test_plot_draws_loss_and_rank_where_the_records_put_them(tmp_path, capsys):
    run = tmp_path / "run"
    write_metrics(run, hand_written_metrics())
    code, out, err = run_cli(["plot", "--adapter-path", str(run)], capsys)
    assert (code, out, err) == (0, f"wrote {run / 'training.png'}\n", "")
    image = decode_png(run / "training.png")
    assert image.shape == (600, 800, 3)
    for step, loss in zip(STEPS, LOSSES):  # every training point, at its step and height
        assert (image[loss_row(loss), col(step)] == TRAIN_LOSS).all(), (step, loss)
    # In the columns of the first and the last step the line stays within 2 rows of the point (the segments
    # there fall less than a row per column): the heights are where the records put them, not just touched.
    for step, loss in ((STEPS[0], LOSSES[0]), (STEPS[-1], LOSSES[-1])):
        rows = rows_of(image, col(step), TRAIN_LOSS)
        assert abs(rows.min() - loss_row(loss)) <= 2 and abs(rows.max() - loss_row(loss)) <= 2, (step, rows)
    for step, loss in VALID.items():
        assert (image[loss_row(loss), col(step)] == VALID_LOSS).all(), step
    # The mean rank holds between records and steps up at the growth events.
    for step, rank in zip(STEPS, RANKS):
        assert (image[rank_row(rank), col(step)] == MEAN_RANK).all(), step
    assert (image[rank_row(3), col(55)] == MEAN_RANK).all() and not (image[rank_row(4), col(55)] == MEAN_RANK).all()
    assert rows_of(image, col(55), MEAN_RANK).tolist() == [rank_row(3), rank_row(3) + 1]
    # The colours are nowhere but in their panel and their legend's line (3 pixels thick, level with the
    # label text 28 rows above the panel); a label under every step tick (0, 20, ... 100).
    for colour, (top, bottom) in ((TRAIN_LOSS, (40, 340)), (VALID_LOSS, (40, 340)), (MEAN_RANK, (396, 536))):
        ys = set(np.nonzero((image == colour).all(axis=2))[0].tolist())
        legend = {top - 22, top - 21, top - 20}
        assert legend <= ys and ys <= legend | set(range(top - 3, bottom + 4)), colour
    for step in range(0, 101, 20):
        below = image[544:559, col(step) - 20 : col(step) + 20]
        assert (below == BLACK).all(axis=2).any(), step


def test_plot_keeps_the_later_record_of_a_step_a_resumed_run_repeated(tmp_path, capsys):
    run = tmp_path / "run"
    lines = hand_written_metrics()
    # A first attempt reached step 60 with other losses, then resumed from its step-50 checkpoint.
    early = [json.dumps({"kind": "train", "step": 60, "loss": 3.4, "mean_rank": 2})]
    write_metrics(run, lines[:8] + early + lines[8:])
    out = tmp_path / "elsewhere.png"
    assert run_cli(["plot", "--adapter-path", str(run), "--out", str(out)], capsys)[:2] == (0, f"wrote {out}\n")
    image = decode_png(out)
    assert (image[loss_row(1.6), col(60)] == TRAIN_LOSS).all()
    assert not (image[loss_row(3.4), col(60)] == TRAIN_LOSS).all()


def test_plot_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    good = hand_written_metrics()
    cases = {
        "missing folder": (None, "is not a folder"),
        "no metrics": ([], "has no metrics.jsonl"),
        "no train records": ([good[0]], "has no training records"),
        "malformed line": (good[:2] + ['{"kind": "train", "step": 3'] + good[2:], "line 3: not valid JSON"),
        "not an object": (good[:1] + ["[1, 2]"], "line 2: expected a JSON object"),
        "no kind": (good[:2] + ['{"step": 3}'], 'record 3: a metrics record needs a "kind"'),
        "missing field": (good[:1] + [json.dumps({"kind": "train", "step": 5, "loss": True, "mean_rank": 2})],
                          "record 2: a 'train' record needs a number for 'loss'"),
    }
    for name, (lines, message) in cases.items():
        folder = tmp_path / name.replace(" ", "-")
        if lines == []:
            folder.mkdir()
        elif lines is not None:
            write_metrics(folder, lines)
        code, out, err = run_cli(["plot", "--adapter-path", str(folder)], capsys)
        assert code == 2 and out == "", (name, err)
        assert len(err.splitlines()) == 1 and err.startswith("drlora-mlx: error: ") and message in err, (name, err)
        assert str(folder) in err and not (folder / "training.png").exists(), name
    bad = subprocess.run([sys.executable, "-m", "drlora_mlx", "plot", "--adapter-path", str(tmp_path / "nothing")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_a_real_runs_metrics_plot(tmp_path, capsys):
    run = tmp_path / "adapters"
    code, _, err = run_cli(["train", "--iters", "20", "--adapter-path", str(run)], capsys)
    assert code == 0, err
    records = read_metrics(run)
    train = [r for r in records if r["kind"] == "train"]
    assert train and any(r["kind"] == "val" for r in records)
    code, out, err = run_cli(["plot", "--adapter-path", str(run)], capsys)
    assert (code, out, err) == (0, f"wrote {run / 'training.png'}\n", "")
    image = decode_png(run / "training.png")
    assert image.shape == (600, 800, 3)
    # Steps run 0..20 (by the 1-2-5 rule: ticks of 2 would need 10 intervals, of 5 need 4): the columns of the
    # first and the last report hold the training loss line.
    for r in (train[0], train[-1]):
        column = round(96 + 680 * r["step"] / 20)
        assert len(rows_of(image, column, TRAIN_LOSS)) > 0, r["step"]
    assert (image[40:341] == VALID_LOSS).all(axis=2).any()
    assert (image[396:537] == MEAN_RANK).all(axis=2).any()


def test_a_run_interrupted_on_a_terminal_leaves_it_clean(tmp_path):
    """`drlora-mlx train` with stdout and stderr on a pseudo-terminal: the panel shows while it runs, and
    after a Ctrl-C the screen holds the plain report lines and the one-line notice, nothing of the panel."""
    master, slave = os.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-m", "drlora_mlx", "train", "--iters", "400", "--adapter-path",
                             str(tmp_path / "run")], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    term, received, interrupted = Terminal(), b"", False
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if select.select([master], [], [], 1.0)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the other end closed: the process is gone
                break
            if not chunk:
                break
            received += chunk
        if not interrupted and b"ETA " in received:
            proc.send_signal(signal.SIGINT)
            interrupted, during = True, received[: received.rfind(b"\n") + 1]
    os.close(master)
    if not interrupted:
        proc.kill()
    assert interrupted, received.decode()[-2000:]
    assert proc.wait(timeout=60) == 128 + signal.SIGINT
    shown = Terminal()
    shown.write(during.decode())
    panel = [line for line in shown.screen() if line[:1] in ("╭", "│", "╰")]
    assert panel[0].startswith("╭─ drlora-mlx train ") and "/400  elapsed " in panel[1] and "ETA " in panel[1]
    term.write(received.decode())
    screen = term.screen()
    assert not [line for line in screen if line[:1] in ("╭", "│", "╰")], screen[-6:]
    assert screen[-1].startswith("drlora-mlx: SIGINT at iteration ") and "--resume" in screen[-1]
    assert any(line.startswith("iter 1: valid loss ") for line in screen)
