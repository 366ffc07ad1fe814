-- Tests of the REPL driven through a pipe (standard input not a terminal,
-- so plain lines without readline): expressions print their values,
-- statements print nothing, multi-line chunks, errors that do not end the
-- session, tensors printed through __tostring, plain tables by their
-- contents.
package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
local check = require("check")

local loom_exe = arg[-1]

-- Feed `lines` to a REPL; returns its combined output and exit code.
local function repl(lines)
  local input = os.tmpname()
  local f = assert(io.open(input, "w"))
  f:write(table.concat(lines, "\n"), "\n")
  f:close()
  local pipe = assert(io.popen(string.format("'%s' < '%s' 2>&1", loom_exe, input), "r"))
  local out = pipe:read("a")
  local _, _, code = pipe:close()
  os.remove(input)
  return out, code
end

do
  local out, code = repl({"1 + 1", "x = 10", "x * 2", "local y = 3", "= 3, 4", "'a', nil, true"})
  check.equal(out, "2\n20\n3\t4\na\tnil\ttrue\n", "expressions print, statements do not")
  check.equal(code, 0, "the REPL exits with 0 at the end of input")
end

do
  -- plain tables print their contents one level deep; others keep their own text
  local out = repl({"x = {a = 1, 2, 'two words', t = {1}, [true] = loom.zeros({2})}", "x",
    "{}, setmetatable({}, {__tostring = function() return 'custom' end})", "{b = 1, a = 2}"})
  check.equal(out, '{2, "two words", [true] = loom.Tensor, a = 1, t = {...}}\n{}\tcustom\n{a = 2, b = 1}\n',
    "tables print their contents")
  local many = repl({"t = {} for i = 1, 45 do t[i] = i end", "t"})
  check.check(many:find(", 40, ... (5 more)}", 1, true) ~= nil, "long tables are cut: " .. many)
end

do
  local out = repl({"function triple(a)", "  return a * 3", "end", "triple(4)", "for i = 1, 2 do", "print(i)", "end"})
  check.equal(out, "12\n1\n2\n", "multi-line chunks run when complete")
end

do
  local out, code = repl({"error('bad thing')", "5", "x = = 1", "6", "nil_function()", "7"})
  check.check(out:find("stdin:1: bad thing", 1, true) ~= nil, "runtime error printed: " .. out)
  check.check(out:find("stack traceback:", 1, true) ~= nil, "runtime error has a traceback")
  check.check(out:find("unexpected symbol", 1, true) ~= nil, "syntax error printed")
  check.check(out:find("attempt to call a nil value (global 'nil_function')", 1, true) ~= nil, "call error printed")
  local numbers = {}
  for n in out:gmatch("\n?(%d)\n") do numbers[#numbers + 1] = tonumber(n) end
  check.equal(numbers, {5, 6, 7}, "the session continues after each error")
  check.equal(code, 0, "errors do not change the exit status")
  local first_error = out:find("bad thing", 1, true)
  local five = out:find("\n5\n", 1, true) or out:find("^5\n")
  check.check(first_error and five and first_error < five, "output keeps the input order")
end

do
  local out = repl({"t = loom.tensor({{1, 2}, {3, 4}})", "t", "t:sum(1)", "#t, t:dtype()"})
  check.equal(out, "tensor([[1.0000, 2.0000],\n        [3.0000, 4.0000]], dtype=f32, shape=[2, 2])\n" ..
    "tensor([4.0000, 6.0000], dtype=f32, shape=[2])\n2\tf32\n", "tensors print through __tostring")
end

do
  local out = repl({"for i = 1, 3 do"})
  check.check(out:find("'end' expected", 1, true) ~= nil, "input ending inside a chunk reports it: " .. out)
  out = repl({"x = 1 --[[ a long", "comment ]] y = 2", "x + y"})
  check.equal(out, "3\n", "a chunk continues across a long comment")
  out = repl({"s = [[", "two", "lines]]", "s"})
  check.equal(out, "two\nlines\n", "a chunk continues across a long string")
end

check.summary()
