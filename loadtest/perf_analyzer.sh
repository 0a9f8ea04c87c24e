#!/usr/bin/env bash
# Run Triton's perf_analyzer against tensorwire (or any KServe v2 gRPC server).
#
#   loadtest/perf_analyzer.sh --setup-only          prepare the binary and its libraries, then exit
#   loadtest/perf_analyzer.sh --help                perf_analyzer's own usage
#   loadtest/perf_analyzer.sh -m identity -u 127.0.0.1:8001 -i grpc --async \
#       --concurrency-range 1:4 --input-data perf_inputs/identity.json
#
# Why this script: the PyPI package "perf-analyzer" is an empty placeholder, and the binary inside
# tritonclient wheels >= 2.52 needs glibc 2.38 (Debian 12 has 2.36). tritonclient 2.51.0's
# manylinux1 wheel carries a binary that runs here once two shared libraries are found:
#   libb64.so.0d     Debian's libb64-0d (apt-get install when root; otherwise, or while another process
#                    keeps the dpkg lock, the .deb is unpacked into the cache)
#   libcudart.so.12  pip's nvidia-cuda-runtime-cu12, installed into a private folder (no GPU is used)
# Everything lives under .cache/perf_analyzer/ (git-ignored). Setup is idempotent: once done, a run
# costs one stamp check. Set TENSORWIRE_PA_CACHE to put the cache elsewhere, TENSORWIRE_PA_PYTHON to
# pick the interpreter whose pip downloads the wheels (default: the project's .venv, else python3).
set -euo pipefail

TRITONCLIENT_VERSION=2.51.0      # last wheel whose perf_analyzer runs on glibc 2.36
CUDART_VERSION=12.6.77           # the CUDA runtime of Triton 24.10 (= tritonclient 2.51.0); any 12.x loads
LIBB64_PACKAGE=libb64-0d

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${TENSORWIRE_PA_CACHE:-$ROOT/.cache/perf_analyzer}
PYTHON=${TENSORWIRE_PA_PYTHON:-$ROOT/.venv/bin/python}
[[ -x $PYTHON ]] || PYTHON=$(command -v python3 || true)   # no project venv yet: any pip will do
BIN=$CACHE/tritonclient-$TRITONCLIENT_VERSION/perf_analyzer
CUDA_DIR=$CACHE/cuda-$CUDART_VERSION
CUDA_LIB=$CUDA_DIR/nvidia/cuda_runtime/lib
DEB_DIR=$CACHE/libb64                      # used only when the system lacks libb64 and we are not root
STAMP=$CACHE/.ready-$TRITONCLIENT_VERSION-$CUDART_VERSION
LOG=$CACHE/setup.log

say() { echo "perf_analyzer.sh: $*" >&2; }
die() { say "error: $*"; exit 1; }

