"""What a finished run leaves for use outside loradrift: the PEFT adapter folder that Hugging Face
auto classes load (checked in a fresh process), the CausalLM copy that serving reads, the model
card, and `load_run_model` for heads no auto class has."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from loradrift.context import setup
from loradrift.evaluate import evaluate, predict
from loradrift.export import load_run_model
from loradrift.train import train_run

# Run in a fresh interpreter that never imports loradrift: PEFT and transformers alone.
_LOAD = r"""
import json, sys, torch
from peft import AutoPeftModelForSequenceClassification
adapter, inputs, out = sys.argv[1:4]
spec = json.load(open(inputs))
model = AutoPeftModelForSequenceClassification.from_pretrained(adapter, num_labels=spec["num_labels"],
                                                                pad_token_id=spec["pad_id"]).eval()
logits = []
with torch.no_grad():
    for i in range(0, len(spec["ids"]), 8):
        batch = spec["ids"][i:i + 8]
        width = max(map(len, batch))
        ids = torch.tensor([x + [spec["pad_id"]] * (width - len(x)) for x in batch])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in batch])
        logits += model(input_ids=ids, attention_mask=mask).logits.tolist()
json.dump({"logits": logits, "base": model.peft_config["default"].base_model_name_or_path}, open(out, "w"))
"""


def test_lora_classification_adapter_loads_with_peft_auto_class_in_a_fresh_process(tiny_cfg, tmp_path):
    cfg = tiny_cfg("sst2", "lora")
    r = train_run(cfg)
    rd = Path(r["run_dir"])
    adapter = rd / "adapter"
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    assert acfg["task_type"] == "SEQ_CLS" and acfg["modules_to_save"] == ["score"]
    ctx = setup(cfg)
    # tiny has no public id: the adapter names its base folder, which a test can load offline
    assert Path(acfg["base_model_name_or_path"]) == ctx.model_dir
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    head = load_file(str(rd / "head.safetensors"))
    assert set(head) == {"proj.weight"}  # bias-free, as HF's score layer
    assert torch.equal(weights["base_model.model.score.weight"], head["proj.weight"])
    # serving's copy: the same LoRA weights with CausalLM keys and no head
    serve = load_file(str(rd / "serve_adapter" / "adapter_model.safetensors"))
    assert set(serve) == set(weights) - {"base_model.model.score.weight"}
    assert json.loads((rd / "serve_adapter" / "adapter_config.json").read_text())["task_type"] in (None, "CAUSAL_LM")

    dev_ids = [f["input_ids"] for f in ctx.feats["dev"]]
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"ids": dev_ids, "pad_id": ctx.pad_id, "num_labels": 2}))
    out = tmp_path / "out.json"
    p = subprocess.run([sys.executable, "-c", _LOAD, str(adapter), str(inputs), str(out)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = torch.tensor(json.loads(out.read_text())["logits"])
    preds = json.loads((rd / "dev_predictions.json").read_text())
    assert len(preds) == r["dev_examples"] == len(dev_ids)
    assert got.argmax(-1).tolist() == preds  # the run's dev predictions, exactly
    # and the logits themselves are the run's model's (an untrained head would give others)
    ctx.model = load_run_model(rd)
    ours = torch.stack(predict(ctx, ctx.feats["dev"])["logits"])
    torch.testing.assert_close(got, ours.float(), rtol=1e-4, atol=1e-5)

    card = (adapter / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n") and "AutoPeftModelForSequenceClassification" in card
    assert f"| dev | {r['dev']['accuracy']:.4g} |" in card.replace(" | ", " | ")
    assert "max_steps: 6" in card and f"{r['train_examples']} training examples" in card


def test_squad_and_full_ft_runs_load_with_load_run_model(tiny_cfg):
    for task, method in (("sst2", "full"), ("squad_v2", "lora")):
        cfg = tiny_cfg(task, method)
        r = train_run(cfg)
        rd = Path(r["run_dir"])
        folder = rd / ("adapter" if method == "lora" else "model")
        card = (folder / "README.md").read_text()
        assert "load_run_model" in card if task == "squad_v2" else "AutoPeftModel" not in card
        assert "max_steps: 6" in card and "## Scores" in card
        if method == "lora":
            assert json.loads((folder / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
        ctx = setup(cfg)
        ctx.model = ctx.forward = load_run_model(rd)
        dev = evaluate(ctx, "dev", na_thresh=r["dev"].get("na_prob_thresh"))
        assert dev["_predictions"] == json.loads((rd / "dev_predictions.json").read_text())
        assert dev[r["primary_metric"]] == r["dev"][r["primary_metric"]]
        if method == "full":  # the card's recipe with transformers alone gives the same logits
            from transformers import AutoModelForSequenceClassification

            hf = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, pad_token_id=ctx.pad_id).eval()
            hf.score.load_state_dict({"weight": load_file(str(rd / "head.safetensors"))["proj.weight"]})
            f = ctx.feats["dev"][:4]
            width = max(len(x["input_ids"]) for x in f)
            ids = torch.tensor([x["input_ids"] + [ctx.pad_id] * (width - len(x["input_ids"])) for x in f])
            with torch.no_grad():
                got = hf(input_ids=ids, attention_mask=(torch.arange(width) < torch.tensor([[len(x["input_ids"])] for x in f])).long()).logits
            ours = torch.stack(predict(ctx, f)["logits"]).float()
            torch.testing.assert_close(got, ours, rtol=1e-4, atol=1e-5)
