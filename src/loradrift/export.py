"""A finished run's weights as folders others load: the head, the full-FT backbone or the LoRA
adapter in PEFT's format, its model card; and back again (`load_run_model`, `export_merged`)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from loradrift.config import load_run_config
from loradrift.context import Context
from loradrift.io import atomic_path, atomic_write_text, respect_umask, serve_adapter_dir
from loradrift.layout import model_key, run_path
from loradrift.models import build_task_model, hf_task_type, is_decoder, load_backbone, load_tokenizer, public_base, resolve_model_dir
from loradrift.tasks import get_task


def export(ctx: Context, rd: Path) -> None:
    """Both methods: head.safetensors; then the method's own folders (its `export` handler in
    loradrift.methods: `export_full`, `export_lora`)."""
    from safetensors.torch import save_file

    with atomic_path(run_path(rd, "head")) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in ctx.model.head.state_dict().items()}, str(tmp))
    ctx.method.handler("export")(ctx, rd)


def export_full(ctx: Context, rd: Path) -> None:
    """Full FT: `model/`, the fine-tuned backbone (and the tokenizer) as a model folder."""
    _write_folder(run_path(rd, "model"), lambda d: (ctx.model.backbone.save_pretrained(d), ctx.tokenizer.save_pretrained(d)))


def export_lora(ctx: Context, rd: Path) -> None:
    """LoRA: `serve_adapter/`, the LoRA weights with the keys PEFT gives a *CausalLM* and no head,
    which vLLM serves and merging and the weight analysis read; and `adapter/`, the PEFT folder
    users load (see `_save_peft_adapter`)."""
    _write_folder(run_path(rd, "serve_adapter"), ctx.peft.save_pretrained)
    _write_folder(run_path(rd, "adapter"), lambda d: _save_peft_adapter(ctx, d))


def _write_folder(target: Path, fill: Callable[[Path], object]) -> None:
    tmp_dir = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    fill(tmp_dir)
    respect_umask(tmp_dir)
    shutil.rmtree(target, ignore_errors=True)
    tmp_dir.rename(target)


def _save_peft_adapter(ctx: Context, folder: Path) -> None:
    """The adapter as PEFT users expect it: the public base model id, the task type, and, where a
    Hugging Face auto class computes exactly this task model (models.hf_task_type), the trained
    head as that class's `score` in `modules_to_save`, so that
    `AutoPeftModelForSequenceClassification.from_pretrained(folder)` gives the run's predictions.
    Otherwise the task type is the backbone's (CAUSAL_LM / FEATURE_EXTRACTION) and the head stays
    in head.safetensors, for `load_run_model`."""
    import copy

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    decoder = is_decoder(ctx.model_dir)
    task_type = hf_task_type(ctx.spec, decoder, ctx.model.pooling)
    config = copy.deepcopy(ctx.peft.peft_config["default"])
    config.base_model_name_or_path = public_base(ctx.cfg.model, ctx.model_dir)[0]
    config.task_type = task_type or ("CAUSAL_LM" if decoder else "FEATURE_EXTRACTION")
    config.inference_mode = True
    state = dict(get_peft_model_state_dict(ctx.peft))
    if task_type == "SEQ_CLS":
        config.modules_to_save = ["score"]
        state["base_model.model.score.weight"] = ctx.model.head.proj.weight
    folder.mkdir(parents=True)
    config.save_pretrained(str(folder))
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})


def write_model_card(ctx: Context, rd: Path, result: dict) -> None:
    """README.md in `adapter/` (LoRA) or `model/` (full FT): what the folder is, how to load it,
    the base model and where its weights came from, the run's scores, data and config."""
    import yaml

    cfg, spec = ctx.cfg, ctx.spec
    lora = ctx.method.adapter
    folder = run_path(rd, ctx.method.card_dir)
    decoder = is_decoder(ctx.model_dir)
    base, origin = public_base(cfg.model, ctx.model_dir)
    task_type = hf_task_type(spec, decoder, ctx.model.pooling)
    classify = bool(spec.labels)
    front = {"library_name": "peft" if lora else "transformers", "base_model": base,
             "pipeline_tag": spec.task_kind.pipeline_tag,
             "tags": ["loradrift", "lora" if lora else "full-fine-tuning", spec.name]}
    what = "a LoRA adapter (PEFT)" if lora else "the fully fine-tuned backbone"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {model_key(cfg.model)} · {spec.name} · {cfg.method.name} · seed {cfg.seed}", "",
             f"This folder holds {what}, trained by loradrift for the task "
             f"`{spec.name}` ({spec.description or spec.kind}). It is one run of a study comparing LoRA with full "
             "fine-tuning.", "", "## Base model", "", f"`{base}`."]
    if cfg.model.name == "tiny":
        lines += ["", f"This is {origin}. On another machine, copy that folder (or rebuild it from the config below "
                  "with `loradrift.models.resolve_model_dir`) and load it by its path, as below."]
    elif origin:
        lines += ["", f"The run was trained on {origin}. The Hub id gives the original weights, which differ slightly "
                  "from these, so scores can differ a little; to reproduce the run exactly, load the base from "
                  "`loradrift.models.resolve_model_dir` (the same weights, in the loradrift model cache)."]
    labels = ", ".join(f"{i} = {name}" for i, name in enumerate(spec.labels))
    inputs = (f"`tokenizer(text_a{', text_b' if len(spec.text_fields) > 1 else ''}, truncation=True, "
              f"max_length={cfg.model.max_length})` with the base model's tokenizer, right padding")
    lines += ["", "## How to load", ""]
    if task_type == "SEQ_CLS" and not lora:
        lines += ["The task head is Hugging Face's `score` layer, saved apart in `../head.safetensors`:", "",
                  "```python", "from safetensors.torch import load_file",
                  "from transformers import AutoModelForSequenceClassification", "",
                  f"model = AutoModelForSequenceClassification.from_pretrained('path/to/this/folder', num_labels={spec.num_labels})",
                  "model.score.load_state_dict({'weight': load_file('path/to/run/head.safetensors')['proj.weight']})",
                  "```", "", "or, with loradrift installed, `loradrift.export.load_run_model('path/to/run')`.", "",
                  f"Inputs: {inputs}. Labels: {labels}."]
    elif task_type == "SEQ_CLS":
        lines += ["The task head is the model's `score` layer (saved in `modules_to_save`), so PEFT's auto class "
                  "gives the run's predictions:", "", "```python",
                  "from peft import AutoPeftModelForSequenceClassification",
                  "from transformers import AutoTokenizer", "",
                  f"tokenizer = AutoTokenizer.from_pretrained('{base}')",
                  f"model = AutoPeftModelForSequenceClassification.from_pretrained('path/to/this/folder', "
                  f"num_labels={spec.num_labels}, pad_token_id=tokenizer.pad_token_id)",
                  "```", "", f"Inputs: {inputs}. Labels: {labels}.", "",
                  "On another machine, the base model is looked up by the id above; if it is a local folder (or "
                  "you keep the base elsewhere), load it yourself and add the adapter:", "", "```python",
                  "from peft import PeftModel",
                  "from transformers import AutoModelForSequenceClassification", "",
                  f"base = AutoModelForSequenceClassification.from_pretrained('path/to/base', num_labels={spec.num_labels}, "
                  "pad_token_id=tokenizer.pad_token_id)",
                  "model = PeftModel.from_pretrained(base, 'path/to/this/folder')", "```"]
    else:
        why = ("SQuAD v2's head (start/end logits plus an answerability logit per window) has no Hugging Face "
               "auto class" if not classify else
               "this classification head (on an encoder, or not on the last token) is not what a Hugging Face "
               "auto class computes")
        lines += [f"The task head is not part of this folder: {why}. It is in `../head.safetensors`. With "
                  "loradrift installed, the whole task model loads from the run folder:", "", "```python",
                  "from loradrift.export import load_run_model", "",
                  "model = load_run_model('path/to/run')  # backbone + trained head, in eval mode",
                  "out = model({'input_ids': ids, 'attention_mask': mask})", "```", ""]
        if lora:
            lines += [f"The LoRA weights alone (task type {'CAUSAL_LM' if decoder else 'FEATURE_EXTRACTION'}) "
                      f"load with `AutoPeftModelFor{'CausalLM' if decoder else 'FeatureExtraction'}`."]
        lines += ["", f"Inputs: {inputs if classify else 'question first, then a window of the context (loradrift.data.encode_squad)'}."
                  + (f" Labels: {labels}." if classify else "")]
    scores = []
    for split in ("val", "dev"):
        vals = result.get(split) or {}
        scores.append({"split": split, **{k: v for k, v in vals.items() if isinstance(v, (int, float))}})
    keys = list(dict.fromkeys(k for r in scores for k in r if k != "split"))
    lines += ["", "## Scores", "", f"Primary metric: `{spec.primary}`. Validation is carved from the training file; "
              "dev is the task's held-out set.", "", "| split | " + " | ".join(keys) + " |",
              "|---" * (len(keys) + 1) + "|"]
    lines += ["| " + r["split"] + " | " + " | ".join("" if r.get(k) is None else f"{r[k]:.4g}" for k in keys) + " |"
              for r in scores if len(r) > 1]
    lines += ["", "## Data", "", f"Task files from `{result.get('data_source')}`: {result.get('train_examples')} training "
              f"examples, {result.get('val_examples')} validation, {result.get('dev_examples')} dev.", "",
              "## Training", "", f"{result.get('steps')} optimizer steps, {result.get('trainable_params'):,} trainable "
              f"parameters of {result.get('total_params'):,}, {result.get('train_time_s', 0):.0f} s on "
              f"{result.get('device')} ({result.get('dtype')}).", "", "## Config", "",
              "The run's resolved config (`loradrift train --config config.yaml` reruns it):", "", "```yaml",
              run_path(rd, "config").read_text().rstrip(), "```", ""]
    atomic_write_text(folder / "README.md", "\n".join(lines))


