"""Blind A/B human review: export a sheet of paired outputs, import the verdicts, count wins.

The reviewer sees ``output 1`` and ``output 2`` in a random order per row and never a run name (the
sheet is named by a hash). The key that maps 1/2 back to the runs stays in the experiment's hidden
``.review/`` folder; ``import`` joins the filled sheet with it and writes ``review_<A>_vs_<B>.json``,
which ``launcher collect`` shows as win/tie/loss counts.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.errors import UserError
from launcher.rundir.paths import (
    ExperimentPaths,
    iter_jsonl,
    read_json,
    utc_now,
    write_json_atomic,
    write_text_atomic,
)

SHEET_COLUMNS: tuple[str, ...] = (
    "sheet",
    "item",
    "id",
    "prompt",
    "reference",
    "output_1",
    "output_2",
    "verdict",
    "comment",
)
VERDICTS = {"1": "1", "2": "2", "tie": "tie", "t": "tie", "=": "tie", "0": "tie"}
KEY_DIR = ".review"


@dataclass(frozen=True)
class ReviewSheet:
    sheet_id: str
    csv_path: Path
    html_path: Path
    key_path: Path
    n_items: int


@dataclass(frozen=True)
class ReviewCounts:
    run_a: str
    run_b: str
    wins_a: int
    ties: int
    wins_b: int
    unrated: int
    path: Path

    @property
    def n_rated(self) -> int:
        return self.wins_a + self.ties + self.wins_b

    @property
    def sign_test_p(self) -> float:
        """Two-sided sign test on wins vs losses (ties dropped): could this split be a coin flip?"""
        n, k = self.wins_a + self.wins_b, min(self.wins_a, self.wins_b)
        if n == 0:
            return 1.0
        tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
        return min(1.0, 2.0 * tail)


def review_result_path(exp_root: Path, run_a: str, run_b: str) -> Path:
    return Path(exp_root) / f"review_{run_a}_vs_{run_b}.json"


def _load_pair(exp: ExperimentPaths, run_a: str, run_b: str) -> list[tuple[str, str, str, str, str]]:
    """(id, prompt, reference, output_a, output_b) for the examples both runs generated."""
    # lazy: sacrebleu and numpy load only when samples are compared
    from launcher.collect.significance import SamplesMismatch, align, load_samples

    for name in (run_a, run_b):
        if not exp.run(name).root.is_dir():
            names = [p.name for p in exp.run_dirs()]
            raise UserError(f"{exp.root}: no run {name!r}; runs: {', '.join(names[:20]) or 'none'}")
        if not exp.run(name).samples_jsonl.is_file():
            raise UserError(f"run {name!r} has no samples.jsonl yet (it is written at the end of training)")
    try:
        samples_a = load_samples(exp.run(run_a).samples_jsonl)
        samples_b = load_samples(exp.run(run_b).samples_jsonl)
        outputs_b = align(samples_a, samples_b, run_b)
    except SamplesMismatch as exc:
        raise UserError(f"cannot pair the outputs of {run_a} and {run_b}: {exc}") from exc
    if len(samples_a) == 0:
        raise UserError(f"run {run_a!r}: samples.jsonl has no usable example")
    prompts: dict[str, str] = {}
    for record in iter_jsonl(exp.run(run_a).samples_jsonl):
        prompts[str(record.get("id"))] = str(record.get("prompt") or "")
    return [
        (ex_id, prompts.get(ex_id, ""), ref, out_a, out_b)
        for ex_id, ref, out_a, out_b in zip(
            samples_a.ids, samples_a.references, samples_a.predictions, outputs_b, strict=True
        )
    ]


def _html_rows(rows: list[dict[str, Any]]) -> str:
    """One table row per example: prompt (reference folded), the two outputs, the verdict inputs."""
    body = []
    for row in rows:
        item = row["item"]
        radios = " ".join(
            f'<label><input type="radio" name="v{item}" value="{value}"> {label}</label>'
            for value, label in (("1", "output 1 better"), ("tie", "tie"), ("2", "output 2 better"))
        )
        body.append(
            f'<tr data-item="{item}"><td>{item}</td><td><pre>{html.escape(row["prompt"])}</pre>'
            f"<details><summary>reference</summary><pre>{html.escape(row['reference'])}</pre></details></td>"
            f"<td><pre>{html.escape(row['output_1'])}</pre></td><td><pre>{html.escape(row['output_2'])}</pre></td>"
            f'<td>{radios}<br><input type="text" name="c{item}" placeholder="comment"></td></tr>'
        )
    return "".join(body)


def _html_page(sheet_id: str, rows: list[dict[str, Any]]) -> str:
    """A self-contained page: no network; verdicts are kept in the browser's localStorage under the sheet
    id as they are given (a closed tab loses nothing) and download as the CSV that ``import`` reads."""
    data = json.dumps(rows, ensure_ascii=False).replace("</", "<\\/")
    columns = json.dumps(list(SHEET_COLUMNS))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Blind review {sheet_id}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }} table {{ border-collapse: collapse; width: 100%; }}
td, th {{ border: 1px solid #ccc; padding: 4px; vertical-align: top; }}
pre {{ white-space: pre-wrap; margin: 0; font-family: inherit; }}
td:nth-child(3), td:nth-child(4) {{ width: 30%; }}
</style></head><body>
<h1>Blind review, sheet {sheet_id}</h1>
<p>For each prompt, pick the better output (or tie). The two outputs come from two systems in a random
order per row. Your verdicts are kept in this browser as you go (closing the tab loses nothing). When
you are done, press <b>Download filled CSV</b> and send the file back
(<code>launcher review import EXP FILE</code>).</p>
<p><button onclick="download()">Download filled CSV</button> <span id="count"></span></p>
<table><tr><th>#</th><th>prompt</th><th>output 1</th><th>output 2</th><th>verdict</th></tr>
{_html_rows(rows)}
</table>
<script>
const ROWS = {data};
const COLUMNS = {columns};
const STORE = "launcher-review:{sheet_id}";  // one entry per sheet: several sheets can be open at once
let storage = null;
try {{
  storage = window.localStorage;
  storage.setItem(STORE + ":probe", "1");
  storage.removeItem(STORE + ":probe");
}} catch (e) {{
  storage = null;  // e.g. storage disabled for files: the page says so
}}
function field(name, item) {{
  return document.querySelector('input[name="' + name + item + '"]');
}}
function verdicts() {{
  const out = {{}};
  for (const row of ROWS) {{
    const checked = document.querySelector('input[name="v' + row.item + '"]:checked');
    const comment = field("c", row.item).value;
    if (checked || comment) out[row.item] = {{verdict: checked ? checked.value : "", comment: comment}};
  }}
  return out;
}}
function save() {{
  const saved = verdicts();
  const rated = Object.values(saved).filter(v => v.verdict).length;
  let note = rated + " of " + ROWS.length + " rated";
  if (storage) {{
    storage.setItem(STORE, JSON.stringify(saved));
    note += ", saved in this browser";
  }} else {{
    note += "; this browser does not keep them: download the CSV before you close the tab";
  }}
  document.getElementById("count").textContent = note;
}}
function restore() {{
  let saved = {{}};
  try {{
    saved = JSON.parse((storage && storage.getItem(STORE)) || "{{}}");
  }} catch (e) {{
    saved = {{}};
  }}
  for (const [item, v] of Object.entries(saved)) {{
    const radio = document.querySelector('input[name="v' + item + '"][value="' + v.verdict + '"]');
    if (radio) radio.checked = true;
    if (field("c", item)) field("c", item).value = v.comment || "";
  }}
  save();
}}
function cell(v) {{
  v = String(v ?? "");
  return /[",\\n\\r]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v;
}}
function csvText() {{
  const saved = verdicts();
  const lines = [COLUMNS.join(",")];
  for (const row of ROWS) {{
    const v = saved[row.item] || {{verdict: "", comment: ""}};
    const filled = Object.assign({{}}, row, {{verdict: v.verdict, comment: v.comment}});
    lines.push(COLUMNS.map(c => cell(filled[c])).join(","));
  }}
  return "\\ufeff" + lines.join("\\r\\n") + "\\r\\n";
}}
function download() {{
  save();
  const blob = new Blob([csvText()], {{type: "text/csv;charset=utf-8"}});
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob); a.download = "review_{sheet_id}_filled.csv"; a.click();
}}
document.addEventListener("change", save);
document.addEventListener("input", save);
restore();
</script></body></html>
"""


