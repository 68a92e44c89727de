"""The appendix sections on what ran and how: setup and presets, data and splits, sanity checks
and baselines (Phase 0), and the reproducibility manifest.

    study/manifest.json, study/timings.json, results.sqlite (kind=data|sanity|baseline|memory)
"""

from __future__ import annotations

from loradrift.layout import PATHS
from loradrift.report.artefacts import Artefacts, latest, method_order, task_order
from loradrift.report.render import Section, flatten, num, pick_columns
from loradrift.tasks import TASKS


def sec_setup(art: Artefacts) -> Section:
    sec = Section("setup", "Setup and presets")
    man = art.json(PATHS["manifest"], dict)
    if man is None:
        sec.not_run("Study manifest", PATHS["manifest"])
    else:
        cfg = man.get("config") or {}
        model = cfg.get("model") or {}
        study = cfg.get("study") or {}
        sec.table([{
            "preset": man.get("preset"), "model": model.get("name"), "max_length": model.get("max_length"),
            "tasks": ", ".join(study.get("tasks", [])) or None, "methods": ", ".join(study.get("methods", [])) or None,
            "seeds": ", ".join(str(s) for s in study.get("seeds", [])) or None, "started": man.get("started"),
        }], caption="Study")
        keys = {"data": ["max_train_examples", "max_val_examples", "max_dev_examples"],
                "train": ["max_steps", "batch_size", "grad_accum", "lr", "lr_full", "lr_lora", "warmup_ratio", "weight_decay"],
                "method": ["name", "lora"], "probe": ["size", "snapshot_every"], "search": ["trials", "trial_max_steps"]}
        shown = {f"{grp}.{k}": (cfg.get(grp) or {}).get(k) for grp, ks in keys.items() for k in ks
                 if k in (cfg.get(grp) or {})}
        if shown:
            sec.kv(shown, caption="Key settings of the resolved config (the full config is in the reproducibility manifest)")
        by_task = man.get("configs_by_task") or {}
        diffs = []
        base_flat = flatten({k: cfg.get(k) for k in ("model", "data", "train", "probe", "method")})
        for task, tcfg in sorted(by_task.items(), key=lambda kv: task_order(kv[0])):
            for k, v in flatten(tcfg).items():
                if base_flat.get(k, object()) != v:
                    diffs.append({"task": task, "setting": k, "value": v, "default": base_flat.get(k)})
        if diffs:
            sec.table(diffs, caption="Per-task settings that differ from the study config (preset per_task blocks)")
        elif by_task:
            sec.p("Every task uses the study config unchanged.")
    tim = art.json(PATHS["timings"], dict)
    if tim is None:
        sec.not_run("Phase timings", PATHS["timings"])
    else:
        rows = [{"phase": p.get("phase"), "seconds": p.get("seconds"),
                 "minutes": (p["seconds"] / 60 if num(p.get("seconds")) is not None else None)}
                for p in tim.get("phases", [])]
        if num(tim.get("total_seconds")) is not None:
            rows.append({"phase": "total", "seconds": tim["total_seconds"], "minutes": tim["total_seconds"] / 60})
        sec.table(rows, ["phase", "seconds", "minutes"], caption="Wall-clock time per phase")
        if tim.get("finished"):
            sec.p(f"Finished {tim['finished']}" + (f"; tasks: {', '.join(tim['tasks'])}." if tim.get("tasks") else "."))
    return sec


def sec_data(art: Artefacts) -> Section:
    sec = Section("data", "Data and splits")
    rows = art.rows("data")
    if rows is None:
        sec.not_run("Data summary", PATHS["results"])
        return sec
    if not rows:
        sec.not_run("Data summary", PATHS["results"], 'has no kind="data" rows (Phase 0 data check)')
        return sec
    rows, _ = latest(rows, lambda r: (r["model"], r["task"]))
    multi = len({r["model"] for r in rows}) > 1
    out = [{"model": r["model"], **r["metrics"]} for r in sorted(rows, key=lambda r: (r["model"], task_order(r["task"])))]
    cols = (["model"] if multi else []) + ["task", "source", "train_rows", "dev_rows", "dev_labels", "train_used",
                                            "val_used", "dev_used", "train_used_labels"]
    sec.p("Rows in the task files, and the subsets this study used. Validation is carved from the "
          "training file (used for early stopping, the search and the SQuAD no-answer threshold); "
          "dev is the held-out test set every score below is measured on.")
    sec.table(out, [c for c in cols if any(c in r for r in out)],
              labels={"dev_labels": "dev labels", "train_used_labels": "train labels (used)"})
    return sec


