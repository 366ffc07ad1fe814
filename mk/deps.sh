#!/bin/sh
# Check (or install) the Debian packages behind the pkg-config modules Loom
# builds against. `check` fails with the exact apt-get line when one is
# missing, installing it first when running as root; `install` always installs.
set -e
mode=$1; shift
pkg_for() {
    case $1 in
        lua5.4) echo liblua5.4-dev ;;
        openblas) echo libopenblas-openmp-dev ;;
        libuv) echo libuv1-dev ;;
        libjpeg) echo libjpeg62-turbo-dev ;;
        libcjson) echo libcjson-dev ;;
        stb) echo libstb-dev ;;
        readline) echo libreadline-dev ;;
        zlib) echo zlib1g-dev ;;
        *) echo "$1" ;;
    esac
}
missing=""
command -v pkg-config >/dev/null 2>&1 || missing="pkg-config"
command -v cc >/dev/null 2>&1 || missing="$missing gcc make"
for m in "$@"; do
    if ! pkg-config --exists "$m" 2>/dev/null; then
        missing="$missing $(pkg_for "$m")"
    fi
done
# lua5.4 interpreter, used by the tests that load Loom from a stock Lua.
command -v lua5.4 >/dev/null 2>&1 || missing="$missing lua5.4"
# luacheck, which the suite runs to keep Lua modules free of globals.
command -v luacheck >/dev/null 2>&1 || missing="$missing lua-check"
[ -z "$missing" ] && exit 0
line="apt-get install -y$missing"
if [ "$(id -u)" = 0 ]; then
    echo "loom: installing missing packages:$missing" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 && apt-get install -y -qq $missing >&2
    exit 0
fi
echo "loom: missing packages:$missing" >&2
echo "loom: install them as root with: sudo $line" >&2
exit 1