def export_review(
    exp_root: Path, run_a: str, run_b: str, *, out_dir: Path | None = None, seed: int = 0
) -> ReviewSheet:
    """Write ``review_<sheet>.csv`` and ``.html`` (blind) to ``out_dir`` and the key to ``<exp>/.review/``."""
    exp = ExperimentPaths(Path(exp_root))
    if run_a == run_b:
        raise UserError("review needs two different runs")
    pairs = _load_pair(exp, run_a, run_b)
    # The id names no run: a reviewer must not learn which system is which from the file name.
    sheet_id = hashlib.sha1(f"{exp.root.name}|{run_a}|{run_b}|{seed}".encode()).hexdigest()[:10]
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    key_items: list[dict[str, Any]] = []
    for item, (ex_id, prompt, ref, out_a, out_b) in enumerate(pairs, start=1):
        a_first = rng.random() < 0.5
        rows.append(
            {
                "sheet": sheet_id,
                "item": item,
                "id": ex_id,
                "prompt": prompt,
                "reference": ref,
                "output_1": out_a if a_first else out_b,
                "output_2": out_b if a_first else out_a,
                "verdict": "",
                "comment": "",
            }
        )
        key_items.append({"item": item, "id": ex_id, "output_1": "A" if a_first else "B"})
    out = Path(out_dir) if out_dir is not None else exp.root / "review"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(SHEET_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    key_path = exp.root / KEY_DIR / f"{sheet_id}.key.json"
    write_json_atomic(
        key_path,
        {
            "sheet": sheet_id,
            "run_a": run_a,
            "run_b": run_b,
            "seed": seed,
            "created_at": utc_now(),
            "items": key_items,
        },
    )
    csv_path, html_path = out / f"review_{sheet_id}.csv", out / f"review_{sheet_id}.html"
    write_text_atomic(csv_path, buffer.getvalue())
    write_text_atomic(html_path, _html_page(sheet_id, rows))
    return ReviewSheet(sheet_id, csv_path, html_path, key_path, len(rows))


def import_review(exp_root: Path, sheet: Path) -> ReviewCounts:
    """Join a filled sheet with its key; write ``review_<A>_vs_<B>.json`` in the experiment dir."""
    exp_root = Path(exp_root)
    try:
        text = Path(sheet).read_text(encoding="utf-8-sig")  # spreadsheets add a BOM
    except OSError as exc:
        raise UserError(f"{sheet}: cannot read the sheet ({exc.strerror or exc})") from exc
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in ("sheet", "item", "verdict") if c not in (reader.fieldnames or [])]
    if missing:
        raise UserError(
            f"{sheet}: missing column(s) {', '.join(missing)}; export a sheet with `launcher review export`"
        )
    records = list(reader)
    sheet_ids = {r["sheet"] for r in records if r.get("sheet")}
    if len(sheet_ids) != 1:
        raise UserError(
            f"{sheet}: expected one sheet id in column 'sheet', found {sorted(sheet_ids) or 'none'}"
        )
    sheet_id = sheet_ids.pop()
    key_path = exp_root / KEY_DIR / f"{sheet_id}.key.json"
    try:
        key = read_json(key_path)
        order = {int(i["item"]): i for i in key["items"]}
        run_a, run_b = str(key["run_a"]), str(key["run_b"])
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{sheet}: no key for sheet {sheet_id} at {key_path} (was it exported from this experiment?)"
        ) from exc
    except (KeyError, TypeError) as exc:
        raise UserError(f"{key_path}: damaged review key ({exc!r}); export the sheet again") from exc
    problems: list[str] = []
    verdicts: list[dict[str, Any]] = []
    seen: set[int] = set()
    counts = {"A": 0, "tie": 0, "B": 0}
    unrated = 0
    for line, record in enumerate(records, start=2):
        try:
            item = int(record["item"])
        except (TypeError, ValueError):
            problems.append(f"{sheet}:{line}: item {record.get('item')!r} is not a number")
            continue
        if item not in order or item in seen:
            problems.append(
                f"{sheet}:{line}: item {item} is {'repeated' if item in seen else 'not in the sheet key'}"
            )
            continue
        seen.add(item)
        raw = (record.get("verdict") or "").strip().lower()
        if not raw:
            unrated += 1
            continue
        verdict = VERDICTS.get(raw)
        if verdict is None:
            problems.append(f"{sheet}:{line}: verdict {raw!r}; valid: 1, 2, tie (or blank for unrated)")
            continue
        first = order[item]["output_1"]
        winner = "tie" if verdict == "tie" else (first if verdict == "1" else ("B" if first == "A" else "A"))
        counts[winner] += 1
        verdicts.append(
            {"item": item, "id": order[item]["id"], "winner": winner, "comment": record.get("comment") or ""}
        )
    if problems:
        raise UserError(f"{len(problems)} problem(s) in the review sheet:\n  " + "\n  ".join(problems))
    unrated += len(order) - len(seen)
    path = review_result_path(exp_root, run_a, run_b)
    result = ReviewCounts(run_a, run_b, counts["A"], counts["tie"], counts["B"], unrated, path)
    write_json_atomic(
        path,
        {
            "run_a": run_a,
            "run_b": run_b,
            "sheet": sheet_id,
            "wins_a": result.wins_a,
            "ties": result.ties,
            "wins_b": result.wins_b,
            "unrated": unrated,
            "sign_test_p": result.sign_test_p,
            "imported_at": utc_now(),
            "source": str(sheet),
            "verdicts": verdicts,
        },
    )
    return result


def load_reviews(exp_root: Path, warnings: list[str]) -> list[ReviewCounts]:
    """Every imported ``review_*.json`` of the experiment (damaged ones are skipped with a warning)."""
    out: list[ReviewCounts] = []
    for path in sorted(Path(exp_root).glob("review_*_vs_*.json")):
        try:
            data = read_json(path)
            out.append(
                ReviewCounts(
                    str(data["run_a"]),
                    str(data["run_b"]),
                    int(data["wins_a"]),
                    int(data["ties"]),
                    int(data["wins_b"]),
                    int(data.get("unrated", 0)),
                    path,
                )
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            warnings.append(f"{path.name}: unreadable review result ({type(exc).__name__}), skipped")
    return out
