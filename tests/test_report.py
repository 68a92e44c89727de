"""The study report: built from a synthetic `<out>` folder of handwritten artefacts, from an empty
folder, with the matplotlib PDF fallback, and (when Chromium is installed) checked in a browser."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from loradrift import report
from loradrift.io import ResultsStore

SECTION_TITLES = [title for _, title, _ in report.SECTIONS]
MODEL = "smollm2-135m"


def _png(path: Path, label: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1.5))
    ax = fig.add_subplot()
    ax.plot([0, 1, 2], [0, 1, 0.5])
    ax.set_title(label, fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=50)


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _hyp(name, scope, estimate, supported, primary=False, n=3, power=0.2, reason="upper bound 3.5 <= threshold 3"):
    word = {True: "supported", False: "not supported"}.get(supported, "undetermined")
    return {"name": name, "scope": scope, "estimate": estimate, "ci_low": estimate - 1, "ci_high": estimate + 1,
            "ci_level": 0.9833 if primary else 0.95, "ci_method": "t", "threshold": 3.0, "alternative": "less",
            "p_value": 0.0123, "p_bonferroni": 0.0369, "p_holm": 0.02468, "supported": supported, "decision": word,
            "reason": reason, "effect_size": 1.5, "power": power, "n": n, "df": n - 1,
            "notes": [f"{name} {scope}: only {n} values (planted)"], "primary": primary,
            "role": "primary" if primary else "secondary"}


def make_study(out: Path) -> Path:
    """Every artefact the report reads, small and with planted numbers."""
    _json(out / "study" / "manifest.json", {
        "preset": "smollm2", "command": "loradrift study --preset smollm2 --out runs/x", "started": "2025-01-01T00:00:00+00:00",
        "config": {"model": {"name": MODEL, "max_length": 96}, "data": {"max_train_examples": 256},
                   "train": {"max_steps": 32, "batch_size": 8}, "method": {"name": "lora"},
                   "study": {"seeds": [42, 1337, 2024], "tasks": ["sst2", "squad_v2"], "methods": ["full", "lora"]}},
        "configs_by_task": {"sst2": {"model": {"name": MODEL, "max_length": 96}},
                            "squad_v2": {"model": {"name": MODEL, "max_length": 192}}},
        "versions": {"torch": "2.13.0", "loradrift": "0.1.0"}, "git_commit": "6f7843cabcdef",
        "data_checksums": {"glue/SST-2/dev.tsv": "ab" * 32}, "device": {"cuda": False, "torch_threads": 2},
        "machine": {"platform": "Linux", "cpus": 2, "python": "3.11"}, "data_dir": "/data"})
    _json(out / "study" / "timings.json", {"phases": [{"phase": "phase0", "seconds": 61.5}, {"phase": "phase2", "seconds": 1234.5}],
                                           "total_seconds": 1296.0})
    store = ResultsStore(out / "results.sqlite")
    store.put("data", MODEL, "sst2", "-", 42, "h", {"task": "sst2", "source": "local", "train_rows": 67349, "dev_rows": 872,
                                                    "dev_labels": {"0": 428, "1": 444}, "train_used": 256, "val_used": 64,
                                                    "dev_used": 128, "train_used_labels": {"0": 120, "1": 136}})
    store.put("sanity", MODEL, "sst2", "lora", 42, "h", {"task": "sst2", "method": "lora", "examples": 16, "steps": 20,
                                                         "metric": "accuracy", "score": 1.0, "threshold": 0.95, "passed": True, "seconds": 3.2})
    store.put("baseline", MODEL, "sst2", "majority", 42, "h", {"baseline": "majority", "task": "sst2", "dev_examples": 128,
                                                               "accuracy": 0.4921875, "predicts": "1"})
    store.put("baseline", MODEL, "squad_v2", "no_answer", 42, "h", {"baseline": "no_answer", "task": "squad_v2", "dev_examples": 96,
                                                                    "exact": 50.0, "f1": 50.0, "HasAns_f1": 0.0, "NoAns_f1": 100.0})
    store.put("memory", MODEL, "sst2", "full", 42, "h", {"task": "sst2", "method": "full", "batch_size": 8, "max_length": 96,
                                                         "device": "cpu", "peak_memory_mb": 1843.25, "seconds_per_step": 0.75})
    scores = {("sst2", "full"): [0.81, 0.83, 0.85], ("sst2", "lora"): [0.8, 0.8125, 0.825],
              ("squad_v2", "full"): [55.0, 56.0, 57.0], ("squad_v2", "lora"): [52.0, 53.0, 54.0]}
    for (task, method), vals in scores.items():
        metric = "accuracy" if task == "sst2" else "f1"
        for seed, v in zip([42, 1337, 2024], vals):
            store.put("run", MODEL, task, method, seed, "h", {
                "val": {metric: v}, "dev": {metric: v}, "steps": 32, "train_time_s": 100.0, "wall_time_s": 120.0,
                "tokens_per_s": 2500.0, "peak_memory_mb": 1800.0, "trainable_params": 134_515_008 if method == "full" else 921_600},
                out / "runs" / task / method / f"seed{seed}")
    _json(out / "search" / "report" / "summary.json", {"storage": "sqlite:///x", "studies": [
        {"study": f"{MODEL}_sst2_lora", "task": "sst2", "method": "lora", "metric": "accuracy", "n_trials": 6,
         "states": {"complete": 5, "pruned": 1}, "best_value": 0.8642, "best_trial": 3, "best_params": {"train.lr": 0.0003},
         "worst_value": 0.7, "best_worst_gap": 0.1642, "importances": {"train.lr": 0.9, "method.lora.r": 0.1}}]})
    _png(out / "search" / "report" / "figures" / f"{MODEL}_sst2_lora_history.png", "history")
    best = out / "configs" / "best" / MODEL / "sst2_lora.yaml"
    best.parent.mkdir(parents=True)
    best.write_text("train:\n  lr: 0.0003  # planted-best-config\n")
    _json(out / "drift" / "comparison.json", {"sst2": {
        "primary_metric": "linear", "n_seeds_full": 3, "n_seeds_lora": 3, "drift_full": 0.2, "drift_full_sd": 0.01,
        "drift_lora": 0.125, "drift_lora_sd": 0.005, "reduction_pct": 37.5, "aggregate_layers": "1..29",
        "noise_floor": 3.25e-9, "drift_layer0_full": 0.0411, "drift_layer0_lora": 0.0,
        "perm_p": 0.05, "perm_n_relabellings": 20, "perm_min_p": 0.05, "probe_ci": [30.25, 44.75], "ci_level": 0.95,
        "cos_drift_full": 0.1, "cos_drift_lora": 0.05, "cos_reduction_pct": 50.0,
        "drift_full_by_seed": {"42": 0.2}, "drift_lora_by_seed": {"42": 0.125}}})
    _png(out / "drift" / "figures" / "heatmap_sst2.png", "heatmap")
    _json(out / "weights" / "summary.json", {
        "settings": {"model": MODEL, "top_k": 8},
        "summary": [{"task": "sst2", "method": "lora", "seed": 42, "n_modules": 210, "mean_rel_norm": 0.01234,
                     "mean_effective_rank": 7.25, "total_intruders": 13}],
        "by_task": {"sst2": {"lora": {"n_seeds": 1, "mean_rel_norm": 0.01234, "mean_effective_rank": 7.25, "total_intruders": 13.0}}}})
    _png(out / "weights" / "figures" / "weights_by_layer_sst2.png", "weights")
    _json(out / "serve" / "overhead.json", [
        {"backend": "hf", "config": "adapters-4", "reference": "mean(merged-sst2)", "batch_size": 8, "overhead_pct": 12.75,
         "ci_low": 10.0, "ci_high": 15.5, "n_rounds": 3, "ci_method": "t", "per_round": [12, 13, 13.25]}])
    _json(out / "serve" / "results.json", [
        {"backend": "hf", "config": "adapters-4", "batch_size": 8, "round": r, "latency_mean_s": 0.5 + r / 100,
         "latency_p50_s": 0.5, "latency_p95_s": 0.6, "throughput_rps": 16.0, "ttft_mean_s": 0.1, "peak_rss_mb": 900.0}
        for r in range(3)])
    _json(out / "serve" / "correctness.json", [{"backend": "hf", "config": "adapters-4", "task": "sst2",
                                                "reference": "hf:merged-sst2", "match_rate": 0.9876, "n_prompts": 4}])
    _png(out / "serve" / "figures" / "latency.png", "latency")
    _json(out / "stats" / "hypotheses.json", {
        "H1": [_hyp("H1", "sst2", 1.2, True), _hyp("H1", "pooled", 2.5, True, primary=True, n=6)],
        "H2": [_hyp("H2", "pooled", 37.5, None, primary=True,
                    reason="undetermined: built on undetermined task(s) planted-task")],
        "H3": [],
        "verdict": {"rule": "H1 AND (H2 OR H3)", "H1": True, "H2": None, "H3": None, "overall": None,
                    "reasons": {"H3": "undetermined: not tested (planted)"},
                    "primary_scopes": {"H1": "pooled", "H2": "pooled"}, "by_scope": {}},
        "family": {"tests": ["H1 pooled", "H2 pooled"], "size": 3, "primary_level": 0.98333, "secondary_level": 0.95},
        "notes": ["H3: no serving benchmark (planted note)"]})
    return out


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = make_study(tmp_path_factory.mktemp("study") / "out")
    return out, report.build_report(out)


def _text(html: str) -> str:
    """Visible text without tags (and without the base64 image payloads)."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_full_report_html_and_pdf(study):
    out, rep = study
    assert rep["html"] == out / "report" / "report.html"
    assert rep["pdf"] == out / "report" / "report.pdf"
    assert rep["pdf_renderer"] == ("chromium" if report.find_browser() else "matplotlib")
    assert rep["pdf"].read_bytes()[:5] == b"%PDF-"
    html = rep["html"].read_text()
    text = _text(html)
    assert "<title>loradrift study report</title>" in html and "Contents" in text
    positions = [text.find(f"{i}. {t}") for i, t in enumerate(SECTION_TITLES, 1)]
    assert all(p >= 0 for p in positions), positions
    assert positions == sorted(positions)
    assert [s["title"] for s in rep["sections"]] == SECTION_TITLES
    statuses = {s["id"]: s["status"] for s in rep["sections"]}
    assert statuses["drift"] == statuses["performance"] == statuses["setup"] == "ok", statuses

    for planted in [
        "37.5", "[30.25, 44.75]", "3.25e-09", "1..29", "0.0411 / 0",  # drift reduction, probe CI, floor, layers
        "0.8642", "train.lr: 0.9", "planted-best-config",  # search summary and verbatim best config YAML
        "12.75", "0.9876",                              # serving overhead and correctness
        "0.01234", "7.25",                              # weights
        "1843", "0.4922",                               # memory and a baseline, 4 significant digits
        "67,349", "smollm2", "6f7843cabcdef", "ab" * 32,  # data, manifest
        "planted note", "p (Holm)", "0.02468",          # hypotheses
        "transformer-block LoRA weights are served",
    ]:
        assert planted in text, planted
    # sst2 full: mean 0.83, t-interval half-width t(0.975, 2) * 0.02 / sqrt(3) = 0.04968
    assert "0.83 ± 0.04968" in text and "[0.7803, 0.8797]" in text
    assert "baseline: majority" in text and "42: 0.81, 1337: 0.83, 2024: 0.85" in text
    # verdict banner: one badge per hypothesis and the overall decision
    assert re.search(r'badge supported">H1<small>supported', html)
    assert re.search(r'badge undetermined">H2<small>undetermined', html)
    assert re.search(r'badge undetermined">H3<small>undetermined', html)
    assert re.search(r'badge undetermined overall">overall<small>undetermined', html)
    # the verdict section: per primary test the estimate, the interval at the corrected level, the
    # decision and why, and a row for the untested H3
    assert "Primary tests (the verdict)" in text and "[1.5, 3.5] (98.33%)" in text
    assert "undetermined: built on undetermined task(s) planted-task" in text
    assert "undetermined: not tested (planted)" in text and "upper bound ≤ 3" in text
    assert "pooled (primary)" in text and "sst2 (secondary)" in text
    # H3 has no results: said plainly
    assert "H3 test: not run" in text

    # images: embedded, decodable PNGs; no external or relative references anywhere
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', html)
    assert len(srcs) == 5  # search, performance bar chart, drift, weights, serving
    for s in srcs:
        assert s.startswith("data:image/png;base64,")
        assert base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'src="http' not in html and "href=\"http" not in html and "url(" not in html
    assert re.findall(r'href="([^"]*)"', html) == [f"#{s['id']}" for s in rep["sections"]]
    assert "max-width: 100%" in html


