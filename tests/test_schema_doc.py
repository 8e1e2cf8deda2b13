"""docs/schema.md is generated from the store's migrations and kept current."""

from pathlib import Path

from selfreward.config import resolve
from selfreward.core import schema_doc
from selfreward.core.store import Run

DOC = Path(__file__).resolve().parent.parent / "docs" / "schema.md"


def test_docs_schema_is_what_the_migrations_make():
    assert DOC.read_text() == schema_doc.markdown(), \
        "docs/schema.md is stale: run `python -m selfreward.core.schema_doc > docs/schema.md`"


def test_the_schema_is_read_from_the_database_a_run_gets(tmp_path):
    run = Run.create(tmp_path / "run", resolve({}, {"preset": "tiny"}))
    try:
        assert schema_doc.render(run.db) == schema_doc.markdown()
    finally:
        run.close()
    # A later migration's table, index, trigger and view show up without touching the generator.
    db = schema_doc.fresh_db(tmp_path)
    db["probe_notes"].create({"id": int, "judgment_id": int, "note": str}, pk="id",
                             foreign_keys=[("judgment_id", "judgments", "id")])
    db["probe_notes"].create_index(["judgment_id"], unique=True)
    db.execute("CREATE TRIGGER probe_notes_no_delete BEFORE DELETE ON probe_notes "
               "BEGIN SELECT RAISE(ABORT, 'notes stay'); END")
    db.execute("CREATE VIEW scored AS SELECT * FROM judgments WHERE score IS NOT NULL")
    text = schema_doc.render(db)
    assert "## `probe_notes`" in text
    assert "| `judgment_id` | INTEGER | references `judgments.id` |" in text
    assert "`idx_probe_notes_judgment_id` (judgment_id) unique" in text
    assert "| `probe_notes_no_delete` | BEFORE DELETE | refuses: notes stay |" in text
    assert "### `scored`" in text and "WHERE score IS NOT NULL" in text
    assert "- `m009_judge_training`" in text and "## `_sqlite_migrations`" not in text
    assert "## `judgments_fts_data`" not in text and "| `judgments_fts` | `rationale`, `raw` | `judgments` |" in text
