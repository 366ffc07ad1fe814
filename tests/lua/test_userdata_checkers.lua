-- Tests of the binding's rule of one checker per userdata type: each
-- metatable name is written in one C file of lua/, and other files reach
-- that userdata through the checker exported in lua/loom_lua.h. Then the
-- errors that the tokenizer checker raises for the async encode.
package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
local check = require("check")
local loom = require("loom")

local root = arg[0]:gsub("tests/lua/[^/]*$", "")
if root == "" then root = "./" end

-- ------------------------------------------------ metatable names per file

do
  local pipe = assert(io.popen("ls " .. root .. "lua/*.c " .. root .. "lua/*.h"))
  local files_of = {}
  for path in pipe:lines() do
    local f = assert(io.open(path, "rb"))
    local text = f:read("a")
    f:close()
    for name in text:gmatch('#define%s+[%w_]+_MT%s+"(loom%.[%w%.]+)"') do
      files_of[name] = files_of[name] or {}
      table.insert(files_of[name], (path:gsub("^.*/", "")))
    end
  end
  pipe:close()
  check.check(files_of["loom.Tokenizer"] ~= nil, "the scan finds the loom.Tokenizer metatable")
  for name, files in pairs(files_of) do
    check.equal(#files, 1, string.format("metatable '%s' is named in %s", name, table.concat(files, ", ")))
  end
end

-- ------------------------------------------- the checker through work_encode

do
  local uv = loom.uv
  local tok = assert(loom.tokenizer.load(root .. "examples/models/tiny-llava/tokenizer.model"))
  tok:free()
  check.checkerror(function() return uv.work_encode(tok, "a cat", nil, function() end) end,
    "attempt to use a released tokenizer")
  check.checkerror(function() return uv.work_encode({}, "a cat", nil, function() end) end,
    "bad argument #1 to 'work_encode' (loom.Tokenizer expected, got table)")
end

check.summary()
