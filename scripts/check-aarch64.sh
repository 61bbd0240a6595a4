#!/usr/bin/env bash
# Prove agegender-run on a Raspberry Pi's architecture: run it on arm64 Debian under qemu-user
# emulation and compare every answer with the same commands on this (x86) host.
#
#   sudo scripts/check-aarch64.sh [--model-int8 PATH] [--model-fp32 PATH] [--images DIR] [options]
#
# Steps: (1) check that the host can emulate arm64 (root, qemu-user-static, binfmt_misc); (2) build
# an arm64 Debian bookworm root file system with debootstrap (minbase + python3, python3-venv,
# python3-pip), cached in $AGEGENDER_AARCH64_CACHE (default ~/.cache/agegender-aarch64); (3) copy
# the repository (git's tracked + untracked-not-ignored files), the models and the images into a
# work folder that is bind-mounted into the rootfs, and `pip install .` there into a venv (runtime
# only, no torch; numpy/opencv-python-headless/onnxruntime pinned to the host's versions unless
# --no-pin); (4) run `agegender-run --json --threads 1 --detector none|haar[|yunet] --model
# int8|fp32` on the images in the rootfs (arm64, once per --cpus core: Cortex-A72 and -A76, the
# Pi 4 and Pi 5 cores) and with the host's runtime (x86); (5) compare: same results, same boxes,
# same top-1 age group and gender for every face, fp32 probabilities (and det scores) within --tol.
#
# Exit status: 0 same answers; 1 any difference; 2 usage or setup error (missing model, failed
# debootstrap/pip); 77 this host cannot emulate arm64 (not root, no qemu-user-static, no
# binfmt_misc, no debootstrap, no mount namespaces), with a line that says what is missing.
# Every chroot runs inside its own mount namespace (unshare), so no mount outlives the script.
set -euo pipefail

PATH=$PATH:/usr/sbin:/sbin          # debootstrap, chroot
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${AGEGENDER_AARCH64_CACHE:-$HOME/.cache/agegender-aarch64}
SUITE=bookworm                      # Raspberry Pi OS (64-bit) is Debian bookworm arm64
MIRROR=${AGEGENDER_AARCH64_MIRROR:-}
MODEL_INT8=$REPO/models/agegender_int8.onnx
MODEL_FP32=$REPO/models/agegender_fp32.onnx
YUNET=""
IMAGES=""
MAX_IMAGES=8
HOST_RUN=${AGEGENDER_HOST_RUN:-}
HOST_PY=""
TOL=1e-3
BOX_TOL=0
PIN=1
FRESH_VENV=0
KEEP=0
WORK=""
CPUS="cortex-a72 cortex-a76"        # the cores of a Raspberry Pi 4 and a Raspberry Pi 5
CPU=""                              # the QEMU_CPU of in_root's programs (empty: qemu's default, "max")

say() { printf 'aarch64-check: %s\n' "$*" >&2; }
die() { say "$1"; exit "${2:-2}"; }
cannot_emulate() { say "this host cannot emulate arm64: $*"; exit 77; }

