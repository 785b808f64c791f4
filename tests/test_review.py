"""Blind A/B review: export, fill, import round trip, and the win/tie/loss counts in the table."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from collect_fixtures import default_result, make_run, perturb, references, samples

from launcher.cli import main
from launcher.collect import collect_experiment
from launcher.collect.review import export_review, import_review
from launcher.errors import UserError

N_ITEMS = 12


@pytest.fixture()
def exp(tmp_path: Path) -> Path:
    root = tmp_path / "history_length"
    refs = references(N_ITEMS, seed=5)
    make_run(
        root,
        "lora-src512",
        result=default_result("lora-src512"),
        samples=samples(refs, perturb(refs, 0.5, 6)),
    )
    make_run(
        root,
        "lora-src1024",
        result=default_result("lora-src1024"),
        samples=samples(refs, perturb(refs, 0.2, 7)),
    )
    return root


def _read_sheet(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))


def _fill(sheet_rows: list[dict[str, str]], key: dict, wanted: list[str], out: Path) -> None:
    """Write the sheet back with verdicts so that run A gets the outcomes in ``wanted`` (A/B/tie/"")."""
    first_by_item = {i["item"]: i["output_1"] for i in key["items"]}
    for row, outcome in zip(sheet_rows, wanted, strict=True):
        first = first_by_item[int(row["item"])]
        if outcome == "tie":
            row["verdict"] = "tie"
        elif outcome == "":
            row["verdict"] = ""
        else:  # the reviewer picks the column that holds the winning run's output
            row["verdict"] = "1" if first == outcome else "2"
    with open(out, "w", encoding="utf-8-sig", newline="") as handle:  # a spreadsheet's BOM
        writer = csv.DictWriter(handle, fieldnames=list(sheet_rows[0]))
        writer.writeheader()
        writer.writerows(sheet_rows)


def test_export_is_blind_and_shuffled(exp: Path, tmp_path: Path) -> None:
    sheet = export_review(exp, "lora-src512", "lora-src1024", out_dir=tmp_path / "out", seed=3)
    assert sheet.n_items == N_ITEMS and sheet.csv_path.parent == tmp_path / "out"
    rows = _read_sheet(sheet.csv_path)
    html = sheet.html_path.read_text(encoding="utf-8")
    for text in (sheet.csv_path.read_text(encoding="utf-8"), html):
        assert "lora-src512" not in text and "lora-src1024" not in text  # no run names for the reviewer
    assert "http://" not in html and "https://" not in html and "<script src" not in html  # self-contained
    key = json.loads(sheet.key_path.read_text())
    assert key["run_a"] == "lora-src512" and key["run_b"] == "lora-src1024"
    orders = {i["output_1"] for i in key["items"]}
    assert orders == {"A", "B"}  # both orders occur in 12 rows with this seed
    lines = (exp / "runs" / "lora-src512" / "samples.jsonl").read_text().splitlines()
    preds_a = {json.loads(line)["id"]: json.loads(line)["prediction"] for line in lines}
    for row, item in zip(rows, key["items"], strict=True):
        shown_a = row["output_1"] if item["output_1"] == "A" else row["output_2"]
        assert shown_a == preds_a[row["id"]]
    again = export_review(exp, "lora-src512", "lora-src1024", out_dir=tmp_path / "out2", seed=3)
    assert json.loads(again.key_path.read_text())["items"] == key["items"]  # deterministic per seed


def test_round_trip_counts_wins_ties_losses_and_the_table_shows_them(exp: Path, tmp_path: Path) -> None:
    sheet = export_review(exp, "lora-src512", "lora-src1024", seed=1)
    assert sheet.csv_path.parent == exp / "review"
    key = json.loads(sheet.key_path.read_text())
    wanted = ["A"] * 3 + ["B"] * 6 + ["tie"] * 2 + [""]
    filled = tmp_path / "filled.csv"
    _fill(_read_sheet(sheet.csv_path), key, wanted, filled)
    counts = import_review(exp, filled)
    assert (counts.wins_a, counts.ties, counts.wins_b, counts.unrated) == (3, 2, 6, 1)
    stored = json.loads((exp / "review_lora-src512_vs_lora-src1024.json").read_text())
    assert (stored["wins_a"], stored["ties"], stored["wins_b"]) == (3, 2, 6)
    assert stored["sign_test_p"] == pytest.approx(2 * (1 + 9 + 36 + 84) / 2**9)  # 3 of 9, two-sided
    collection = collect_experiment(exp, write=True)
    assert collection.row("lora-src512").get("review") == [
        {"vs": "lora-src1024", "win": 3, "tie": 2, "loss": 6, "unrated": 1}
    ]
    assert collection.row("lora-src1024").get("review")[0]["win"] == 6
    md = (exp / "summary.md").read_text()
    assert "| lora-src512 | lora-src1024 | 3 | 2 | 6 | 1 |" in md
    assert "vs lora-src1024: 3/2/6" in md


def test_invalid_verdicts_are_reported_with_their_line_and_nothing_is_written(
    exp: Path, tmp_path: Path
) -> None:
    sheet = export_review(exp, "lora-src512", "lora-src1024")
    rows = _read_sheet(sheet.csv_path)
    rows[2]["verdict"] = "left"
    rows[5]["verdict"] = "3"
    filled = tmp_path / "bad.csv"
    with open(filled, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(UserError, match=r"2 problem\(s\)") as info:
        import_review(exp, filled)
    assert "bad.csv:4: verdict 'left'" in str(info.value) and "bad.csv:7: verdict '3'" in str(info.value)
    assert not list(exp.glob("review_*.json"))


def test_unknown_sheet_and_mismatched_runs_are_user_errors(exp: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.csv"
    other.write_text("sheet,item,verdict\nnokey,1,1\n")
    with pytest.raises(UserError, match="no key for sheet nokey"):
        import_review(exp, other)
    refs = references(5, seed=9)
    make_run(exp, "other", result=default_result("other"), samples=samples(refs, refs))
    with pytest.raises(UserError, match="cannot pair the outputs"):
        export_review(exp, "lora-src512", "other")
    with pytest.raises(UserError, match="no run 'missing'"):
        export_review(exp, "lora-src512", "missing")


def test_cli_round_trip(exp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "sheets"
    assert (
        main(
            [
                "review",
                "export",
                str(exp),
                "lora-src1024",
                "lora-src512",
                "--out",
                str(out_dir),
                "--seed",
                "4",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "wrote 12 items" in printed and "do not send it to reviewers" in printed
    (sheet_csv,) = out_dir.glob("review_*.csv")
    key_path = next((exp / ".review").glob("*.key.json"))
    filled = tmp_path / "filled.csv"
    _fill(_read_sheet(sheet_csv), json.loads(key_path.read_text()), ["A"] * 10 + ["B"] * 2, filled)
    assert main(["review", "import", str(exp), str(filled)]) == 0
    assert "lora-src1024 wins 10, ties 0, lora-src512 wins 2" in capsys.readouterr().out
