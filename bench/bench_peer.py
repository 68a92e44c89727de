"""The peer of bench_train.py: HF Trainer (+ PEFT for LoRA) on the same model, data, batch size,
length and learning rate, timed the same way (bench/common.py).

    python bench/bench_peer.py --preset smollm2 --task sst2 --batch-sizes 8,16,32 --steps 20 --warmup 5 [--out F.json] [key=value ...]

The model is what a Hugging Face user would take: AutoModelForSequenceClassification (GLUE) or
AutoModelForQuestionAnswering (SQuAD windows; the answerability head of loradrift has no
counterpart there, a Linear of hidden × 1), loaded from the folder loradrift resolves for the
preset; LoRA is PEFT's with loradrift's rank, alpha, dropout and target modules. The features
are loradrift's own (same token ids). Trainer settings: bf16 on a CUDA device, the run's AdamW
(Trainer's default: fused on CUDA), linear schedule, warm-up ratio, weight decay and max grad norm;
no evaluation, logging or saving in the timed steps.
"""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import add_mfu, base_parser, linear_params, print_table, write_rows

from loradrift.config import resolve_config
from loradrift.data import encode, load_task
from loradrift.engine import peak_memory_mb, pick_device
from loradrift.models import body_of, is_decoder, load_tokenizer, resolve_model_dir
from loradrift.tasks import get_task

COLUMNS = [("system", "system", ""), ("task", "task", ""), ("method", "method", ""), ("batch_size", "batch", "d"),
           ("max_length", "len", "d"), ("step_time_s", "step s", ".4f"), ("tokens_per_s", "tok/s", ",.0f"),
           ("padded_tokens_per_s", "pad tok/s", ",.0f"), ("peak_memory_mb", "peak MB", ",.0f"), ("mfu", "MFU", ".3f")]


def bench(preset: str, task: str, method: str, batch: int, steps: int, warmup: int, overrides: list[str]) -> dict:
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

    cfg = resolve_config(preset=preset, task=task, overrides=[f"method.name={method}", f"train.batch_size={batch}", *overrides])
    spec = get_task(task)
    model_dir = resolve_model_dir(cfg.model)
    tok = load_tokenizer(model_dir, is_decoder(model_dir))
    device = pick_device()
    qa = spec.kind == "extractive_qa"
    if qa:
        model = AutoModelForQuestionAnswering.from_pretrained(model_dir, dtype=torch.float32)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=spec.num_labels, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        lc = cfg.method.lora
        model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
                                                 task_type="QUESTION_ANS" if qa else "SEQ_CLS", bias="none"))
    feats = encode(spec, tok, load_task(cfg, spec).train, cfg)
    if qa:
        # Windows without an answer point at position 0, as HF's run_qa.py labels them.
        rows = [{"input_ids": f["input_ids"], "start_positions": max(f["start"], 0), "end_positions": max(f["end"], 0)} for f in feats]
    else:
        rows = [{"input_ids": f["input_ids"], "labels": f["label"]} for f in feats]
    n_total = steps + warmup
    times: dict[str, float] = {}
    counts = {"tokens": 0, "padded": 0}

    def collate(items):
        width = max(len(r["input_ids"]) for r in items)
        ids = torch.full((len(items), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(items):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        counts["tokens"] += int(mask.sum())
        counts["padded"] += mask.numel()
        out = {"input_ids": ids, "attention_mask": mask}
        for k in items[0]:
            if k != "input_ids":
                out[k] = torch.tensor([r[k] for r in items])
        return out

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (warmup, n_total):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[f"end{state.global_step}"] = time.perf_counter()
                if state.global_step == warmup:
                    counts["tokens"] = counts["padded"] = 0

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=batch, learning_rate=cfg.train.lr_for(method),
                                 max_steps=n_total, warmup_steps=cfg.train.warmup_ratio, weight_decay=cfg.train.weight_decay,
                                 max_grad_norm=cfg.train.max_grad_norm, lr_scheduler_type="linear", bf16=device.type == "cuda",
                                 logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], seed=cfg.seed,
                                 dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True, use_cpu=device.type != "cuda")
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[Clock()])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    # The collator also ran for the batch the dataloader fetched ahead; counts cover the timed
    # window to within that one batch (reported tokens/s are per timed step, from the mean).
    elapsed = times[f"end{n_total}"] - times[f"end{warmup}"]
    step_time = elapsed / steps
    per_step_padded = counts["padded"] / steps
    mc = model.config if method == "full" else model.base_model.model.config
    n_lin = linear_params(body_of(model if method == "full" else model.base_model.model))
    row = {
        "system": "hf-trainer",
        "preset": preset,
        "task": task,
        "method": method,
        "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": "bfloat16" if device.type == "cuda" else "float32",
        "batch_size": batch,
        "max_length": cfg.model.max_length,
        "steps": steps,
        "warmup_steps": warmup,
        "step_time_s": step_time,
        "tokens_per_s": counts["tokens"] / elapsed,
        "padded_tokens_per_s": counts["padded"] / elapsed,
        "mean_padded_length": per_step_padded / batch,
        "peak_memory_mb": peak_memory_mb(device),
        "linear_params": n_lin,
    }
    add_mfu(row, device, mc, n_lin, per_step_padded, step_time, method)
    return row


def main() -> None:
    args = base_parser(__doc__).parse_intermixed_args()
    out = args.out or Path(__file__).parent / "results" / f"peer_{args.preset}_{args.task}.json"
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for method in args.methods.split(","):
            try:
                rows.append(bench(args.preset, args.task, method, batch, args.steps, args.warmup, args.overrides))
            except Exception as e:  # noqa: BLE001 - a failed row is recorded with its error; the other rows are kept
                traceback.print_exc()
                rows.append(
                    {"system": "hf-trainer", "task": args.task, "method": method, "batch_size": batch, "error": f"{type(e).__name__}: {e}"[:500]}
                )
            write_rows(out, rows, "python " + " ".join(sys.argv))
    print_table([r for r in rows if "step_time_s" in r], COLUMNS)


if __name__ == "__main__":
    main()
