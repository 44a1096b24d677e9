"""Tables that fit the terminal they are printed on: one line per row, at 80 columns too.

A UID never folds into a narrow column (one UID over seven lines): when a table does not fit,
its UIDs are shortened in the middle first (`1.2.826.0…6090.12`, the tail lengthened until the
shortened UIDs of the table are distinct), then its least useful columns are dropped, in the
order each table gives; free-text columns (an error, a message) take the width that is left
and end in "…", or, prose in a detail view (a timeline's messages, a verdict), wrap within their
column. `wide` keeps every column and every UID whole, the table as wide as it needs
(the terminal wraps it; for `grep` and for copying UIDs). `--json` never goes through here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from rich.table import Table
from rich.text import Text

ELLIPSIS = "…"
UID_HEAD = 9  # "1.2.826.0": the root, which says whose UID it is
UID_TAIL = 7  # "6090.12": the end, which tells one UID from another


def shorten_uid(uid: str, head: int = UID_HEAD, tail: int = UID_TAIL) -> str:
    """`uid` with its middle replaced by "…" when that makes it shorter."""
    if len(uid) <= head + tail + len(ELLIPSIS):
        return uid
    return f"{uid[:head]}{ELLIPSIS}{uid[-tail:]}"


def shorten_uids(uids: list[str], head: int = UID_HEAD, tail: int = UID_TAIL) -> dict[str, str]:
    """UID -> its shortened form, the tail as long as it takes to keep distinct UIDs distinct."""
    distinct = set(uids)
    while True:
        short = {uid: shorten_uid(uid, head, tail) for uid in distinct}
        if len(set(short.values())) == len(distinct):
            return short
        tail += 1  # terminates: a tail as long as the UID gives the UID itself


class Kind(StrEnum):
    FIXED = "fixed"  # shown whole (a number, a state, a time)
    UID = "uid"  # shown whole, or shortened in the middle
    TEXT = "text"  # free text: takes the width left, cut with "…"
    PROSE = "prose"  # free text: takes the width left, wrapped over more lines (detail views)


FREE = (Kind.TEXT, Kind.PROSE)


@dataclass(frozen=True)
class Column:
    header: str
    kind: Kind = Kind.FIXED
    drop: int | None = None  # the order in which columns go when the table does not fit (1 first); None: kept
    min_width: int = 12  # free text narrower than this: another column is dropped (or this one, in its turn)
    style: str | None = None


def chrome(columns: int) -> int:
    """Characters a rich table with the default box and padding adds to its cells' widths."""
    return 3 * columns + 1


def _cell(value: str | Text) -> Text:
    return value if isinstance(value, Text) else Text.from_markup(value)


def _width(value: str | Text) -> int:
    return max((line.cell_len for line in _cell(value).split("\n")), default=0)


@dataclass
class Fitted:
    table: Table
    width: int  # the width the table takes (wide: as wide as its widest row)
    shown: list[str]  # the headers of the columns shown


def fit_table(title: str, columns: list[Column], rows: list[tuple[str | Text, ...]], width: int,
              wide: bool = False) -> Fitted:
    """A table of `rows` (cells: markup strings or Text) for a terminal `width` columns wide."""
    rows = [tuple(row) for row in rows]
    short: dict[int, dict[str, str]] = {}
    for i, column in enumerate(columns):
        if column.kind == Kind.UID:
            short[i] = shorten_uids([str(row[i]) for row in rows if row[i]])

    def natural(i: int, shortened: bool) -> int:
        cells = [short[i].get(str(row[i]), str(row[i])) if shortened and i in short else row[i] for row in rows]
        return max([len(columns[i].header)] + [_width(c) for c in cells])

    kept = list(range(len(columns)))
    shortened = False
    widths: dict[int, int] = {}
    if wide:
        widths = {i: natural(i, False) for i in kept}
    else:
        droppable = sorted((c.drop, i) for i, c in enumerate(columns) if c.drop is not None)
        while True:
            fixed = {i: natural(i, shortened) for i in kept if columns[i].kind not in FREE}
            text = {i: min(natural(i, shortened), max(columns[i].min_width, len(columns[i].header)))
                    for i in kept if columns[i].kind in FREE}
            left = width - chrome(len(kept)) - sum(fixed.values()) - sum(text.values())
            if left >= 0:
                widths = {**fixed, **text}
                for i in sorted(text):  # the width left goes to the free text, in column order
                    more = min(left, natural(i, shortened) - widths[i])
                    widths[i] += more
                    left -= more
                break
            if short and not shortened:
                shortened = True
            elif droppable:
                kept.remove(droppable.pop(0)[1])
            else:  # nothing left to give up: rich folds what does not fit
                widths = {**fixed, **text}
                break
    table = Table(title=title, title_justify="left")
    for i in kept:
        column = columns[i]
        if wide:
            table.add_column(column.header, no_wrap=column.kind != Kind.PROSE, style=column.style)
        elif column.kind == Kind.PROSE:
            table.add_column(column.header, overflow="fold", min_width=widths[i], max_width=widths[i],
                             style=column.style)
        else:
            table.add_column(column.header, no_wrap=True, overflow="ellipsis", min_width=widths[i],
                             max_width=widths[i], style=column.style)
    for row in rows:
        cells = []
        for i in kept:
            value = row[i]
            if shortened and i in short and value:
                value = short[i][str(value)]
            cell = _cell(value)
            if not wide and columns[i].kind != Kind.PROSE:  # one line: a cell's lines joined
                cell = Text(" ").join(cell.split("\n"))
            cells.append(cell)
        table.add_row(*cells)
    return Fitted(table, sum(widths[i] for i in kept) + chrome(len(kept)), [columns[i].header for i in kept])
