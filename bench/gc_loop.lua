-- Allocate many 4 MiB tensors in a loop that never calls collectgarbage and
-- print the peak resident size (VmHWM from /proc/self/status), to show that
-- the binding's GC pacing keeps memory flat. Usage:
--   bin/loom bench/gc_loop.lua [count]      (default 10000)
local loom = require("loom")

local count = tonumber(arg and arg[1]) or 10000

-- Peak resident set size of this process in KiB.
local function peak_rss_kib()
  local f = assert(io.open("/proc/self/status", "r"))
  local text = f:read("a")
  f:close()
  return tonumber(text:match("VmHWM:%s*(%d+)"))
end

-- AddressSanitizer keeps freed memory in quarantine, so under it the peak
-- does not measure the pacing. Report it so that callers can tell.
local function under_asan()
  local f = io.open("/proc/self/maps", "r")
  if not f then
    return false
  end
  local maps = f:read("a")
  f:close()
  return maps:find("libasan", 1, true) ~= nil
end

local start_rss = peak_rss_kib()
local start = os.clock()
for _ = 1, count do
  local t = loom.zeros(1024, 1024) -- 4 MiB of f32
end
-- The same through an operator result: x + 1 allocates 4 MiB each time.
local x = loom.zeros(1024, 1024)
for _ = 1, count // 5 do
  local y = x + 1
end
local seconds = os.clock() - start
local peak = peak_rss_kib()
print(string.format("gc_loop: %d zeros and %d additions of 4 MiB in %.2f s CPU; peak RSS %.1f MiB (%.1f MiB at start)",
  count, count // 5, seconds, peak / 1024, start_rss / 1024))
print(string.format("peak_rss_mib=%.1f asan=%s", peak / 1024, under_asan() and 1 or 0))