def load_run_model(run_dir: Path, model_dir: Path | None = None) -> torch.nn.Module:
    """A finished run's task model (backbone with its fine-tuned weights or LoRA adapter, and the
    trained head) in eval mode, for any head, including those no Hugging Face class has.

        from loradrift.export import load_run_model
        model = load_run_model("runs/tiny/runs/<model>/sst2/lora/seed42")

    `model_dir`: the base model folder; by default the one the run's config names, resolved (and
    built if needed) in the loradrift model cache."""
    from peft import PeftModel
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    cfg = load_run_config(run_path(run_dir, "config"))
    model_dir = Path(model_dir) if model_dir else resolve_model_dir(cfg.model)
    model = build_task_model(model_dir, get_task(cfg.task), cfg.model, head_seed=cfg.seed)
    backbone_dir = run_path(run_dir, "model")
    if (backbone_dir / "config.json").exists():
        model.backbone = load_backbone(backbone_dir, is_decoder(model_dir), torch.float32, cfg.model.trust_remote_code)
    else:
        # Injects the LoRA layers into model.backbone in place; the wrapper itself is not needed.
        PeftModel.from_pretrained(model.backbone, serve_adapter_dir(run_dir))
    model.head.load_state_dict(load_file(str(run_path(run_dir, "head"))))
    return model.eval()


def export_merged(run_dir: Path, out: Path | None = None) -> Path:
    """Fold a LoRA run's adapter into the base weights: a plain CausalLM folder for serving."""
    from peft import PeftModel

    run_dir = Path(run_dir)
    out = Path(out or run_path(run_dir, "merged"))
    if (out / "config.json").exists():
        return out
    cfg = load_run_config(run_path(run_dir, "config"))
    if not (serve_adapter_dir(run_dir) / "adapter_config.json").exists():
        raise FileNotFoundError(f"{run_dir}: no serve_adapter/ folder (only LoRA runs can be merged)")
    model_dir = resolve_model_dir(cfg.model)
    base = load_backbone(model_dir, True, torch.float32)
    merged = PeftModel.from_pretrained(base, serve_adapter_dir(run_dir)).merge_and_unload()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    load_tokenizer(model_dir, True).save_pretrained(tmp)
    respect_umask(tmp)
    tmp.rename(out)
    return out
