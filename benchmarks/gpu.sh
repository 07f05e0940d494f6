#!/usr/bin/env bash
# The GPU checks of issue 19 as one script, for a machine with a CUDA GPU (about 5 minutes on one H200):
#   1. the smoke pipeline with run.device=cuda (every computing stage on the GPU; the manifest records each
#      stage's wall time, peak RSS and the CUDA allocator's peak),
#   2. the CUDA-vs-CPU parity test (logits within bf16 tolerance, the same greedy tokens),
#   3. the whole test suite with MODULARFORGE_TEST_DEVICE=cuda,
# and writes gpu.json (to $OUT when set, as on the device tool's machine, else docs/results/).
#
#   bash benchmarks/gpu.sh          # on a GPU machine
#   bash benchmarks/gpu.sh cpu      # the same steps on the CPU: checks the script itself
#
# Machines without a package registry (the device tool's H200 image has torch, transformers, pytest and hypothesis,
# not pydantic or gguf): fetch the wheels into .whl/ here first and carry that folder; they are installed to
# /tmp/site when pydantic is missing there.
#   echo /.whl/ >> .git/info/exclude
#   for w in pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 gguf==0.19.0; do
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$w"
#   done
# Not built yet (issue 19, reported in docs/RESULTS.md): the GPU modes of the speed, memory and quality benchmarks.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE="${1:-cuda}"
RESULTS="${OUT:-docs/results}"
WORK="$(mktemp -d /tmp/mf-gpu.XXXXXX)"
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! python3 -c "import pydantic" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

start=$(date +%s)
python3 -m modularforge run --smoke-test --set run.device="$DEVICE" --set run.root="$WORK/runs" \
  >"$WORK/smoke.log" 2>&1
smoke_rc=$?
MODULARFORGE_TEST_DEVICE="$DEVICE" python3 -m pytest -q -p no:cacheprovider \
  tests/test_device.py -k "cuda_and_cpu or every_stage" >"$WORK/parity.log" 2>&1
parity_rc=$?
MODULARFORGE_TEST_DEVICE="$DEVICE" timeout 420 python3 -m pytest -q -p no:cacheprovider -x >"$WORK/suite.log" 2>&1
suite_rc=$?
end=$(date +%s)

python3 - "$WORK" "$RESULTS/gpu.json" "$DEVICE" "$smoke_rc" "$parity_rc" "$suite_rc" "$((end - start))" <<'EOF'
import json, platform, subprocess, sys
from pathlib import Path

import torch

work, out, device, smoke_rc, parity_rc, suite_rc, seconds = sys.argv[1:]
work = Path(work)


def tail(name: str, lines: int = 15) -> list[str]:
    path = work / name
    return path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []


manifest = work / "runs" / "smoke" / "manifest.json"
stages = json.loads(manifest.read_text())["stages"] if manifest.exists() else {}
report = work / "runs" / "smoke" / "reports" / "report.json"
headline = json.loads(report.read_text())["headline"] if report.exists() else None
result = {
    "benchmark": "gpu.sh",
    "device": device,
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
    "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None,
    "wall_seconds": int(seconds),
    "smoke_pipeline": {"exit_code": int(smoke_rc), "headline": headline,
                       "stages": {name: {k: v for k, v in entry.items()
                                         if k in ("wall_seconds", "peak_rss_mb", "peak_cuda_allocated_mb")}
                                  for name, entry in stages.items()},
                       "log_tail": tail("smoke.log")},
    "parity_test": {"exit_code": int(parity_rc), "log_tail": tail("parity.log", 5)},
    "suite": {"exit_code": int(suite_rc), "log_tail": tail("suite.log", 8)},
    "not_built": ["speed benchmark GPU mode", "memory benchmark VRAM mode and the 8 GiB headline",
                  "quality benchmark --device cuda"],
}
Path(out).write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps({k: result[k] for k in ("device", "gpu", "wall_seconds")}), "->", out)
for part in ("smoke_pipeline", "parity_test", "suite"):
    print(part, "exit", result[part]["exit_code"], "|", (result[part]["log_tail"] or [""])[-1])
EOF
