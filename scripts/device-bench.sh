#!/usr/bin/env bash
# The GPU half of the benchmark on a lent device machine (see DEVELOPERS.md, "The GPU machine").
#
# That machine has torch and a CPU-only onnxruntime, no registry access, and each call carries at most
# 64 MiB. onnxruntime-gpu's wheel is about 255 MB, so it travels as xz-compressed parts, one per call,
# calls back to back (a warm machine keeps /tmp between calls).
#
#   here:   scripts/device-bench.sh pack          # download and split into .devcarry1..N (git-excluded)
#   there:  scripts/device-bench.sh unpack I N    # call I of N, carrying .devcarry<I>; the last one installs
#   there:  scripts/device-bench.sh bench [FRAMES] # export the models, run bench --device cpu,cuda into $OUT
#           (DEVICE_REVISION=$(git rev-parse HEAD) of a clean tree names the commit in the JSON)
#   there:  scripts/device-bench.sh streams        # bench --streams 1,2,4,8 on CUDA (issue 19's 5x target)
#   there:  scripts/device-bench.sh families [N]   # gradcam on CUDA for mobilenet_v3_large, convnext_tiny, swin_t,
#           vit_b_16 (issue 14): export --arch (random weights), run N frames of the video, logs into $OUT
#
# Each "there" step is one device call; the last part and the bench can share a call:
#   scripts/device-bench.sh unpack 4 4 && scripts/device-bench.sh bench
set -euo pipefail
cd "$(dirname "$0")/.."

ORT_GPU_VERSION=${ORT_GPU_VERSION:-1.31.1}
PART_MB=${PART_MB:-55}         # each call also carries the working tree (about 1 MB)
STAGE=${DEVICE_STAGE:-/tmp/realtime-cam-device}  # on the device machine: survives between calls while it is warm
SITE=$STAGE/site

