-- Tests of the loom executable's command line, run as child processes:
-- --help, --version, -e, -l, scripts with the `arg` table as lua5.4 builds
-- it, `-` for standard input, exit statuses and module paths.
package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
local check = require("check")

local loom_exe = arg[-1]
local tmp = os.tmpname()
os.remove(tmp)
assert(os.execute("mkdir -p '" .. tmp .. "'"))

local function quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

-- Run a shell command line; returns its combined output and exit code.
local function run(cmdline)
  local pipe = assert(io.popen(cmdline .. " 2>&1", "r"))
  local out = pipe:read("a")
  local _, _, code = pipe:close()
  return out, code
end

local function write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

local exe = quote(loom_exe)

do
  local out, code = run(exe .. " --help")
  check.equal(code, 0, "--help exits with 0")
  check.check(out:find("^usage: [%w-]+ %[options%] %[script %[args%]%]") ~= nil, "--help prints the usage: " .. out)
  check.check(out:find("-e CODE", 1, true) and out:find("LOOM_HISTORY", 1, true), "--help lists options and environment")
  out, code = run(exe .. " -h")
  check.equal(code, 0, "-h exits with 0")

  out, code = run(exe .. " --version")
  check.equal(code, 0, "--version exits with 0")
  check.check(out:match("^Loom %d+%.%d+%.%d+ %(Lua 5%.4%.%d+%)\n$") ~= nil, "--version prints both versions: " .. out)

  out, code = run(exe .. " --bogus")
  check.equal(code, 1, "an unknown option exits with 1")
  check.check(out:find("unrecognized option '--bogus'", 1, true) and out:find("usage:", 1, true),
    "unknown option message: " .. out)
  out, code = run(exe .. " -e")
  check.equal(code, 1, "-e without code exits with 1")
  check.check(out:find("'-e' needs an argument", 1, true) ~= nil, "-e needs an argument: " .. out)
end

do
  local out, code = run(exe .. " -e " .. quote("print(1 + 1, loom.version)"))
  check.equal({out, code}, {"2\t0.1.0\n", 0}, "-e runs code with the global loom")
  out, code = run(exe .. " -e " .. quote("x = 5") .. " -e " .. quote("print(x * 2)"))
  check.equal(out, "10\n", "several -e run in order")
  out, code = run(exe .. " -e " .. quote("error('boom')"))
  check.equal(code, 1, "an error in -e exits with 1")
  check.check(out:find("(command line):1: boom", 1, true) and out:find("stack traceback:", 1, true),
    "the error is printed with a traceback: " .. out)
  out, code = run(exe .. " -e " .. quote("os.exit(3)"))
  check.equal(code, 3, "os.exit status is kept")
  out = run(exe .. " -e " .. quote("print(require('loom.core') == package.loaded['loom.core'], type(loom.tensor))"))
  check.equal(out, "true\tfunction\n", "loom.core is preloaded")

  write(tmp .. "/mymod.lua", "return {answer = 42}\n")
  out, code = run("LUA_PATH=" .. quote(tmp .. "/?.lua;;") .. " " .. exe .. " -l mymod -e " .. quote("print(mymod.answer)"))
  check.equal({out, code}, {"42\n", 0}, "-l requires a module into a global")
end

-- -l follows lua.c of Lua 5.4.4: `-l mod` sets the global named by the whole
-- module name, dots and suffixes included, and `-l g=mod` sets global g.
do
  assert(os.execute("mkdir -p " .. quote(tmp .. "/pkg")))
  write(tmp .. "/pkg/sub.lua", "return {answer = 7}\n")
  write(tmp .. "/mod-v2.lua", "return {answer = 2}\n")
  local env = "LUA_PATH=" .. quote(tmp .. "/?.lua;;") .. " "
  local cases = {
    {"-l pkg.sub", "print(rawget(_G, 'pkg.sub').answer, rawget(_G, 'pkg'))", "7\tnil\n", "a dotted name"},
    {"-l g=pkg.sub", "print(g.answer, rawget(_G, 'g=pkg.sub'), rawget(_G, 'pkg.sub'))", "7\tnil\tnil\n",
      "the g=mod form"},
    {"-lg=pkg.sub", "print(g.answer)", "7\n", "the g=mod form joined to -l"},
    {"-l mod-v2", "print(rawget(_G, 'mod-v2').answer, rawget(_G, 'mod'))", "2\tnil\n", "a name with a suffix"},
    {"-l json=loom.json", "print(type(json.decode), rawget(_G, 'loom.json'))", "function\tnil\n", "loom.json into g"},
  }
  for _, case in ipairs(cases) do
    local out, code = run(env .. exe .. " " .. case[1] .. " -e " .. quote(case[2]))
    check.equal({out, code}, {case[3], 0}, "-l with " .. case[4])
  end

  local out, code = run(env .. exe .. " -l g= -e " .. quote("print(g)"))
  check.equal(code, 1, "-l g= with an empty module name exits with 1")
  check.check(out:find("module '' not found", 1, true) ~= nil, "-l g= names the empty module: " .. out)

  -- the same results as the stock interpreter, where it is installed
  if os.execute("command -v lua5.4 >/dev/null 2>&1") then
    for i = 1, 4 do
      local case = cases[i]
      local stock = run(env .. "lua5.4 " .. case[1] .. " -e " .. quote(case[2]))
      check.equal(stock, case[3], "lua5.4 agrees on -l with " .. case[4])
    end
  end
end