def test_empty_out_folder_says_not_run(tmp_path):
    out = tmp_path / "empty"
    rep = report.build_report(out, pdf=False)
    assert rep["pdf"] is None and rep["pdf_renderer"] is None
    text = _text(rep["html"].read_text())
    for i, t in enumerate(SECTION_TITLES, 1):
        assert f"{i}. {t}" in text
    for rel in ["study/manifest.json", "study/timings.json", "results.sqlite", "search/report/summary.json",
                "drift/comparison.json", "weights/summary.json", "serve/overhead.json", "serve/results.json",
                "stats/hypotheses.json", "forgetting/summary.json", "ablation/rank/*/summary.json"]:
        assert f"not run — {rel}" in text, rel
    by_id = {s["id"]: s for s in rep["sections"]}
    for sid in ("setup", "data", "sanity", "search", "performance", "drift", "weights", "forgetting", "rank-ablation",
                "serving", "hypotheses", "manifest"):
        assert by_id[sid]["status"] == "not run", (sid, by_id[sid])
    assert by_id["limitations"]["status"] == "ok"  # fixed text still has something to say
    assert "<img" not in rep["html"].read_text()
    assert not (out / "results.sqlite").exists()  # the report reads; it never creates artefacts


def test_pdf_fallback_without_browser(study, tmp_path, monkeypatch):
    out, _ = study
    monkeypatch.setattr(report.render, "find_browser", lambda: None)
    rep = report.build_report(out)
    assert rep["pdf_renderer"] == "matplotlib"
    data = rep["pdf"].read_bytes()
    assert data[:5] == b"%PDF-"
    pages = len(re.findall(rb"/Type\s*/Page\b(?!s)", data))
    # a contents page, at least one text page per section, and one page per figure
    assert pages >= 1 + len(SECTION_TITLES) + 5, pages
    assert not list((out / "report").glob(".*tmp"))  # atomic writes leave no temporaries


