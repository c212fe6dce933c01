#!/usr/bin/env bash
# perf_analyzer from the tritonclient wheel with its libraries on LD_LIBRARY_PATH (model_analyzer's perf_analyzer_path).
exec "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/tritonserver_wrapper.sh" --perf-analyzer "$@"