pack() {
    work=$(mktemp -d)  # global: the trap runs after this function has returned
    trap 'rm -rf "$work"' EXIT
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$work" "onnxruntime-gpu==$ORT_GPU_VERSION" "onnxconverter-common>=1.14" \
        "av>=18" "threadpoolctl>=3.1"  # PyAV (video files, NVENC) and threadpoolctl: runtime needs the image lacks
    mkdir -p "$work/site"
    (cd "$work/site" && for w in "$work"/*.whl; do python3 -m zipfile -e "$w" .; done)
    # The TensorRT provider is not used (and needs TensorRT, which the machine lacks): it is a third of the wheel.
    rm -f "$work"/site/onnxruntime/capi/libonnxruntime_providers_tensorrt.so
    rm -rf .devcarry*/
    tar -C "$work/site" -cf - . | xz -T0 -6 | split -b "${PART_MB}M" -d -a 2 - "$work/part."
    local count=0
    mkdir -p .git/info
    for p in "$work"/part.*; do
        count=$((count + 1))
        mkdir -p ".devcarry$count"
        mv "$p" ".devcarry$count/part"
        grep -qx "/.devcarry$count/" .git/info/exclude 2>/dev/null || echo "/.devcarry$count/" >>.git/info/exclude
    done
    # The source of the CPU runs in docs/benchmarks.md travels with the first part (500 kB).
    cp "${SOURCE:-../shared/data/videos/bottle-detection.mp4}" .devcarry1/source.mp4
    echo "packed onnxruntime-gpu $ORT_GPU_VERSION into $count parts: .devcarry1..$count"
    echo "on the device, call I carries [\".devcarry<I>\"] and runs: bash scripts/device-bench.sh unpack I $count"
}

unpack() {
    local index=$1 count=$2
    mkdir -p "$STAGE"
    [ -f ".devcarry$index/part" ] || { echo "device-bench: .devcarry$index/part was not carried" >&2; exit 1; }
    cp ".devcarry$index/part" "$STAGE/part.$index"
    if [ -f ".devcarry$index/source.mp4" ]; then cp ".devcarry$index/source.mp4" "$STAGE/source.mp4"; fi
    echo "part $index of $count is in $STAGE"
    if [ "$index" = "$count" ]; then
        for i in $(seq 1 "$count"); do
            [ -f "$STAGE/part.$i" ] || { echo "device-bench: part $i is missing: the machine went back between calls; start again from part 1" >&2; exit 1; }
        done
        rm -rf "$SITE" && mkdir -p "$SITE"
        for i in $(seq 1 "$count"); do cat "$STAGE/part.$i"; done | xz -d | tar -C "$SITE" -xf -
        rm -f "$STAGE"/part.*
        PYTHONPATH=$SITE python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
        PYTHONPATH=$SITE python3 -c "import av; print('av', av.__version__, 'h264_nvenc' in av.codecs_available)"
    fi
}

# Sets out, cam, m and source for the steps below: the project copied afresh, the models' folder, the video.
setup() {
    out=${OUT:-$STAGE/out}
    [ -d "$SITE/onnxruntime" ] || { echo "device-bench: onnxruntime-gpu is not unpacked yet (run unpack first)" >&2; exit 1; }
    # The package as pyproject.toml lays it out (export/ installs as realtime_cam.export), copied afresh: no
    # build step, whatever setuptools the machine has.
    rm -rf "$STAGE/project" && mkdir -p "$STAGE/project"
    cp -r realtime_cam "$STAGE/project/"
    cp -r export "$STAGE/project/realtime_cam/export"
    export PYTHONPATH=$STAGE/project:$SITE PYTHONUNBUFFERED=1
    mkdir -p "$out" "$STAGE/models"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt" || true
    # -P: the copy above, not the working tree's realtime_cam/ (which lacks realtime_cam.export).
    cam="python3 -P -m realtime_cam" m=$STAGE/models source=()
    # Without a carried video, bench makes a synthetic clip of bottle-detection.mp4's size.
    if [ -f "$STAGE/source.mp4" ]; then source=(--source "$STAGE/source.mp4"); fi
}

# The copy setup made is no checkout, so bench cannot name its commit: the caller does (DEVICE_REVISION=SHA,
# the commit of a clean tree that was sent), and the JSON says who recorded it.
stamp() {
    [ -n "${DEVICE_REVISION:-}" ] || return 0
    python3 - "$1" "$DEVICE_REVISION" <<'PY'
import json, sys
path, commit = sys.argv[1], sys.argv[2]
with open(path, encoding="utf-8") as f:
    report = json.load(f)
report.setdefault("environment", {})["git"] = {"commit": commit, "dirty": False,
                                               "recorded_by": "scripts/device-bench.sh (DEVICE_REVISION)"}
with open(path, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
PY
}

resnet18() {
    [ -f "$m/r18.onnx" ] || $cam export --weights none --output "$m/r18.onnx"
}

bench() {
    local frames=${1:-500}
    setup
    resnet18
    $cam export --from-onnx "$m/r18.onnx" --fp16 --output "$m/r18-fp16.onnx"
    $cam bench --model "$m/r18.onnx" --model "$m/r18-fp16.onnx" "${source[@]}" --device cpu,cuda \
        --frames "$frames" --json "$out/h200.json" --plot "$out/h200.png" 2>&1 | tee "$out/h200.log"
    stamp "$out/h200.json"
}

streams() {
    setup
    resnet18
    $cam bench --model "$m/r18.onnx" --streams 1,2,4,8 --device "${DEVICE:-cuda}" "${source[@]}" \
        --json "$out/h200-streams.json" 2>&1 | tee "$out/h200-streams.log"
    stamp "$out/h200-streams.json"
}

families() {
    local frames=${1:-300} arch
    setup
    [ ${#source[@]} -gt 0 ] || { echo "device-bench: families needs the carried video (.devcarry1)" >&2; exit 1; }
    for arch in ${ARCHS:-mobilenet_v3_large convnext_tiny swin_t vit_b_16}; do
        # One family failing (its export, or CUDA) is logged and the next one goes on.
        { $cam export --arch "$arch" --weights none --output "$m/$arch.onnx" &&
          $cam run --model "$m/$arch.onnx" --device "${DEVICE:-cuda}" --method gradcam "${source[@]}" \
              --output "$STAGE/$arch-gradcam.mp4" --no-display --max-frames "$frames"; } >"$out/$arch.log" 2>&1 ||
            echo "device-bench: $arch failed (exit $?), see $arch.log" | tee -a "$out/$arch.log"
        tail -n 3 "$out/$arch.log"
    done
}

case "${1:-}" in
    pack) pack ;;
    unpack) unpack "${2:?part index}" "${3:?part count}" ;;
    bench) bench "${2:-500}" ;;
    streams) streams ;;
    families) families "${2:-300}" ;;
    *) sed -n '2,16p' "$0"; exit 2 ;;
esac
