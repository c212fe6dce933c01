#!/usr/bin/env bash
# seqrank container entrypoint: prepare the model repository for the GPU this container runs on, then exec
# tritonserver (PID 1 stays tritonserver, so SIGTERM drains in-flight requests for --exit-timeout-secs).
#
# 1. The exported repository in the image ($SEQRANK_REPOSITORY, read-only) is mirrored into a writable runtime
#    repository ($SEQRANK_WORKDIR/model_repository): symlinks for preprocess/postprocess/seqrank and the version
#    files, the ranker's configs rendered through seqrank.exporting.triton_config (the engine cache path of this container).
# 2. Unless SEQRANK_TRT=off or the CPU configuration is selected, export/build_trt.py builds a TensorRT engine from
#    each ranker/<version>/model.onnx for this GPU, cached in $SEQRANK_TRT_CACHE (a volume) under
#    <gpu name>__trt-<TensorRT version>__onnx-<sha256>__cfg-<settings>: the first start on a GPU type takes minutes,
#    the next ones reuse the plan. Success: the ranker config becomes a tensorrt_plan config (every optimization
#    profile, CUDA graphs unless SEQRANK_CUDA_GRAPHS=0). Failure (no TensorRT module, no GPU, build error): the
#    ONNX Runtime config with the TensorRT execution accelerator stays (SEQRANK_TRT=require makes that fatal).
# 3. With SEQRANK_MODEL_CONTROL=explicit and SEQRANK_WATCH_INTERVAL_S > 0, a watcher in the background checks
#    $SEQRANK_REPOSITORY (a shared volume that `seqrank refresh` writes) every that many seconds. A new release N
#    (preprocess/N, published after ranker/N) is mirrored like step 1 (and built like step 2 when the ranker runs
#    TensorRT plans), then loaded through the repository API on this server: ranker N, and once it is ready,
#    preprocess N (python -m seqrank.server.model_control). One attempt per release; a failure is logged and the
#    previous release keeps serving.
# 4. exec tritonserver with the admin APIs (model load/unload, config, shared memory, statistics, trace, logging)
#    behind the key in SEQRANK_ADMIN_KEY (a random key when unset: then nobody can use them). Inference, health and
#    metadata stay open. Extra arguments are passed to tritonserver.
#
# Environment: SEQRANK_REPOSITORY, SEQRANK_WORKDIR, SEQRANK_TRT_CACHE, SEQRANK_TRT (auto|off|require),
# SEQRANK_TRT_WORKSPACE_MIB, SEQRANK_CUDA_GRAPHS (1|0), SEQRANK_MODEL_CONFIG_NAME (''|h200|cpu|...),
# SEQRANK_MODEL_CONTROL (none|explicit), SEQRANK_WATCH_INTERVAL_S (0 = off), SEQRANK_ADMIN_KEY,
# SEQRANK_PYTHON_SHM_BYTES, SEQRANK_EXIT_TIMEOUT_S, SEQRANK_STORE (read by preprocess), SEQRANK_DRY_RUN=1 (print the
# command, one argument a line, and exit).
# SEQRANK_TRITONSERVER, SEQRANK_PYTHON and SEQRANK_BUILD_TRT point at the binaries (tests use them).
set -Eeuo pipefail
shopt -s nullglob

