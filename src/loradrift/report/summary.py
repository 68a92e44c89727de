"""The report's first screen: the header lines (what ran, and a warning for a pipeline check on the
tiny model), and the summary section: the verdicts with their intervals, reasons and scope, the
scores against the baselines, and the drift by layer. The sections after it hold the evidence.

    stats/hypotheses.json, study/manifest.json, serve/meta.json, serve/fingerprint.json,
    serve/overhead.json, results.sqlite, drift/figures/final_by_layer_<task>.png
"""

from __future__ import annotations

import re
from typing import Any

from loradrift.layout import PATHS
from loradrift.methods import METHODS
from loradrift.report.artefacts import ArtefactError, Artefacts, latest, method_order, primary_metric, steps_by_task, task_order
from loradrift.report.figures import DRIFT_BY_LAYER, caption, not_learned_caveat
from loradrift.report.hypotheses import RESULT_LABELS, primary_rows, result_row, results_by_name
from loradrift.report.performance import mean_ci, performance_table
from loradrift.report.render import Block, Section, fmt


def header_facts(art: Artefacts) -> dict[str, str | None]:
    """The report's first lines: what ran (preset, model, training device, serving backend), and
    for a study on the random-init `tiny` model a warning that its results are a pipeline check."""
    def read(rel: str, expect: type | tuple[type, ...]) -> Any:
        try:  # an unreadable file is the business of its section, not of the header
            return art.json(rel, expect)
        except ArtefactError:
            return None

    man = read(PATHS["manifest"], dict) or {}
    preset = man.get("preset")
    model = ((man.get("config") or {}).get("model") or {}).get("name")
    dev = man.get("device")
    device = (dev.get("gpu") or "a CUDA GPU" if dev.get("cuda") else "CPU") if isinstance(dev, dict) else None
    fingerprint = read(PATHS["serve_fingerprint"], dict) or {}
    backends = fingerprint.get("backend") or ",".join(dict.fromkeys(
        r["backend"] for r in (read(PATHS["serve_overhead"], (dict, list)) or []) if isinstance(r, dict) and r.get("backend")))
    names = {"hf": "hf (transformers + PEFT)", "vllm": "vLLM"}
    backend = " and ".join(names.get(b, b) for b in backends.split(",")) if backends else None
    line = " · ".join([f"Preset {preset or 'unknown'}", f"model {model or 'unknown'}", f"trained on {device or 'an unknown device'}",
                       f"served with {backend}" if backend else "no serving benchmark"])
    warning = None
    if preset == "tiny" or model == "tiny":
        warning = ("Pipeline check, not findings: this study ran on the random-init tiny model (2 layers, hidden 64) "
                   "on a few dozen examples per task. It shows that every phase runs end to end; its scores, drift "
                   "and verdicts say nothing about LoRA or full fine-tuning.")
    return {"line": line, "warning": warning}


def sec_summary(art: Artefacts) -> Section:
    """One screen: the verdicts with their intervals and reasons, the scores against the baselines,
    and the drift by layer. The sections after it hold the evidence for each line."""
    sec = Section("summary", "Summary")
    h = art.json(PATHS["hypotheses"], dict)
    if h is None:
        sec.not_run("Verdicts", PATHS["hypotheses"])
    else:
        v = h.get("verdict") or {}
        sec.blocks.append(Block("verdict", v.get("rule", "H1 AND (H2 OR H3)"),
                                items=[(k, v.get(k)) for k in ("H1", "H2", "H3", "overall")]))
        sec.table(primary_rows(h), ["scope", "estimate", "_ci", "_h0", "decision", "reason"], labels=RESULT_LABELS,
                  caption="The three primary tests: estimate, interval at the corrected level, and why each is decided "
                          "as it is (details in Hypotheses)")
        sec.table(verdict_scope(h), ["hypothesis", "decided on", "not decided on"],
                  caption="Scope of the verdicts: the tasks (or serving backend) each hypothesis was decided on, and "
                          "those left undetermined with the reason. " + _model_scale(art))
        _h3_backend_lines(sec, h)
    meta = art.json(PATHS["serve_meta"])
    findings = meta.get("findings") if isinstance(meta, dict) else None
    if findings:
        sec.note("Serving: adapter(s) whose outputs equal the base model's, so they change nothing the correctness "
                 "check can see (details in Serving benchmark): " + "; ".join(findings))
    if not art.store_path.is_file():
        sec.not_run("Scores", PATHS["results"])
    else:
        rows, base, _ = performance_table(art)
        if not rows:
            sec.not_run("Scores", PATHS["results"], 'has no kind="run" rows')
        else:
            methods = sorted({r["method"] for r in rows}, key=method_order)
            table = []
            for key in sorted({(r.get("model", ""), r["task"]) for r in rows}, key=lambda k: (k[0], task_order(k[1]))):
                row = {"model": key[0], "task": key[1], "metric": primary_metric(key[1])}
                for r in rows:
                    if (r.get("model", ""), r["task"]) == key:
                        row[r["method"]] = mean_ci(r)
                row["baselines"] = {b["method"].split(": ", 1)[-1]: b["mean"] for b in base
                                    if (b.get("model", ""), b["task"]) == key} or None
                row["bar"] = (((h or {}).get("learning_gate") or {}).get("bars") or {}).get(key[1], {}).get("bar")
                table.append(row)
            cols = (["model"] if "model" in rows[0] else []) + ["task", "metric", *methods, "baselines", "bar"]
            sec.table(table, cols, labels={**{m: f"{METHODS[m].label if m in METHODS else m} (mean ± 95% CI)" for m in methods},
                                           "bar": "learning bar (H1's metric)"},
                      caption="Dev score per task against the baselines, and the bar a method must beat by more "
                              "than its seed spread to have learned the task (details in Performance, Hypotheses)")
    figs = [p for p in art.pngs(PATHS["drift"] + "figures") if re.fullmatch(DRIFT_BY_LAYER, p.stem)]
    if not figs:
        sec.not_run("Drift by layer", PATHS["drift"] + "figures/final_by_layer_<task>.png", "is missing")
    for p in figs:
        sec.figure(art.read_bytes(p), caption(p.stem) + not_learned_caveat(art, p.stem))
    return sec


