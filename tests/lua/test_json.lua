-- Tests of loom.json's file reading: the value of a valid file, the
-- nil, message, code results of a file that cannot be read, the error
-- raised for invalid JSON, and loom.errno_name, which supplies the codes.
package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
local check = require("check")
local loom = require("loom")
local json = require("loom.json")

local function quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

local dir = os.tmpname()
os.remove(dir)
assert(os.execute("mkdir -p " .. quote(dir)))

local function write_file(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end

-- ------------------------------------------------------------ valid file

do
  local path = dir .. "/config.json"
  write_file(path, '{"hidden_size": 64, "layers": [1, 2], "name": null}')
  local value = json.read(path)
  check.equal(value.hidden_size, 64, "json.read decodes numbers")
  check.equal(value.layers, { 1, 2 }, "json.read decodes arrays")
  check.check(value.name == json.null, "json.read keeps null as json.null")
end

-- ------------------------------------------------- unreadable and invalid

do
  local missing = dir .. "/missing.json"
  local value, message, code = json.read(missing)
  check.equal({ value, code }, { nil, "ENOENT" }, "missing file gives ENOENT")
  check.check(message:find(missing .. ": No such file or directory", 1, true), "missing file message: " .. message)

  value, message, code = json.read(dir)
  check.equal({ value, code }, { nil, "EISDIR" }, "directory gives EISDIR")
  check.check(message:find(dir .. ": Is a directory", 1, true), "directory message: " .. message)

  local broken = dir .. "/broken.json"
  write_file(broken, '{"a": 1,\n "b": }')
  check.checkerror(function() return json.read(broken) end, broken .. ": invalid JSON at line 2",
    "unexpected character '}'")
end

-- ----------------------------------------------------------- errno_name

do
  local _, _, enoent = io.open(dir .. "/missing.json", "rb")
  check.equal(loom.errno_name(enoent), "ENOENT", "errno_name of io.open's ENOENT")
  local f = assert(io.open(dir, "rb"))
  local _, _, eisdir = f:read("a")
  f:close()
  check.equal(loom.errno_name(eisdir), "EISDIR", "errno_name of a read of a directory")
  check.equal(loom.errno_name(0), "EIO", "errno_name of an unlisted value")
  check.checkerror(function() return loom.errno_name("two") end, "bad argument #1 to 'errno_name'")
end

os.execute("rm -rf " .. quote(dir))
check.summary()
