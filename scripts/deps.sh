#!/usr/bin/env bash
# Installs the Debian packages MoI Studio needs, only those missing. Sourced by scripts/studio and
# scripts/test; safe to run again.
#   build: a C compiler and pkg-config (onig, zstd are built from source by cargo)
#   run:   OpenGL/EGL (Mesa) and the X11/Wayland client libraries eframe loads at start
set -euo pipefail

moi_need_packages() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "Installing Debian packages: ${missing[*]}" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  fi
}

MOI_BUILD_PACKAGES=(gcc g++ make pkg-config python3)
MOI_RUN_PACKAGES=(libgl1 libegl1 libgl1-mesa-dri libx11-6 libx11-xcb1 libxcursor1 libxrandr2 libxi6 libxkbcommon0 libxkbcommon-x11-0 libwayland-client0)
