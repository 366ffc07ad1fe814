-- Small helpers for command-line scripts.
local M = {}

-- Handle the options of a script that takes positional arguments only:
-- print `usage` and exit 0 for -h or --help, and exit 2 naming any other
-- argument that starts with "-". Returns `args` (a script's `arg`) or {}.
function M.positional_only(args, usage)
  args = args or {}
  local script = (args[0] or "script"):match("[^/]*$")
  for _, a in ipairs(args) do
    if a == "-h" or a == "--help" then
      print("usage: " .. usage)
      os.exit(0)
    elseif a:sub(1, 1) == "-" then
      io.stderr:write(script, ": unknown option '", a, "' (see --help)\n")
      os.exit(2)
    end
  end
  return args
end

return M
