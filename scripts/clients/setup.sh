#!/usr/bin/env bash
# Install the client programs that `make test-clients` drives, in venvs of their
# own under .cache/clients/ (git-ignored), never in .venv.
#
# Idempotent: each venv carries a stamp of what was asked for it; a second run
# with nothing changed only checks the stamps (a second). What it installs:
#   .cache/clients/light-venv    the light client libraries, to record their
#                                requests with scripts/clients/record.py:
#                                ollama openai anthropic langchain-ollama litellm
#                                llama-index-llms-ollama llama-index-core
#   .cache/clients/openwebui-venv  Open WebUI (about 7 GB with its ML stack,
#                                several minutes) and Playwright's Python
#                                package (its driver only: no browser download)
#   chromium                     Debian's, with apt-get, non-interactively,
#                                only when missing (needs root)
#
# Environment: PYTHON (interpreter for the venvs, >= 3.11 and < 3.13 for Open
# WebUI), OPENWEBUI_SPEC (pip requirement, default "open-webui"),
# CLIENTS_SKIP_OPENWEBUI=1 (light clients only).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$(pwd)
CLIENTS="$ROOT/.cache/clients"
LIGHT="$CLIENTS/light-venv"
HEAVY="$CLIENTS/openwebui-venv"
OPENWEBUI_SPEC=${OPENWEBUI_SPEC:-open-webui}
LIGHT_PKGS=(ollama openai anthropic langchain-ollama litellm llama-index-llms-ollama llama-index-core)
HEAVY_PKGS=("$OPENWEBUI_SPEC" playwright)

say() { printf 'clients-setup: %s\n' "$*"; }
die() { printf 'clients-setup: error: %s\n' "$*" >&2; exit 1; }

pick_python() {
    for candidate in ${PYTHON:-} python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c \
            'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] < (3, 13) else 1)' 2>/dev/null; then
            command -v "$candidate"
            return
        fi
    done
    die "need Python 3.11 or 3.12 (Open WebUI's range); set PYTHON=/path/to/python3.11"
}

# venv DIR PKG...: create DIR and install PKG... into it unless its stamp says it has them.
venv() {
    local dir=$1; shift
    local want; want=$(printf '%s\n' "$@")
    if [[ -x "$dir/bin/python" && -f "$dir/.stamp" && "$(cat "$dir/.stamp")" == "$want" ]]; then
        say "$(basename "$dir"): up to date"
        return
    fi
    [[ -x "$dir/bin/python" ]] || "$(pick_python)" -m venv "$dir"
    say "$(basename "$dir"): installing $* (this can take minutes)"
    local t0=$SECONDS
    "$dir/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    "$dir/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v 'is ignored: it is neither' || true
    # pip's exit status is lost in the pipe above: check that the packages are there.
    "$dir/bin/python" -m pip check >/dev/null 2>&1 || say "warning: pip check reports conflicts in $dir"
    local pkg
    for pkg in "$@"; do
        pkg=${pkg%%[<>=!~ ;]*}
        "$dir/bin/python" -m pip show -q "$pkg" >/dev/null 2>&1 || die "$pkg did not install into $dir"
    done
    printf '%s\n' "$want" >"$dir/.stamp"
    say "$(basename "$dir"): installed in $((SECONDS - t0))s"
}

mkdir -p "$CLIENTS"
venv "$LIGHT" "${LIGHT_PKGS[@]}"

if [[ "${CLIENTS_SKIP_OPENWEBUI:-0}" == "1" ]]; then
    say "Open WebUI: skipped (CLIENTS_SKIP_OPENWEBUI=1)"
    exit 0
fi
venv "$HEAVY" "${HEAVY_PKGS[@]}"

# Debian's chromium, for Playwright to drive (Playwright's own browser download
# needs a CDN this machine cannot reach).
if command -v chromium >/dev/null 2>&1; then
    say "chromium: $(chromium --version 2>/dev/null || echo present)"
elif [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    say "chromium: installing with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || say "apt-get update failed; trying the install anyway"
    apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null \
        || die "could not install chromium"
    say "chromium: $(chromium --version 2>/dev/null)"
else
    die "chromium is missing and cannot be installed here (not root or no apt-get): install Debian's chromium"
fi
say "versions: $("$LIGHT/bin/python" -m pip list 2>/dev/null | grep -iE '^(ollama|openai|anthropic|langchain-ollama|litellm|llama-index-llms-ollama) ' | tr -s ' ' | paste -sd, -)"
say "versions: $("$HEAVY/bin/python" -m pip list 2>/dev/null | grep -iE '^(open-webui|playwright) ' | tr -s ' ' | paste -sd, -)"
