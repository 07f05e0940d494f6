#!/usr/bin/env bash
# The GPU checks as one script, for a machine with a CUDA GPU (sized for 8 minutes on one H200; every
# part has its own time limit, so one that overruns is recorded as such and the rest still run):
#   smoke    the smoke pipeline with run.device=cuda (every computing stage on the GPU; the manifest records each
#            stage's wall time, peak RSS and the CUDA allocator's peak)
#   upcycle  the smoke pipeline from a pretrained base (a tiny random Llama 3.x-shaped model that transformers builds
#            from a config, tests/bases.py) with run.device=cuda
#   parity   the CUDA-vs-CPU parity test (logits within bf16 tolerance, the same greedy tokens)
#   suite    the whole test suite with MODULARFORGE_TEST_DEVICE=cuda
#   speed    benchmarks/speed.py --device cuda: both phases against transformers' Mixtral and Llama steps at
#            hidden 1024, MFU against the measured bf16 peak, batch-1 generation against transformers' generate
#   memory   benchmarks/memory.py --device cuda --only poc-50m: each stage's VRAM peak against its floor
#   quality  benchmarks/quality.py --device cuda at QUALITY_TOKENS (default 24M, 10x the CPU budget)
#   headline (not in the default list: about 40 GB of disk and several minutes) memory.py --only gpu-8gib, the
#            4.89B-parameter MoE of which every stage must stay under 8 GiB of VRAM
# It writes gpu.json (a summary of every part) beside speed_gpu.json, memory_gpu.json and quality_gpu.{json,png},
# to $OUT when set (as on the device tool's machine), else docs/results/.
#
#   bash benchmarks/gpu.sh                        # on a GPU machine: smoke parity suite speed memory quality
#   bash benchmarks/gpu.sh cuda headline          # only the named parts
#   bash benchmarks/gpu.sh cpu smoke parity       # the same steps on the CPU: checks the script itself
#
# Machines without a package registry (the device tool's H200 image has torch, transformers, pytest and hypothesis,
# not pydantic or gguf): fetch the wheels into .whl/ here first and carry that folder; they are installed to
# /tmp/site when pydantic is missing there.
#   echo /.whl/ >> .git/info/exclude
#   for w in pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 gguf==0.19.0; do
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$w"
#   done
# The quality part reads ../shared/data; where it is absent (the device tool sends the repository alone), carry
# it packed: `echo /.gpu-data/ >> .git/info/exclude; mkdir -p .gpu-data; tar czf .gpu-data/data.tar.gz -C ../shared data`.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE="${1:-cuda}"
shift || true
PARTS="${*:-smoke upcycle parity suite speed memory quality}"
RESULTS="${OUT:-docs/results}"
WORK="$(mktemp -d /tmp/mf-gpu.XXXXXX)"
QUALITY_TOKENS="${QUALITY_TOKENS:-24000000}"
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! python3 -c "import pydantic" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
DATA=../shared/data
if [ ! -d "$DATA" ] && [ -f .gpu-data/data.tar.gz ]; then
  tar xzf .gpu-data/data.tar.gz -C "$WORK" && DATA="$WORK/data"
fi

# part NAME LIMIT_SECONDS COMMAND...: runs one part under its time limit, its log in $WORK/NAME.log
declare -A RC SECONDS_TAKEN
part() {
  local name=$1 limit=$2
  shift 2
  case " $PARTS " in *" $name "*) ;; *) return ;; esac
  echo "== $name (limit ${limit}s)"
  local start=$(date +%s)
  timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
  RC[$name]=$?
  SECONDS_TAKEN[$name]=$(( $(date +%s) - start ))
  echo "   exit ${RC[$name]} after ${SECONDS_TAKEN[$name]}s: $(tail -n 1 "$WORK/$name.log")"
}