log() { printf '%s [seqrank-entrypoint] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}

SRC_REPO=${SEQRANK_REPOSITORY:-/opt/seqrank/model_repository}
WORKDIR=${SEQRANK_WORKDIR:-/tmp/seqrank}
TRT_CACHE=${SEQRANK_TRT_CACHE:-/cache/trt}
TRT_MODE=${SEQRANK_TRT:-auto}
TRT_WORKSPACE_MIB=${SEQRANK_TRT_WORKSPACE_MIB:-4096}
CUDA_GRAPHS=${SEQRANK_CUDA_GRAPHS:-1}
CONFIG_NAME=${SEQRANK_MODEL_CONFIG_NAME:-}
CONTROL_MODE=${SEQRANK_MODEL_CONTROL:-none}
WATCH_S=${SEQRANK_WATCH_INTERVAL_S:-0}
SHM_BYTES=${SEQRANK_PYTHON_SHM_BYTES:-16777216}
EXIT_TIMEOUT_S=${SEQRANK_EXIT_TIMEOUT_S:-30}
PYTHON=${SEQRANK_PYTHON:-python3}
BUILD_TRT=${SEQRANK_BUILD_TRT:-/opt/seqrank/export/build_trt.py}
TRITONSERVER=${SEQRANK_TRITONSERVER:-tritonserver}
# The same groups as seqrank.server.triton.RESTRICTED_APIS; "shared-memory" also closes the registration path used
# by the Aug-2025 Python-backend exploit chain (CVE-2025-23319/23320/23334) even where the server is patched.
RESTRICTED_APIS="model-repository,model-config,shared-memory,statistics,trace,logging"

case $TRT_MODE in auto | off | require) ;; *) die "SEQRANK_TRT must be auto, off or require (got '$TRT_MODE')" ;; esac
case $CONTROL_MODE in none | explicit) ;; *) die "SEQRANK_MODEL_CONTROL must be none or explicit" ;; esac
[[ $SHM_BYTES =~ ^[0-9]+$ && $EXIT_TIMEOUT_S =~ ^[0-9]+$ && $TRT_WORKSPACE_MIB =~ ^[0-9]+$ && $WATCH_S =~ ^[0-9]+$ ]] ||
  die "SEQRANK_PYTHON_SHM_BYTES, SEQRANK_EXIT_TIMEOUT_S, SEQRANK_TRT_WORKSPACE_MIB and SEQRANK_WATCH_INTERVAL_S must be integers"
[[ $WATCH_S -eq 0 || $CONTROL_MODE == explicit ]] ||
  die "SEQRANK_WATCH_INTERVAL_S needs SEQRANK_MODEL_CONTROL=explicit (only explicit loads keep the ranker first)"
[[ -f $SRC_REPO/ranker/config.pbtxt && -f $SRC_REPO/seqrank/config.pbtxt ]] ||
  die "$SRC_REPO is not an exported seqrank model repository (run: seqrank export --run RUN --repository DIR)"

# --- 1. the writable runtime repository ------------------------------------------------------------------------------
RUNTIME_REPO=$WORKDIR/model_repository
rm -rf "$RUNTIME_REPO"
mkdir -p "$RUNTIME_REPO"
RANKER=$RUNTIME_REPO/ranker
render_configs() { # the ranker's configs, through the ModelConfig protobuf: the engine cache path of this container
  local pairs=("$SRC_REPO/ranker/config.pbtxt" "$RANKER/config.pbtxt") c
  mkdir -p "$RANKER/configs"
  for c in "$SRC_REPO"/ranker/configs/*.pbtxt; do pairs+=("$c" "$RANKER/configs/${c##*/}"); done
  "$PYTHON" -m seqrank.exporting.triton_config --trt-cache-path "$TRT_CACHE" "${pairs[@]}"
}
mirror_ranker_version() { # ranker/$1: one link per file (step 2 may add this container's model.plan beside them)
  local f
  mkdir -p "$RANKER/$1"
  for f in "$SRC_REPO/ranker/$1"/*; do ln -sfn "$f" "$RANKER/$1/${f##*/}"; done
}
newest_version() { # the highest numbered version directory of the model directory $1 (0: none)
  local best=0 d
  for d in "$1"/*/; do
    d=${d%/}
    d=${d##*/}
    if [[ $d =~ ^[0-9]+$ ]] && ((d > best)); then best=$d; fi
  done
  printf '%s\n' "$best"
}
for model in "$SRC_REPO"/*/; do
  model=${model%/}
  [[ ${model##*/} == ranker ]] || ln -s "$model" "$RUNTIME_REPO/${model##*/}"
done
mkdir -p "$RANKER"
versions=()
for entry in "$SRC_REPO"/ranker/*; do
  base=${entry##*/}
  if [[ $base == config.pbtxt || ($base == configs && -d $entry) ]]; then
    continue # rendered below
  elif [[ -d $entry && $base =~ ^[0-9]+$ ]]; then
    mirror_ranker_version "$base"
    versions+=("$base")
  else
    ln -s "$entry" "$RANKER/$base"
  fi
