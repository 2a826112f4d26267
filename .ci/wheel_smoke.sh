#!/usr/bin/env bash
# A plain install works: build the wheel, install it (not editable) into a fresh venv, and from outside the
# repository quantize a tiny model with a shipped recipe by name and with --scheme NVFP4; routealign check passes both.
set -euo pipefail
cd "$(dirname "$0")/.."
export REPO="$PWD"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/pip wheel -q --disable-pip-version-check --no-deps -w "$work/dist" .
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q --disable-pip-version-check "$work"/dist/routealign-*.whl
cd "$work"
V="$work/venv/bin"
"$V/python" - <<'PY'
import pathlib
import routealign
from routealign.tiny import save_tiny
assert "site-packages" in routealign.__file__, routealign.__file__  # the installed wheel, not the source tree
save_tiny("qwen3_moe", "tiny", seed=3)
# the wheel carries the repository's top-level recipes/ as files, byte for byte (one copy in the repository)
import os
repo = pathlib.Path(os.environ["REPO"]) / "recipes"
shipped = pathlib.Path(routealign.__file__).parent / "recipes" / "files"
assert not shipped.is_symlink() and sorted(p.name for p in shipped.glob("*.yaml")) == sorted(
    p.name for p in repo.glob("*.yaml")), (list(shipped.glob("*")), list(repo.glob("*")))
for p in repo.glob("*.yaml"):
    assert (shipped / p.name).read_bytes() == p.read_bytes(), p.name
pathlib.Path("text.path").write_text(str(pathlib.Path(routealign.__file__).parent / "data" / "shakespeare.txt"))
PY
text=$(cat text.path)
"$V/routealign" recipes
"$V/routealign" quantize tiny --recipe vsraq_w4a16 --iters 2 --data "$text" --samples 4 --seq-len 32 \
    --dtype float32 --out q-w4a16
"$V/routealign" quantize tiny --scheme NVFP4 --iters 2 --data "$text" --samples 4 --seq-len 32 \
    --dtype float32 --out q-nvfp4
"$V/routealign" check q-w4a16
"$V/routealign" check q-nvfp4
echo "wheel smoke test: PASS"
