"""DPO with a LoRA adapter on a tiny model: the adapter learns, the base stays put."""

import hashlib

import torch
from safetensors.torch import load_file

from selfreward.config import resolve
from selfreward.training.recipes import preference


def folder_hash(path):
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def test_dpo_changes_adapter_not_base(tiny_model, tmp_path):
    before = folder_hash(tiny_model)
    base = load_file(next(tiny_model.glob("*.safetensors")))
    cfg = resolve({}, {"preset": "tiny", "dpo_epochs": 2.0, "dpo_learning_rate": 1e-2, "dpo_learning_rate_end": 1e-3})
    pairs = [{"prompt": f"say {w}", "chosen": f"{w} answer good", "rejected": "bad bad bad"}
             for w in ("water", "energy", "city", "music")]
    rows, adapter, info = preference(str(tiny_model), pairs, cfg, tmp_path / "M2", round=2)

    assert folder_hash(tiny_model) == before  # the base on disk is untouched
    lora = load_file(adapter / "adapter_model.safetensors")
    lora_b = [v for k, v in lora.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero; training moved it
    merged = load_file(next((tmp_path / "M2").glob("*.safetensors")))
    changed = [k for k in base if k in merged and not torch.equal(base[k], merged[k])]
    assert changed  # the merged model carries the update
    assert rows and all(r["kind"] == "dpo" and r["loss"] is not None for r in rows)
    assert any(r["rewards_margin"] is not None for r in rows)


def test_model_folders_reach_the_disk_before_their_stage_commits(tmp_path, tiny_model, seed_files, monkeypatch):
    import os

    from click.testing import CliRunner

    from selfreward.cli import cli

    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    args = ["iterate", "--runs-dir", str(tmp_path / "runs"), "--name", "s", "--model", str(tiny_model), "--ift",
            str(seed_files["ift"]), "--eft", str(seed_files["eft"]), "--eft-eval", "", "--preset", "tiny",
            "--rounds", "1"]
    assert CliRunner().invoke(cli, args, catch_exceptions=False).exit_code == 0
    m1 = str(tmp_path / "runs" / "s" / "models" / "M1")
    assert any(p.startswith(m1) and p.endswith(".safetensors") and "/adapter/" not in p for p in synced)
    assert any(p.startswith(m1 + "/adapter/") and p.endswith(".safetensors") for p in synced)
    assert m1 in synced  # the folder entry itself


def test_a_merge_never_deletes_a_model_named_like_its_scratch(tiny_model, tmp_path):
    # A reward model may be named `M2.tmp`; merging M2 used to stage in (and first delete) M2.tmp.
    from peft import LoraConfig, get_peft_model

    from selfreward.backends.models import load_model, merge_adapter

    models = tmp_path / "models"
    (models / "M2.tmp").mkdir(parents=True)
    (models / "M2.tmp" / "config.json").write_text("{}")
    (models / ".M2.k1ll3d_x.merging").mkdir()  # the stage of a merge of M2 that was killed
    adapter = tmp_path / "adapter"
    get_peft_model(load_model(str(tiny_model)), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    merge_adapter(str(tiny_model), adapter, models / "M2")
    assert (models / "M2.tmp" / "config.json").read_text() == "{}"
    assert (models / "M2" / "config.json").is_file() and list((models / "M2").glob("*.safetensors"))
    assert sorted(p.name for p in models.iterdir()) == ["M2", "M2.tmp"]  # no scratch left, nor a stale one


def test_a_merge_with_non_finite_weights_is_refused_in_one_line(tiny_model, tmp_path):
    """A training that diverged (here: a NaN planted in a saved adapter) stops at its merge with
    one line, and no model folder is written: not in the next round's sampling."""
    import pytest
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from selfreward.backends.models import merge_adapter
    from selfreward.errors import SelfRewardError

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora_b[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(SelfRewardError, match=r"training M1 made non-finite weights .* in 1 tensors.*nothing was written"):
        merge_adapter(str(tiny_model), tmp_path / "adapter", tmp_path / "models" / "M1")
    assert not (tmp_path / "models").exists()  # neither the model nor a staging folder
