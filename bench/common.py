"""What the training benchmarks share: FLOP counts, the GPU's peak, timing, the JSON file.

Both `bench_train.py` (loradrift's engine) and `bench_peer.py` (HF Trainer + PEFT) count FLOPs
the same way, so their MFU columns compare:

- matmul FLOPs per token = 2 · N_linear forward, where N_linear is the weights of every Linear
  layer in the transformer body (embeddings are lookups and the LM head is unused by the task
  heads, so neither counts); backward costs 2·N_linear for input gradients and, for trained
  weights, 2·N_linear more for weight gradients: 6·N for full fine-tuning, 4·N for LoRA
  (frozen base weights get no weight gradient; the adapters' own FLOPs are < 1 % and ignored);
- attention FLOPs per token = 12 · layers · hidden · length (scores and values, forward and
  backward, as in the PaLM paper's MFU), for both methods;
- MFU = FLOPs per second over the GPU's dense bf16 peak, counted on padded tokens (the work the
  GPU does); tokens/s is given for real and padded tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import subprocess
import time
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, matched on the device name.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10": 125.0, "4090": 165.2}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops
    return None


def linear_params(body: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in body.modules() if isinstance(m, torch.nn.Linear))


def flops_per_step(n_linear: int, layers: int, hidden: int, length: int, padded_tokens: int, method: str) -> float:
    per_token = (6 if method == "full" else 4) * n_linear + 12 * layers * hidden * length
    return per_token * padded_tokens


def add_mfu(row: dict, device: torch.device, model_config, n_linear: int, padded_per_step: float, step_time: float, method: str) -> None:
    """MFU and the peak it is measured against, on a GPU whose peak is known."""
    peak = peak_tflops(device)
    if peak:
        length = round(padded_per_step / row["batch_size"])
        flops = flops_per_step(n_linear, model_config.num_hidden_layers, model_config.hidden_size, length, padded_per_step, method)
        row["mfu"] = flops / step_time / (peak * 1e12)
        row["peak_tflops"] = peak


def base_parser(doc: str) -> argparse.ArgumentParser:
    """The options bench_train.py and bench_peer.py share (a run of each compares directly)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--preset", default="smollm2")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--methods", default="full,lora")
    ap.add_argument("--batch-sizes", default="8")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. data.max_train_examples=4000")
    return ap


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
    return info


class Window:
    """Wall time of N steps between two device synchronisations: per-step syncs would hide the
    host running ahead of the GPU, which is exactly what an overhead-bound step needs."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format)."""
    print("  ".join(f"{h:>{max(len(h), 8)}}" for _, h, _ in columns))
    for r in rows:
        cells = []
        for key, h, fmt in columns:
            v = r.get(key)
            cells.append(f"{(format(v, fmt) if isinstance(v, (int, float)) and v is not None else str(v)):>{max(len(h), 8)}}")
        print("  ".join(cells))


def write_rows(out: Path, rows: list[dict], command: str) -> None:
    from loradrift.io import atomic_write_json

    atomic_write_json(out, {"machine": machine(), "command": command, "rows": rows})
    print(f"wrote {out}")
