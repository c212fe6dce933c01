#!/usr/bin/env bash
# tritonserver (or, with --perf-analyzer as the first argument, perf_analyzer) from the pip wheels, started with the
# environment seqrank.server.triton builds (LD_LIBRARY_PATH with the wheel libraries, the venv's bin first on PATH so
# the Python backend stub imports the venv's packages). For model_analyzer's triton_server_path / perf_analyzer_path
# (perf/model_analyzer.yaml; perf/perf_analyzer_wrapper.sh calls this with --perf-analyzer).
#
# tritonserver also gets --backend-directory (the Python backend with the Python 3.11 stub, built once by
# seqrank.server.triton.backend_directory) unless the caller passes one.
# SEQRANK_PYTHON overrides the interpreter (default: the repository's .venv).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
py="${SEQRANK_PYTHON:-$root/.venv/bin/python}"
mode=server
if [[ "${1:-}" == "--perf-analyzer" ]]; then
  mode=perf_analyzer
  shift
fi
setup="$(cd "$root" && "$py" - "$mode" <<'PY'
import shlex
import sys

from seqrank.server import triton as t

mode = sys.argv[1]
env = t.server_env() if mode == "server" else t.perf_analyzer_env()
for key in ("LD_LIBRARY_PATH", "PATH"):
    print(f"export {key}={shlex.quote(env[key])}")
if mode == "server":
    print(f"binary={shlex.quote(str(t.tritonserver_binary()))}")
    print(f"backend_dir={shlex.quote(str(t.backend_directory()))}")
else:
    print(f"binary={shlex.quote(str(t.perf_analyzer_binary()))}")
PY
)"
binary=""
backend_dir=""
eval "$setup"
if [[ "$mode" == server ]]; then
  args=("$@")
  has_backend_dir=0
  for a in "$@"; do
    [[ "$a" == --backend-directory* ]] && has_backend_dir=1
  done
  if (( ! has_backend_dir )); then
    args+=("--backend-directory=${backend_dir}")
  fi
  exec "$binary" "${args[@]}"
fi
exec "$binary" "$@"
