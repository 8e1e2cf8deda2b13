"""Auditing: append-only records, verify, and every rationales filter through the CLI."""

import csv
import io
import json
import shutil
import sqlite3

import pytest
from click.testing import CliRunner

from selfreward.cli import cli
from selfreward.core.store import append_only_triggers


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("table", ["judgments", "candidates", "pairs"])
def test_triggers_refuse_edits(judged_run, table):
    # A plain sqlite3 client, as someone editing the file by hand would use (a reader's Run cannot write at all).
    db = sqlite3.connect(judged_run.path / "run.db")
    with pytest.raises(sqlite3.IntegrityError, match="append-only: UPDATE refused"):
        db.execute(f"update {table} set round = 99")
    with pytest.raises(sqlite3.IntegrityError, match="append-only: DELETE refused"):
        db.execute(f"delete from {table}")
    # INSERT OR REPLACE deletes the old row without firing the DELETE trigger (recursive_triggers is off).
    row = db.execute(f"select * from {table} order by id limit 1")
    cols = [d[0] for d in row.description]
    old = dict(zip(cols, row.fetchone()))
    changed = {**old, "round": 99}
    with pytest.raises(sqlite3.IntegrityError, match="append-only: INSERT of an existing id refused"):
        db.execute(f"insert or replace into {table} ({', '.join(cols)}) values ({', '.join('?' * len(cols))})",
                   list(changed.values()))
    db.commit()
    assert db.execute(f"select round from {table} where id = ?", [old["id"]]).fetchone() == (old["round"],)
    db.close()
    with pytest.raises(sqlite3.OperationalError, match="readonly"):  # readers open run.db read-only
        judged_run.db.execute(f"insert into {table} (round) values (1)")


def test_every_judgment_carries_provenance(judged_run):
    rows = judged_run.rows("select * from judgments where judge = 'scripted'")
    assert rows
    for j in rows:
        assert j["template_sha"] and j["judge_model_sha"] and j["version"] and j["created_at"]
        sampling = json.loads(j["sampling"])
        assert {"temperature", "top_p", "seed", "mode"} <= sampling.keys()
    models = {m["name"]: m["sha256"] for m in judged_run.rows("select name, sha256 from models")}
    assert all(models.values()) and models["M0"] != models["M1"]


def test_verify_passes_then_catches_tampering(judged_run):
    ok = invoke("verify", judged_run.path)
    assert ok.exit_code == 0, ok.output
    assert "ok:" in ok.output
    kept = judged_run.rows("select * from pairs where status = 'kept' limit 1")
    assert kept, "the scripted judge should yield at least one kept pair"
    pair = kept[0]
    # Tamper through raw SQL: drop the trigger first, as someone editing the file by hand would.
    db = sqlite3.connect(judged_run.path / "run.db")
    db.execute("drop trigger pairs_no_update")
    db.execute("update pairs set chosen_id = rejected_id, rejected_id = chosen_id where id = ?", [pair["id"]])
    db.commit()
    db.close()
    bad = invoke("verify", judged_run.path)
    assert bad.exit_code == 1
    assert f"pair {pair['id']}" in bad.output and "recomputed" in bad.output


def test_verify_says_what_it_could_not_reread(judged_run):
    total = judged_run.db["judgments"].count
    db = sqlite3.connect(judged_run.path / "run.db")
    # One judgment made with a template this version does not know, and one with no raw text (as PairRM leaves).
    db.execute("drop trigger judgments_no_update")
    (first,) = db.execute("select id from judgments where score is not null order by id limit 1").fetchone()
    (second,) = db.execute("select id from judgments where score is null order by id limit 1").fetchone()
    db.execute("update judgments set template_sha = 'feedfeedfeedfeed' where id = ?", [first])
    db.execute("update judgments set raw = null where id = ?", [second])
    db.execute(append_only_triggers("judgments")["judgments_no_update"])  # put back, so that only the edit shows
    db.commit()
    db.close()
    result = invoke("verify", judged_run.path)
    assert result.exit_code == 0, result.output
    assert f"{total - 2} of {total} judgments match" in result.output
    assert "not re-read: 1 without raw judge text" in result.output
    assert "1 made with a template this version does not have" in result.output


