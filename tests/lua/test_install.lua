-- `make install PREFIX=...` into a temporary prefix: the library, the public
-- headers and pkg-config file (a C program builds and runs against them),
-- the executable, and the Lua modules found by the installed bin/loom.
package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
local check = require("check")

local root = arg[0]:gsub("tests/lua/[^/]*$", "")
if root == "" then
  root = "."
end
local build = os.getenv("BUILD") or "build"
local loom_bin = os.getenv("LOOM") or "bin/loom"

local function quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

local function run(cmdline)
  local pipe = assert(io.popen(cmdline .. " 2>&1", "r"))
  local out = pipe:read("a")
  local _, _, code = pipe:close()
  return out, code
end

local prefix = os.tmpname()
os.remove(prefix)

local out, status = run(string.format("cd %s && make -s BUILD=%s LOOM=%s install PREFIX=%s", quote(root),
  quote(build), quote(loom_bin), quote(prefix)))
check.equal(status, 0, "make install succeeds: " .. out)

for _, path in ipairs({"lib/libloom.a", "lib/libloom.so", "lib/pkgconfig/loom.pc", "include/loom/loom.h",
    "include/loom/tensor.h", "bin/loom", "lib/lua/5.4/loom/core.so", "share/lua/5.4/loom/init.lua"}) do
  local f = io.open(prefix .. "/" .. path, "rb")
  check.check(f ~= nil, "installed " .. path)
  if f then
    f:close()
  end
end
local internal = io.open(prefix .. "/include/loom/ops_internal.h", "rb")
check.check(internal == nil, "internal headers are not installed")
if internal then
  internal:close()
end

-- A C program built with the installed pkg-config file.
local csrc = prefix .. "/probe.c"
local f = assert(io.open(csrc, "w"))
f:write([[
#include <loom.h>
#include <stdio.h>
int main(void) {
    loom_tensor t = LOOM_TENSOR_EMPTY, p = LOOM_TENSOR_EMPTY;
    int64_t shape[2] = {2, 3};
    if (loom_tensor_zeros(&t, LOOM_BF16, 2, shape) != LOOM_OK)
        return 1;
    /* Pull in the operators (OpenBLAS, OpenMP) and the PyTorch reader (zlib). */
    loom_tensor_fill(&t, 1);
    if (loom_matmul(&p, &t, &t) == LOOM_OK || loom_checkpoint_format("/nonexistent") != -1)
        return 2;
    printf("%s\n", loom_shape_str(&t).s);
    loom_tensor_free(&t);
    return 0;
}
]])
f:close()
-- Under `make asan` the library is instrumented, so the probe links the
-- sanitizer runtimes too.
local sanitize = os.getenv("LOOM_PRELOAD") and "-fsanitize=address,undefined" or ""
out, status = run(string.format(
  "cc %s %s -o %s/probe $(PKG_CONFIG_PATH=%s pkg-config --cflags --libs loom) && LD_LIBRARY_PATH=%s %s/probe",
  sanitize, quote(csrc), quote(prefix), quote(prefix .. "/lib/pkgconfig"), quote(prefix .. "/lib"), quote(prefix)))
check.equal(out, "bf16[2, 3]\n", "C program against the installed library (status " .. tostring(status) .. ")")

-- The same program linked statically against libloom.a with the private
-- libraries that `pkg-config --static` lists.
if sanitize == "" then
  out, status = run(string.format(
    "cc %s -I%s %s/lib/libloom.a $(PKG_CONFIG_PATH=%s pkg-config --libs --static loom | sed 's/-lloom//') -o %s/probe_static && %s/probe_static",
    quote(csrc), quote(prefix .. "/include/loom"), quote(prefix), quote(prefix .. "/lib/pkgconfig"), quote(prefix),
    quote(prefix)))
  check.equal(out, "bf16[2, 3]\n", "static link with pkg-config --static (status " .. tostring(status) .. ")")
end

-- The installed executable finds the installed Lua modules from any directory.
out, status = run(string.format("cd / && %s/bin/loom -e %s", quote(prefix),
  quote("print(loom.nn ~= nil, loom.llava ~= nil, (loom.zeros(2, 2) + 1):sum():item())")))
check.equal(out, "true\ttrue\t4.0\n", "installed bin/loom loads its modules (status " .. tostring(status) .. ")")

run("rm -rf " .. quote(prefix))
check.summary()
