-- Shared helpers for the Lua tests: counted checks, error checks on message
-- substrings, deep comparison of nested tables, and the closing
-- "N passed, N failed" line that tests/run_all.sh adds up. A test file ends
-- with check.summary(), which exits non-zero when anything failed.
--
-- Load it from a test with:
--   package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
--   local check = require("check")
local M = {passed = 0, failed = 0}

local function where(level)
  local info = debug.getinfo(level + 1, "Sl")
  return info and (info.short_src .. ":" .. (info.currentline or "?")) or "?"
end

local function record(ok, msg, level)
  if ok then
    M.passed = M.passed + 1
  else
    M.failed = M.failed + 1
    io.stderr:write(string.format("FAIL %s: %s\n", where(level + 1), msg or "check failed"))
  end
  return ok
end

-- Count one check of `cond`; `msg` describes what was expected.
function M.check(cond, msg)
  local ok = record(cond and true or false, msg, 2)
  return ok -- not a tail call, so the failure location stays right
end

-- Deep equality of numbers, strings, booleans and nested tables; numbers
-- compare with tolerance `tol` (0 when nil).
local function deep_equal(a, b, tol)
  if type(a) == "number" and type(b) == "number" then
    return a == b or math.abs(a - b) <= (tol or 0)
  end
  if type(a) ~= "table" or type(b) ~= "table" then
    return a == b
  end
  if #a ~= #b then
    return false
  end
  for k, v in pairs(a) do
    if not deep_equal(v, b[k], tol) then
      return false
    end
  end
  for k in pairs(b) do
    if a[k] == nil then
      return false
    end
  end
  return true
end
M.deep_equal = deep_equal

-- Text form of a value for failure messages: nested tables as {1, {2, 3}}.
local function show(v)
  if type(v) ~= "table" then
    return tostring(v)
  end
  local parts = {}
  for i = 1, #v do
    parts[i] = show(v[i])
  end
  return "{" .. table.concat(parts, ", ") .. "}"
end
M.show = show

-- Count one check that `actual` deep-equals `expected` (within `tol`).
function M.equal(actual, expected, msg, tol)
  local ok = deep_equal(actual, expected, tol)
  ok = record(ok, string.format("%s: expected %s, got %s", msg or "values differ", show(expected), show(actual)), 2)
  return ok
end

-- Count one check that fn() raises an error whose message contains every
-- one of the given substrings (plain text, not patterns).
function M.checkerror(fn, ...)
  local ok, err = pcall(fn)
  local missing
  if ok then
    missing = "expected an error, but the call succeeded"
  else
    err = tostring(err)
    for i = 1, select("#", ...) do
      local s = select(i, ...)
      if not missing and not err:find(s, 1, true) then
        missing = string.format("error message %q does not contain %q", err, s)
      end
    end
  end
  local passed = record(missing == nil, missing, 2)
  return passed
end

-- Print the closing line and exit with the status run_all.sh expects.
function M.summary()
  io.stdout:write(string.format("%d passed, %d failed\n", M.passed, M.failed))
  io.stdout:flush()
  os.exit(M.failed == 0 and 0 or 1)
end

return M