def test_verify_catches_a_score_that_its_raw_text_does_not_say(judged_run):
    db = sqlite3.connect(judged_run.path / "run.db")
    db.execute("drop trigger judgments_no_update")
    jid = db.execute("select id from judgments where score = 4 limit 1").fetchone()[0]
    db.execute("update judgments set score = 5 where id = ?", [jid])
    db.commit()
    db.close()
    bad = invoke("verify", judged_run.path)
    assert bad.exit_code == 1
    assert f"judgment {jid}: stored score 5.0 but its raw text parses to 4.0" in bad.output


def rows_of(result):
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.output.splitlines() if line.strip()]


def test_rationales_filters(judged_run):
    path = judged_run.path
    every = rows_of(invoke("rationales", path, "--format", "jsonl"))
    assert len(every) == judged_run.db["judgments"].count
    assert {r["round"] for r in rows_of(invoke("rationales", path, "--round", 2, "--format", "jsonl"))} == {2}

    high = rows_of(invoke("rationales", path, "--min-score", 4, "--format", "jsonl"))
    assert high and all(r["score"] >= 4 for r in high)
    low = rows_of(invoke("rationales", path, "--max-score", 1, "--format", "jsonl"))
    assert low and all(r["score"] <= 1 for r in low)

    failures = rows_of(invoke("rationales", path, "--failures", "--format", "jsonl"))
    assert failures and all(r["score"] is None and r["reason"] for r in failures)

    spread = rows_of(invoke("rationales", path, "--spread", 2, "--format", "jsonl"))
    for r in spread:
        scores = [j["score"] for j in judged_run.rows("select score from judgments where candidate_id = ? "
                                                      "and score is not null", [r["candidate_id"]])]
        assert max(scores) - min(scores) >= 2

    margin = rows_of(invoke("rationales", path, "--margin", 1, "--format", "jsonl"))
    kept_ids = {i for p in judged_run.rows("select chosen_id, rejected_id from pairs where status = 'kept' "
                                           "and chosen_score - rejected_score >= 1") for i in p.values()}
    assert {r["candidate_id"] for r in margin} == kept_ids

    found = rows_of(invoke("rationales", path, "--search", "relevant", "--format", "jsonl"))
    assert found and all("relevant" in (r["rationale"] or "").lower() or "relevant" in r["response"].lower()
                         for r in found)

    table = invoke("rationales", path, "--round", 2, "--limit", 3)
    assert table.exit_code == 0 and "judgment_id" in table.output and len(table.output.splitlines()) == 5
    as_csv = list(csv.DictReader(io.StringIO(invoke("rationales", path, "--failures", "--format", "csv").output)))
    assert len(as_csv) == len(failures)

    bad = invoke("rationales", path, "--search", '"unbalanced')
    assert bad.exit_code != 0 and "bad --search query" in bad.output


def test_show_pair(judged_run):
    pair = judged_run.rows("select * from pairs where status = 'kept' limit 1")[0]
    result = invoke("show", judged_run.path, "--pair", pair["id"])
    assert result.exit_code == 0, result.output
    assert "CHOSEN: candidate" in result.output and "REJECTED: candidate" in result.output
    assert result.output.count("judge sample") == 2 * 2  # two sides, two samples each (tiny preset)


