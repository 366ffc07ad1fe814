#!/bin/sh
# Run every test program of the suite and add up their "N passed, N failed"
# lines: the C unit tests, the Lua tests and the parity runner over the
# reference cases in tests/golden. Exits non-zero when anything failed or a
# test program ended without its summary line.
BUILD=${BUILD:-build}
LOOM=${LOOM:-bin/loom}
total_pass=0
total_fail=0
log=$(mktemp)
trap 'rm -f "$log"' EXIT

run() {
    name=$1; shift
    "$@" >"$log" 2>&1
    rc=$?
    line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1)
    if [ -z "$line" ]; then
        cat "$log"
        echo "$name: no summary line (exit status $rc)"
        total_fail=$((total_fail + 1))
        return
    fi
    p=$(echo "$line" | sed 's/^\([0-9]*\) passed, \([0-9]*\) failed.*/\1/')
    f=$(echo "$line" | sed 's/^\([0-9]*\) passed, \([0-9]*\) failed.*/\2/')
    if [ "$f" != 0 ] || [ "$rc" != 0 ]; then
        cat "$log"
        [ "$f" = 0 ] && f=1
    fi
    echo "$name: $p passed, $f failed"
    total_pass=$((total_pass + p))
    total_fail=$((total_fail + f))
}

for t in "$BUILD"/tests/test_*; do
    [ -x "$t" ] && run "$(basename "$t")" "$t"
done
for t in tests/lua/test_*.lua; do
    [ -f "$t" ] && run "$(basename "$t")" "$LOOM" "$t"
done
# No Lua file may read or write an undefined global (luacheck's W1xx codes).
if command -v luacheck >/dev/null 2>&1; then
    if luacheck --no-color -q lua/loom scripts tests bench --only 1 >"$log" 2>&1; then
        echo "luacheck globals: 1 passed, 0 failed"
        total_pass=$((total_pass + 1))
    else
        cat "$log"
        echo "luacheck globals: 0 passed, 1 failed"
        total_fail=$((total_fail + 1))
    fi
else
    echo "luacheck globals: 0 passed, 1 failed (luacheck is not installed: apt-get install lua-check)"
    total_fail=$((total_fail + 1))
fi

if [ -f tests/parity.lua ] && [ -d tests/golden ]; then
    run parity "$LOOM" tests/parity.lua tests/golden/*
fi

echo "$total_pass passed, $total_fail failed"
[ "$total_fail" = 0 ]
