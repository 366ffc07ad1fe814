-- Helpers for Lua benchmarks that report each figure beside the bound it
-- measured in the same run. They give a wall clock, the sgemm rate through
-- loom.matmul, instruction peaks, the streaming-read bandwidth over given
-- tensors, the CPU time other processes took during a measurement,
-- resident memory and a description of the machine. The clock, the peaks
-- and the read come from the C helpers of lua/l_bench.c
-- (luaopen_loom_bench).
-- Load it from a script in bench/ with:
--   package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
--   local bounds = require("bounds")
local loom = require("loom")

local M = {}

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local text = f:read("a")
  f:close()
  return text
end

-- The helpers of lua/l_bench.c: from the executable (bin/loom), else from
-- the loom.core module that a stock lua5.4 loaded.
local function open_bench_module()
  local open = package.loadlib("", "luaopen_loom_bench")
  if not open then
    local path = package.searchpath("loom.core", package.cpath)
    open = path and package.loadlib(path, "luaopen_loom_bench")
  end
  if not open then error("this build of loom has no luaopen_loom_bench (lua/l_bench.c)", 0) end
  return open()
end
local bench = open_bench_module()

-- Wall-clock seconds from an arbitrary start (CLOCK_MONOTONIC).
M.clock = bench.now

-- ---------------------------------------------------------------------------
-- CPU time of this process and of the machine

local CLOCK_TICKS = 100 -- USER_HZ of Linux on x86-64 (sysconf(_SC_CLK_TCK))

-- CPU seconds this process has used (user + system), and its major page
-- faults (pages read from disk) so far.
local function process_cpu()
  local stat = read_file("/proc/self/stat")
  -- fields after the command name, which is in parentheses and may hold spaces
  local rest = stat:match("%) (.*)$")
  local fields = {}
  for f in rest:gmatch("%S+") do fields[#fields + 1] = f end
  -- majflt, utime and stime are fields 12, 14 and 15 of the line, so 10, 12
  -- and 13 after the name
  return (tonumber(fields[12]) + tonumber(fields[13])) / CLOCK_TICKS, tonumber(fields[10])
end

-- Busy and total CPU seconds of the whole machine since boot.
local function machine_cpu()
  local line = read_file("/proc/stat"):match("^cpu%s+([^\n]+)")
  local values = {}
  for v in line:gmatch("%d+") do values[#values + 1] = tonumber(v) end
  local total = 0
  for i = 1, math.min(#values, 8) do total = total + values[i] end
  local idle = values[4] + (values[5] or 0) -- idle + iowait
  return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS
end

-- Start measuring the CPU time that other processes take. Returns a
-- function that, called at the end, returns the fraction of the machine's
-- CPU time they used meanwhile (0 on an otherwise idle machine), and the
-- major page faults of this process meanwhile. Those are memory-mapped
-- weights read again from disk, because other processes pushed them out of
-- the page cache.
function M.other_load()
  local own0, faults0 = process_cpu()
  local busy0, total0 = machine_cpu()
  return function()
    local own1, faults1 = process_cpu()
    local busy1, total1 = machine_cpu()
    local total = total1 - total0
    local load = total > 0 and math.max(0, (busy1 - busy0) - (own1 - own0)) / total or 0
    return load, faults1 - faults0
  end
end

-- Wait until other processes take less than `threshold` of the machine's
-- CPU time over a `window`-second sample, for at most `max_wait` seconds
-- (defaults 0.1, 2 and 600). Returns the last sample's load and whether it
-- was below the threshold.
function M.wait_for_idle(threshold, window, max_wait)
  threshold, window, max_wait = threshold or 0.1, window or 2, max_wait or 600
  local start = M.clock()
  while true do
    local other = M.other_load()
    local t = M.clock()
    repeat until M.clock() - t >= window or not os.execute("sleep 0.2")
    local load = other()
    if load < threshold then return load, true end
    if M.clock() - start >= max_wait then return load, false end
  end
end

-- ---------------------------------------------------------------------------
-- Bounds

-- Best GFLOPS of loom.matmul on two n x n f32 matrices (cblas_sgemm) over
-- at least `seconds` (defaults: n = 4096, 3 s).
function M.sgemm_gflops(n, seconds)
  n, seconds = n or 4096, seconds or 3
  local a = loom.randn({ n, n }, { seed = 1 })
  local b = loom.randn({ n, n }, { seed = 2 })
  local c = loom.matmul(a, b)
  local best, start = 0, M.clock()
  repeat
    local t = M.clock()
    loom.matmul(a, b, c)
    t = M.clock() - t
    if t > 0 then best = math.max(best, 2 * n ^ 3 / t * 1e-9) end
  until M.clock() - start >= seconds
  a:free()
  b:free()
  c:free()
  return best
end

-- GFLOP/s of one multiply-add instruction run back to back on all threads:
-- "fma_f32", "dpbf16" (AVX512-BF16) or "amx_bf16". Returns nil and a
-- message when the CPU lacks it.
function M.peak_gflops(kind, seconds)
  return bench.peak_gflops(kind, seconds)
end

-- Best GB/s of `passes` (default 2) streaming reads of every byte of a
-- list of contiguous tensors, on all OpenMP threads. Reading the weights a
-- measurement uses gives the bandwidth of exactly those pages.
function M.read_gbps(tensors, passes)
  local best = 0
  for _ = 1, passes or 2 do
    local _, bytes, seconds = bench.read_sum(tensors)
    if seconds > 0 then best = math.max(best, bytes / seconds * 1e-9) end
  end
  return best
end

-- ---------------------------------------------------------------------------
-- Memory and machine

-- A field of /proc/self/status in MiB (VmHWM: peak resident size, VmRSS,
-- RssAnon, RssFile).
function M.status_mib(field)
  local kib = read_file("/proc/self/status"):match(field .. ":%s*(%d+) kB")
  return kib and tonumber(kib) / 1024 or nil
end

-- CPU model, thread count, AVX512-BF16 support and memory of this machine.
function M.machine()
  local cpuinfo = read_file("/proc/cpuinfo") or ""
  local meminfo = read_file("/proc/meminfo") or ""
  local cpus = 0
  for _ in cpuinfo:gmatch("\nprocessor%s*:") do cpus = cpus + 1 end
  if cpuinfo:match("^processor%s*:") then cpus = cpus + 1 end
  local flags = cpuinfo:match("\nflags%s*:([^\n]*)") or ""
  return {
    cpu = cpuinfo:match("model name%s*:%s*([^\n]+)") or "unknown",
    cpus = cpus,
    avx512_bf16 = flags:find(" avx512_bf16", 1, true) ~= nil,
    memory_gib = (tonumber(meminfo:match("MemTotal:%s*(%d+) kB")) or 0) / 2 ^ 20,
    omp_threads = os.getenv("OMP_NUM_THREADS"),
  }
end

-- Free bytes of the file system holding `path`, from df.
function M.free_bytes(path)
  local pipe = io.popen(string.format("df -Pk '%s' 2>/dev/null", path:gsub("'", "'\\''")), "r")
  local out = pipe and pipe:read("a") or ""
  if pipe then pipe:close() end
  local kib = out:match("\n%S+%s+%d+%s+%d+%s+(%d+)")
  return kib and tonumber(kib) * 1024 or nil
end

return M