def test_a_changed_or_missing_model_is_named_in_one_line(judged_run, tmp_path):
    import shutil

    m2 = judged_run.path / "models" / "M2"
    weights = next(m2.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last weight
    weights.write_bytes(bytes(data))
    bad = invoke("verify", judged_run.path)
    assert bad.exit_code == 1 and "model M2 at" in bad.output and "has changed since it was written" in bad.output
    # Loading it for work (here: as the judge of an eval) stops with the same line, before any model loads.
    result = invoke("eval", "judge", judged_run.path, "--models", "M2", "--limit", "1", "--judge", "self")
    assert result.exit_code == 1 and "model M2 at" in result.output and "has changed" in result.output
    shutil.rmtree(m2)
    gone = invoke("eval", "judge", judged_run.path, "--models", "M2", "--limit", "1", "--judge", "self")
    assert gone.exit_code == 1 and "model M2 is missing" in gone.output
    assert len(gone.output.strip().splitlines()) == 1


def tamper(run_path, table: str, sql: str, params=()) -> None:
    """Edit an append-only table as a careful forger would: drop its UPDATE trigger, edit, put it back."""
    db = sqlite3.connect(run_path / "run.db")
    db.execute(f"drop trigger {table}_no_update")
    db.execute(sql, params)
    db.execute(append_only_triggers(table)[f"{table}_no_update"])
    db.commit()
    db.close()


def scripted_run(tmp_path, tiny_model, seed_files, outputs, name, *extra, rounds=2):
    script = tmp_path / f"{name}.json"
    script.write_text(json.dumps(outputs))
    args = ["iterate", "--runs-dir", tmp_path / "runs", "--name", name, "--model", tiny_model, "--ift",
            seed_files["ift"], "--eft", seed_files["eft"], "--eft-eval", "", "--preset", "tiny", "--engine",
            "transformers", "--judge", "scripted", "--judge-script", script, "--rounds", rounds,
            "--set", "prompts_per_round=3", "--set", "n_candidates=3", *extra]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return tmp_path / "runs" / name


def test_verify_passes_a_copied_score_line_and_a_small_rho(tmp_path, tiny_model, seed_files, monkeypatch):
    """An honest run: the judge refused a score line it copied from the response (stored NULL), and
    length_rho=0.00001 is written 'rho=1e-05' in the pairing rule; verify must read both as the loop did."""
    from selfreward.backends.engines import Completion
    from selfreward.backends.engines.hf import TransformersEngine
    from selfreward.backends.judges.llm import COPIED

    real = TransformersEngine.generate
    answer = "It moves water by pressure. Score: 5"

    def answers_with_a_score_line(self, prompts, n, sampling, desc="generate", on_done=None):
        outs = real(self, prompts, n, sampling, desc, on_done)
        if "candidates" not in desc:
            return outs
        return [[Completion(answer, c.n_tokens, "stop") for c in per] for per in outs]

    monkeypatch.setattr(TransformersEngine, "generate", answers_with_a_score_line)
    outputs = ["Clear. Score: 4", "Vague. Score: 1", f"The answer reads: {answer}", "Fine. Score: 3"]
    path = scripted_run(tmp_path, tiny_model, seed_files, outputs, "copied", "--set", "length_rho=0.00001")
    db = sqlite3.connect(path / "run.db")
    assert db.execute("select count(*) from judgments where reason = ? and score is null", [COPIED]).fetchone()[0]
    assert {r for (r,) in db.execute("select distinct rule from pairs")} == {"max-min rho=1e-05"}
    db.close()
    result = invoke("verify", path)
    assert result.exit_code == 0, result.output


def test_verify_rereads_pairwise_comparisons_and_their_scores(tmp_path, tiny_model, seed_files):
    outputs = ["A is clearer. Verdict: A", "B is clearer. Verdict: B", "Alike. Verdict: tie", "Verdict: A",
               "Hmm, B.\nVerdict: B", "Cannot tell."]
    path = scripted_run(tmp_path, tiny_model, seed_files, outputs, "pw", "--judge-mode", "pairwise")
    ok = invoke("verify", path)
    assert ok.exit_code == 0, ok.output
    assert "pairwise comparisons" in ok.output and "not re-read" not in ok.output
    db = sqlite3.connect(path / "run.db")
    (cid,) = db.execute("select id from comparisons where ab_score = 1.0 and ba_score is not null").fetchone()
    (jid, score) = db.execute("select id, score from judgments where score is not null and raw is null "
                              "and judge like '%/pairwise' limit 1").fetchone()
    db.close()
    tamper(path, "comparisons", "update comparisons set ab_score = 0.0, outcome = 'unparsed' where id = ?",
           [cid])
    tamper(path, "judgments", "update judgments set score = score + 0.5 where id = ?", [jid])
    bad = invoke("verify", path)
    assert bad.exit_code == 1
    assert f"comparison {cid}: stored ab verdict 0.0 but its raw text parses to 1.0" in bad.output
    assert f"comparison {cid}: stored outcome 'unparsed', recomputed" in bad.output
    assert f"judgment {jid}: stored pairwise score {score + 0.5} but its comparisons give {score}" in bad.output


def test_verify_rereads_cream_consistency_judgments(tmp_path, tiny_model, seed_files):
    outputs = ["Accurate and complete. Score: 4", "Misses the point. Score: 1", "Partly right.\nScore: 3",
               "Good. Score: 5", "No idea."]
    path = scripted_run(tmp_path, tiny_model, seed_files, outputs, "cream", "--set", "consistency=yes", rounds=3)
    ok = invoke("verify", path)
    assert ok.exit_code == 0 and "consistency judgments" in ok.output, ok.output
    db = sqlite3.connect(path / "run.db")
    (jid,) = db.execute("select id from consistency_judgments where score = 4 limit 1").fetchone()
    db.close()
    tamper(path, "consistency_judgments", "update consistency_judgments set score = 0 where id = ?", [jid])
    bad = invoke("verify", path)
    assert bad.exit_code == 1
    assert f"consistency judgment {jid}: stored score 0.0 but its raw text parses to 4.0" in bad.output


def test_verify_names_a_missing_or_changed_trigger(judged_run):
    db = sqlite3.connect(judged_run.path / "run.db")
    db.execute("drop trigger pairs_no_delete")
    db.execute("drop trigger candidates_no_update")
    db.execute("create trigger candidates_no_update before update on candidates begin select 1; end")
    db.commit()
    db.close()
    bad = invoke("verify", judged_run.path)
    assert bad.exit_code == 1
    assert "trigger pairs_no_delete is missing" in bad.output
    assert "trigger candidates_no_update has been changed" in bad.output


def test_model_hash_covers_config_tokenizer_and_chat_template(judged_run):
    from selfreward.backends.models import _safetensors_sha, check_weights

    m2 = judged_run.path / "models" / "M2"
    (sha,) = judged_run.db.execute("select sha256 from models where name = 'M2'").fetchone()
    template = m2 / "chat_template.jinja" if (m2 / "chat_template.jinja").exists() else m2 / "tokenizer_config.json"
    for f in (m2 / "config.json", m2 / "tokenizer.json", template):
        saved = f.read_bytes()
        f.write_bytes(saved + b"\n")  # still valid: one byte more
        bad = invoke("verify", judged_run.path)
        assert bad.exit_code == 1 and "model M2 at" in bad.output and "has changed" in bad.output, f.name
        with pytest.raises(Exception, match="has changed"):  # a load checks too, whatever the size
            check_weights("M2", m2, sha)
        f.write_bytes(saved)
    check_weights("M2", m2, sha)
    # A named chat template lives in a subfolder, and a load reads it too.
    (m2 / "additional_chat_templates").mkdir()
    (m2 / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages }}")
    with pytest.raises(Exception, match="has changed"):
        check_weights("M2", m2, sha)
    shutil.rmtree(m2 / "additional_chat_templates")
    check_weights("M2", m2, sha)
    # A run recorded before: 16 hex digits over the *.safetensors alone, still verified as such.
    db = sqlite3.connect(judged_run.path / "run.db")
    with db:
        db.execute("update models set sha256 = ? where name = 'M2'", [_safetensors_sha(m2)])
    ok = invoke("verify", judged_run.path)
    assert ok.exit_code == 0, ok.output
    weights = next(m2.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    bad = invoke("verify", judged_run.path)
    assert bad.exit_code == 1 and "model M2 at" in bad.output and "has changed" in bad.output


def test_terminal_escapes_in_model_text_are_shown_not_obeyed(tmp_path):
    from fixture_run import build_fixture_run

    run = build_fixture_run(tmp_path / "runs" / "esc")
    evil = "Fine answer.\x1b[2J\x1b]0;pwned\x07\rScore: 5\u202e"
    with run.db.atomic():
        run.db["prompts"].insert({"id": 900, "round": 2, "text": "say hi\x1b[31m", "source": "t", "created_at": "x"})
        run.db["candidates"].insert({"id": 9000, "round": 2, "prompt_id": 900, "idx": 0, "text": evil})
        run.db["judgments"].insert({"id": 9000, "round": 2, "candidate_id": 9000, "sample": 0, "judge": "self:M1",
                                    "score": 3, "rationale": evil, "raw": evil})
    run.close()
    for args in (["show", run.path, 900], ["rationales", run.path, "--round", 2]):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        assert not any(ch in result.output for ch in "\x1b\x07\r\u202e"), args
        assert "\\x1b[2J" in result.output
    with sqlite3.connect(run.path / "run.db") as db:  # the stored text is left as it was
        assert db.execute("select text from candidates where id = 9000").fetchone() == (evil,)