done
render_configs || die "could not render the ranker configs of $SRC_REPO"
[[ -d $SRC_REPO/ranker/configs ]] || rm -rf "$RANKER/configs"

ACTIVE=$RANKER/config.pbtxt
if [[ -n $CONFIG_NAME && -f $RANKER/configs/$CONFIG_NAME.pbtxt ]]; then
  ACTIVE=$RANKER/configs/$CONFIG_NAME.pbtxt
fi
ENGINE_CONFIG=$WORKDIR/ranker-engine-config.pbtxt # what engines are built from: ACTIVE is replaced by a plan config
cp "$ACTIVE" "$ENGINE_CONFIG"

# --- 2. TensorRT engine for this GPU -----------------------------------------------------------------------------------
trt_reason=""
if [[ $TRT_MODE == off ]]; then
  trt_reason="SEQRANK_TRT=off"
elif [[ $CONFIG_NAME == cpu ]]; then
  trt_reason="CPU configuration selected (SEQRANK_MODEL_CONFIG_NAME=cpu)"
elif ! grep -Eq '^[^#]*kind:[[:space:]]*KIND_GPU' "$ACTIVE"; then
  trt_reason="the active ranker config ${ACTIVE#"$RUNTIME_REPO"/} has no KIND_GPU instance group"
elif [[ ${#versions[@]} -eq 0 ]]; then
  trt_reason="no ranker version directory"
fi

build_engine() { # ranker/$1 -> $RANKER/$1/model.plan for this GPU; sets trt_reason and fails when it cannot
  local onnx=$SRC_REPO/ranker/$1/model.onnx rc=0 out plan
  if [[ ! -f $onnx ]]; then
    trt_reason="ranker/$1 has no model.onnx"
    return 1
  fi
  out=$("$PYTHON" "$BUILD_TRT" --onnx "$onnx" --repository "$SRC_REPO" --config "$ENGINE_CONFIG" \
    --cache-dir "$TRT_CACHE" --fp16 --workspace "$TRT_WORKSPACE_MIB") || rc=$?
  plan=$(printf '%s\n' "$out" | tail -n 1)
  if [[ $rc -eq 0 && -f $plan ]]; then
    rm -f "$RANKER/$1/model.plan"
    ln -s "$plan" "$RANKER/$1/model.plan"
    return 0
  fi
  case $rc in
    0) trt_reason="build_trt.py printed no plan file ('$plan')" ;;
    3) trt_reason="the TensorRT Python module is not installed" ;;
    4) trt_reason="no NVIDIA GPU visible" ;;
    *) trt_reason="the engine build failed (exit $rc, see the log above)" ;;
  esac
  return 1
}

built=0
if [[ -z $trt_reason ]]; then
  mkdir -p "$TRT_CACHE" 2>/dev/null || true
  for v in "${versions[@]}"; do
    build_engine "$v" || break
    built=$((built + 1))
  done
fi

PLAN_MODE=0
if [[ -z $trt_reason && $built -gt 0 ]]; then
  graphs_flag=()
  [[ $CUDA_GRAPHS == 1 ]] || graphs_flag=(--no-cuda-graphs)
  "$PYTHON" "$BUILD_TRT" --plan-config "$ACTIVE" --repository "$SRC_REPO" --config "$ACTIVE" "${graphs_flag[@]}" \
    >"$RANKER/config.pbtxt.plan" || die "could not derive the tensorrt_plan config from $ACTIVE"
  mv "$RANKER/config.pbtxt.plan" "$RANKER/config.pbtxt"
  rm -rf "$RANKER/configs" # --model-config-name must not pick an ONNX Runtime variant for the ranker
  PLAN_MODE=1
  log "ranker: TensorRT engine for this GPU (tensorrt_plan, $built version(s), cuda graphs=$CUDA_GRAPHS)"
else
  for v in "${versions[@]}"; do
    [[ -L $RANKER/$v/model.plan && ! -e $SRC_REPO/ranker/$v/model.plan ]] && rm -f "$RANKER/$v/model.plan"
  done
  [[ $TRT_MODE == require ]] && die "SEQRANK_TRT=require but no TensorRT engine: $trt_reason"
  log "ranker: ${ACTIVE#"$RUNTIME_REPO"/} (no TensorRT engine: $trt_reason)"
