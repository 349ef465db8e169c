#!/usr/bin/env bash
# The GPU checks, one script, one JSON line per check (issue 15). On a GPU machine:
#
#     bench/gpu.sh              # ~8 minutes on one H100/H200-class GPU
#     bench/gpu.sh --dry-run    # every check built and run for a step or two on CPU at tiny sizes (the tests run this)
#
# 1. pretraining GPT-2 124M: tunelab (bf16, compile, fused AdamW) against the plain PyTorch loop; tokens/s, MFU
# 2. pretraining llama-1b (Llama 3.2 1B's shape): plain and FSDP2 on one rank; tokens/s, MFU
# 3. LoRA SFT of SmolLM2-135M in bf16 against TRL's SFTTrainer (bench/sft.py)
# 4. text classification (MiniLM + SST-2) in bf16 against the Hugging Face Trainer (bench/textcls.py)
#
# Each line is {"check": NAME, "result": <the bench's own final JSON line>}; a check that fails or runs past
# its time prints {"check": NAME, "error": ...} and the script goes on to the next one, exiting 1 at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PY:-}" ]]; then PY=python; [[ -x .venv/bin/python ]] && PY=.venv/bin/python; fi

if [[ "${1:-}" == "--dry-run" ]]; then
  DEVICE=cpu LIMIT=600
  GPT2=(--size baby --steps 2 --batch-size 2 --block-size 64 --no-compile --repeats 1)
  LLAMA=(--size baby-llama --steps 2 --batch-size 2 --block-size 64 --no-compile --repeats 1)
  SFT=(--steps 1 --batch-size 1 --grad-accum 1 --eval-size 2 --max-length 64)
  TEXT=(--n 64 --max-length 32)
else
  DEVICE=cuda LIMIT=200
  GPT2=(--size gpt2-124m --steps 200 --batch-size 16 --block-size 1024 --compile --repeats 1)
  LLAMA=(--size llama-1b --steps 40 --batch-size 4 --block-size 2048 --compile --repeats 1)
  SFT=(--steps 40 --batch-size 8 --grad-accum 1 --eval-size 64 --max-length 512)
  TEXT=(--n 8000 --batch-size 64)
fi

failed=0
check() {
  local name=$1; shift
  local out
  if out=$(timeout "$LIMIT" "$PY" "$@" 2>/tmp/tunelab-gpu-$name.err) && [[ "$(tail -n1 <<<"$out")" == \{* ]]; then
    echo "{\"check\": \"$name\", \"device\": \"$DEVICE\", \"result\": $(tail -n1 <<<"$out")}"
  else
    failed=1
    local why
    why=$(tail -n1 /tmp/tunelab-gpu-$name.err | tr -d '"\\' | cut -c1-300)
    echo "{\"check\": \"$name\", \"device\": \"$DEVICE\", \"error\": \"$why\"}"
  fi
}

check pretrain-gpt2-124m bench/pretrain.py --device "$DEVICE" --precision bf16 --sides ours,plain_loop "${GPT2[@]}"
check pretrain-llama-1b bench/pretrain.py --device "$DEVICE" --precision bf16 --sides ours,ours_fsdp "${LLAMA[@]}"
check sft-bf16 bench/sft.py --bf16 --sides peer,ours "${SFT[@]}"
check textcls-bf16 bench/textcls.py --device "$DEVICE" --bf16 --sides peer,ours "${TEXT[@]}"
exit $failed
