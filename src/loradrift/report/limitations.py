"""The limitations section: what the study's scale and setup allow one to conclude, in facts read
from the artefacts (model, subset sizes, seeds, steps, undefined CKA layers, device) and a few
fixed caveats. It always has something to say, even for an empty study folder.

    study/manifest.json, results.sqlite (kind=run|data), stats/hypotheses.json, drift/comparison.json
"""

from __future__ import annotations

from loradrift.layout import PATHS
from loradrift.methods import FULL
from loradrift.report.artefacts import Artefacts, latest, not_learned, steps_by_task, task_order
from loradrift.report.render import Section, fmt, num
from loradrift.tasks import TASKS


def sec_limitations(art: Artefacts) -> Section:
    sec = Section("limitations", "Limitations")
    man = art.json(PATHS["manifest"], dict) or {}
    cfg = man.get("config") or {}
    model = (cfg.get("model") or {}).get("name")
    facts = []
    runs = art.rows("run") or []
    n_params = (man.get("model_info") or {}).get("parameters") if isinstance(man.get("model_info"), dict) else None
    full_params = [num((r["metrics"] or {}).get("trainable_params")) for r in runs if r["method"] == FULL]
    full_params = [p for p in full_params if p is not None]
    if model:
        size = f" ({fmt(int(n_params))} parameters)" if n_params else (
            f" (full fine-tuning trains {fmt(int(max(full_params)))} parameters, backbone and head)" if full_params else "")
        facts.append(f"One small model: {model}{size}. Results need not transfer to larger models, where LoRA "
                     f"is usually closer to full fine-tuning.")
    else:
        facts.append(f"Model: unknown ({PATHS['manifest']} is missing).")
    data = art.rows("data") or []
    if data:
        data, _ = latest(data, lambda r: (r["model"], r["task"]))
        parts = [f"{r['task']} {fmt(r['metrics'].get('train_used'))} train / {fmt(r['metrics'].get('val_used'))} val / "
                 f"{fmt(r['metrics'].get('dev_used'))} dev" for r in sorted(data, key=lambda r: task_order(r["task"]))]
        facts.append("Small task subsets (examples used): " + "; ".join(parts) + ". Scores are noisy and below "
                     "published full-data numbers.")
    else:
        facts.append(f'Subset sizes: unknown ({PATHS["results"]} is missing or has no kind="data" rows).')
    if runs:
        seeds = sorted({r["seed"] for r in runs})
        facts.append(f"{len(seeds)} seed(s) per task and method ({', '.join(map(str, seeds))}): confidence intervals "
                     f"are wide and the hypothesis tests have low power.")
    else:
        facts.append(f'Seeds: unknown ({PATHS["results"]} is missing or has no kind="run" rows).')
    by_task = man.get("configs_by_task") or {}
    if runs and by_task:
        steps = steps_by_task(runs)
        parts = [f"{t} {steps.get(t, '?')} steps, "
                 f"{fmt((by_task[t].get('model') or {}).get('max_length'))} tokens"
                 for t in sorted(by_task, key=task_order)]
        bad = not_learned(art)
        facts.append("Short training on short inputs (optimizer steps per final run; inputs or SQuAD windows cut to "
                     "this many tokens): " + "; ".join(parts) + "."
                     + (f" {', '.join(bad)}: at least one method did not learn the task at this scale, so "
                        "those tasks carry no verdict." if bad else ""))
    undefined = {t: c.get("cka_undefined_layers") for t, c in (art.json(PATHS["drift_comparison"], dict) or {}).items()
                 if isinstance(c, dict) and c.get("cka_undefined_layers")}
    if undefined:
        facts.append("CKA is undefined where the base model's probe vectors are identical for every example (last-"
                     "token pooling at the embedding layer when every input ends with the same token): "
                     + "; ".join(f"{t} layer(s) {', '.join(map(str, v))}" for t, v in sorted(undefined.items(), key=lambda kv: task_order(kv[0])))
                     + ". Those layers are left out of the drift means.")
    facts += [t.caveat.format(train_file=t.train_file) for t in TASKS.values() if t.caveat]
    if model is None or "smollm2" in str(model).lower():
        facts.append("SmolLM2 weights come from a Q4_1-quantised GGUF, dequantised to float: they differ slightly "
                     "from the original bf16 checkpoint, so absolute scores are not those of the released model.")
    dev = man.get("device") or {}
    machine = man.get("machine") or {}
    if not dev:
        facts.append(f"Device: unknown ({PATHS['manifest']} is missing). Timings from a shared CPU machine are "
                     "indicative, not benchmarks.")
    elif not dev.get("cuda", False):
        cpus = machine.get("cpus")
        threads = f", {dev['torch_threads']} torch threads" if dev.get("torch_threads") else ""
        facts.append("Timings (training speed, memory, serving latency) were measured on CPU"
                     + (f" ({cpus} logical cores{threads})" if cpus else "")
                     + ", possibly shared with other processes: they are indicative, not benchmarks, and GPU "
                       "serving overheads can differ in sign and size.")
    else:
        facts.append(f"Timings were measured on {dev.get('gpu', 'a GPU')}; other hardware can give other overheads.")
    facts.append("Drift is measured on a small probe set with CKA-based similarity; other similarity measures "
                 "or probe sets can rank methods differently.")
    sec.bullets(facts)
    return sec
