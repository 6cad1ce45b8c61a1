#!/usr/bin/env bash
# One command on a fresh machine, Linux or macOS: as root, as a user (with sudo or
# without), with apt or with no apt at all.
#
#   bash setup.sh              set up, then run the demo   (python demo.py; flags pass through)
#   bash setup.sh --test       set up, then run the tests  (python -m pytest -q tests; or the tests named after it)
#
# Set-up: Debian's fortunes-zh where apt can install it (the README's figures; without it
# the demo runs on the corpus in assets/embedded/), a CJK font for the figures, with --test
# Chromium for the browser test (skipped without it), then requirements.txt into the active
# virtual or conda environment, or else into .venv, made here (python3 -m venv).
set -euo pipefail
cd "$(dirname "$0")"
say() { echo "setup: $*"; }

in_env=${VIRTUAL_ENV:-${CONDA_PREFIX:-}}
packages=()
[ -f /usr/share/games/fortunes/tang300 ] || packages+=(fortunes-zh)
# a CJK font for the figures that label Chinese tokens (visualize.py --inside, the Gradio page's Inside tab)
[ -f /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ] || packages+=(fonts-wqy-microhei)
# --test: headless Chromium and its driver, for the test that drives the Gradio page in a real browser
if [ "${1:-}" = "--test" ] && ! command -v chromedriver >/dev/null 2>&1; then packages+=(chromium chromium-driver); fi
if [ -z "$in_env" ] && [ ! -x .venv/bin/python ] && ! python3 -c "import ensurepip, venv" 2>/dev/null; then
  packages+=(python3-venv)  # Debian's python3 makes no virtual environment without it
fi
if [ ${#packages[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    say "no apt-get here: ${packages[*]} not installed"
  else
    if [ "$(id -u)" = 0 ]; then sudo=(); elif command -v sudo >/dev/null 2>&1; then sudo=(sudo); else sudo=(none); fi
    if [ "${sudo[*]-}" = none ]; then
      say "not root and no sudo: ${packages[*]} not installed"
    else
      say "apt-get install ${packages[*]}"
      { "${sudo[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${packages[@]}"; } \
        || say "apt-get failed: ${packages[*]} not installed"
    fi
  fi
  [ -f /usr/share/games/fortunes/tang300 ] || say "without fortunes-zh the demo runs on the embedded corpus (assets/embedded/)"
  [ -f /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ] \
    || say "without a CJK font the figures draw Chinese tokens as boxes"
fi

if [ -n "$in_env" ]; then
  py=python  # the active environment
else
  [ -x .venv/bin/python ] || { say "making .venv"; python3 -m venv .venv; }
  py=.venv/bin/python
fi
say "$py -m pip install -r requirements.txt"
"$py" -m pip install -q -r requirements.txt
if [ "${1:-}" = "--test" ]; then
  shift
  [ $# -gt 0 ] || set -- tests
  exec "$py" -m pytest -q "$@"
fi
[ "$py" = python ] || say "next time: source .venv/bin/activate, then python demo.py, python sample.py, ..."
exec "$py" demo.py "$@"
