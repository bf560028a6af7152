#!/usr/bin/env bash
# Sanitizer job: builds the extension with AddressSanitizer + UndefinedBehaviorSanitizer in a
# scratch copy of the sources, runs the op, fuzz and serialization tests on every CPU kernel path
# of this machine, and fails on any sanitizer report (or test failure).
#
#   bash .ci/sanitize.sh            # in an environment with torch, pytest and hypothesis
#
# -fno-wrapv: Python's own compiler flags carry -fwrapv, which defines signed overflow and so
# hides it from UBSan (setting CFLAGS drops them here; -fno-wrapv makes sure, the later flag
# wins). The uninstrumented python binary needs the ASan
# runtime (and libstdc++, which it must not load after it) preloaded. Leak detection is off:
# the interpreter's own allocations at exit are not the extension's.
set -euo pipefail

# All in one function, parsed before it runs: bash reads a script as it goes, so editing this
# file during a (long) run would otherwise change what the run does.
main() {
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The sources (tracked and untracked, not ignored), without the in-place build.
(cd "$repo" && git ls-files -co --exclude-standard -z) | (cd "$repo" && tar -c --null -T - -f -) | tar -x -C "$work"
mkdir -p "$work/reports"

san="-fsanitize=address,undefined -fno-wrapv -fno-omit-frame-pointer"
echo "+ sanitized build ($san)"
start=$SECONDS
(cd "$work" && CFLAGS="$san" LDFLAGS="$san" SPARKS_FORCE_CPU=1 MAX_JOBS="${MAX_JOBS:-2}" \
   python setup.py build_ext --inplace > "$work/reports/build.log" 2>&1) ||
  { tail -50 "$work/reports/build.log"; exit 1; }
grep -q -- "-fno-wrapv" "$work/build/temp"*/build.ninja ||
  { echo "the sanitizer flags did not reach the compiler" >&2; exit 1; }
echo "  built in $((SECONDS - start)) s"

export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS="detect_leaks=0:log_path=$work/reports/asan:abort_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:log_path=$work/reports/ubsan"
paths="$(cd "$work" && python -c 'import sparks_ext; print(" ".join(sparks_ext.ops.cpu_kernels()))')"

# These files force every kernel path themselves (a fixture over cpu_kernels()).
per_path_files="tests/test_cpu_paths.py tests/test_fuzz.py tests/test_hardening.py tests/test_fused_op.py"
# These run on one path at a time: each path once.
once_files="tests/test_conv2d.py tests/test_binary_conv2d.py tests/test_errors.py tests/test_codebook_layer.py
  tests/test_serialization.py tests/test_load_hardening.py tests/test_load_fuzz.py"

status=0
run() {
  echo "+ $*"
  (cd "$work" && "$@") || status=1
}
start=$SECONDS
run python -m pytest -q -p no:cacheprovider $per_path_files
for path in $paths; do
  SPARKS_CPU_KERNEL=$path run python -m pytest -q -p no:cacheprovider $once_files
done
echo "  tests in $((SECONDS - start)) s (paths: $paths)"

if compgen -G "$work/reports/[au][sb]san.*" > /dev/null; then
  echo "sanitizer reports:" >&2
  cat "$work"/reports/[au][sb]san.* >&2
  exit 1
fi
[ "$status" = 0 ] || { echo "tests failed under the sanitizers" >&2; exit 1; }
echo "sanitizers: no reports on paths $paths"
}

main "$@"
