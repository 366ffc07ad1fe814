-- The REPL's display of results: a plain table (one without a metatable)
-- shows its contents, one level deep, instead of its address. Other values
-- go to print unchanged.
local M = {}

local MAX_ITEMS = 40

-- A value inside a table: strings quoted, nested tables and userdata named
-- by their kind so that one line stays short.
local function short(v)
  local kind = type(v)
  if kind == "string" then return string.format("%q", v) end
  if kind == "table" then
    local mt = getmetatable(v)
    return type(mt) == "table" and type(mt.__name) == "string" and mt.__name or "{...}"
  end
  if kind == "userdata" then
    local mt = getmetatable(v)
    return type(mt) == "table" and type(mt.__name) == "string" and mt.__name or "userdata"
  end
  return tostring(v)
end

local function key_text(k)
  if type(k) == "string" and k:match("^[%a_][%w_]*$") then return k end
  return "[" .. short(k) .. "]"
end

-- The text the REPL prints for `v`, or `v` itself when it is not a plain table.
function M.format(v)
  if type(v) ~= "table" or getmetatable(v) ~= nil then return v end
  local parts, n = {}, #v
  for i = 1, n do parts[#parts + 1] = short(v[i]) end
  local keys = {}
  for k in pairs(v) do
    if not (math.type(k) == "integer" and k >= 1 and k <= n) then keys[#keys + 1] = k end
  end
  table.sort(keys, function(a, b)
    if type(a) ~= type(b) then return type(a) < type(b) end
    if type(a) == "number" or type(a) == "string" then return a < b end
    return tostring(a) < tostring(b)
  end)
  for _, k in ipairs(keys) do parts[#parts + 1] = key_text(k) .. " = " .. short(v[k]) end
  if #parts > MAX_ITEMS then
    local more = #parts - MAX_ITEMS
    for i = #parts, MAX_ITEMS + 1, -1 do parts[i] = nil end
    parts[#parts + 1] = string.format("... (%d more)", more)
  end
  return "{" .. table.concat(parts, ", ") .. "}"
end

return M