def test_malformed_artefact_costs_only_its_section(tmp_path):
    out = tmp_path / "out"
    (out / "drift").mkdir(parents=True)
    (out / "drift" / "comparison.json").write_text("{not json")
    rep = report.build_report(out, pdf=False)
    by_id = {s["id"]: s for s in rep["sections"]}
    assert by_id["drift"]["status"] == "error"
    assert by_id["drift"]["error"].startswith("drift/comparison.json is not valid JSON")
    assert "could not be built from its artefacts: drift/comparison.json is not valid JSON" in rep["html"].read_text()
    assert len(rep["sections"]) == len(SECTION_TITLES)
    # sections.json beside report.html records the same statuses (written atomically: no temporaries)
    assert json.loads((out / "report" / "sections.json").read_text()) == rep["sections"]
    assert not list((out / "report").glob(".*tmp"))


def test_an_artefact_of_the_wrong_kind_is_an_error_naming_it(tmp_path):
    out = make_study(tmp_path / "out")
    _json(out / "stats" / "hypotheses.json", ["not", "an", "object"])
    by_id = {s["id"]: s for s in report.build_report(out, pdf=False)["sections"]}
    assert by_id["hypotheses"]["status"] == by_id["summary"]["status"] == "error"
    assert by_id["hypotheses"]["error"] == "stats/hypotheses.json holds a JSON list, not a JSON object"
    assert by_id["performance"]["status"] == "ok"


