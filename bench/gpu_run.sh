#!/bin/sh
# The GPU acceptance run as one command on the device machine (prepare .carry/ here first with
# `sh bench/pack_gpu_carry.sh`). Device tool `run` arguments:
#     command: sh bench/gpu_run.sh      carry: [".carry"]      timeout_s: 360
# 360 s leaves room in a 15-minute lease for one rerun on the warm machine; the bench stops starting work
# at its own deadline (DEADLINE_S, default 280 s) and always writes what it has to $OUT.
#
# Why a copy under /var/tmp: the CRIU sandbox gives each engine private tmpfs folders (criu_init.py;
# /tmp was one once), so what the engine reads (repo, model, carried packages) stays out of /tmp, where
# the device may have put the working tree. Why unzip and not pip: the image's pip has no index and is not needed to place wheels.
set -u
OUT=${OUT:-$PWD/bench-out}
mkdir -p "$OUT"
{
  echo "== $(date -u +%FT%TZ) $(uname -r) $(nvidia-smi -L 2>&1 | head -2 | tr '\n' ' ')"
  dest=/var/tmp/coldstart-run
  site=/var/tmp/coldstart-site
  rm -rf "$dest" "$site"
  mkdir -p "$dest" "$site"
  tar -C "$PWD" --exclude=./.git -cf - . | tar -C "$dest" -xf -
  cd "$dest" || exit 1
  python3 - "$site" <<'PY'
import glob, sys, zipfile
wheels = sorted(glob.glob(".carry/whl/*.whl"))
for wheel in wheels:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])
print(f"unpacked {len(wheels)} wheels into {sys.argv[1]}")
PY
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  python3 bench/gpu_coldstart.py --out "$OUT" --deadline-s "${DEADLINE_S:-280}" "$@"
  echo "== exit $? at $(date -u +%FT%TZ)"
} 2>&1 | tee "$OUT/log.txt"
