"""`collect`, `plan` and `status` in a real terminal: tmux panes 80, 100 and 160 columns wide, read back
with ``capture-pane``. A row must sit on one screen line with its whole run name and whole numbers; a
line the terminal had to wrap shows up as a difference between the pane's lines and its joined lines
(``capture-pane -J``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from collect_fixtures import default_result, make_run, perturb, references, samples, write_spec
from sacrebleu.metrics import BLEU
from spec_helpers import SPEC

from launcher.collect import collect_experiments
from launcher.collect.table import COLUMNS
from launcher.plan.planner import load_and_plan
from launcher.rundir.paths import ExperimentPaths, RunState
from launcher.rundir.status import update_status
from launcher.submit.status_view import STATUS_COLUMNS, collect_rows

REPO = Path(__file__).resolve().parent.parent
WIDTHS = (80, 100, 160)
REQUIRE_ENV = "LAUNCHER_REQUIRE_TMUX"  # CI sets it: a missing tmux then fails instead of skipping

pytestmark = pytest.mark.skipif(
    shutil.which("tmux") is None and not os.environ.get(REQUIRE_ENV),
    reason="tmux is not installed (Debian: apt-get install tmux); these tests need a real terminal",
)


@dataclass
class Pane:
    lines: list[str]
    """The screen, one entry per terminal line."""
    joined: list[str]
    """The same with the lines the terminal wrapped joined back (capture-pane -J)."""

    def row(self, name: str) -> str:
        """The one screen line that holds the run's whole name as a cell."""
        found = [line for line in self.lines if f" {name} " in line]
        assert len(found) == 1, f"{name!r} is not whole on exactly one line:\n" + "\n".join(self.lines)
        return found[0]

    def assert_nothing_wrapped(self) -> None:
        assert self.lines == self.joined, "the terminal wrapped a line:\n" + "\n".join(self.lines)
        assert not any("…" in line for line in self.lines), "a cell was cut:\n" + "\n".join(self.lines)


