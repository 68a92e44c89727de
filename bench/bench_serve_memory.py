"""Peak memory of the hf serving benchmark, whose configurations all stay loaded at once, with and
without sharing equal weights between them (issue 28 item 14).

    python bench/bench_serve_memory.py [--model-dir DIR] [--tasks 4] [--rank 8] [--out F.json]

Builds `--tasks` random rank-`--rank` LoRA adapters on every projection of the model (the default
study's targets; random B, so each adapter really changes the model), merges them, and runs
`loradrift.serving.run_serve_bench` on the hf backend with the smallest workload (batch 1, 4 new
tokens, one round) in a fresh process, once as it is and once with the sharing switched off
(`share_equal_weights` patched to share nothing). The figure is the process's peak RSS
(ru_maxrss). Prints a table and writes bench/results/serve_memory.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, write_rows

COLUMNS = [("sharing", "sharing", ""), ("configs", "configs", "d"), ("peak_rss_mb", "peak RSS MB", ",.0f"),
           ("shared_mb", "shared MB", ",.0f"), ("seconds", "seconds", ".1f")]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model_dir: Path, root: Path, n: int, rank: int) -> dict[str, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = {}
    for i in range(n):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                               LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        out[f"task{i}"] = root / f"task{i}"
        model.save_pretrained(out[f"task{i}"])
    return out


def child(args) -> None:
    """One benchmark in this process; prints its peak RSS and the weights the configurations shared."""
    import time

    import loradrift.serving.backends as backends
    from loradrift import serving

    if args.no_sharing:
        backends.share_equal_weights = lambda model: 0
    spec = json.loads(args.child)
    adapters = {t: Path(p) for t, p in spec["adapters"].items()}
    prompts = {t: ["The quick brown fox jumps over the lazy dog."] * 4 for t in adapters}
    t0 = time.perf_counter()
    res = serving.run_serve_bench(Path(spec["model_dir"]), adapters, None, prompts, backend="hf", batch_sizes=[1],
                                  max_tokens=4, rounds=1, warmup=0, out_dir=Path(spec["out"]), check_prompts=len(adapters),
                                  check_tokens=2, cache_dir=Path(spec["merged"]), log=lambda *a, **k: None)
    shared = sum(s.get("weights_shared_mb", 0) for s in res["meta"]["engine_settings"]["hf"].values())
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "shared_mb": shared,
                      "configs": len(res["meta"]["configs"]), "seconds": time.perf_counter() - t0}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=Path.home() / ".cache" / "loradrift" / "models" / "smollm2-135m")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-sharing", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    out = args.out or Path(__file__).parent / "results" / "serve_memory.json"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapters = make_adapters(args.model_dir, root / "adapters", args.tasks, args.rank)
        spec = {"model_dir": str(args.model_dir), "adapters": {t: str(p) for t, p in adapters.items()},
                "merged": str(root / "merged"), "out": str(root / "serve")}
        from loradrift.serving import ensure_merged

        for t, a in adapters.items():  # merged here, so neither child's peak includes merging
            ensure_merged(args.model_dir, a, root / "merged" / t)
        for sharing in (False, True):
            cmd = [sys.executable, __file__, "--child", json.dumps(spec)] + ([] if sharing else ["--no-sharing"])
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(r.stderr[-3000:])
            rows.append({"sharing": "on" if sharing else "off", **json.loads(r.stdout.strip().splitlines()[-1])})
            print_table(rows[-1:], COLUMNS)
    write_rows(out, rows, "python " + " ".join(sys.argv))
    print()
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
