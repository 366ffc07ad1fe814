-- Shared parts of the parity runner: the report that prints one line per
-- check and counts results, tensor comparison, and file helpers.
local loom = require("loom")
local json = require("loom.json")

local M = {}

-- ---------------------------------------------------------------------------
-- Files

function M.join(dir, name)
  return (dir:gsub("/+$", "")) .. "/" .. name
end

function M.exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

function M.is_dir(path)
  local f = io.open(path, "rb")
  if not f then return false end
  local _, _, code = f:read(1)
  f:close()
  return code == 21 -- EISDIR: reading a directory handle fails with it
end

-- Sorted names in a directory (without "." and "..").
function M.list(dir)
  local quoted = "'" .. dir:gsub("'", "'\\''") .. "'"
  local p = io.popen("ls -1A " .. quoted .. " 2>/dev/null")
  local names = {}
  for line in p:lines() do names[#names + 1] = line end
  p:close()
  table.sort(names)
  return names
end

-- A JSON file's value, or nil when the file does not exist.
function M.read_json(path)
  if not M.exists(path) then return nil end
  return json.read(path)
end

-- ---------------------------------------------------------------------------
-- Report

local Report = {}
Report.__index = Report

function M.report()
  return setmetatable({ passed = 0, failed = 0, skipped = 0, prefix = "" }, Report)
end

local function record(self, ok, name)
  if ok then
    self.passed = self.passed + 1
  else
    self.failed = self.failed + 1
    self.first_failure = self.first_failure or (self.prefix .. name)
  end
end

-- A numeric check: passes when diff <= tol.
function Report:close(name, diff, tol)
  local ok = diff == diff and diff <= tol
  record(self, ok, name)
  print(string.format("%-4s %s%s: max abs diff %.3g (tolerance %.0e)", ok and "ok" or "FAIL", self.prefix, name,
    diff, tol))
  return ok
end

-- An exact check. `detail` describes the first difference when it fails,
-- or summarises what matched.
function Report:exact(name, ok, detail)
  record(self, ok, name)
  print(string.format("%-4s %s%s%s", ok and "ok" or "FAIL", self.prefix, name, detail and (": " .. detail) or ""))
  return ok
end

-- A check that could not run.
function Report:error(name, message)
  record(self, false, name)
  print(string.format("FAIL %s%s: %s", self.prefix, name, message))
end

function Report:skip(name, why)
  self.skipped = self.skipped + 1
  print(string.format("skip %s%s: %s", self.prefix, name, why))
end

-- ---------------------------------------------------------------------------
-- Tensors

local function shape_text(t)
  return "[" .. table.concat(t:shape(), ", ") .. "]"
end
M.shape_text = shape_text

-- Largest absolute difference of two tensors after conversion to f32, or
-- nil and a message when their shapes differ.
function M.max_diff(actual, expected)
  local a, e = actual:shape(), expected:shape()
  local same = #a == #e
  for i = 1, #e do same = same and a[i] == e[i] end
  if not same then
    return nil, string.format("shape %s, expected %s", shape_text(actual), shape_text(expected))
  end
  if actual:numel() == 0 then return 0.0 end
  return loom.max_abs_diff(actual:to("f32"), expected:to("f32"))
end

-- Compare a tensor against a reference within tol (0 for exact).
function Report:tensor(name, actual, expected, tol)
  local diff, err = M.max_diff(actual, expected)
  if diff == nil then
    self:error(name, err)
    return false
  end
  return self:close(name, diff, tol)
end

-- Compare two Lua lists; returns ok and a description of the first
-- difference.
function M.compare_lists(actual, expected)
  local n = math.max(#actual, #expected)
  for i = 1, n do
    if actual[i] ~= expected[i] then
      return false, string.format("first difference at position %d: got %s, expected %s (lengths %d and %d)",
        i, tostring(actual[i]), tostring(expected[i]), #actual, #expected)
    end
  end
  return true
end

return M
