-- Leveled logging for the Lua side of Loom, in the format of the core's
-- default log sink ("loom: <level>: message" lines on stderr). The level is
-- info by default; scripts lower the noise with log.set_level("warning")
-- (their --quiet option). log.model writes the summary a model family logs
-- when it loads: aligned "name: value" lines, the parameter count and the
-- memory the weights take.
-- NOTE: the binding does not expose loom_log yet, so the core's messages
-- and these have separate levels and sinks.
local loom = require("loom.core")

local M = {}

local LEVELS = { debug = 0, info = 1, warning = 2, error = 3 }
local NAMES = { [0] = "debug", "info", "warning", "error" }
local ALIASES = { warn = "warning", quiet = "warning" }

local min_level = LEVELS.info

local function default_sink(level, message)
  io.stderr:write("loom: ", level, ": ", message, "\n")
end
local sink = default_sink

-- The numeric level of a level name; raises for an unknown name.
local function level_number(name, arg_level)
  local n = LEVELS[ALIASES[name] or name]
  if n == nil then
    error(string.format("unknown log level '%s' (expected debug, info, warning or error)", tostring(name)),
      arg_level + 1)
  end
  return n
end

-- Set the minimum level that is written: "debug", "info" (default),
-- "warning" (also "warn" or "quiet") or "error".
function M.set_level(name)
  min_level = level_number(name, 2)
end

-- The current minimum level's name.
function M.get_level()
  return NAMES[min_level]
end

-- Replace the sink, a function(level_name, message) called once per line;
-- nil restores the default, which writes to stderr.
function M.set_sink(fn)
  if fn ~= nil and type(fn) ~= "function" then
    error("log sink must be a function or nil, got " .. type(fn), 2)
  end
  sink = fn or default_sink
end

-- Whether messages of `level` are written.
function M.enabled(level)
  return level_number(level, 2) >= min_level
end

-- Write string.format(fmt, ...) at `level`, one sink call per line.
function M.log(level, fmt, ...)
  local n = level_number(level, 2)
  if n < min_level then return end
  local message = select("#", ...) > 0 and string.format(fmt, ...) or tostring(fmt)
  for line in (message .. "\n"):gmatch("(.-)\n") do sink(NAMES[n], line) end
end

function M.debug(fmt, ...) M.log("debug", fmt, ...) end
function M.info(fmt, ...) M.log("info", fmt, ...) end
function M.warning(fmt, ...) M.log("warning", fmt, ...) end
function M.error(fmt, ...) M.log("error", fmt, ...) end

-- ---------------------------------------------------------------------------
-- Aligned fields and model summaries

-- Text of a field value: floats in %g (so 17.0 prints as 17), lists
-- joined with ", ", anything else through tostring.
local function value_text(v)
  if math.type(v) == "float" then
    return string.format("%g", v)
  elseif type(v) == "table" then
    local parts = {}
    for i, item in ipairs(v) do parts[i] = value_text(item) end
    return table.concat(parts, ", ")
  end
  return tostring(v)
end
M.value_text = value_text

