-- The collector sees the memory held by tensors: a loop that allocates
-- 10000 tensors of 4 MiB without calling collectgarbage stays under 200 MiB
-- resident (bench/gc_loop.lua, run in its own process so that nothing else
-- counts toward its peak), and t:free() returns memory at once.
package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
local check = require("check")
local loom = require("loom")

local LIMIT_MIB = 200
local root = arg[0]:gsub("tests/lua/[^/]*$", "")
local interpreter = arg[-1]

local cmd = string.format("%q %q 10000 2>&1", interpreter, root .. "bench/gc_loop.lua")
local pipe = assert(io.popen(cmd, "r"))
local output = pipe:read("a")
local ok = pipe:close()
check.check(ok, "bench/gc_loop.lua exits with status 0: " .. output)
local peak, asan = output:match("peak_rss_mib=([%d.]+) asan=(%d)")
check.check(peak ~= nil, "gc_loop prints its peak: " .. output)
if asan == "1" then
  io.write("NOTE: under AddressSanitizer the quarantine holds freed memory; peak not compared\n")
elseif peak then
  check.check(tonumber(peak) < LIMIT_MIB,
    string.format("peak RSS %.1f MiB is below %d MiB", tonumber(peak), LIMIT_MIB))
end

-- free() gives the storage back immediately, without a collection.
local before = loom.owned_bytes()
local t = loom.zeros(256, 1024)
check.equal(loom.owned_bytes() - before, 256 * 1024 * 4, "owned bytes grow by the tensor size")
t:free()
check.equal(loom.owned_bytes(), before, "free() releases the storage at once")

-- A view keeps the storage alive after its base is released.
local base = loom.zeros(256, 1024)
local view = base:narrow(1, 1, 1)
base:free()
check.equal(loom.owned_bytes() - before, 256 * 1024 * 4, "a view keeps the storage")
view:free()
check.equal(loom.owned_bytes(), before, "releasing the last view frees the storage")

check.summary()
