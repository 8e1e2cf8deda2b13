"""Real SIGKILLs of `selfreward iterate` mid-generation, mid-SFT merge, mid-judging commit
and mid-DPO: each rerun ends with exactly the rows of an uninterrupted run of the same
seed, passes verify, and leaves no scratch behind. bench/chaos.py runs all 20 points."""

import pytest
from chaos import CI_POINTS, baseline_run, kill_and_resume, write_inputs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_model):
    inputs = write_inputs(tmp_path_factory.mktemp("chaos-inputs"))
    return inputs, baseline_run(tmp_path_factory.mktemp("chaos-base"), tiny_model, inputs)


@pytest.mark.parametrize("point", CI_POINTS)
def test_kill_9_then_rerun_heals_exactly(point, baseline, tiny_model, tmp_path):
    inputs, expected = baseline
    assert kill_and_resume(point, tmp_path, tiny_model, inputs, expected) == []
