#!/usr/bin/env bash
# Headless-Chromium screenshots of the built HTML book, for checking pages
# without a browser (math typeset, widgets drawn, solutions hidden).
#
#   bash scripts/screenshot.sh [-b BUILD_HTML] [-o OUT_DIR] [-s WIDTHxHEIGHT] [PAGE ...]
#
# BUILD_HTML defaults to _build/html, OUT_DIR to _build/screenshots, the size to
# 1280x1500. PAGE is a path relative to BUILD_HTML (book/10_summary.html), with
# or without .html; with no PAGE every page under BUILD_HTML/book is shot.
# Each PAGE becomes OUT_DIR/<name>.png. Set INSTALL_CHROMIUM=1 to apt-get
# install Debian's chromium when it is missing (needs root and the network).
set -euo pipefail
cd "$(dirname "$0")/.."

html=_build/html out=_build/screenshots size=1280,1500
while getopts "b:o:s:h" opt; do
  case $opt in
    b) html=$OPTARG ;;
    o) out=$OPTARG ;;
    s) size=${OPTARG/x/,} ;;
    h) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))

browser=""
for name in chromium chromium-browser google-chrome; do
  if command -v "$name" >/dev/null 2>&1; then browser=$name; break; fi
done
if [ -z "$browser" ]; then
  if [ "${INSTALL_CHROMIUM:-0}" = 1 ]; then
    apt-get update && apt-get install -y chromium
    browser=chromium
  else
    echo "error: no chromium found; install it (apt-get install -y chromium) or" \
         "rerun with INSTALL_CHROMIUM=1" >&2
    exit 1
  fi
fi

if [ ! -d "$html" ]; then
  echo "error: $html does not exist; build the book first (bash scripts/book.sh)" >&2
  exit 1
fi
html=$(cd "$html" && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)

pages=("$@")
if [ ${#pages[@]} -eq 0 ]; then
  while IFS= read -r page; do pages+=("${page#"$html"/}"); done \
    < <(find "$html/book" -name '*.html' | sort)
fi

profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
status=0
for page in "${pages[@]}"; do
  page=${page%.html}.html
  if [ ! -f "$html/$page" ]; then
    echo "missing: $html/$page" >&2
    status=1
    continue
  fi
  png="$out/$(basename "${page%.html}").png"
  # --virtual-time-budget lets MathJax and the widget manager finish before the
  # capture; the other flags keep Chromium off the network and quiet.
  "$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --hide-scrollbars --user-data-dir="$profile" --virtual-time-budget=5000 \
    --window-size="$size" --screenshot="$png" "file://$html/$page" \
    >/dev/null 2>&1 || true
  if [ -s "$png" ]; then
    echo "$png"
  else
    echo "failed: $page" >&2
    status=1
  fi
done
exit $status
