#!/usr/bin/env bash
# The GPU training benchmark of docs/benchmarks.md in one run that fits a short lease: each step
# has its own time limit and all share one deadline; what finished is kept. JSON goes to OUT_DIR.
# Needs the SmolLM2 weights (on a lent machine: ../shared/gpu/README.md).
#   bash bench/gpu_bench.sh OUT_DIR [SECONDS]
set -u
R=${1:-bench/results/gpu}; mkdir -p "$R"
DEADLINE=$(( $(date +%s) + ${2:-480} ))
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
B="python bench/bench_train.py"; P="python bench/bench_peer.py"
SST="--preset smollm2 --task sst2 data.max_train_examples=4000"
# TinyLlama-1.1B's shape (hidden 2048, 22 layers, MLP 5632, 32 heads, 4 KV heads, 32k vocab, untied
# LM head), random init: speed and memory need no weights. SQuAD windows of 256 tokens, batch 16.
TL="--preset tiny --task squad_v2 --batch-sizes 16 --fixed-length model.tiny.hidden_size=2048 model.tiny.intermediate_size=5632
    model.tiny.num_hidden_layers=22 model.tiny.num_attention_heads=32 model.tiny.num_key_value_heads=4 model.tiny.vocab_size=32000
    model.tiny.tie_word_embeddings=false model.max_length=256 data.doc_stride=128 data.max_train_examples=400"
step() {
  local t=$1; shift
  local left=$(( DEADLINE - $(date +%s) )); [ "$left" -lt "$t" ] && t=$left
  [ "$t" -lt 15 ] && { echo "=== skipped (deadline): $*"; return; }
  echo "=== $(date +%T) [${t}s] $*"; timeout "$t" "$@" 2>&1 | grep -v -e "^Loading weights" -e "Warning"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# SmolLM2, SST-2, batch 32: the engine without compile (auto switches: grouped lengths, fused AdamW,
# no host syncs), its HF Trainer peer, then with CUDA graphs (one fixed shape: the preset's length 64).
step 75 $B $SST --batch-sizes 32 --variants eager --steps 30 --warmup 6 --profile --out "$R/train_smollm2_sst2_eager.json"
step 60 $P $SST --batch-sizes 32 --steps 30 --warmup 6 --out "$R/peer_smollm2_sst2.json"
step 60 $B $TL --variants eager --methods full --steps 6 --warmup 2 train.engine.gradient_checkpointing=true --out "$R/train_tinyllama_shape_eager.json"
step 120 $B $SST --batch-sizes 32 --variants cudagraphs --steps 30 --warmup 6 --profile train.engine.pad_to_multiple_of=64 --out "$R/train_smollm2_sst2_cudagraphs.json"
step 90 $B $TL --variants compile --methods full --steps 8 --warmup 3 train.engine.gradient_checkpointing=true --out "$R/train_tinyllama_shape_ckpt.json"
step 60 $B $TL --variants compile --methods full --steps 8 --warmup 3 --out "$R/train_tinyllama_shape_nockpt.json"
step 60 $B $TL --variants compile --methods lora --steps 8 --warmup 3 train.engine.gradient_checkpointing=true --out "$R/train_tinyllama_shape_lora.json"
step 60 $P $SST --batch-sizes 16 --steps 30 --warmup 6 --out "$R/peer_smollm2_sst2_b16.json"
step 90 $B $SST --batch-sizes 16 --variants cudagraphs --steps 30 --warmup 6 train.engine.pad_to_multiple_of=64 --out "$R/train_smollm2_sst2_cudagraphs_b16.json"
echo "=== $(date +%T) done"
