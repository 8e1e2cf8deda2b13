"""DPO with a LoRA adapter on a tiny model: the adapter learns, the base stays put."""

import hashlib

import torch
from safetensors.torch import load_file

from selfreward.config import resolve
from selfreward.core.stages.train import dpo


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
    rows, adapter = dpo(str(tiny_model), pairs, cfg, tmp_path / "M2", round=2)

    assert folder_hash(tiny_model) == before  # the base on disk is untouched
    lora = load_file(adapter / "adapter_model.safetensors")
    lora_b = [v for k, v in lora.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero; training moved it
    merged = load_file(next((tmp_path / "M2").glob("*.safetensors")))
    changed = [k for k in base if k in merged and not torch.equal(base[k], merged[k])]
    assert changed  # the merged model carries the update
    assert rows and all(r["kind"] == "dpo" and r["loss"] is not None for r in rows)
    assert any(r["rewards_margin"] is not None for r in rows)
