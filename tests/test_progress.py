"""Progress on stderr: plain lines at a bounded rate off a terminal, tiles counted in tiled extraction, quiet."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from conftest import TINY_MODEL
from posvit_cli._cli import RichProgress


class FakeClock:
    """A clock the test moves by hand (seconds)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _lines(buf: io.StringIO) -> list[str]:
    return buf.getvalue().splitlines()


def test_lines_at_every_five_percent_and_none_after_the_final_one():
    clock, buf = FakeClock(), io.StringIO()
    with RichProgress(live=False, clock=clock, stream=buf) as progress:
        progress("count", 0, 100)
        for k in range(1, 101):
            clock.now = float(k)  # one unit a second: 5 % steps come every 5 s, long before 30 s
            progress("count", k, 100)
        clock.now = 500.0  # leaving the block later writes nothing more: the final state is written
    lines = _lines(buf)
    # 5 %, 10 %, ..., 100 %: 20 lines; at step k the elapsed time is k s and the rate 1/s, so eta = 100 - k s.
    assert len(lines) == 20, lines
    assert lines[0] == "count: 5/100 (5%), 0:00:05 elapsed, eta 0:01:35"
    assert lines[1] == "count: 10/100 (10%), 0:00:10 elapsed, eta 0:01:30"
    assert lines[11] == "count: 60/100 (60%), 0:01:00 elapsed, eta 0:00:40"
    assert lines[-1] == "count: 100/100 (100%), 0:01:40 elapsed, eta 0:00:00"
    assert [int(line.split()[1].split("/")[0]) for line in lines] == list(range(5, 101, 5))


def test_a_slow_task_writes_a_line_every_thirty_seconds_and_its_last_state_at_the_end():
    clock, buf = FakeClock(), io.StringIO()
    with RichProgress(live=False, clock=clock, stream=buf) as progress:
        progress("slow", 0, 1000)
        for k in range(1, 41):
            clock.now = 10.0 * k  # 10 s a unit: 40 units are 4 %, no 5 % step
            progress("slow", k, 1000)
        clock.now = 400.0
    lines = _lines(buf)
    # Every 30 s: units 3, 6, ..., 39 (13 lines), then the unwritten last state (40) when the block ends.
    assert len(lines) == 14, lines
    # 3 units in 30 s = 0.1/s, 997 left: 9970 s = 2:46:10.
    assert lines[0] == "slow: 3/1000 (0%), 0:00:30 elapsed, eta 2:46:10"
    assert lines[1] == "slow: 6/1000 (0%), 0:01:00 elapsed, eta 2:45:40"  # 994 left: 9940 s
    # 40 units in 400 s: 960 left at 0.1/s = 9600 s.
    assert lines[-1] == "slow: 40/1000 (4%), 0:06:40 elapsed, eta 2:40:00"


def test_unknown_total_and_a_grown_total():
    clock, buf = FakeClock(), io.StringIO()
    with RichProgress(live=False, clock=clock, stream=buf, step_percent=50, every_seconds=100) as progress:
        progress("kmeans", 0)
        clock.now = 100.0
        progress("kmeans", 7)  # 100 s: a line
        clock.now = 150.0
        progress("kmeans", 9)  # 50 s later: no line
        progress("tiles", 0, 4)
        progress("tiles", 2, 4)  # 50 %: a line
        progress("tiles", 2, 8)  # the total grew: 25 %, steps count on from there
        progress("tiles", 3, 8)  # 37 %: no line
        progress("tiles", 4, 8)  # 50 %: a line
        clock.now = 160.0
    assert _lines(buf) == [
        "kmeans: 7 done, 0:01:40 elapsed",
        "tiles: 2/4 (50%), 0:00:00 elapsed, eta -:--:--",
        "tiles: 4/8 (50%), 0:00:00 elapsed, eta -:--:--",
        "kmeans: 9 done, 0:02:40 elapsed",  # its last state, when the block ends
    ]


def test_quiet_writes_nothing():
    clock, buf = FakeClock(), io.StringIO()
    with RichProgress(quiet=True, live=False, clock=clock, stream=buf) as progress:
        for k in range(101):
            clock.now = 60.0 * k
            progress("count", k, 100)
    assert buf.getvalue() == ""


def _tiled_image(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "big.png"
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
    return path


def test_tiled_extract_off_a_terminal_writes_lines_counting_tiles(cli, tmp_path):
    image = _tiled_image(tmp_path)
    # 64 px in 32-px tiles without overlap: 2 × 2 = 4 tiles; the CliRunner's stderr is not a terminal.
    res = cli(["extract", image, "-m", TINY_MODEL, "-w", "random", "-o", tmp_path / "f.h5", "--tile", "32",
               "--overlap", "0", "--batch-size", "1"])
    assert res.exit_code == 0, res.output
    lines = res.stderr.splitlines()
    tiles = [line for line in lines if line.startswith("extract tiles: ")]
    # One tile a forward pass: a line at each of 1/4, 2/4, 3/4, 4/4 (each is a 5 % step or more).
    assert [line.split()[2] for line in tiles] == ["1/4", "2/4", "3/4", "4/4"], lines
    assert "extract tiles: 4/4 (100%)" in tiles[-1] and tiles[-1].endswith("eta 0:00:00")
    assert any(line.startswith("extract: 1/1 (100%)") for line in lines), lines
    assert not any("━" in line for line in lines), lines  # no Rich bar off a terminal


def test_tiled_extract_quiet_writes_nothing(cli, tmp_path):
    image = _tiled_image(tmp_path)
    res = cli(["extract", image, "-m", TINY_MODEL, "-w", "random", "-o", tmp_path / "f.h5", "--tile", "32",
               "--overlap", "0", "-q"])
    assert res.exit_code == 0, res.output
    assert res.stderr == ""
