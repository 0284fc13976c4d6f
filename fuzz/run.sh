#!/usr/bin/env bash
# Build the rANS decoder fuzzer with libFuzzer + ASan + UBSan and run it for SECONDS (default 60).
#   fuzz/run.sh [SECONDS] [extra libFuzzer flags...]
# Needs clang with compiler-rt (Debian: apt-get install clang-14 libclang-rt-14-dev).
# CLANG may name the compiler (default: the first of clang++, clang++-19..14 found).
# The seed corpus is generated with the built package (PYTHONPATH=src after an in-place build);
# the working corpus and any crash-* files go to fuzz/build/ (ignored by git).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
secs="${1:-60}"
shift || true
if [[ -z "${CLANG:-}" ]]; then
  for c in clang++ clang++-19 clang++-18 clang++-17 clang++-16 clang++-15 clang++-14; do
    if command -v "$c" >/dev/null; then CLANG="$c"; break; fi
  done
fi
[[ -n "${CLANG:-}" ]] || { echo "run.sh: no clang++ found" >&2; exit 77; }
build="$here/build"
mkdir -p "$build/corpus" "$build/seeds" "$build/artifacts"
exe="$build/fuzz_rans_decode"
if [[ ! -x "$exe" || "$here/fuzz_rans_decode.cpp" -nt "$exe" || -n "$(find "$root/csrc/rans" -newer "$exe" -name '*.h')" ]]; then
  "$CLANG" -std=c++20 -g -O1 -fno-omit-frame-pointer \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    "$here/fuzz_rans_decode.cpp" -o "$exe"
fi
PYTHON="${PYTHON:-python3}"
if [[ -z "$(ls -A "$build/seeds")" ]]; then
  PYTHONPATH="${PYTHONPATH:-$root/src}" "$PYTHON" "$here/make_corpus.py" "$build/seeds" \
    || echo "run.sh: could not generate seeds (is dualres_ext built?); fuzzing from scratch" >&2
fi
# -rss_limit_mb / -malloc_limit_mb: a decoder allocating from a forged length is a finding too.
exec "$exe" "$build/corpus" "$build/seeds" -max_total_time="$secs" -max_len=8192 -timeout=10 \
  -rss_limit_mb=2048 -malloc_limit_mb=512 -artifact_prefix="$build/artifacts/" -print_final_stats=1 "$@"
