#!/usr/bin/env bash
# Install the system (Debian/Ubuntu) packages seqrank needs outside the Python venv.
#   libpython3.11  - the Python backend stub (triton_python_backend_stub) links the system libpython3.11
#   libb64-0d      - perf_analyzer (tritonclient wheel) links libb64.so.0d
#   redis-server   - the online feature store used by preprocess and the integration tests
# Idempotent: does nothing when everything is already installed. Used by `make install` and CI.
set -euo pipefail

PACKAGES=(libpython3.11 libb64-0d redis-server)

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    echo "install_system.sh: dpkg/apt-get not found; install these packages with your system's package manager: ${PACKAGES[*]}" >&2
    exit 1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
    if [[ "$status" == "install ok installed" ]]; then
        echo "install_system.sh: $pkg is already installed"
    else
        missing+=("$pkg")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install_system.sh: nothing to do"
    exit 0
fi

SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        echo "install_system.sh: not root and sudo is not available; as root run: apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
fi

echo "install_system.sh: missing: ${missing[*]}"
echo "install_system.sh: running: ${SUDO[*]} apt-get update"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update
echo "install_system.sh: running: ${SUDO[*]} apt-get install -y --no-install-recommends ${missing[*]}"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends "${missing[@]}"
echo "install_system.sh: installed: ${missing[*]}"