usage() {
    cat <<EOF
usage: $0 [options]
  --model-int8 PATH   int8 model (default: models/agegender_int8.onnx)
  --model-fp32 PATH   fp32 model (default: models/agegender_fp32.onnx)
  --yunet-model PATH  also compare --detector yunet with this YuNet ONNX file (on the haar canvases)
  --images DIR        face images (the first --max-images, sorted); default: generated drawn faces
  --max-images N      how many images of --images DIR (default $MAX_IMAGES)
  --cache DIR         rootfs cache (default \$AGEGENDER_AARCH64_CACHE or ~/.cache/agegender-aarch64)
  --mirror URL        Debian mirror for debootstrap (default: the host's apt source, else deb.debian.org)
  --host-run CMD      the x86 agegender-run (default: agegender-run on PATH)
  --cpus "A B"        emulated CPUs, each compared with x86 (default "$CPUS": Pi 4 and Pi 5 cores;
                      qemu's default "max" has SVE and i8mm, which no Pi has, so ARM kernels would differ)
  --tol X             fp32 probability tolerance (default $TOL)
  --box-tol PX        box coordinate tolerance for the haar run (default $BOX_TOL)
  --no-pin            let pip pick the newest numpy/opencv/onnxruntime instead of the host's versions
  --fresh-venv        rebuild the venv inside the rootfs (default: reuse it, re-running pip install .)
  --keep              keep the work folder (outputs of both sides) and print where it is
Exit: 0 same answers, 1 differences, 2 setup error, 77 host cannot emulate arm64.
EOF
}

while [ $# -gt 0 ]; do
    case $1 in
        --model-int8) MODEL_INT8=$2; shift 2 ;;
        --model-fp32) MODEL_FP32=$2; shift 2 ;;
        --images) IMAGES=$2; shift 2 ;;
        --yunet-model) YUNET=$2; shift 2 ;;
        --max-images) MAX_IMAGES=$2; shift 2 ;;
        --cache) CACHE=$2; shift 2 ;;
        --mirror) MIRROR=$2; shift 2 ;;
        --host-run) HOST_RUN=$2; shift 2 ;;
        --cpus) CPUS=${2//,/ }; shift 2 ;;
        --tol) TOL=$2; shift 2 ;;
        --box-tol) BOX_TOL=$2; shift 2 ;;
        --no-pin) PIN=0; shift ;;
        --fresh-venv) FRESH_VENV=1; shift ;;
        --keep) KEEP=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
done

T0=$SECONDS
stage() { say "[$((SECONDS - T0))s] $*"; }

# --------------------------------------------------------------------------- can this host emulate arm64?
NATIVE=0
case $(uname -m) in
    aarch64|arm64) NATIVE=1; say "the host is arm64: running natively, no emulation needed" ;;
esac
[ "$(id -u)" = 0 ] || cannot_emulate "not root (debootstrap, chroot and mounts need root; run with sudo)"
command -v debootstrap >/dev/null || cannot_emulate "no debootstrap (apt-get install debootstrap)"
command -v unshare >/dev/null && unshare --mount --propagation private true 2>/dev/null \
    || cannot_emulate "cannot create a mount namespace (unshare --mount failed: a container without CAP_SYS_ADMIN?)"
QEMU=""
if [ $NATIVE = 0 ]; then
    QEMU=$(command -v qemu-aarch64-static || true)
    [ -n "$QEMU" ] || cannot_emulate "no qemu-aarch64-static (apt-get install qemu-user-static)"
    BINFMT=/proc/sys/fs/binfmt_misc
    if [ ! -e $BINFMT/status ]; then
        mount -t binfmt_misc binfmt_misc $BINFMT 2>/dev/null \
            || cannot_emulate "binfmt_misc is not mounted and cannot be (mount -t binfmt_misc binfmt_misc $BINFMT failed)"
        say "mounted binfmt_misc on $BINFMT"
    fi
    [ "$(cat $BINFMT/status)" = enabled ] || cannot_emulate "binfmt_misc is disabled ($BINFMT/status)"
    if [ ! -e $BINFMT/qemu-aarch64 ]; then
        conf=/usr/lib/binfmt.d/qemu-aarch64.conf
        if [ -f $conf ]; then line=$(grep -v '^#' $conf | head -n1)
        else  # the ELF header of an arm64 executable, and the F flag (open qemu now: works inside chroots)
            line=':qemu-aarch64:M::\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:'"$QEMU"':OCF'
        fi
        printf '%s' "$line" > $BINFMT/register 2>/dev/null \
            || cannot_emulate "cannot register qemu-aarch64 with binfmt_misc"
        say "registered qemu-aarch64 with binfmt_misc"
    fi
    grep -q '^enabled' $BINFMT/qemu-aarch64 || cannot_emulate "the qemu-aarch64 binfmt_misc entry is disabled"
fi

# --------------------------------------------------------------------------- inputs
for m in "$MODEL_INT8" "$MODEL_FP32"; do
    [ -f "$m" ] || die "$m: no such model (build them first, or pass --model-int8/--model-fp32)"
