-- The `loom` package: everything of the C module loom.core (tensors,
-- operators, checkpoints, images, tokenizers) plus the pure-Lua modules
-- under lua/loom/, which load on first access (loom.nn is require "loom.nn",
-- loom.models.llama is require "loom.models.llama").
--
-- bin/loom finds all of it by itself. From the stock lua5.4 interpreter, run
-- at the top of the source tree after `make`:
--   LUA_CPATH='build/lua/?.so;;' LUA_PATH='lua/?.lua;lua/?/init.lua;;' lua5.4 script.lua
-- where build/lua/loom/core.so is the C module and ";;" keeps Lua's default
-- paths. After `make install` the defaults already cover
-- <prefix>/share/lua/5.4 and <prefix>/lib/lua/5.4 when the prefix is
-- /usr/local.
local core = require("loom.core")

local loom = {}
for name, value in pairs(core) do
  loom[name] = value
end

-- The module `modname` when a loader can find it, else nil.
local function find_module(modname)
  if package.loaded[modname] == nil and package.preload[modname] == nil
      and not package.searchpath(modname, package.path) then
    return nil
  end
  return require(modname)
end

-- Folders of lua/loom/ without an init.lua. Their table loads
-- loom.<folder>.<name> on first access, so loom.models.llama is
-- require "loom.models.llama".
local NAMESPACES = { models = true, connectors = true }

local function lazy_namespace(prefix)
  return setmetatable({}, {
    __index = function(t, name)
      if type(name) ~= "string" then
        return nil
      end
      local module = find_module(prefix .. "." .. name)
      if module ~= nil then
        rawset(t, name, module)
      end
      return module
    end,
  })
end

-- Load loom.<name> from lua/loom/<name>.lua (or <name>/init.lua) when it
-- exists; other unknown names give nil, as for any missing table field.
setmetatable(loom, {
  __index = function(t, name)
    if type(name) ~= "string" then
      return nil
    end
    local module = find_module("loom." .. name)
    if module == nil and NAMESPACES[name] then
      module = lazy_namespace("loom." .. name)
    end
    if module ~= nil then
      rawset(t, name, module)
    end
    return module
  end,
})

return loom