@pytest.fixture(scope="module")
def terminal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Pane]]:
    """Run `launcher ARGS` in a fresh tmux window of the given width and return its screen."""
    socket = tmp_path_factory.mktemp("tmux") / "socket"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TERM": "xterm-256color"}
    env.pop("TMUX", None)  # a test run inside tmux must still start its own server

    def tmux(*args: str, timeout_s: float = 60) -> str:
        out = subprocess.run(
            ["tmux", "-S", str(socket), *args], env=env, capture_output=True, text=True, timeout=timeout_s
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    def show(args: list[str], width: int) -> Pane:
        """The screen after the command ended (saved under $LAUNCHER_TMUX_CAPTURES when set)."""
        name = f"t{uuid.uuid4().hex[:8]}"
        command = " ".join([sys.executable, "-m", "launcher", *args])
        tmux(
            "new-session",
            "-d",
            "-s",
            name,
            "-x",
            str(width),
            "-y",
            "150",
            f"{command}; tmux -S {socket} wait-for -S {name}; sleep 600",
        )
        tmux("wait-for", name)
        lines = tmux("capture-pane", "-p", "-t", name).rstrip("\n").split("\n")
        joined = tmux("capture-pane", "-p", "-J", "-t", name).rstrip("\n").split("\n")
        tmux("kill-session", "-t", name)
        strip = [line.rstrip() for line in lines]
        if os.environ.get("LAUNCHER_TMUX_CAPTURES"):
            out = (
                Path(os.environ["LAUNCHER_TMUX_CAPTURES"])
                / f"{args[0]}{'-wide' if '--wide' in args else ''}-{width}.txt"
            )
            out.write_text("\n".join(strip) + "\n")
        return Pane([s for s in strip if s], [s.rstrip() for s in joined if s.strip()])

    yield show
    subprocess.run(["tmux", "-S", str(socket), "kill-server"], env=env, capture_output=True)


# --- collect ---------------------------------------------------------------------------------------

NAMES = (
    "freeze-last4-src1024-tgt256",
    "lora-lr1e-4-r16-src1024-tgt256",
    "full-zero3-offload-src1024-tgt256",
    "ptuning-v2-pre16-src1024-tgt256",
)


def _experiment(root: Path, names: tuple[str, ...], *, ids_offset: int = 0) -> Path:
    refs = references(40)
    ids = [f"ex{i + ids_offset:04d}" for i in range(40)]
    for index, name in enumerate(names):
        if name.startswith("ptuning"):
            reason = (
                "RuntimeError: [enforce fail at gloo/transport/tcp/pair.cc:446] op.preamble.length <= nbytes"
            )
            make_run(root, name, state=RunState.FAILED, reason=reason)
            continue
        preds = perturb(refs, 0.1 + 0.15 * index, seed=index)
        bleu = BLEU(tokenize="zh").corpus_score(preds, [refs]).score
        result = default_result(
            name, bleu=bleu, eval_loss=1.4 - 0.1 * index, train_loss_final=1.2 - 0.1 * index
        )
        make_run(
            root,
            name,
            result=result,
            samples=samples(refs, preds, ids=ids),
            max_source_length=1024,
            seed=42 + index,
        )
    write_spec(root, baseline=names[0])
    return root


@pytest.fixture(scope="module")
def experiments(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tables")
    first = _experiment(root / "history", NAMES)
    second = _experiment(root / "rerun", ("lora-lr1e-4-r16-src1024-tgt256", "freeze-last2"), ids_offset=5)
    return first, second


def _cells(exp: Path, name: str) -> dict[str, str]:
    collection = collect_experiments([exp], write=False)
    row = collection.row(name)
    return {c.header: c.cell(row) for c in COLUMNS}


@pytest.mark.parametrize("width", WIDTHS)
def test_collect_fits_each_terminal_width(terminal, experiments, width: int) -> None:
    exp, _ = experiments
    pane = terminal(["collect", str(exp), "--no-write"], width)
    pane.assert_nothing_wrapped()
    compact = (
        ("state", "eval loss", "BLEU", "ΔBLEU")
        if width == 80
        else ("state", "eval loss", "BLEU", "ΔBLEU", "peak mem GiB", "loss")
    )
    for name in NAMES:
        line = pane.row(name)
        cells = _cells(exp, name)
        for header in compact:
            assert f" {cells[header]} " in line, (header, line)
    text = " ".join(pane.lines)
    assert f"more column(s) at {width} columns:" in text and "(--wide shows all)" in text
    if width == 160:
        line = pane.row(NAMES[1])
        assert _cells(exp, NAMES[1])["95% CI"] in line


def test_collect_wide_shows_every_column(terminal, experiments) -> None:
    exp, _ = experiments
    pane = terminal(["collect", str(exp), "--no-write", "--wide"], 100)
    assert not any("more column(s) at" in line for line in pane.lines)
    # Wider than the terminal: the terminal wraps each row, the joined line holds every cell (free
    # text may fold onto the row's next line: its start is there).
    name = NAMES[1]
    line = next(line for line in pane.joined if f" {name} " in line)
    row = collect_experiments([exp], write=False).row(name)
    for column in COLUMNS:
        text = column.cell(row)
        assert (text[:12] if column.wrap else f" {text} ") in line, (column.header, text, line)


# --- plan ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep_spec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("plan")
    path = root / "sweep.yaml"
    path.write_text(f"output_dir: {root / 'runs'}\n" + SPEC)  # a grid x zip x seeds sweep: long run names
    return path


@pytest.mark.parametrize("width", WIDTHS)
def test_plan_keeps_swept_run_names_whole(terminal, sweep_spec: Path, width: int) -> None:
    rows = load_and_plan(sweep_spec).rows()
    pane = terminal(["plan", str(sweep_spec)], width)
    pane.assert_nothing_wrapped()
    for row in rows:
        line = pane.row(row["name"])
        assert f" {row['est_mem_gib']:.1f} " in line and " yes " in line
        assert f" {row['nodes']} x {row['gpus_per_node']} " in line
    if width == 160:
        assert all(f"{r['micro_batch_size']}x" in pane.row(r["name"]) for r in rows)


# --- status ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planned(sweep_spec: Path) -> Path:
    from launcher.plan.planner import write_run_dirs

    exp = write_run_dirs(load_and_plan(sweep_spec))
    runs = exp.run_dirs()
    update_status(runs[0], RunState.COMPLETED, step=20, total_steps=20)
    update_status(runs[1], RunState.RUNNING, step=7, total_steps=20)
    update_status(
        runs[2],
        RunState.FAILED,
        "rank 1: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 1; 79.15 GiB total)",
    )
    return exp.root


@pytest.mark.parametrize("width", WIDTHS)
def test_status_shows_whole_states_and_names(terminal, planned: Path, width: int) -> None:
    pane = terminal(["status", str(planned)], width)
    pane.assert_nothing_wrapped()
    rows = collect_rows(ExperimentPaths(planned), live=False)
    for row in rows:
        line = pane.row(row.name)
        assert f" {row.state} " in line
        step = next(c for c in STATUS_COLUMNS if c.header == "step").cell(row)
        assert f" {step} " in line
    # The failure reason is shown, folded onto the row's next lines when the terminal is narrow.
    reason = " ".join(line.split("│")[-2].strip() for line in pane.lines if line.count("│") > 2)
    assert "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB" in reason