done
[ -z "$IMAGES" ] || [ -d "$IMAGES" ] || die "$IMAGES: no such directory"
[ -z "$YUNET" ] || [ -f "$YUNET" ] || die "$YUNET: no such YuNet model"
for c in $CPUS; do
    case $c in cortex-a53|cortex-a57|cortex-a72|cortex-a76|neoverse-n1|max) ;; *) die "--cpus: $c is not a CPU this script knows (cortex-a53 cortex-a57 cortex-a72 cortex-a76 neoverse-n1 max)" ;; esac
done
[ -n "$CPUS" ] || die "--cpus: give at least one CPU"
if [ -z "$HOST_RUN" ]; then
    HOST_RUN=$(command -v agegender-run) || die "no agegender-run on PATH (install the project, or --host-run CMD)"
fi
HOST_RUN=$(command -v "$HOST_RUN") || die "$HOST_RUN: not found"
HOST_PY=$(dirname "$HOST_RUN")/python
[ -x "$HOST_PY" ] || HOST_PY=$(sed -n '1s/^#! *//p' "$HOST_RUN")
"$HOST_PY" -c 'import agegender.runtime' 2>/dev/null || die "$HOST_PY cannot import agegender.runtime"

# run CMD... inside ROOT, with /proc, /dev and (if set) $WORK at /mnt/agegender, in a private mount
# namespace; $CPU (if set) is the CPU qemu emulates (QEMU_CPU). No /sys on purpose: under qemu-user,
# /proc/cpuinfo is the x86 host's, and onnxruntime's cpuinfo library segfaults when /sys lists CPUs
# that /proc/cpuinfo does not describe as ARM cores. Without /sys it warns ("Error in cpuinfo") and
# falls back to the kernel's HWCAP bits, which QEMU_CPU sets like the emulated core's.
in_root() {
    local root=$1; shift
    unshare --mount --propagation private -- /bin/sh -c '
        set -e; R=$1; W=$2; C=$3; shift 3
        mount -t proc proc "$R/proc"
        mount --rbind /dev "$R/dev"
        if [ -n "$W" ]; then mkdir -p "$R/mnt/agegender"; mount --bind "$W" "$R/mnt/agegender"; fi
        exec chroot "$R" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb ${C:+QEMU_CPU=$C} \
            PATH=/opt/agegender/bin:/usr/local/bin:/usr/bin:/bin "$@"' sh "$root" "$WORK" "$CPU" "$@"
}

mounted_under() { awk -v p="$1" '$2 == p || index($2, p "/") == 1 {found=1} END {exit !found}' /proc/mounts; }