-- Lines "  name: value" for a list of { name, value } pairs, with the values
-- aligned in one column. Pairs whose value is nil are left out.
function M.format_fields(fields)
  local width = 0
  for _, f in ipairs(fields) do
    if f[2] ~= nil then width = math.max(width, #f[1] + 1) end
  end
  local lines = {}
  for _, f in ipairs(fields) do
    if f[2] ~= nil then
      lines[#lines + 1] = string.format("  %-" .. width .. "s %s", f[1] .. ":", value_text(f[2]))
    end
  end
  return lines
end

-- Write `title`, then the aligned fields, at `level`.
function M.fields(level, title, fields)
  if not M.enabled(level) then return end
  M.log(level, "%s", title)
  for _, line in ipairs(M.format_fields(fields)) do M.log(level, "%s", line) end
end

local DTYPE_BYTES = { f32 = 4, f16 = 2, bf16 = 2, i32 = 4, i64 = 8, u8 = 1 }

-- Parameter statistics of the tensors reachable from `module` (a table of
-- tables, as the model families build them). A tensor held in two places,
-- such as a tied output head, counts once. Fields named "weights" (the
-- checkpoint table, which may hold tensors the model does not use) are not
-- followed. Returns { count, bytes, bytes_by_dtype = { dtype = bytes },
-- mapped_bytes (of memory-mapped storage) }.
function M.parameter_stats(module)
  local stats = { count = 0, bytes = 0, bytes_by_dtype = {}, mapped_bytes = 0 }
  local seen = {}
  local function visit(v)
    if seen[v] then return end
    if loom.is_tensor(v) then
      seen[v] = true
      local n, dtype = v:numel(), v:dtype()
      local bytes = n * (DTYPE_BYTES[dtype] or 0)
      stats.count = stats.count + n
      stats.bytes = stats.bytes + bytes
      stats.bytes_by_dtype[dtype] = (stats.bytes_by_dtype[dtype] or 0) + bytes
      if v:storage_kind() == "mmap" then stats.mapped_bytes = stats.mapped_bytes + bytes end
    elseif type(v) == "table" then
      seen[v] = true
      for k, item in pairs(v) do
        if k ~= "weights" then visit(item) end
      end
    end
  end
  visit(module)
  return stats
end

local function mib(bytes)
  return string.format("%.1f MiB", bytes / 2 ^ 20)
end

-- Text of a parameter count with thousands separators, and in millions or
-- billions when large: "3,744,761,856 (3.74 B)".
local function count_text(n)
  local digits = tostring(n):reverse():gsub("(%d%d%d)", "%1,"):reverse():gsub("^,", "")
  if n >= 1e9 then return string.format("%s (%.2f B)", digits, n / 1e9) end
  if n >= 1e6 then return string.format("%s (%.1f M)", digits, n / 1e6) end
  return digits
end
M.count_text = count_text

-- Text of the memory of a stats table: the total, then the bytes per dtype
-- when there are several, and how much of it is memory-mapped.
local function memory_text(stats)
  local dtypes = {}
  for dtype in pairs(stats.bytes_by_dtype) do dtypes[#dtypes + 1] = dtype end
  table.sort(dtypes)
  local text = mib(stats.bytes)
  if #dtypes == 1 then
    text = text .. " " .. dtypes[1]
  elseif #dtypes > 1 then
    local parts = {}
    for i, dtype in ipairs(dtypes) do parts[i] = dtype .. " " .. mib(stats.bytes_by_dtype[dtype]) end
    text = text .. " (" .. table.concat(parts, ", ") .. ")"
  end
  if stats.bytes > 0 and stats.mapped_bytes == stats.bytes then
    text = text .. ", memory-mapped"
  elseif stats.mapped_bytes > 0 then
    text = text .. ", " .. mib(stats.mapped_bytes) .. " memory-mapped"
  end
  return text
end

-- Log a loaded model at info level: `title`, then the configuration
-- `fields` (a list of { name, value }), then for each of `parts` (a list of
-- { name, module }) its parameter count, and the total count and memory of
-- all parts together (tensors shared between parts count once).
function M.model(title, fields, parts)
  if not M.enabled("info") then return end
  local rows = {}
  for _, f in ipairs(fields) do rows[#rows + 1] = f end
  local all = {}
  for _, part in ipairs(parts or {}) do
    if part[2] ~= nil then
      rows[#rows + 1] = { "parameters." .. part[1], count_text(M.parameter_stats(part[2]).count) }
      all[#all + 1] = part[2]
    end
  end
  local total = M.parameter_stats(all)
  rows[#rows + 1] = { "parameters", count_text(total.count) }
  rows[#rows + 1] = { "memory", memory_text(total) }
  M.fields("info", title, rows)
end

return M