def test_a_section_whose_artefact_is_missing_says_not_run_naming_it(tmp_path):
    """The reader raises ArtefactError for an artefact a section cannot do without; the section
    (and only it) says "not run" and names the file, in the HTML and in sections.json."""
    out = make_study(tmp_path / "out")
    (out / "stats" / "hypotheses.json").unlink()
    with pytest.raises(report.ArtefactError, match="stats/hypotheses.json is missing") as e:
        report.Artefacts(out).require("stats/hypotheses.json", "Hypothesis tests")
    assert e.value.missing and e.value.rel == "stats/hypotheses.json"
    rep = report.build_report(out, pdf=False)
    by_id = {s["id"]: s for s in json.loads((out / "report" / "sections.json").read_text())}
    assert by_id["hypotheses"] == {"id": "hypotheses", "title": "Hypotheses", "status": "not run",
                                   "missing": ["stats/hypotheses.json"], "error": None}
    assert "Hypothesis tests: not run — stats/hypotheses.json is missing." in _text(rep["html"].read_text())
    assert by_id["performance"]["status"] == by_id["drift"]["status"] == "ok"


def test_a_bug_in_a_section_fails_the_report(tmp_path, monkeypatch):
    """Only ArtefactError costs a section: any other exception is a bug and propagates."""
    out = make_study(tmp_path / "out")

    def broken(art):
        raise TypeError("planted bug")

    sections = [(sid, title, broken if sid == "drift" else make) for sid, title, make in report.SECTIONS]
    monkeypatch.setattr(report.build, "SECTIONS", sections)
    with pytest.raises(TypeError, match="planted bug"):
        report.build_report(out, pdf=False)
    assert not (out / "report" / "report.html").exists() and not (out / "report" / "sections.json").exists()