# --------------------------------------------------------------------------- the arm64 rootfs (cached)
ROOTFS=$CACHE/debian-$SUITE-arm64
if [ ! -f "$ROOTFS/.agegender-rootfs-ok" ]; then
    PARTIAL=$ROOTFS.partial
    mkdir -p "$CACHE"
    mounted_under "$ROOTFS" && die "something is mounted under $ROOTFS: unmount it first"
    mounted_under "$PARTIAL" && die "something is mounted under $PARTIAL: unmount it first"
    rm -rf -- "$PARTIAL" "$ROOTFS"
    if [ -z "$MIRROR" ]; then
        MIRROR=$(grep -rhoE '(URIs:|^deb) *https?://[^ ]*/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ \
                 2>/dev/null | grep -oE 'https?://[^ ]*' | head -n1 || true)
        MIRROR=${MIRROR:-http://deb.debian.org/debian}
    fi
    stage "building an arm64 Debian $SUITE rootfs in $ROOTFS from $MIRROR (once; cached)"
    debootstrap --arch=arm64 --variant=minbase --foreign \
        --include=python3,python3-venv,python3-pip,ca-certificates,time \
        "$SUITE" "$PARTIAL" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1 \
        || { tail -n 20 "$CACHE/debootstrap.log" >&2; die "debootstrap (first stage) failed: see $CACHE/debootstrap.log"; }
    [ -z "$QEMU" ] || cp "$QEMU" "$PARTIAL/usr/bin/"  # for binfmt entries without the F flag
    in_root "$PARTIAL" /bin/true \
        || cannot_emulate "arm64 programs do not run here even with qemu-aarch64 registered (binfmt_misc in this container?)"
    stage "debootstrap second stage (under emulation)"
    in_root "$PARTIAL" /debootstrap/debootstrap --second-stage >> "$CACHE/debootstrap.log" 2>&1 \
        || { tail -n 20 "$CACHE/debootstrap.log" >&2; die "debootstrap (second stage) failed: see $CACHE/debootstrap.log"; }
    rm -rf -- "$PARTIAL/var/cache/apt/archives/"*.deb
    touch "$PARTIAL/.agegender-rootfs-ok"
    mv "$PARTIAL" "$ROOTFS"
fi
stage "rootfs: $ROOTFS ($(in_root "$ROOTFS" /usr/bin/python3 -c 'import platform; print(platform.machine(), platform.python_version())'))"
# network settings for pip inside (DNS, and the host's CA bundle, which may hold a proxy's CA)
cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf" 2>/dev/null || true
for ca in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
    [ -f "$ca" ] && { cp "$ca" "$ROOTFS/etc/ssl/host-ca-bundle.crt"; break; }
done
PIP_ENV="PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 PIP_PROGRESS_BAR=off"
[ -f "$ROOTFS/etc/ssl/host-ca-bundle.crt" ] && PIP_ENV="$PIP_ENV PIP_CERT=/etc/ssl/host-ca-bundle.crt"
for v in PIP_INDEX_URL HTTPS_PROXY https_proxy HTTP_PROXY http_proxy NO_PROXY no_proxy; do
    [ -n "${!v:-}" ] && PIP_ENV="$PIP_ENV $v=${!v}"
done

# --------------------------------------------------------------------------- the work folder
WORK=$(mktemp -d "${TMPDIR:-/tmp}/agegender-aarch64.XXXXXX")
cleanup() {
    if [ $KEEP = 1 ]; then say "work folder kept: $WORK"; else rm -rf -- "$WORK"; fi
}
trap cleanup EXIT
mkdir -p "$WORK/src" "$WORK/models" "$WORK/out/x86"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
        [ -e "$f" ] && printf '%s\0' "$f"; done | tar --null -T - -cf -) | tar -xf - -C "$WORK/src"
else
    tar -C "$REPO" --exclude=.git --exclude='*.egg-info' --exclude=build --exclude=.venv -cf - . | tar -xf - -C "$WORK/src"
fi
cp "$MODEL_INT8" "$WORK/models/int8.onnx"
cp "$MODEL_FP32" "$WORK/models/fp32.onnx"
[ -z "$YUNET" ] || cp "$YUNET" "$WORK/models/yunet.onnx"
DETS="none haar"; [ -z "$YUNET" ] || DETS="none haar yunet"
"$HOST_PY" "$REPO/scripts/aarch64_helper.py" images "$WORK/images" ${IMAGES:+--from "$IMAGES" --max "$MAX_IMAGES"} >&2
: > "$WORK/constraints.txt"
if [ $PIN = 1 ]; then
    "$HOST_PY" "$REPO/scripts/aarch64_helper.py" pins "$WORK/constraints.txt" >/dev/null || die "cannot read the host's versions"
    say "pinned to the host's $(tr '\n' ' ' < "$WORK/constraints.txt")"
fi

# the runs, one script for both sides: $1 = agegender-run, $2 = this work folder as that side sees it, $3 = out
cat > "$WORK/runs.sh" <<'EOF'
#!/bin/sh
# agegender-run --json on both models x both detectors; the peak RSS of each run goes to OUT/MODEL-DET.rss
RUN=$1; W=$2; OUT=$3; PY=$4; rc=0
DETS="none haar"; [ -f "$W/models/yunet.onnx" ] && DETS="$DETS yunet"
export OMP_NUM_THREADS=1 AGEGENDER_CACHE_DIR=$OUT/cache AGEGENDER_DETECTOR_URL=http://127.0.0.1:9/none.onnx
unset AGEGENDER_MODEL AGEGENDER_DETECTOR_MODEL
for model in int8 fp32; do
    for det in $DETS; do
        imgs=$det; [ $det = yunet ] && imgs=haar  # the detectors see the same canvases
        set -- --detector "$det"; [ $det = yunet ] && set -- --detector yunet --detector-model "$W/models/yunet.onnx"
        cd "$W/images/$imgs" || exit 2
        "$PY" -c 'import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:], stdin=sys.stdin, stdout=sys.stdout)
open(sys.argv[1], "w").write("%d\n" % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(rc)' "$OUT/$model-$det.rss" "$RUN" --json --threads 1 "$@" --model "$W/models/$model.onnx" - \
            < "$W/images/$imgs.list" > "$OUT/$model-$det.jsonl" 2> "$OUT/$model-$det.err" \
            || { echo "$model/$det: agegender-run exited $?: $(tail -n 3 "$OUT/$model-$det.err")" >&2; rc=1; }
    done
done
exit $rc
EOF

# --------------------------------------------------------------------------- install into the rootfs
VENV=$ROOTFS/opt/agegender
KEY=$(cat "$WORK/constraints.txt" "$REPO/pyproject.toml" | sha256sum | cut -c1-16)
if [ $FRESH_VENV = 1 ] || [ "$(cat "$VENV/.agegender-key" 2>/dev/null)" != "$KEY" ]; then
    rm -rf -- "$VENV"
    stage "creating the venv /opt/agegender in the rootfs"
    in_root "$ROOTFS" /usr/bin/python3 -m venv /opt/agegender || die "python3 -m venv failed in the rootfs"
fi
stage "pip install . in the rootfs (arm64 wheels from the package registry)"
# shellcheck disable=SC2086
in_root "$ROOTFS" $PIP_ENV /bin/sh -c 'cd /mnt/agegender/src && pip install -c /mnt/agegender/constraints.txt .' \
    > "$WORK/pip.log" 2>&1 || { tail -n 25 "$WORK/pip.log" >&2; 
    if [ $PIN = 1 ]; then die "pip install . failed in the arm64 rootfs (the host's versions were pinned: try --no-pin if one has no arm64 wheel)"
    else die "pip install . failed in the arm64 rootfs"; fi; }
echo "$KEY" > "$VENV/.agegender-key"
in_root "$ROOTFS" /opt/agegender/bin/python -c 'import importlib.metadata as m, platform
print("arm64 runtime:", platform.machine(), "python", platform.python_version(), *("%s %s" % (n, m.version(n)) for n in ("agegender", "numpy", "opencv-python-headless", "onnxruntime")))' >&2
in_root "$ROOTFS" /opt/agegender/bin/python -c 'import torch' 2>/dev/null && die "torch got installed in the rootfs: the runtime must not need it"

# --------------------------------------------------------------------------- run both sides
stage "x86: $HOST_RUN"
sh "$WORK/runs.sh" "$HOST_RUN" "$WORK" "$WORK/out/x86" "$HOST_PY" || die "the x86 runs failed"
[ $NATIVE = 1 ] && CPUS=native
for c in $CPUS; do
    [ "$c" = native ] && CPU="" || CPU=$c
    mkdir -p "$WORK/out/arm64-$c"
    stage "arm64 ($c): /opt/agegender/bin/agegender-run"
    in_root "$ROOTFS" /bin/sh /mnt/agegender/runs.sh /opt/agegender/bin/agegender-run /mnt/agegender \
        "/mnt/agegender/out/arm64-$c" /usr/bin/python3 || die "the arm64 ($c) runs failed"
done
CPU=""

# --------------------------------------------------------------------------- compare
stage "comparing x86 and arm64 answers (same faces, boxes, top-1 age and gender; fp32 |dp| <= $TOL)"
"$HOST_PY" "$REPO/scripts/aarch64_helper.py" rss "$WORK/out"
rc=0
for c in $CPUS; do
    echo "== x86 vs arm64 ($c)"
    "$HOST_PY" "$REPO/scripts/aarch64_helper.py" compare "$WORK/out/x86" "$WORK/out/arm64-$c" \
        --tol "$TOL" --box-tol "$BOX_TOL" --detectors "$DETS" || rc=1
done
if [ $rc = 0 ]; then stage "PASS: arm64 ($CPUS) gives the same answers as x86"
else stage "FAIL: arm64 and x86 answers differ"; KEEP=1; fi
exit $rc
