import pytest

from selfreward.config import PRESETS, Config, load_toml, resolve, to_toml
from selfreward.errors import SelfRewardError


def test_precedence_defaults_preset_toml_cli(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('preset = "demo"\nn_candidates = 6\njudge_samples = 5\n')
    cfg = resolve(load_toml(toml), {"judge_samples": 2})
    assert cfg.dpo_beta == Config.dpo_beta == 0.1                      # default (the paper's)
    assert cfg.prompts_per_round == PRESETS["demo"]["prompts_per_round"]  # preset
    assert cfg.n_candidates == 6                                        # TOML over preset/default
    assert cfg.judge_samples == 2                                       # CLI over TOML


def test_paper_defaults():
    cfg = resolve({}, {"preset": "paper"})
    assert (cfg.n_candidates, cfg.judge_samples, cfg.candidate_temperature, cfg.candidate_top_p) == (4, 3, 0.7, 0.9)
    assert (cfg.dpo_learning_rate, cfg.dpo_learning_rate_end, cfg.dpo_batch_size) == (1e-6, 1e-7, 16)
    assert (cfg.sft_learning_rate, cfg.sft_learning_rate_end) == (5.5e-6, 1.1e-6)


def test_bad_config_values_are_one_clear_error(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("no_such_key = 1\n")
    with pytest.raises(SelfRewardError, match="unknown config key 'no_such_key'"):
        load_toml(toml)
    toml.write_text('n_candidates = "four"\n')
    with pytest.raises(SelfRewardError, match="wants a int"):
        load_toml(toml)
    toml.write_text("n_candidates = [\n")
    with pytest.raises(SelfRewardError, match="not valid TOML"):
        load_toml(toml)
    with pytest.raises(SelfRewardError, match="at least 2"):
        resolve({}, {"n_candidates": 1, "preset": "demo"})
    with pytest.raises(SelfRewardError, match="unknown preset"):
        resolve({}, {"preset": "huge"})


def test_dump_round_trips(tmp_path):
    cfg = resolve({}, {"preset": "demo", "model": 'a "quoted" path'})
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    assert resolve(load_toml(path)) == cfg


def test_any_text_and_number_round_trip_through_config_toml(tmp_path):
    # json.dumps wrote a non-BMP character as a surrogate pair of \u escapes, which TOML refuses.
    text = 'emoji 😀, CJK 模型, a "quote", a back\\slash, a tab\tand\nnewline, DEL \x7f, bell \x07'
    cfg = resolve({}, {"preset": "demo", "api_model": text, "vllm_extra_args": "--x 𝔘", "length_rho": 1e-05,
                       "sft_learning_rate": 5.5e-06, "api_timeout": 1e300})
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    assert resolve(load_toml(path)) == cfg


def test_text_that_is_not_unicode_is_refused(tmp_path):
    # A lone surrogate (from a mangled --set on some terminals) cannot be written to config.toml as UTF-8.
    with pytest.raises(SelfRewardError, match="config key 'api_model' holds text that is not valid Unicode"):
        resolve({}, {"preset": "demo", "api_model": "model-\udc80"})


@pytest.mark.parametrize("key", ["candidate_temperature", "api_timeout", "length_rho", "dpo_beta", "rl_beta"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_are_refused(key, value):
    with pytest.raises(SelfRewardError, match=f"config key '{key}' must be a finite number"):
        resolve({}, {"preset": "demo", key: value})


def test_nan_in_a_toml_file_is_refused(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("judge_temperature = nan\n")
    with pytest.raises(SelfRewardError, match="must be a finite number"):
        resolve(load_toml(toml))
    toml.write_bytes(b"\xff\xfe binary \x00")
    with pytest.raises(SelfRewardError, match="not valid TOML"):
        load_toml(toml)


@pytest.mark.parametrize("values", [{"min_words": 0}, {"min_words": -1}, {"min_words": 5, "max_words": 4}])
def test_word_limits_are_validated(values):
    with pytest.raises(SelfRewardError, match="min_words must be at least 1"):
        resolve({}, {"preset": "demo", **values})


@pytest.mark.parametrize("extra, flag", [
    ("--host 0.0.0.0", "--host"), ("--port=8000", "--port"), ("--uds /tmp/x.sock", "--uds"),
    ("--api-key sk-secret", "--api-key"), ("--api_key=sk-secret", "--api-key"), ("--hf-token hf_secret", "--hf-token"),
    ("--max-num-batched-tokens 512 --ho 0.0.0.0", "--host"),  # argparse takes an unambiguous prefix
])
def test_vllm_extra_args_cannot_move_the_server_or_carry_a_secret(extra, flag):
    with pytest.raises(SelfRewardError, match=f"^vllm_extra_args must not set {flag}:") as err:
        resolve(cli={"vllm_extra_args": extra})
    assert "secret" not in str(err.value) and "0.0.0.0" not in str(err.value) and "\n" not in str(err.value)


def test_vllm_extra_args_pass_other_flags_and_refuse_a_broken_line():
    assert resolve(cli={"vllm_extra_args": "--max-num-batched-tokens 512 --enable-prompt-tokens-details"})
    with pytest.raises(SelfRewardError, match="^vllm_extra_args is not a valid command line"):
        resolve(cli={"vllm_extra_args": "--served-model-name 'x"})
