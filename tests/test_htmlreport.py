import re

import pytest
from fixture_run import EVAL_DATASET, build_fixture_run

from selfreward.config import resolve
from selfreward.inspection.report import build_report
from selfreward.core.store import Run


@pytest.fixture
def run(tmp_path):
    return build_fixture_run(tmp_path / "r")


def _images(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def test_report_charts_exist_and_are_pngs(run):
    path = build_report(run)
    assert path == run.path / "report" / "report.html"
    page = path.read_text()
    images = _images(page)
    assert set(images) == {"scores.png", "pairs.png", "lengths.png", "training.png", "judge.png"}
    for src in images:
        png = path.parent / src
        assert png.stat().st_size > 1000 and png.read_bytes().startswith(b"\x89PNG"), src
    assert not list(path.parent.glob("*.tmp"))


def test_report_covers_every_round_and_escapes_text(run, tmp_path):
    page = build_report(run, tmp_path / "out").read_text()
    for t in (1, 2, 3):
        assert f"Round {t} (M{t - 1}-&gt;M{t})" in page
    assert "reward-hacking" in page
    # Unparsed judgments are counted apart, with their reason.
    assert "no score found" in page
    # Judge quality: the loop's eft_* metrics per model and the eval_metrics row, as tables.
    assert "M0" in page and "e1f2a3b4c5d6" in page
    assert "&lt;held-out&gt; &amp; ranked" in page and EVAL_DATASET not in page
    assert "http://" not in page and "https://" not in page and "<script" not in page


def test_report_of_an_empty_run(tmp_path):
    run = Run.create(tmp_path / "empty", resolve({}, {"preset": "tiny"}))
    path = build_report(run)
    page = path.read_text()
    assert "No rounds yet" in page and page.count("no data yet") >= 5
    assert _images(page) == []


def test_report_before_dpo_says_no_data_in_the_chart(run, tmp_path):
    # A run stopped after SFT: training has data, DPO panels do not.
    with run.db.atomic():
        run.db.execute("delete from training_steps where kind = 'dpo'")
        run.db.execute("delete from eval_metrics")
    page = build_report(run, tmp_path / "out").read_text()
    assert "training.png" in page and (tmp_path / "out" / "training.png").read_bytes().startswith(b"\x89PNG")
