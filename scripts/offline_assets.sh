#!/usr/bin/env bash
# Fetch the three JavaScript files the HTML book needs to work offline (no CDN):
#   _offline/tex-svg.js    MathJax 3, TeX to SVG, with every TeX extension built in
#                          (MathJax's tex-svg-full.js: the plain tex-svg.js would
#                          fetch extensions such as \boldsymbol at run time, and a
#                          failed fetch leaves the whole page's math untypeset)
#   _offline/require.js    RequireJS (loads the widget manager)
#   _offline/embed-amd.js  @jupyter-widgets/html-manager (renders saved widget state)
# _config.yml names them in html_static_path, mathjax_path and nb_ipywidgets_js.
# Uses `npm pack` (tarballs only, no dependency tree), then extracts one file
# from each. Idempotent: does nothing when the files are present and were made
# from the pinned versions below (recorded in _offline/ASSETS). Fails loudly
# when npm or the extraction fails. _offline/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=_offline
# package@version  path-inside-tarball  file-name-in-_offline
ASSETS="\
mathjax@3.2.2 package/es5/tex-svg-full.js tex-svg.js
requirejs@2.3.4 package/require.js require.js
@jupyter-widgets/html-manager@1.0.6 package/dist/embed-amd.js embed-amd.js"

present=1
while read -r _ _ name; do
  [ -s "$DEST/$name" ] || present=0
done <<<"$ASSETS"
if [ $present = 1 ] && [ "$(cat "$DEST/ASSETS" 2>/dev/null)" = "$ASSETS" ]; then
  echo "offline assets present in $DEST/ (delete it to fetch again)"
  exit 0
fi

if ! command -v npm >/dev/null 2>&1; then
  echo "error: npm not found; install Node.js (npm) to fetch the offline JS" >&2
  exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$DEST"
rm -f "$DEST/ASSETS"
while read -r spec inner name; do
  # npm pack prints the tarball's file name on its last stdout line.
  if ! tarball=$(cd "$tmp" && npm pack --loglevel=error "$spec" | tail -n 1) \
      || [ -z "$tarball" ] || [ ! -f "$tmp/$tarball" ]; then
    echo "error: 'npm pack $spec' failed (is the npm registry reachable?)" >&2
    exit 1
  fi
  if ! tar --no-same-owner -xzf "$tmp/$tarball" -C "$tmp" "$inner"; then
    echo "error: $inner not found in $tarball" >&2
    exit 1
  fi
  # Write to a temporary name and rename, so an interrupted run never leaves a
  # truncated file in place.
  mv "$tmp/$inner" "$DEST/$name.part"
  mv "$DEST/$name.part" "$DEST/$name"
  rm -rf "$tmp/package"
  echo "fetched $spec ${inner#package/} -> $DEST/$name ($(du -h "$DEST/$name" | cut -f1))"
done <<<"$ASSETS"
# Written last: its presence means every file above is complete.
printf '%s\n' "$ASSETS" >"$DEST/ASSETS"
