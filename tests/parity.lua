-- Parity runner: `loom tests/parity.lua CASE_DIR...` recognises each
-- reference case's kind from its files, runs that kind's checks against the
-- stored reference outputs, prints one line per check with its largest
-- difference and tolerance, and ends with "N passed, N failed" (exit status
-- 1 when anything failed).
local here = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = here .. "/?.lua;" .. package.path

local common = require("parity.common")

-- The kinds, tried in order; each module has detect(dir) and run(dir,
-- report). A new kind is one file under tests/parity/ and one line here.
local KINDS = {
  { name = "blip2", module = "parity.blip2" },
  { name = "idefics", module = "parity.idefics" },
  { name = "llava", module = "parity.llava" },
  { name = "openflamingo", module = "parity.openflamingo" },
  { name = "preprocess", module = "parity.preprocess" },
  { name = "tokenizers", module = "parity.tokenizers" },
}

local function usage()
  io.stderr:write("usage: loom tests/parity.lua CASE_DIR...\n",
    "Runs the parity checks of each reference case directory (kinds: ")
  local names = {}
  for _, k in ipairs(KINDS) do names[#names + 1] = k.name end
  io.stderr:write(table.concat(names, ", "), ").\n")
end

local dirs = {}
for _, a in ipairs(arg or {}) do
  if a == "-h" or a == "--help" then usage() os.exit(0) end
  dirs[#dirs + 1] = a
end
if #dirs == 0 then usage() os.exit(2) end

local kinds = {}
for i, k in ipairs(KINDS) do kinds[i] = { name = k.name, impl = require(k.module) } end

local report = common.report()
for _, dir in ipairs(dirs) do
  local kind
  for _, k in ipairs(kinds) do
    if k.impl.detect(dir) then kind = k break end
  end
  local label = (dir:gsub("/+$", ""))
  if kind == nil then
    local cfg = common.read_json(common.join(dir, "config.json"))
    local why = cfg and cfg.model_type and string.format("model_type '%s' has no parity kind yet", cfg.model_type)
      or "no parity kind recognises its files"
    report.prefix = ""
    report:skip(label, why)
  else
    print(string.format("== %s (%s)", label, kind.name))
    report.prefix = label:match("[^/]*$") .. "/"
    local ok, err = xpcall(kind.impl.run, debug.traceback, dir, report)
    if not ok then report:error("run", err) end
  end
end

if report.first_failure then
  print("first failing check: " .. report.first_failure)
end
print(string.format("%d passed, %d failed", report.passed, report.failed))
os.exit(report.failed == 0 and 0 or 1)
