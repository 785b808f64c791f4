"""Tables that fit the terminal: the one place that decides which columns `plan`, `status` and `collect`
show and how wide each one is.

Each table declares its columns once (header, cell text, priority). On a terminal the columns are taken
in priority order while they fit its width; priority 0 columns (the run name, the state) always show.
Names and numbers are never cut or wrapped: their column is as wide as their longest cell. Only free
text (reasons, notes, swept values) folds onto more lines, and headers wrap at their spaces when that
saves room. ``--wide`` shows every column; output that is not a terminal (a pipe, a log file) gets
every column on one line per row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

R = TypeVar("R")

ALWAYS = 0
_WRAP_MIN_WIDTH = 12  # free text folds to no narrower than this (a failure reason must find room)
_WORD_WIDTH = 30  # ...and is given room for its longest word up to this before another column is added


@dataclass(frozen=True)
class Column(Generic[R]):
    header: str
    cell: Callable[[R], str]
    right: bool = False
    priority: int = 1
    """0: always shown; otherwise columns with a lower number are kept first when the terminal is narrow."""
    wrap: bool = False
    """Free text that may fold onto more lines; names and numbers never do."""
    style: Callable[[R], str] | None = None
    """A rich style for the cell (e.g. the state's colour)."""


@dataclass(frozen=True)
class _Layout:
    indices: list[int]
    widths: list[int]
    hidden: list[str]


def _text_width(text: str) -> int:
    from rich.cells import cell_len

    return max((cell_len(line) for line in text.splitlines()), default=0)


def _longest_word(header: str) -> int:
    return max((_text_width(word) for word in header.split()), default=0)


def _table_width(widths: Sequence[int]) -> int:
    """Content widths plus padding (1 each side) and the vertical rules of rich's default box."""
    return sum(widths) + 3 * len(widths) + 1


def _layout(
    columns: Sequence[Column[R]], cells: list[list[str]], width: int | None, every_column: bool
) -> _Layout:
    """Which columns and how wide; ``width`` None: every column at its natural width (nothing folds);
    ``every_column``: all of them, as wide as needed for names and numbers to stay whole."""
    natural = [
        max([_text_width(c.header), *(_text_width(row[i]) for row in cells)]) for i, c in enumerate(columns)
    ]
    content = [max((_text_width(row[i]) for row in cells), default=0) for i in range(len(columns))]
    minimum = [
        max(_longest_word(c.header), min(content[i], _WRAP_MIN_WIDTH) if c.wrap else content[i])
        for i, c in enumerate(columns)
    ]
    words = [max((_longest_word(row[i]) for row in cells), default=0) for i in range(len(columns))]
    comfortable = [
        max(minimum[i], min(content[i], words[i], _WORD_WIDTH)) if c.wrap else minimum[i]
        for i, c in enumerate(columns)
    ]
    if width is None:
        return _Layout(list(range(len(columns))), natural, [])
    # A column with nothing in it (no row has a reason) is left out without a word.
    columns_with_text = [i for i in range(len(columns)) if content[i] > 0]
    if every_column:
        width = max(width, _table_width(minimum))
    order = sorted(columns_with_text, key=lambda i: (columns[i].priority, i))
    chosen = [i for i in order if columns[i].priority == ALWAYS or every_column]
    for i in order:
        # Free text already shown keeps room for whole words before another column comes in; a free
        # text column itself may come in folded to the minimum.
        if i not in chosen and (
            _table_width([comfortable[j] for j in [*chosen, i]]) <= width
            or (columns[i].wrap and _table_width([minimum[j] for j in [*chosen, i]]) <= width)
        ):
            chosen.append(i)
    chosen.sort()
    roomy = _table_width([comfortable[i] for i in chosen]) <= width
    widths = {i: comfortable[i] if roomy else minimum[i] for i in chosen}
    # Room left: first unfold free text, then unwrap headers.
    spare = width - _table_width(list(widths.values()))
    for i in [*(j for j in chosen if columns[j].wrap), *chosen]:
        grow = min(max(0, spare), natural[i] - widths[i])
        widths[i] += grow
        spare -= grow
    hidden = [columns[i].header for i in columns_with_text if i not in chosen]
    return _Layout(chosen, [widths[i] for i in chosen], hidden)


def fitted_table(
    columns: Sequence[Column[R]],
    rows: Sequence[R],
    *,
    width: int | None,
    every_column: bool = False,
    title: str | None = None,
    caption: str | None = None,
    row_style: Callable[[R], str | None] | None = None,
) -> tuple[Table, list[str]]:
    """The rich table for ``width`` terminal columns and the headers it leaves out (see ``_layout``)."""
    from rich.markup import escape
    from rich.table import Table

    cells = [[c.cell(row) for c in columns] for row in rows]
    layout = _layout(columns, cells, width, every_column)
    table = Table(title=title, caption=caption, header_style="bold")
    for i, w in zip(layout.indices, layout.widths, strict=True):
        c = columns[i]
        table.add_column(escape(c.header), justify="right" if c.right else "left", width=w, overflow="fold")
    for row, texts in zip(rows, cells, strict=True):
        shown = []
        for i in layout.indices:
            styler = columns[i].style
            style = styler(row) if styler is not None else ""
            text = escape(texts[i])  # reasons may hold "[...]" (gloo source paths)
            shown.append(f"[{style}]{text}[/]" if style else text)
        table.add_row(*shown, style=row_style(row) if row_style else None)
    return table, layout.hidden


def print_fitted(
    console: Console,
    columns: Sequence[Column[R]],
    rows: Sequence[R],
    *,
    wide: bool = False,
    title: str | None = None,
    caption: str | None = None,
    row_style: Callable[[R], str | None] | None = None,
) -> None:
    """Print the table fitted to ``console``: every column with ``wide``; on one line per row, whatever
    the width, when the output is not a terminal."""
    terminal = console.is_terminal
    table, hidden = fitted_table(
        columns,
        rows,
        width=console.width if terminal else None,
        every_column=wide,
        title=title,
        caption=caption,
        row_style=row_style,
    )
    table_width = _table_width([col.width or 0 for col in table.columns])
    if table_width > console.width:
        # Names and numbers stay whole: a terminal wraps the long lines, a log file keeps them.
        console_width = console.width
        console.width = table_width
        try:
            console.print(table)
        finally:
            console.width = console_width
    else:
        console.print(table)
    if hidden:
        console.print(
            f"[dim]{len(hidden)} more column(s) at {console.width} columns: {', '.join(hidden)} "
            "(--wide shows all)[/]",
            highlight=False,
        )