start=$(date +%s)
part smoke 90 python3 -m modularforge run --smoke-test --set run.device="$DEVICE" --set run.root="$WORK/runs"
part upcycle 120 bash -c "python3 -c 'import sys; sys.path.insert(0, \"tests\"); from pathlib import Path; \
from bases import hf_folder, tokenizer_folder, LLAMA3; \
tok = tokenizer_folder([open(\"README.md\").read()] * 4, Path(\"$WORK/tok\")); \
hf_folder(Path(\"$WORK/base\"), tok, \"llama\", rope_scaling=dict(LLAMA3), context=16384)' && \
python3 -m modularforge run --smoke-test --base $WORK/base --set run.device=$DEVICE --set run.root=$WORK/runs"
part parity 60 env MODULARFORGE_TEST_DEVICE="$DEVICE" python3 -m pytest -q -p no:cacheprovider tests/test_device.py \
  -k "cuda_and_cpu or every_stage"
part suite 150 env MODULARFORGE_TEST_DEVICE="$DEVICE" python3 -m pytest -q -p no:cacheprovider -x
part speed 90 python3 benchmarks/speed.py --device "$DEVICE" --repeats 5 --out "$RESULTS/speed_gpu.json"
part memory 100 python3 benchmarks/memory.py --device "$DEVICE" --vram --only poc-50m --work "$WORK/memory" \
  --out "$RESULTS/memory_gpu.json"
if [ -d "$DATA" ]; then
  part quality 200 python3 benchmarks/quality.py --device "$DEVICE" --data "$DATA" --tokens "$QUALITY_TOKENS" \
    --work "$WORK/quality" --out "$RESULTS/quality_gpu.json" --plot "$RESULTS/quality_gpu.png"
elif [[ " $PARTS " == *" quality "* ]]; then
  echo "quality: no data (../shared/data, or .gpu-data/data.tar.gz carried); skipped" | tee "$WORK/quality.log"
fi
part headline 540 python3 benchmarks/memory.py --device "$DEVICE" --vram --only gpu-8gib --work "$WORK/headline" \
  --out "$RESULTS/memory_gpu_8gib.json"
end=$(date +%s)

for name in "${!RC[@]}"; do echo "$name ${RC[$name]} ${SECONDS_TAKEN[$name]}"; done >"$WORK/parts.txt"
python3 - "$WORK" "$RESULTS/gpu.json" "$DEVICE" "$((end - start))" <<'EOF'
import json, platform, subprocess, sys
from pathlib import Path

import torch

work, out, device, seconds = sys.argv[1:]
work = Path(work)


def tail(name: str, lines: int = 12) -> list[str]:
    path = work / f"{name}.log"
    return path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []


parts = {}
for line in (work / "parts.txt").read_text().splitlines():
    name, rc, took = line.split()
    parts[name] = {"exit_code": int(rc), "timed_out": int(rc) == 124, "seconds": int(took), "log_tail": tail(name)}
manifest = work / "runs" / "smoke" / "manifest.json"
if "smoke" in parts and manifest.exists():
    stages = json.loads(manifest.read_text())["stages"]
    parts["smoke"]["stages"] = {name: {k: v for k, v in entry.items()
                                       if k in ("wall_seconds", "peak_rss_mb", "peak_cuda_allocated_mb")}
                                for name, entry in stages.items()}
    report = work / "runs" / "smoke" / "reports" / "report.json"
    parts["smoke"]["headline"] = json.loads(report.read_text())["headline"] if report.exists() else None
result = {
    "benchmark": "gpu.sh",
    "device": device,
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
    "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None,
    "wall_seconds": int(seconds),
    "parts": parts,
    "outputs": {"speed": "speed_gpu.json", "memory": "memory_gpu.json", "quality": "quality_gpu.json",
                "headline": "memory_gpu_8gib.json"},
}
Path(out).write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps({k: result[k] for k in ("device", "gpu", "wall_seconds")}), "->", out)
for name, entry in parts.items():
    print(f"{name}: exit {entry['exit_code']} in {entry['seconds']}s |", (entry["log_tail"] or [""])[-1])
EOF