def verdict_scope(h: dict) -> list[dict]:
    """Per hypothesis, the scopes it was decided on and those it was not, with the short reason: a
    verdict reads differently when one task of four carries it."""
    rows = []
    for name in ("H1", "H2"):
        res = [r for r in results_by_name(h)[name] if r.get("scope") != "pooled"]
        pooled = next((r for r in results_by_name(h)[name] if r.get("scope") == "pooled"), None)
        decided = [f"{r['scope']} ({r.get('decision')})" for r in res if r.get("decision") != "undetermined"]
        undecided = [f"{r['scope']} ({_short_reason(r.get('reason'))})" for r in res if r.get("decision") == "undetermined"]
        if pooled is not None:
            (decided if pooled.get("decision") != "undetermined" else undecided).append(
                f"pooled, primary ({pooled.get('decision') if pooled.get('decision') != 'undetermined' else _short_reason(pooled.get('reason'))})")
        rows.append({"hypothesis": name, "decided on": ", ".join(decided) or "nothing",
                     "not decided on": ", ".join(undecided) or "–"})
    info = h.get("H3_backend") or {}
    where = f"{info.get('backend', '?')} backend on {info.get('device', '?')}" if info else "no serving benchmark"
    if not results_by_name(h)["H3"]:
        rows.append({"hypothesis": "H3", "decided on": "nothing", "not decided on": where})
    elif info.get("pre_registered", True):
        rows.append({"hypothesis": "H3", "decided on": where, "not decided on": "–"})
    else:
        rows.append({"hypothesis": "H3", "decided on": f"{where}: secondary evidence only",
                     "not decided on": "the pre-registered H3 (needs vLLM)"})
    return rows


def _short_reason(reason: Any) -> str:
    text = str(reason or "").removeprefix("undetermined: ")
    for key, short in (("built on undetermined", "built on undetermined tasks"), ("every task is undetermined", None),
                       ("did not learn", None), ("no spread between seeds", None), ("too few seeds", None),
                       ("noise floor", "drift within the noise floor")):
        if key in text:
            return short or key
    return text[:80] + ("…" if len(text) > 80 else "")


def _model_scale(art: Artefacts) -> str:
    """Which model and how much training, in one sentence, from the manifest and the run rows."""
    man = art.json(PATHS["manifest"], dict) or {}
    model = ((man.get("config") or {}).get("model") or {}).get("name")
    if not model:
        return f"Model and scale: unknown ({PATHS['manifest']} is missing)."
    n = (man.get("model_info") or {}).get("parameters") if isinstance(man.get("model_info"), dict) else None
    dev = man.get("device") or {}
    where = dev.get("gpu") or ("CUDA GPU" if dev.get("cuda") else "CPU")
    data = {r["task"]: r["metrics"] for r in latest(art.rows("data") or [], lambda r: (r["model"], r["task"]))[0]}
    steps = steps_by_task(art.rows("run") or [])
    parts = []
    for t in sorted(set(data) | set(steps), key=task_order):
        d = data.get(t) or {}
        parts.append(f"{t} {steps.get(t, '?')} steps on {fmt(d.get('train_used'))} train examples, dev {fmt(d.get('dev_used'))} of "
                     f"{fmt(d.get('dev_rows'))}")
    return (f"Model {model}" + (f" ({fmt(int(n))} parameters)" if n else "") + f", preset {man.get('preset', '?')}, "
            f"trained on {where}; per final run: " + ("; ".join(parts) or "no runs") + ".")


def _h3_backend_lines(sec: Section, h: dict) -> None:
    """What H3 was measured on, where that is not the pre-registered vLLM on a GPU: on the PEFT
    backend its result is shown as secondary evidence; on vLLM's CPU build it is no GPU figure."""
    info = h.get("H3_backend") or {}
    if not info.get("note"):
        return
    if info.get("pre_registered"):
        sec.note(info["note"])
        return
    # the verdict's H3 row already gives the reason; here the PEFT result itself
    at = [r for r in results_by_name(h)["H3"] if str(r.get("scope", "")).endswith(f"batch={(h.get('settings') or {}).get('h3_batch', 8)}")]
    sec.table([result_row(r) for r in at], ["scope", "estimate", "_ci", "_h0", "decision", "reason"],
              labels=RESULT_LABELS, caption="H3 on the PEFT backend, not vLLM: secondary evidence, not in the verdict")
