-- Tests of the `loom` package table: the C module's functions, the Lua
-- modules that load on first access, and the folders models and connectors,
-- whose modules load on first access too.
package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
local check = require("check")
local loom = require("loom")

do
  check.check(loom.tensor == require("loom.core").tensor, "loom.tensor comes from loom.core")
  check.check(loom.nn == require("loom.nn"), "loom.nn is require 'loom.nn'")
  check.equal(loom.no_such_module, nil, "an unknown name gives nil")
  check.equal(loom[1], nil, "a non-string key gives nil")
end

do
  check.equal(package.loaded["loom.models.mpt"], nil, "loom.models.mpt is not loaded before access")
  check.equal(type(loom.models), "table", "loom.models is a table")
  check.check(rawequal(loom.models, loom.models), "loom.models is created once")
  check.equal(package.loaded["loom.models.mpt"], nil, "loom.models alone loads no model")
  check.check(loom.models.mpt == require("loom.models.mpt"), "loom.models.mpt is require 'loom.models.mpt'")
  check.check(loom.models.llama == require("loom.models.llama"), "loom.models.llama is require 'loom.models.llama'")
  check.equal(loom.models.no_such_model, nil, "an unknown model gives nil")
  check.equal(loom.models[1], nil, "a non-string key in loom.models gives nil")

  check.equal(type(loom.connectors), "table", "loom.connectors is a table")
  check.check(loom.connectors.qformer == require("loom.connectors.qformer"),
    "loom.connectors.qformer is require 'loom.connectors.qformer'")
  check.check(loom.connectors.projector == require("loom.connectors.projector"),
    "loom.connectors.projector is require 'loom.connectors.projector'")
end

check.summary()
