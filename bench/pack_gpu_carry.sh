#!/bin/sh
# Prepare .carry/ for bench/gpu_coldstart.py on the GPU machine (run here, as root, from the repo root).
#
# The GPU machine has torch, transformers, cuda-bindings, nvidia-ml-py and httpx but no starlette/uvicorn
# (the example engine serves with them), no CRIU, and no network. This puts in .carry/ (git-ignored):
#   whl/    starlette and uvicorn wheels (pure Python), installed there with pip --no-index --target
#   criu/   this machine's criu (>= 4.2) and the non-glibc libraries it links, behind a wrapper script
#           that sets LD_LIBRARY_PATH; plus CRIU's cuda_plugin.so when $CRIU_CUDA_PLUGIN names one
#   bin/    cuda-checkpoint -> coldstart-cuda-checkpoint (what CRIU's CUDA plugin runs from PATH)
# Then run the device command given in bench/gpu_coldstart.py's docstring (carry [".carry"]).
set -eu
out=.carry
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >>.git/info/exclude
rm -rf "$out" && mkdir -p "$out/whl" "$out/criu" "$out/bin"

"${PYTHON:-.venv/bin/python}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform any -d "$out/whl" starlette==1.10.0 uvicorn==0.54.0

criu=$(command -v criu || true)
if [ -n "$criu" ]; then
  cp "$criu" "$out/criu/criu.bin"
  # Every library but glibc's own (the GPU image's glibc is as new or newer).
  ldd "$criu" | awk '/=> \//{print $3}' | grep -v -E '/(libc|libm|libpthread|libdl|librt|ld-linux[^/]*)\.so' |
    while read -r lib; do cp -L "$lib" "$out/criu/"; done
  if [ -n "${CRIU_CUDA_PLUGIN:-}" ]; then cp "$CRIU_CUDA_PLUGIN" "$out/criu/cuda_plugin.so"; fi
  cat >"$out/criu/criu" <<'SH'
#!/bin/sh
here=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH="$here${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/criu.bin" "$@"
SH
  chmod +x "$out/criu/criu"
else
  echo "no criu here: the GPU run will measure the CUDA-level path only" >&2
fi

cat >"$out/bin/cuda-checkpoint" <<'SH'
#!/bin/sh
exec python3 -m coldstart.launcher.cli.cuda_checkpoint "$@"
SH
chmod +x "$out/bin/cuda-checkpoint"
du -sh "$out"
