#!/usr/bin/env bash
# The GPU training benchmark of docs/benchmarks.md in one run that fits a short lease: each step
# has its own time limit and all share one deadline; what finished is kept. JSON goes to OUT_DIR.
# Needs the SmolLM2 weights (on a lent machine: docs/study.md, "Which preset, and the study on a lent GPU").
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
# What the H200 lease of commit 06d6e56 left unmeasured comes first (docs/benchmarks.md): compiled
# LoRA, with each block compiled once for all (train.engine.compile_scope=blocks, the default since
# whole-model compilation of LoRA did not finish in that lease), against full FT the same way; CUDA
# graphs at the preset's fixed length 64.
CG="--variants cudagraphs --steps 30 --warmup 6 train.engine.pad_to_multiple_of=64"
step 150 $B $SST --batch-sizes 32 $CG --out "$R/train_smollm2_sst2_cudagraphs_b32.json"
step 90 $B $SST --batch-sizes 16 $CG --out "$R/train_smollm2_sst2_cudagraphs_b16.json"
# The peer on the same GPU (the 5x target compares on one device).
step 60 $P $SST --batch-sizes 32 --steps 30 --warmup 6 --out "$R/peer_smollm2_sst2_b32.json"
step 60 $P $SST --batch-sizes 16 --steps 30 --warmup 6 --out "$R/peer_smollm2_sst2_b16.json"
# TinyLlama's shape at 16 x 256: MFU of full FT with CUDA graphs and no activation checkpointing
# (38.8 % with default-mode compile), and compiled LoRA (the tinyllama preset's checkpointing).
step 90 $B $TL --variants cudagraphs --methods full --steps 8 --warmup 3 --out "$R/train_tinyllama_shape_cudagraphs.json"
step 75 $B $TL --variants compile --methods lora --steps 8 --warmup 3 train.engine.gradient_checkpointing=true --out "$R/train_tinyllama_shape_lora.json"
# SmolLM2 on SQuAD v2 windows (384 tokens, batch 16), and whole-model compilation for comparison.
step 90 $B --preset smollm2 --task squad_v2 model.max_length=384 data.doc_stride=128 data.max_train_examples=400 --batch-sizes 16 \
  --variants cudagraphs --fixed-length --steps 20 --warmup 4 --out "$R/train_smollm2_squad_cudagraphs_b16.json"
step 120 $B $SST --batch-sizes 32 $CG --methods full train.engine.compile_scope=model --out "$R/train_smollm2_sst2_cudagraphs_model_b32.json"
echo "=== $(date +%T) done"