def _latest_metrics(rows: list[dict]) -> list[dict]:
    """The metrics of the newest row per (model, task, method), in task then method order."""
    rows, _ = latest(rows, lambda r: (r["model"], r["task"], r["method"]))
    return [r["metrics"] for r in sorted(rows, key=lambda r: (task_order(r["task"]), method_order(r["method"])))]


def sec_sanity(art: Artefacts) -> Section:
    sec = Section("sanity", "Sanity checks and baselines")
    if not art.store_path.is_file():
        sec.not_run("Sanity checks, baselines and memory profile", PATHS["results"])
        return sec
    sec.h3("Sanity checks (overfit a small training sample)")
    rows = art.rows("sanity")
    if rows:
        out = _latest_metrics(rows)
        sec.table(out, pick_columns(out, ["task", "method", "examples", "steps", "metric", "score", "threshold",
                                          "passed", "seconds"]))
        failed = [f"{r.get('task')}/{r.get('method')}" for r in out if r.get("passed") is False]
        sec.p("All sanity checks passed." if not failed else f"FAILED: {', '.join(failed)}.")
    else:
        sec.not_run("Sanity checks", PATHS["results"], 'has no kind="sanity" rows')
    sec.h3("Baselines on dev")
    rows = art.rows("baseline")
    if rows:
        rows, _ = latest(rows, lambda r: (r["model"], r["task"], r["method"]))
        # one table per task kind, with the kind's columns (a task not in the registry: every column)
        by_kind: dict[str, list[dict]] = {}
        columns: dict[str, tuple[str, ...]] = {}
        for r in sorted(rows, key=lambda r: (task_order(r["task"]), r["method"])):
            kind = TASKS[r["task"]].task_kind if r["task"] in TASKS else None
            name = kind.name if kind else "other"
            columns[name] = kind.baseline_columns if kind else ()
            by_kind.setdefault(name, []).append({"baseline": r["method"], "task": r["task"], **r["metrics"]})
        for name, out in by_kind.items():
            sec.table(out, pick_columns(out, columns[name]), caption=name.replace("_", " "))
    else:
        sec.not_run("Baselines", PATHS["results"], 'has no kind="baseline" rows')
    sec.h3("Peak training memory")
    rows = art.rows("memory")
    if rows:
        out = _latest_metrics(rows)
        sec.table(out, pick_columns(out, ["task", "method", "batch_size", "grad_accum", "max_length", "device",
                                          "peak_memory_mb", "seconds_per_step"]))
        if any(str(r.get("device", "")).startswith("cpu") for r in out):
            sec.note("On CPU the peak is the process's peak resident memory (a high-water mark that includes "
                     "the Python process and the loaded model), not the training step alone.")
    else:
        sec.not_run("Memory profile", PATHS["results"], 'has no kind="memory" rows')
    return sec


def sec_manifest(art: Artefacts) -> Section:
    sec = Section("manifest", "Reproducibility manifest")
    man = art.require(PATHS["manifest"], "Manifest", dict)
    import yaml

    sec.table([{"command": man.get("command"), "git commit": man.get("git_commit"), "preset": man.get("preset"),
                "started": man.get("started"), "data dir": man.get("data_dir")}],
              ["command", "git commit", "preset", "started", "data dir"])
    if man.get("versions"):
        sec.table([{"package": k, "version": v} for k, v in man["versions"].items()], caption="Package versions")
    if man.get("device") or man.get("machine"):
        sec.kv({"device": man.get("device") or {}, "machine": man.get("machine") or {}}, caption="Device and machine")
    sums = man.get("data_checksums") or {}
    if sums:
        sec.table([{"file": k, "sha256": v} for k, v in sorted(sums.items())], caption="Data checksums (SHA-256)")
    else:
        sec.note("No data checksums were recorded (the data folder has no SHA256SUMS file).")
    if man.get("config"):
        sec.pre(yaml.safe_dump(man["config"], sort_keys=False, allow_unicode=True), "Resolved config (YAML)")
    for task, c in (man.get("configs_by_task") or {}).items():
        sec.pre(yaml.safe_dump(c, sort_keys=False, allow_unicode=True), f"Resolved config for {task} (YAML)")
    return sec
