-- `require "loom"` from the stock lua5.4 interpreter, with the environment
-- documented in lua/loom/init.lua: LUA_CPATH points at the built C module
-- ($BUILD/lua/loom/core.so, BUILD defaults to "build") and LUA_PATH at lua/.
package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
local check = require("check")

local root = arg[0]:gsub("tests/lua/[^/]*$", "")
if root == "" then
  root = "."
end
local build = os.getenv("BUILD") or "build"

local function quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

local function run(cmdline)
  local pipe = assert(io.popen(cmdline .. " 2>&1", "r"))
  local out = pipe:read("a")
  local _, _, code = pipe:close()
  return out, code
end

local module = root .. "/" .. build .. "/lua/loom/core.so"
local f = io.open(module, "rb")
check.check(f ~= nil, "the C module " .. module .. " exists (run make first)")
if f then
  f:close()
end
local _, has_lua = run("command -v lua5.4")
check.equal(has_lua, 0, "lua5.4 is installed (apt-get install lua5.4)")

local code = [[
local loom = require("loom")
local t = loom.tensor({{1, 2}, {3, 4}})
print(t:sum():item(), loom.matmul(t, t)[2][2], loom.version, type(loom.nn))
print(tostring(t:narrow(2, 2, 1)))
local big
for i = 1, 50 do big = loom.zeros(1024, 1024) end
collectgarbage()
print(loom.owned_bytes() < 64 * 2 ^ 20)
]]
-- A sanitizer build's module needs the sanitizer runtimes loaded first;
-- `make asan` passes their paths in LOOM_PRELOAD.
local preload = os.getenv("LOOM_PRELOAD") or ""
local cmd = string.format("cd %s && LD_PRELOAD=%s ASAN_OPTIONS=detect_leaks=0 LUA_CPATH=%s LUA_PATH=%s lua5.4 -e %s",
  quote(root), quote(preload), quote(build .. "/lua/?.so;;"), quote("lua/?.lua;lua/?/init.lua;;"), quote(code))
local out, status = run(cmd)
check.equal(status, 0, "lua5.4 runs the script: " .. out)
check.equal(out, "10.0\t22.0\t0.1.0\ttable\n" ..
  "tensor([[2.0000],\n        [4.0000]], dtype=f32, shape=[2, 1])\ntrue\n", "results under lua5.4")

check.summary()