do
  local script = tmp .. "/args.lua"
  write(script, [[
print("n", #arg, select("#", ...))
for i = -2, #arg do print(i, arg[i]) end
print("varargs", ...)
]])
  local out, code = run(exe .. " " .. quote(script) .. " one 'two words' 3")
  check.equal(code, 0, "script exits with 0")
  local expected = table.concat({
    "n\t3\t3",
    "-2\tnil",
    "-1\t" .. loom_exe,
    "0\t" .. script,
    "1\tone",
    "2\ttwo words",
    "3\t3",
    "varargs\tone\ttwo words\t3",
  }, "\n") .. "\n"
  check.equal(out, expected, "arg table and varargs of a script")

  out = run(exe .. " -e " .. quote("x = 1") .. " " .. quote(script) .. " a")
  check.check(out:find("-2\t-e\n-1\tx = 1\n0\t" .. script .. "\n1\ta\n", 1, true) ~= nil,
    "options before the script get negative indices: " .. out)

  out = run(exe .. " -- " .. quote(script))
  check.check(out:find("0\t" .. script, 1, true) ~= nil, "-- ends the options: " .. out)

  write(tmp .. "/fail.lua", "local x = nil\nlocal y = x.field\n")
  out, code = run(exe .. " " .. quote(tmp .. "/fail.lua"))
  check.equal(code, 1, "a failing script exits with 1")
  check.check(out:find("fail.lua:2: attempt to index a nil value", 1, true) and out:find("stack traceback:", 1, true),
    "the script error names the line: " .. out)

  write(tmp .. "/syntax.lua", "x = = 1\n")
  out, code = run(exe .. " " .. quote(tmp .. "/syntax.lua"))
  check.equal(code, 1, "a syntax error exits with 1")
  check.check(out:find("syntax.lua:1:", 1, true) ~= nil, "syntax error message: " .. out)

  out, code = run(exe .. " " .. quote(tmp .. "/missing.lua"))
  check.equal(code, 1, "a missing script exits with 1")
  check.check(out:find("cannot open", 1, true) ~= nil, "missing script message: " .. out)

  out, code = run("printf 'print(\"from stdin\", ...)' | " .. exe .. " - x y")
  check.equal({out, code}, {"from stdin\tx\ty\n", 0}, "'-' runs standard input as a script")

  out, code = run("printf 'print(z + 1)\\n' | " .. exe .. " -i " .. quote(tmp .. "/setz.lua"))
  check.equal(code, 1, "-i with a missing script exits with 1")
  check.check(out:find("cannot open", 1, true) ~= nil, "-i with a missing script says so: " .. out)
  write(tmp .. "/setz.lua", "z = 41\n")
  out, code = run("printf 'print(z + 1)\\nz\\n' | " .. exe .. " -i " .. quote(tmp .. "/setz.lua"))
  check.equal({out, code}, {"42\n41\n", 0}, "-i runs the script, then the REPL")
end

do
  -- the Lua modules are found relative to the executable, from any directory
  local abs = loom_exe:sub(1, 1) == "/" and loom_exe or (os.getenv("PWD") .. "/" .. loom_exe)
  local out, code = run("cd / && " .. quote(abs) .. " -e " .. quote("print(type(require('loom.nn')), type(loom.image))"))
  check.equal({out, code}, {"table\ttable\n", 0}, "lua/loom is found from another working directory")
end

-- The scripts that build the shipped checkpoints take --help and reject
-- other options instead of treating them as the output directory.
do
  local function absolute(path)
    if path:sub(1, 1) == "/" then return path end
    return assert(os.getenv("PWD")) .. "/" .. path
  end
  local root = absolute(arg[0]:gsub("tests/lua/[^/]*$", ""))
  local loom_abs = quote(absolute(loom_exe))
  for _, name in ipairs({ "make_tiny_llava", "make_tiny_blip2", "make_tiny_flamingo" }) do
    local script = quote(root .. "scripts/" .. name .. ".lua")
    local out, code = run("cd " .. quote(tmp) .. " && " .. loom_abs .. " " .. script .. " --help")
    check.equal(code, 0, name .. " --help exits with 0")
    check.check(out:find("usage: loom scripts/" .. name .. ".lua [OUT_DIR]", 1, true) ~= nil,
      name .. " --help prints its usage: " .. out)
    out, code = run("cd " .. quote(tmp) .. " && " .. loom_abs .. " " .. script .. " --out x")
    check.equal(code, 2, name .. " rejects an unknown option with status 2")
    check.check(out:find("unknown option '--out'", 1, true) ~= nil, name .. " names the option: " .. out)
    local leftover = io.open(tmp .. "/--help", "r") or io.open(tmp .. "/--out", "r")
    check.check(leftover == nil, name .. " creates no directory named after an option")
    if leftover then leftover:close() end
  end
end

-- llava.lua rejects a repeated option and a negative number with status 2
do
  local root = assert(os.getenv("PWD")) .. "/"
  if arg[0]:sub(1, 1) == "/" then root = arg[0]:gsub("tests/lua/[^/]*$", "") end
  local base = exe .. " " .. quote(root .. "scripts/llava.lua")
    .. " --model " .. quote(root .. "examples/models/tiny-llava")
    .. " --image " .. quote(root .. "examples/images/cat.png")
  local out, code = run(base .. " --prompt a --prompt b")
  check.equal(code, 2, "a repeated --prompt exits with 2")
  check.check(out:find("option --prompt is given twice", 1, true) ~= nil, "the repeated option is named: " .. out)
  out, code = run(base .. " --prompt a --temperature -1")
  check.equal(code, 2, "a negative --temperature exits with 2")
  check.check(out:find("--temperature needs a value of 0 or more, got '-1'", 1, true) ~= nil,
    "the value is named: " .. out)
  out, code = run(base .. " --prompt a --max-new-tokens")
  check.check(code == 2 and out:find("option --max-new-tokens needs a value", 1, true) ~= nil,
    "a missing value is named: " .. out)
end

os.execute("rm -rf " .. quote(tmp))
check.summary()
