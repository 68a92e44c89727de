"""Diagnose the SQuAD v2 sanity check on this device: per question, gold answers, prediction,
no-answer probability and F1, for each method and compute dtype.

    python bench/diag_squad_sanity.py --preset smollm2 [--dtypes auto,float32] [--bf16-heads]

`--bf16-heads` puts the task heads back under autocast (the behaviour before the heads were
pinned to fp32). On the H200 it made no difference: the F1 75 there came from the tokenizer's
overflow windows (docs/benchmarks.md), which loradrift no longer uses.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smollm2")
    ap.add_argument("--methods", default="full,lora")
    ap.add_argument("--dtypes", default="auto")
    ap.add_argument("--bf16-heads", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import loradrift.models as models
    from loradrift.config import resolve_config
    from loradrift.context import setup
    from loradrift.data import load_task, rows_as_squad_json
    from loradrift.engine import batch_order, make_optimizer, train_step
    from loradrift.evaluate import squad_predictions
    from loradrift.metrics import squad_v2_evaluate

    if args.bf16_heads:
        models._fp32 = lambda hidden: contextlib.nullcontext()
    out = []
    for dtype in args.dtypes.split(","):
        for method in args.methods.split(","):
            cfg = resolve_config(preset=args.preset, task="squad_v2", overrides=[f"method.name={method}", f"model.dtype={dtype}",
                                                                                 "method.lora.dropout=0", *args.overrides])
            s = cfg.sanity
            data = load_task(cfg)
            rng = np.random.default_rng(cfg.seed)
            sample = [data.train[i] for i in sorted(rng.permutation(len(data.train))[: s.n_examples])]
            data.train, data.val, data.dev = sample, sample, sample
            cfg.train.batch_size = s.batch_size
            ctx = setup(cfg, data)
            lr = s.lr_full if method == "full" else s.lr_lora
            opt, sched = make_optimizer(ctx, lr, s.max_steps)
            order = batch_order(ctx, s.batch_size, cfg.seed)
            ctx.model.train()
            for step in range(s.max_steps):
                train_step(ctx, order, step, opt, sched)
            preds, na = squad_predictions(ctx, sample, ctx.feats["val"])
            res = squad_v2_evaluate(rows_as_squad_json(sample), preds, na)
            print(f"== {method} dtype={dtype} ({ctx.dtype}) device={ctx.device} bf16_heads={args.bf16_heads}: F1 {res['f1']:.1f} "
                  f"best_f1 {res['best_f1']:.1f} thresh {res['best_f1_thresh']:.3f}")
            for r in sample:
                print(f"   {r['id'][:10]} gold={r['answers']['text'][:2]} pred={preds[r['id']]!r} na_prob={na[r['id']]:.3f}")
            out.append({"method": method, "dtype": dtype, "f1": res["f1"], "best_f1": res["best_f1"]})
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
