#!/bin/sh
# Prepare .carry/ for the GPU acceptance run (bench/gpu_run.sh); run here, as root, from the repo root.
#
# The device image runs Python 3.12 (/opt/torch/.venv/bin/python3) with torch, transformers, cuda-bindings,
# nvidia-ml-py, httpx, aiohttp, anyio, rich, uvloop, prometheus-client, but no starlette, uvicorn, fastapi,
# pydantic or openai, no CRIU, and no network (see the device tool's KINDS.md). This puts in .carry/
# (git-ignored, sent with `carry: [".carry"]`):
#   whl/   cp312 manylinux wheels of what is missing there, with their missing dependencies, at the
#          versions this repo's .venv runs (known to work together). gpu_run.sh unpacks them with
#          Python's zipfile (no pip needed there) into a folder outside /tmp, first on PYTHONPATH.
#          anyio, idna and typing-extensions are carried too although the image has them: the carried
#          pydantic/openai need newer ones than an image may hold, and newer ones are compatible.
#   criu/  this machine's criu (>= 4.2) and every library it links but glibc's, behind a wrapper that
#          sets LD_LIBRARY_PATH (the image's glibc is as new or newer).
#   bin/   the same for `ip` (iproute2: the CRIU sandbox makes network namespaces with it), used only
#          where the image has none (the bench appends bin/ to the end of PATH).
# Then it checks that the tree the device tool sends (tracked + untracked-not-ignored files + .carry) fits
# in 64 MiB, and prints the device command.
set -eu
cd "$(dirname "$0")/.."
out=.carry
limit=$((64 * 1024 * 1024))
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >>.git/info/exclude
rm -rf "$out" && mkdir -p "$out/whl" "$out/criu" "$out/bin"

# Pinned to what runs together here (the .venv); names only where a distribution name differs.
pins=$("$py" - <<'PY'
from importlib.metadata import version, PackageNotFoundError
names = ["starlette", "uvicorn", "fastapi", "pydantic", "pydantic-core", "annotated-types",
         "typing-inspection", "openai", "jiter", "sniffio", "distro", "httpx2", "httpcore2", "truststore",
         "opentelemetry-api", "anyio", "idna", "typing-extensions"]
pins = []
for name in names:
    try:
        pins.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pass  # not a dependency of the versions installed here
print(" ".join(pins))
PY
)
echo "wheels: $pins"
# shellcheck disable=SC2086 -- one argument per pin
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$out/whl" $pins

# A binary and the libraries it links (all but glibc's own), behind a wrapper setting LD_LIBRARY_PATH.
pack_binary() { # SRC DEST_DIR NAME
  cp -L "$1" "$2/$3.bin"
  mkdir -p "$2/lib"
  ldd "$1" | awk '/=> \//{print $3}' | grep -v -E '/(libc|libm|libpthread|libdl|librt|ld-linux[^/]*)\.so' |
    while read -r lib; do cp -L "$lib" "$2/lib/"; done
  cat >"$2/$3" <<SH
#!/bin/sh
here=\$(dirname "\$(readlink -f "\$0")")
LD_LIBRARY_PATH="\$here/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "\$here/$3.bin" "\$@"
SH
  chmod +x "$2/$3"
}

criu=${CRIU:-}
[ -n "$criu" ] || criu=$(command -v criu || true)
[ -n "$criu" ] || { [ -x /usr/local/sbin/criu ] && criu=/usr/local/sbin/criu; } || true
if [ -n "$criu" ]; then
  pack_binary "$criu" "$out/criu" criu
  "$out/criu/criu" --version | head -1
else
  echo "no criu here: the GPU run will measure the CUDA-level path only" >&2
fi
ip=$(command -v ip || true)
if [ -n "$ip" ]; then pack_binary "$ip" "$out/bin" ip; fi

carry_bytes=$(du -sb "$out" | cut -f1)
tree_bytes=$( (git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null || true) |
  awk '{s += $1} END {print s + 0}')
total=$((carry_bytes + tree_bytes))
awk -v c="$carry_bytes" -v t="$tree_bytes" 'BEGIN {
  printf "carry %.1f MiB + working tree %.1f MiB = %.1f MiB (limit 64 MiB)\n", c / 1048576, t / 1048576, (c + t) / 1048576 }'
if [ "$total" -gt "$limit" ]; then
  echo "too big for the device tool: the largest untracked, not ignored files (ignore them in .git/info/exclude):" >&2
  git ls-files -z --others --exclude-standard | xargs -0 -r du -b -- 2>/dev/null | sort -rn | head -10 >&2
  exit 1
fi
cat <<'EOF'
device command (run tool): command "sh bench/gpu_run.sh", carry [".carry"], timeout_s 360
EOF