library_path() {
    local path=$CUDA_LIB
    [[ -d $DEB_DIR/usr/lib/x86_64-linux-gnu ]] && path=$path:$DEB_DIR/usr/lib/x86_64-linux-gnu
    echo "$path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

system_has_libb64() {  # not grep -q: with pipefail, ldconfig's SIGPIPE would read as "missing"
    local ldconfig
    ldconfig=$(PATH=$PATH:/sbin:/usr/sbin command -v ldconfig) || return 1
    "$ldconfig" -p 2>/dev/null | grep 'libb64\.so\.0d' >/dev/null
}

# Quiet pip: its output goes to the setup log and is shown only when it fails.
pip_quiet() {
    if ! "$PYTHON" -m pip "$@" --disable-pip-version-check --retries 2 --timeout 30 -q >>"$LOG" 2>&1; then
        tail -n 20 "$LOG" >&2
        die "'pip $*' failed (full log: $LOG); perf_analyzer needs the package registry once, for setup"
    fi
}

# apt-get ATTEMPTS times while another process (unattended-upgrades, a parallel set-up) holds the dpkg
# or the lists lock; apt itself waits up to APT_LOCK_WAIT seconds each time (DPkg::Lock::Timeout).
APT_LOCK_WAIT=${TENSORWIRE_APT_LOCK_WAIT:-30}
APT_LOCKED=0        # set by apt_retry: 1 when its last failure was a held lock
apt_retry() {
    local attempts=$1 attempt out
    shift
    out=$(mktemp)
    for ((attempt = 1; attempt <= attempts; attempt++)); do
        APT_LOCKED=0
        if apt-get -o DPkg::Lock::Timeout="$APT_LOCK_WAIT" "$@" >"$out" 2>&1; then
            cat "$out" >>"$LOG"; rm -f "$out"
            return 0
        fi
        cat "$out" >>"$LOG"
        grep -qE "Could not get lock|Unable to acquire|is another process using it" "$out" || break
        APT_LOCKED=1
        say "apt-get $1: a package lock is held by another process (attempt $attempt of $attempts)"
    done
    rm -f "$out"
    return 1
}

unpack_libb64() {  # no root or no lock needed: the .deb unpacked into the cache, used via LD_LIBRARY_PATH
    say "unpacking $LIBB64_PACKAGE into $DEB_DIR (not installed system-wide)"
    local tmp
    tmp=$(mktemp -d)
    chmod 755 "$tmp"   # apt's _apt user must be able to write the download
    if ! (cd "$tmp" && apt_retry 3 download "$LIBB64_PACKAGE"); then
        if [[ $(id -u) == 0 ]]; then   # a fresh machine may have empty package lists
            say "apt-get update (package lists), then downloading $LIBB64_PACKAGE again"
            apt_retry 3 update -q || true
        fi
        (cd "$tmp" && apt_retry 3 download "$LIBB64_PACKAGE") \
            || { rm -rf "$tmp"; tail -n 20 "$LOG" >&2; die "apt-get download $LIBB64_PACKAGE failed (log: $LOG); ask root to: apt-get install $LIBB64_PACKAGE"; }
    fi
    mkdir -p "$DEB_DIR"
    dpkg-deb -x "$tmp"/"$LIBB64_PACKAGE"_*.deb "$DEB_DIR"
    rm -rf "$tmp"
}

install_libb64() {
    system_has_libb64 && return 0
    [[ -e $DEB_DIR/usr/lib/x86_64-linux-gnu/libb64.so.0d ]] && return 0
    command -v apt-get >/dev/null || die "libb64.so.0d is missing and there is no apt-get; install libb64 0d (Debian: $LIBB64_PACKAGE)"
    if [[ $(id -u) == 0 ]]; then
        say "installing $LIBB64_PACKAGE with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        # One try: when the dpkg lock stays busy, unpacking the .deb (no lock needed) is quicker than waiting.
        apt_retry 1 install -y -q --no-install-recommends "$LIBB64_PACKAGE" && return 0
        if [[ $APT_LOCKED == 0 ]]; then
            say "apt-get update (package lists), then installing $LIBB64_PACKAGE again"
            apt_retry 3 update -q || true
            apt_retry 1 install -y -q --no-install-recommends "$LIBB64_PACKAGE" && return 0
        fi
        if [[ $APT_LOCKED == 1 ]]; then
            say "the dpkg lock stays busy: unpacking $LIBB64_PACKAGE into the cache instead of installing it"
        else
            say "apt-get install $LIBB64_PACKAGE failed (see $LOG): unpacking it into the cache instead"
        fi
    fi
    unpack_libb64   # not root, or the dpkg lock stayed busy: no system install needed
}

install_binary() {
    [[ -x $BIN ]] && return 0                # written to a temp name, then renamed: present = complete
    say "downloading tritonclient==$TRITONCLIENT_VERSION (manylinux1 wheel) for its perf_analyzer binary"
    local wheels=$CACHE/wheels
    mkdir -p "$wheels" "$(dirname "$BIN")"
    pip_quiet download --no-deps --only-binary=:all: --platform manylinux1_x86_64 \
        -d "$wheels" "tritonclient==$TRITONCLIENT_VERSION"
    local wheel
    wheel=$(ls "$wheels"/tritonclient-"$TRITONCLIENT_VERSION"-*manylinux1_x86_64.whl 2>/dev/null | head -n 1)
    [[ -n $wheel ]] || die "no tritonclient $TRITONCLIENT_VERSION manylinux1 wheel in $wheels"
    "$PYTHON" - "$wheel" "$BIN.tmp" <<'EOF'
import shutil, sys, zipfile
wheel, target = sys.argv[1], sys.argv[2]
member = next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".data/data/bin/perf_analyzer"))
with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(target, "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
    chmod +x "$BIN.tmp"
    mv -f "$BIN.tmp" "$BIN"
    rm -f "$wheel"   # 14 MB; the binary is all we keep
}

install_cudart() {
    [[ -e $CUDA_LIB/libcudart.so.12 ]] && return 0
    say "installing nvidia-cuda-runtime-cu12==$CUDART_VERSION into $CUDA_DIR (for libcudart.so.12; no GPU is used)"
    rm -rf "$CUDA_DIR.tmp"
    pip_quiet install --no-deps --only-binary=:all: --target "$CUDA_DIR.tmp" "nvidia-cuda-runtime-cu12==$CUDART_VERSION"
    rm -rf "$CUDA_DIR"
    mv "$CUDA_DIR.tmp" "$CUDA_DIR"
    [[ -e $CUDA_LIB/libcudart.so.12 ]] || die "libcudart.so.12 not found under $CUDA_DIR after install"
}

setup() {
    [[ -f $STAMP && -x $BIN ]] && return 0
    [[ $(uname -s) == Linux && $(uname -m) == x86_64 ]] || die "only Linux x86_64 is supported (this is $(uname -sm))"
    [[ -n $PYTHON && -x $PYTHON ]] || die "no Python with pip found (run 'make setup', or set TENSORWIRE_PA_PYTHON)"
    mkdir -p "$CACHE"
    exec 9>"$CACHE/.lock"
    flock 9                                  # concurrent first runs (parallel tests) set up once
    if [[ ! -f $STAMP ]]; then
        : >"$LOG"
        install_libb64
        install_binary
        install_cudart
        local missing
        missing=$(LD_LIBRARY_PATH=$(library_path) ldd "$BIN" | grep 'not found' || true)
        [[ -z $missing ]] || die "perf_analyzer still lacks libraries:"$'\n'"$missing"
        LD_LIBRARY_PATH=$(library_path) "$BIN" --version >>"$LOG" 2>&1 \
            || { tail -n 5 "$LOG" >&2; die "perf_analyzer --version failed (log: $LOG)"; }
        touch "$STAMP"
        say "ready: $BIN"
    fi
    exec 9>&-
}

setup
case "${1:-}" in
    --setup-only)
        exit 0 ;;
    --help | -h)
        # perf_analyzer prints its usage only as an error ("unrecognized option"); show it as help.
        LD_LIBRARY_PATH=$(library_path) "$BIN" --help 2>&1 | grep -v "unrecognized option" || true
        exit 0 ;;
esac
export LD_LIBRARY_PATH
LD_LIBRARY_PATH=$(library_path)
exec "$BIN" "$@"
