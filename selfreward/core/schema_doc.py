"""docs/schema.md, generated from the store's migrations: run.db's tables, columns, indexes,
triggers and views as a fresh run has them.

    python -m selfreward.core.schema_doc > docs/schema.md

tests/test_schema_doc.py fails when docs/schema.md differs from what this prints, so a
new migration is documented by rerunning the command above.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import sqlite_utils

from selfreward.core.store import migrations

HEADER = """# The run store's schema (`runs/<name>/run.db`)

Generated from the migrations in `selfreward/core/store.py` by
`python -m selfreward.core.schema_doc > docs/schema.md`; do not edit by hand
(`tests/test_schema_doc.py` fails when this file is stale). What the tables mean,
and the values their columns take, is in [auditing.md](auditing.md#tables).
"""


def fresh_db(folder: Path) -> sqlite_utils.Database:
    db = sqlite_utils.Database(folder / "run.db")
    migrations.apply(db)
    return db


def _cell(text) -> str:
    return "" if text is None else str(text).replace("|", "\\|").replace("\n", " ")


def _trigger(sql: str) -> tuple[str, str]:
    """(when it fires, what it does) from a CREATE TRIGGER statement."""
    sql = " ".join(sql.split())
    when = re.search(r"\b(BEFORE|AFTER|INSTEAD OF)\s+(INSERT|DELETE|UPDATE)\b", sql, re.I)
    raise_ = re.search(r"RAISE\s*\(\s*\w+\s*,\s*'([^']*)'", sql, re.I)
    targets = {t.strip('"[]') for t in re.findall(r"\b(?:INSERT INTO|DELETE FROM|UPDATE)\s+(\S+)", sql.partition(
        " BEGIN ")[2], re.I)}
    does = (f"refuses: {raise_[1]}" if raise_ else f"writes {', '.join(f'`{t}`' for t in sorted(targets))}"
            if targets else sql)
    return (f"{when[1]} {when[2]}".upper() if when else ""), does


def render(db: sqlite_utils.Database) -> str:
    master = list(db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY rowid").fetchall())
    virtual = {name for kind, name, _, sql in master if kind == "table" and sql and sql.upper().startswith(
        "CREATE VIRTUAL TABLE")}
    # SQLite's own tables behind a virtual (FTS5) table, and the migrations' bookkeeping.
    shadow = {name for kind, name, _, _ in master if kind == "table" and any(
        name.startswith(v + "_") for v in virtual)}
    internal = {"_sqlite_migrations"}
    tables = [name for kind, name, _, _ in master if kind == "table" and not name.startswith("sqlite_")
              and name not in shadow | internal | virtual]
    applied = [row[0] for row in db.execute("SELECT name FROM _sqlite_migrations ORDER BY applied_at, rowid")]
    out = [HEADER, "Migrations, in the order they apply:", "", *(f"- `{m}`" for m in applied), ""]
    for table in tables:
        out += [f"## `{table}`", "", "| column | type | constraints |", "|---|---|---|"]
        fks = {fk[3]: f"references `{fk[2]}.{fk[4]}`" for fk in db.execute(f"PRAGMA foreign_key_list([{table}])")}
        for _, name, kind, notnull, default, pk in db.execute(f"PRAGMA table_info([{table}])"):
            notes = ["primary key" if pk else "", "not null" if notnull else "",
                     f"default {_cell(default)}" if default is not None else "", fks.get(name, "")]
            out.append(f"| `{name}` | {kind or ''} | {', '.join(n for n in notes if n)} |")
        indexes = [(row[1], row[2]) for row in db.execute(f"PRAGMA index_list([{table}])")
                   if not row[1].startswith("sqlite_autoindex")]
        if indexes:
            out += ["", "Indexes: " + "; ".join(
                f"`{name}` ({', '.join(r[2] for r in db.execute(f'PRAGMA index_info([{name}])'))})"
                + (" unique" if unique else "") for name, unique in sorted(indexes))]
        triggers = sorted((name, sql) for kind, name, tbl, sql in master if kind == "trigger" and tbl == table)
        if triggers:
            out += ["", "| trigger | fires | does |", "|---|---|---|"]
            out += [f"| `{name}` | {when} | {_cell(does)} |" for name, sql in triggers
                    for when, does in [_trigger(sql)]]
        out.append("")
    if virtual:
        out += ["## Full-text indexes (FTS5)", "", "| table | indexes | of |", "|---|---|---|"]
        for name in sorted(virtual):
            sql = next(s for kind, n, _, s in master if n == name)
            cols = re.search(r"\((.*)\)", sql, re.S)[1]
            parts = [p.strip().strip("[]\"") for p in cols.split(",")]
            columns = [p for p in parts if "=" not in p]
            source = next((p.split("=", 1)[1].strip().strip("[]'\"") for p in parts if p.startswith("content=")), "")
            out.append(f"| `{name}` | {', '.join(f'`{c}`' for c in columns)} | `{source}` |")
        out += ["", "SQLite keeps each in its own shadow tables: "
                + ", ".join(f"`{name}`" for name in sorted(shadow)) + ".", ""]
    views = [(name, sql) for kind, name, _, sql in master if kind == "view"]
    if views:
        out += ["## Views", ""]
        for name, sql in views:
            out += [f"### `{name}`", "", "```sql", sql.strip(), "```", ""]
    return "\n".join(out).rstrip() + "\n"


def markdown() -> str:
    with tempfile.TemporaryDirectory(prefix="selfreward-schema-") as tmp:
        db = fresh_db(Path(tmp))
        try:
            return render(db)
        finally:
            db.close()


if __name__ == "__main__":
    print(markdown(), end="")
