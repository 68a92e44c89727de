"""Projected GPU hours of a preset's whole study, from its token counts and measured throughput.

    python bench/project_study.py --preset tinyllama --throughput bench/results/train_tinyllama_shape_h100.json \
        [--variant compile] [--tokenizer smollm2-135m] [--json out.json]

Counts, per phase, the (padded) tokens the preset trains on and the tokens it only runs forward
(validation, dev, probe snapshots), with the preset's lengths, batch sizes, epochs, trials and
seeds, and prices them with the training speed measured by bench/bench_train.py. A training step
of T padded tokens is priced at the measured step time × max(1, T / T_measured): a step with fewer
tokens than the measured one is priced as the measured one (an upper bound: short sequences are
overhead-bound, so their tokens/s would flatter them). A forward pass costs about a third of a full
fine-tuning step, so forward tokens are counted at three times the full-FT token rate. Where the local data is a subset of the official split
(SQuAD v2 train offline: 10 articles), train counts are scaled to the official size. A Hub model
that is not on this machine (TinyLlama) is counted with `--tokenizer`'s tokenizer as a proxy.
Phase 3 (drift, serving, report) is not GPU training and is left out, and so is each run's fixed
cost (loading the model, tokenising, compiling): for short runs it can be most of the wall time.
`--lora-as-full` prices LoRA at full fine-tuning's speed where only full FT was measured (an
assumption, printed and written as one).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from loradrift.config import resolve_config
from loradrift.data import encode, load_task, probe_examples
from loradrift.engine import total_steps_for
from loradrift.models import is_decoder, load_tokenizer, resolve_model_dir
from loradrift.tasks import get_task

# Official train split sizes (questions for SQuAD v2), for scaling a local subset.
OFFICIAL_TRAIN = {"mrpc": 3668, "sst2": 67349, "rte": 2490, "squad_v2": 130319}


def padded_len(n: int, multiple: int) -> int:
    return math.ceil(n / multiple) * multiple


def count(preset: str, task: str, tokenizer_model: str | None) -> dict:
    over = [f"model.name={tokenizer_model}"] if tokenizer_model else []
    cfg = resolve_config(preset=preset, task=task, overrides=over)
    ref = resolve_config(preset=preset, task=task)
    data = load_task(cfg)
    model_dir = resolve_model_dir(cfg.model)
    tok = load_tokenizer(model_dir, is_decoder(model_dir))
    spec = get_task(task)
    mult = ref.train.engine.pad_to_multiple_of or 32  # auto on a GPU: 32 when compiling; grouping makes batch padding ≈ this
    feats = {s: encode(spec, tok, getattr(data, s), cfg) for s in ("train", "val", "dev")}
    tok_per = {s: sum(padded_len(len(f["input_ids"]), mult) for f in fs) for s, fs in feats.items()}
    n_rows = len(data.train)
    scale = 1.0
    if data.full_train_size < OFFICIAL_TRAIN[task] and ref.data.max_train_examples is None:
        scale = OFFICIAL_TRAIN[task] / data.full_train_size
    elif ref.data.max_train_examples is not None:
        scale = min(ref.data.max_train_examples, OFFICIAL_TRAIN[task]) / n_rows if n_rows < ref.data.max_train_examples else 1.0
    train_feats = len(feats["train"]) * scale
    mean_train = tok_per["train"] / len(feats["train"])
    t = ref.train
    per_run_steps = total_steps_for(ref, round(train_feats))
    step_tokens = t.batch_size * t.grad_accum * mean_train
    train_tokens_run = per_run_steps * step_tokens
    mean_val = tok_per["val"] / max(1, len(feats["val"]))
    val_feats_mid = (
        len(feats["val"])
        if t.eval_max_examples is None
        else min(len(feats["val"]), round(t.eval_max_examples * len(feats["val"]) / max(1, len(data.val))))
    )
    n_evals = per_run_steps // t.eval_every if t.eval_every else 0
    probe = len(probe_examples(ref, data)) * mean_val
    fwd_run = n_evals * val_feats_mid * mean_val + (per_run_steps // ref.probe.snapshot_every + 1) * probe + tok_per["val"] + tok_per["dev"]
    seeds, methods = len(ref.study.seeds), len(ref.study.methods)
    s = ref.search
    trial_steps = s.trial_max_steps or per_run_steps
    trial_tokens = trial_steps * step_tokens  # searched batch sizes average out near the preset's
    trial_fwd = (2 if trial_steps > 1 else 1) * tok_per["val"]
    sanity = ref.sanity.max_steps * ref.sanity.batch_size * mean_train
    return {
        "task": task,
        "train_features": round(train_feats),
        "scaled_from_local": scale != 1.0,
        "mean_padded_length": mean_train,
        "steps_per_run": per_run_steps,
        "step_tokens": step_tokens,
        "sanity_step_tokens": ref.sanity.batch_size * mean_train,
        "phase0_train_tokens": methods * sanity,
        "phase1_train_tokens": methods * s.trials * trial_tokens,
        "phase1_forward_tokens": methods * s.trials * trial_fwd,
        "phase2_train_tokens_per_method": seeds * train_tokens_run,
        "phase2_forward_tokens": seeds * methods * fwd_run,
    }


def throughput(path: Path, variant: str | None) -> dict[str, dict]:
    """Per method, the fastest measured row: step time and padded tokens per step."""
    rows = [r for r in json.loads(Path(path).read_text())["rows"] if "padded_tokens_per_s" in r and r.get("system") == "loradrift"]
    if variant:
        rows = [r for r in rows if r.get("variant") == variant]
    out: dict[str, dict] = {}
    for r in rows:
        if r["method"] not in out or r["padded_tokens_per_s"] > out[r["method"]]["rate"]:
            out[r["method"]] = {
                "rate": r["padded_tokens_per_s"],
                "step_s": r["step_time_s"],
                "step_tokens": r["padded_tokens_per_s"] * r["step_time_s"],
                "variant": r.get("variant"),
            }
    if set(out) != {"full", "lora"}:
        sys.exit(f"{path}: needs loradrift rows for both methods (variant {variant}); found {sorted(out)}")
    return out


def train_seconds(tokens: float, step_tokens: float, m: dict) -> float:
    steps = tokens / step_tokens
    return steps * m["step_s"] * max(1.0, step_tokens / m["step_tokens"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tinyllama")
    ap.add_argument("--throughput", type=Path, required=True, help="bench_train.py JSON measured on the target GPU and model shape")
    ap.add_argument("--variant", default=None, help="which bench variant's rows to use (default: the fastest)")
    ap.add_argument("--tokenizer", default=None, help="count tokens with this model's tokenizer (for a Hub model not on this machine)")
    ap.add_argument(
        "--lora-as-full",
        action="store_true",
        help="price LoRA steps at full fine-tuning's measured speed (an assumption, printed as such: for a GPU "
        "where only full FT was measured compiled)",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    tp = throughput(args.throughput, args.variant)
    if args.lora_as_full:
        tp["lora"] = {**tp["full"], "assumed": "LoRA priced at full fine-tuning's measured speed (--lora-as-full)"}
        print("ASSUMPTION: " + tp["lora"]["assumed"])
    tasks = resolve_config(preset=args.preset).study.tasks
    rows = [count(args.preset, t, args.tokenizer) for t in tasks]
    fwd_rate = 3 * tp["full"]["rate"]
    total = {"phase 0": 0.0, "phase 1": 0.0, "phase 2": 0.0}
    print(f"{'task':9} {'features':>9} {'len':>5} {'steps/run':>9} {'P0 h':>6} {'P1 h':>6} {'P2 h':>6}")

    def both(tokens: float, step_tokens: float) -> float:  # half the tokens per method
        return sum(train_seconds(tokens / 2, step_tokens, tp[m]) for m in ("full", "lora"))

    for r in rows:
        p0 = both(r["phase0_train_tokens"], r["sanity_step_tokens"])
        p1 = both(r["phase1_train_tokens"], r["step_tokens"]) + r["phase1_forward_tokens"] / fwd_rate
        p2 = both(2 * r["phase2_train_tokens_per_method"], r["step_tokens"]) + r["phase2_forward_tokens"] / fwd_rate
        r.update(phase0_h=p0 / 3600, phase1_h=p1 / 3600, phase2_h=p2 / 3600)
        total["phase 0"] += p0 / 3600
        total["phase 1"] += p1 / 3600
        total["phase 2"] += p2 / 3600
        print(
            f"{r['task']:9} {r['train_features']:>9,d} {r['mean_padded_length']:5.0f} {r['steps_per_run']:>9,d} "
            f"{r['phase0_h']:6.2f} {r['phase1_h']:6.2f} {r['phase2_h']:6.2f}"
            + ("  (train scaled to the official size)" if r["scaled_from_local"] else "")
        )
    hours = sum(total.values())
    print(
        "measured: "
        + ", ".join(
            f"{m} {v['variant']} {v['step_s']:.4f} s/step of {v['step_tokens']:,.0f} padded tokens ({v['rate']:,.0f} tokens/s)" for m, v in tp.items()
        )
        + f", from {args.throughput}"
    )
    print("projected GPU hours: " + ", ".join(f"{k} {v:.2f}" for k, v in total.items()) + f"; total {hours:.2f} h ({hours * 60:.1f} min)")
    if args.json:
        from loradrift.io import atomic_write_json

        atomic_write_json(
            args.json, {"preset": args.preset, "throughput": tp, "source": str(args.throughput), "tasks": rows, "hours": total, "total_hours": hours}
        )


if __name__ == "__main__":
    main()