def test_fmt():
    assert report.fmt(37.5) == "37.5"
    assert report.fmt(0.123456) == "0.1235"
    assert report.fmt(123456.7) == "123,457"
    assert report.fmt(float("nan")) == "—" and report.fmt(None) == "—"
    assert report.fmt(True) == "yes" and report.fmt(42) == "42" and report.fmt(134515008) == "134,515,008"
    assert report.fmt([1.0, 2.5]) == "[1, 2.5]" and report.fmt({"a": 0.5}) == "a: 0.5"


# Injected before the report's CSP meta so that it may run; it records script errors, console
# errors, failed resource loads and CSP violations, then writes the image checks into the DOM.
_PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push('error: ' + (e.message || (e.target && (e.target.src || e.target.href)) || e.type)), true);
document.addEventListener('securitypolicyviolation', e => window.__errors.push('csp: ' + e.blockedURI + ' ' + e.violatedDirective));
const __ce = console.error; console.error = (...a) => { window.__errors.push('console: ' + a.join(' ')); __ce(...a); };
window.addEventListener('load', () => setTimeout(() => {
  const imgs = Array.from(document.images).map(i => ({src: i.src.slice(0, 30), complete: i.complete, w: i.naturalWidth, h: i.naturalHeight}));
  const pre = document.createElement('pre'); pre.id = '__probe';
  pre.textContent = JSON.stringify({imgs, errors: window.__errors, sections: document.querySelectorAll('section').length,
                                    width: document.documentElement.scrollWidth, viewport: window.innerWidth});
  document.body.appendChild(pre);
}, 50));
</script>"""


def test_report_renders_in_chromium(study, tmp_path):
    browser = report.find_browser()
    if browser is None:
        pytest.skip("no Chromium binary (looked for chromium, chromium-browser, google-chrome); "
                    "`apt-get install -y chromium` enables this browser check")
    _, rep = study
    html = rep["html"].read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("<head>", "<head>" + _PROBE, 1))
    r = report.run_chromium(browser, ["--dump-dom", "--virtual-time-budget=5000", "--window-size=1200,900"], probe.as_uri(), timeout=90)
    m = re.search(r'<pre id="__probe">(.*?)</pre>', r.stdout, re.S)
    assert m, f"probe did not run (exit {r.returncode}): {r.stderr[-2000:]}"
    import html as _html

    res = json.loads(_html.unescape(m.group(1)))
    assert res["errors"] == []
    assert res["sections"] == len(SECTION_TITLES)
    assert len(res["imgs"]) == 5
    for img in res["imgs"]:
        assert img["complete"] and img["w"] > 0 and img["h"] > 0, img
    assert res["width"] <= res["viewport"] + 1, "the page scrolls sideways: an image or table is not contained"


def test_summary_opens_the_report_and_appendices_close_it(tmp_path):
    out = make_study(tmp_path / "out")
    _png(out / "drift" / "figures" / "final_by_layer_sst2.png", "final by layer")
    rep = report.build_report(out, pdf=False)
    html = rep["html"].read_text()
    ids = [s["id"] for s in rep["sections"]]
    assert ids[0] == "summary" and ids[-3:] == ["setup", "search", "manifest"]
    summary = re.search(r'<section id="summary">(.*?)</section>', html, re.S).group(1)
    text = _text(summary).replace("&lt;", "<")
    # the verdicts, each primary interval with the reason, the scores against the baselines, drift by layer
    assert 'badge supported">H1<small>supported' in summary
    assert "[1.5, 3.5] (98.33%)" in text and "upper bound 3.5 <= threshold 3" in text
    assert "undetermined: not tested (planted)" in text
    assert "0.83 ± 0.04968" in text and "0.8125 ± 0.03105" in text and "majority: 0.4922" in text
    assert summary.count("<img") == 1 and "LoRA line lies below the full-FT line" in text
    # the drift section shows its other figures, not the summary's again, each with its caption
    drift = re.search(r'<section id="drift">(.*?)</section>', html, re.S).group(1)
    assert drift.count("<img") == 1 and "Compare the panels row by row" in drift
    body = html[html.index("<main>"):]
    assert body.index('part">Evidence') < body.index('id="performance"') < body.index('part">Appendices') < body.index('id="setup"')


def test_the_report_package_holds_no_markup():
    files = sorted(Path(report.__file__).parent.glob("*.py"))
    assert len(files) > 10
    for f in files:
        assert not re.findall(r"</?(?:html|body|div|section|table|tr|td|th|p|h[1-6]|img|figure|ul|li|pre)\b", f.read_text()), f


def test_header_names_preset_model_device_and_backend(study, tmp_path):
    _, rep = study
    text = _text(rep["html"].read_text())
    assert "Preset smollm2 · model smollm2-135m · trained on CPU · served with hf (transformers + PEFT)" in text
    assert "Pipeline check" not in text
    empty = report.build_report(tmp_path / "empty", pdf=False)
    assert ("Preset unknown · model unknown · trained on an unknown device · no serving benchmark"
            in _text(empty["html"].read_text()))


def test_a_tiny_study_says_on_its_first_screen_that_it_is_a_pipeline_check(tmp_path, monkeypatch):
    out = make_study(tmp_path / "out")
    man = json.loads((out / "study" / "manifest.json").read_text())
    man.update(preset="tiny", config={**man["config"], "model": {"name": "tiny", "max_length": 96}},
               device={"cuda": True, "gpu": "NVIDIA H100 80GB HBM3"})
    _json(out / "study" / "manifest.json", man)
    _json(out / "serve" / "fingerprint.json", {"backend": "hf,vllm"})
    text = _text(report.build_report(out, pdf=False)["html"].read_text())
    assert "Preset tiny · model tiny · trained on NVIDIA H100 80GB HBM3 · served with hf (transformers + PEFT) and vLLM" in text
    warning = text.find("Pipeline check, not findings")
    assert 0 <= warning < text.find("Contents")  # above everything else, the verdicts included
    assert "say nothing about LoRA or full fine-tuning" in text
    # The matplotlib PDF draws it on its first page, before the contents.
    from matplotlib.figure import Figure

    drawn = []
    real_text = Figure.text
    monkeypatch.setattr(Figure, "text", lambda self, x, y, s, *a, **k: (drawn.append(s), real_text(self, x, y, s, *a, **k))[1])
    monkeypatch.setattr(report.render, "find_browser", lambda: None)
    report.build_report(out)
    first = " ".join(drawn[:drawn.index("Contents")])
    assert "Preset tiny · model tiny" in first and "Pipeline check, not findings" in first


def test_summary_states_the_scope_of_each_verdict():
    """Issue 26: the first screen says which tasks carry H1 and H2 and what H3 was measured on."""
    from loradrift.report.summary import verdict_scope

    def res(name, scope, decision, reason="", primary=False):
        return {"name": name, "scope": scope, "decision": decision, "reason": reason, "primary": primary}

    nl = "undetermined: FT did not learn: mean 0.5 beats the baseline bar 0.58 by -0.08"
    h = {"H1": [res("H1", "rte", "undetermined", nl), res("H1", "sst2", "supported"),
                res("H1", "pooled", "undetermined", "undetermined: built on undetermined task(s) rte", True)],
         "H2": [res("H2", "rte", "undetermined", "undetermined: rte: did not learn, so its drift says nothing"),
                res("H2", "sst2", "not supported"), res("H2", "pooled", "not supported", "", True)],
         "H3": [res("H3", "hf/adapters-4/batch=8", "not supported")],
         "H3_backend": {"backend": "hf", "device": "cpu", "pre_registered": False}}
    rows = {r["hypothesis"]: r for r in verdict_scope(h)}
    assert rows["H1"] == {"hypothesis": "H1", "decided on": "sst2 (supported)",
                          "not decided on": "rte (did not learn), pooled, primary (built on undetermined tasks)"}
    assert rows["H2"]["decided on"] == "sst2 (not supported), pooled, primary (not supported)"
    assert rows["H2"]["not decided on"] == "rte (did not learn)"
    assert rows["H3"] == {"hypothesis": "H3", "decided on": "hf backend on cpu: secondary evidence only",
                          "not decided on": "the pre-registered H3 (needs vLLM)"}
    h["H3_backend"] = {"backend": "vllm", "device": "cuda", "pre_registered": True}
    assert {r["hypothesis"]: r for r in verdict_scope(h)}["H3"]["decided on"] == "vllm backend on cuda"


def test_figure_captions_over_runs_that_did_not_learn_say_so(tmp_path):
    """Issue 26: figures over runs of a task that did not learn say so in their captions."""
    import json as _json

    from loradrift.report import Artefacts
    from loradrift.report.figures import not_learned_caveat

    (tmp_path / "stats").mkdir()
    (tmp_path / "stats" / "hypotheses.json").write_text(_json.dumps(
        {"learning_gate": {"not_learned": {"rte": "FT did not learn", "squad_v2": "LoRA did not learn"}}}))
    art = Artefacts(tmp_path)
    assert not_learned_caveat(art, "final_by_layer_sst2") == ""
    assert not_learned_caveat(art, "final_by_layer_rte") == " (rte: did not learn, so no conclusion about LoRA)"
    assert not_learned_caveat(art, "over_training_squad_v2") == " (squad_v2: did not learn, so no conclusion about LoRA)"
    assert "includes runs of rte, squad_v2" in not_learned_caveat(art, "drift_vs_forgetting")
    (tmp_path / "stats" / "hypotheses.json").write_text(_json.dumps({"learning_gate": {"not_learned": {}}}))
    assert not_learned_caveat(Artefacts(tmp_path), "drift_vs_forgetting") == ""


def test_report_modules_name_no_task_kind_method_or_artefact_path():
    """The report reads task kinds, methods and paths from the registries (tasks, methods, layout):
    no string in its code (docstrings aside) is a task, kind or method name, or a layout path."""
    import ast

    from loradrift.layout import PATHS
    from loradrift.methods import METHOD_NAMES
    from loradrift.tasks import KINDS, TASKS

    # "lora" is also the config's method.lora block, which the setup section lists as a setting
    names = {*TASKS, *KINDS, *(m for m in METHOD_NAMES if m != "lora")}
    fixed = [p for p in PATHS.values() if "{" not in p]
    # a folder without its "/" only where it has one inside: "drift" alone is also a section id
    paths = {*fixed, *(p.rstrip("/") for p in fixed if "/" in p.rstrip("/"))}
    for src in sorted((Path(report.__file__).parent).glob("*.py")):
        tree = ast.parse(src.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                assert node.value not in names, f"{src.name}:{node.lineno}: names {node.value!r}"
                assert node.value not in paths, f"{src.name}:{node.lineno}: spells out the path {node.value!r}"
