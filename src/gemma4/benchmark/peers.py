"""The peer engines' side of a benchmark: where llama.cpp is, and the same checkpoint converted
to GGUF by llama.cpp's own converter at the type that matches ours (cached beside the checkpoint)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..errors import Gemma4Error
from ..weights.default_model import cache_dir

LLAMA_CPP_VERSION = "0.3.36"  # scripts/build_llama_cpp.sh builds it and unpacks its source (the converter)
LLAMA_CPP_TYPE = {"bf16": "F16", "int8": "Q8_0", "int4": "Q4_0", "q4_0": "Q4_0"}  # llama.cpp's type of the same size class


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def converter_script() -> Path | None:
    root = os.environ.get("GEMMA4_LLAMA_CPP_SRC") or cache_dir() / f"llama_cpp_python-{LLAMA_CPP_VERSION}"
    script = Path(root) / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    return script if script.is_file() else None


def gguf_for(checkpoint: Path, type_name: str) -> Path:
    """`checkpoint` as a GGUF file of `type_name` (F16, Q8_0, Q4_0), converted once and cached."""
    target = checkpoint / "gguf" / f"model-{type_name.lower()}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(exist_ok=True)
    if type_name == "Q4_0":  # the converter writes no Q4_0: llama.cpp's quantizer makes it from F16
        _quantize(gguf_for(checkpoint, "F16"), target, type_name)
        return target
    script = converter_script()
    if script is None:
        raise Gemma4Error("llama.cpp's converter is absent: run scripts/build_llama_cpp.sh")
    print(f"gemma4 bench: converting {checkpoint.name} to {type_name} GGUF with llama.cpp's converter...", file=sys.stderr, flush=True)
    partial = target.with_suffix(".partial")
    result = subprocess.run(
        [sys.executable, str(script), str(checkpoint), "--outfile", str(partial), "--outtype", type_name.lower()],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(script.parent / "gguf-py")},
    )
    if result.returncode != 0:
        raise Gemma4Error(f"llama.cpp's converter failed on {checkpoint}: {result.stderr.strip().splitlines()[-1]}")
    partial.rename(target)
    return target


def quantized_for(checkpoint: Path, kind: str) -> Path:
    """`checkpoint` saved by `gemma4 quantize` as int8/int4 (cached beside it), so a benchmark's load
    is a load, as llama.cpp's of its pre-quantized file is."""
    from ..weights.quantized import save_quantized

    target = checkpoint / f"gemma4-{kind}"
    if not (target / "config.json").is_file():
        print(f"gemma4 bench: saving {checkpoint.name} as {kind} (once)...", file=sys.stderr, flush=True)
        partial = target.with_name(target.name + ".partial")
        if partial.exists():
            shutil.rmtree(partial)
        save_quantized(checkpoint, partial, kind, progress=False)
        partial.rename(target)
    return target


def _quantize(source: Path, target: Path, type_name: str) -> None:
    print(f"gemma4 bench: quantizing {source.name} to {type_name} with llama.cpp...", file=sys.stderr, flush=True)
    code = (
        "import llama_cpp, sys\n"
        "p = llama_cpp.llama_model_quantize_default_params()\n"
        f"p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_{type_name}\n"
        "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))\n"
    )
    partial = target.with_suffix(".partial")
    if subprocess.run([sys.executable, "-c", code, str(source), str(partial)], capture_output=True).returncode != 0:
        raise Gemma4Error(f"llama.cpp could not quantize {source} to {type_name}")
    partial.rename(target)