fi

# --- 3. tritonserver ----------------------------------------------------------------------------------------------------
if [[ -z ${SEQRANK_ADMIN_KEY:-} ]]; then
  SEQRANK_ADMIN_KEY=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
  log "SEQRANK_ADMIN_KEY is not set: the admin APIs are locked with a random key nobody knows"
fi
[[ $SEQRANK_ADMIN_KEY =~ ^[A-Za-z0-9._~+/-]+$ ]] ||
  die "SEQRANK_ADMIN_KEY may only contain letters, digits and . _ ~ + / -"

cmd=(
  "$TRITONSERVER"
  "--model-repository=$RUNTIME_REPO"
  "--model-control-mode=$CONTROL_MODE"
  "--strict-readiness=true"
  "--exit-on-error=true"
  "--disable-auto-complete-config"
  "--exit-timeout-secs=$EXIT_TIMEOUT_S"
  "--backend-config=python,shm-default-byte-size=$SHM_BYTES"
  "--http-restricted-api=$RESTRICTED_APIS:admin-key=$SEQRANK_ADMIN_KEY"
  "--grpc-restricted-protocol=$RESTRICTED_APIS:admin-key=$SEQRANK_ADMIN_KEY"
)
[[ -n $CONFIG_NAME ]] && cmd+=("--model-config-name=$CONFIG_NAME")
[[ $CONTROL_MODE == explicit ]] && cmd+=("--load-model=*")
cmd+=("$@")

# --- the release watcher (step 3 of the header) -----------------------------------------------------------------------
HTTP_PORT=8000
for ((i = 1; i <= $#; i++)); do
  arg=${!i}
  case $arg in
    --http-port=*) HTTP_PORT=${arg#--http-port=} ;;
    --http-port) ((i < $#)) && j=$((i + 1)) && HTTP_PORT=${!j} ;;
  esac
done
ADMIN_KEY=$SEQRANK_ADMIN_KEY
load_release() { # ranker/$1 into the runtime repository (and its engine), then ranker $1 and preprocess $1 loaded
  mirror_ranker_version "$1"
  if ((PLAN_MODE)); then
    build_engine "$1" || {
      rm -rf "${RANKER:?}/$1"
      log "ERROR: release $1: no TensorRT engine ($trt_reason); version $1 not loaded"
      return 1
    }
  else
    render_configs || return 1 # the CPU ranker's id bound (n_items) follows the grown table
  fi
  SEQRANK_ADMIN_KEY=$ADMIN_KEY "$PYTHON" -m seqrank.server.model_control --server "127.0.0.1:$HTTP_PORT" \
    "ranker:$1" "preprocess:$1"
}
watch_releases() {
  local served v
  served=$(newest_version "$SRC_REPO/preprocess")
  while sleep "$WATCH_S"; do
    v=$(newest_version "$SRC_REPO/preprocess")
    ((v > served)) || continue
    served=$v # one attempt per release
    if [[ ! -d $SRC_REPO/ranker/$v ]]; then
      log "ERROR: release $v: preprocess/$v has no ranker/$v; not loaded"
    elif load_release "$v"; then
      log "release $v loaded: ranker, then preprocess"
    else
      log "ERROR: release $v was not loaded; the previous release keeps serving"
    fi
  done
}

shown=("${cmd[@]//"$SEQRANK_ADMIN_KEY"/<redacted>}")
log "exec ${shown[*]}"
if [[ $WATCH_S -gt 0 ]]; then
  log "watching $SRC_REPO for refreshed releases every ${WATCH_S}s (this server's HTTP port $HTTP_PORT)"
fi
if [[ ${SEQRANK_DRY_RUN:-0} == 1 ]]; then
  printf '%s\n' "${shown[@]}"
  exit 0
fi
if [[ $WATCH_S -gt 0 ]]; then
  watch_releases &
fi
unset SEQRANK_ADMIN_KEY
exec "${cmd[@]}"
