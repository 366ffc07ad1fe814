-- Tests of background batches in the REPL. On a terminal (a pseudo-terminal
-- from util-linux's `script`), a batch started with loom.batch.start makes
-- progress while the REPL waits for input, and loom.jobs() lists it. With
-- piped input, the batch also runs between lines, and job:wait() runs it to
-- its end.
package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
local check = require("check")
local json = require("loom.json")

local loom_exe = arg[-1]
local root = arg[0]:gsub("tests/lua/[^/]*$", "")
if root:sub(1, 1) ~= "/" then root = assert(os.getenv("PWD")) .. "/" .. root end
local MODEL_DIR = root .. "examples/models/tiny-llava"
local IMAGE = root .. "examples/images/cat.png"

local temp_dirs = {}
local function temp_dir()
  local path = os.tmpname()
  os.remove(path)
  assert(os.execute("mkdir -p '" .. path .. "'"))
  temp_dirs[#temp_dirs + 1] = path
  return path
end

local function write_file(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end

local function count_lines(path)
  local f = io.open(path, "rb")
  if not f then return 0 end
  local n = select(2, f:read("a"):gsub("\n", ""))
  f:close()
  return n
end

local function contains(text, part)
  return type(text) == "string" and text:find(part, 1, true) ~= nil
end

local dir = temp_dir()
local jobs_path, out_path = dir .. "/jobs.jsonl", dir .. "/results.jsonl"
local lines = {}
for i = 1, 40 do
  lines[i] = json.encode({ id = "r" .. i, image = IMAGE, prompt = "Picture " .. i, max_new_tokens = 100 })
end
write_file(jobs_path, table.concat(lines, "\n") .. "\n")

local start_line = string.format(
  'job = loom.batch.start{pipeline = "llava", model_object = loom.llava.load(%q), input = %q, output = %q, concurrency = 4}',
  MODEL_DIR, jobs_path, out_path)

-- With piped input: the listing right after the start, then wait.
do
  local input = dir .. "/input.lua"
  write_file(input, table.concat({ start_line, "loom.jobs()", "summary = job:wait()", "summary.done",
    "loom.jobs()" }, "\n") .. "\n")
  local pipe = assert(io.popen(string.format("'%s' < '%s' 2>&1", loom_exe, input), "r"))
  local out = pipe:read("a")
  pipe:close()
  check.check(contains(out, "[1] "), "loom.jobs() lists the batch: " .. out)
  check.check(contains(out, "\n40\n"), "job:wait() returns the summary of 40 jobs: " .. out)
  check.check(contains(out, "done      batch"), "the last listing shows it done: " .. out)
  check.check(contains(out, "40/40 done"), "with its count: " .. out)
  check.equal(count_lines(out_path), 40, "every job has its result line")
  os.remove(out_path)
end

-- With piped input too, the batch runs while the REPL waits for the next
-- line, before any call that waits.
do
  local first, second = dir .. "/pipe_first.lua", dir .. "/pipe_second.lua"
  write_file(first, start_line .. "\n")
  write_file(second, 'print("DONE=" .. job:progress().done)\n')
  local feed = dir .. "/pipe_feed.sh"
  write_file(feed, string.format("cat '%s'; sleep 1.5; cat '%s'\n", first, second))
  local pipe = assert(io.popen(string.format("sh '%s' | '%s' 2>&1", feed, loom_exe), "r"))
  local out = pipe:read("a")
  pipe:close()
  local done = tonumber(out:match("DONE=(%d+)"))
  check.check(done ~= nil and done > 0,
    "jobs finished while the piped REPL waited for input (" .. tostring(done) .. " done): " .. out)
  os.remove(out_path)
end

-- On a terminal: progress while the REPL waits for the next line.
local has_script = os.execute("command -v script >/dev/null 2>&1")
if not has_script then
  io.stderr:write("note: util-linux 'script' is missing; the terminal REPL case is skipped\n")
else
  local first, second = dir .. "/first.lua", dir .. "/second.lua"
  write_file(first, start_line .. "\n")
  write_file(second, 'print("DONE=" .. job:progress().done)\nloom.jobs()\n')
  local feed = dir .. "/feed.sh"
  write_file(feed, string.format("cat '%s'; sleep 1.5; cat '%s'; sleep 0.3; echo 'os.exit(0)'\n", first, second))
  local cmd = string.format("sh '%s' | LOOM_HISTORY='%s/history' script -qfec '%s' /dev/null 2>&1",
    feed, dir, loom_exe)
  local pipe = assert(io.popen(cmd, "r"))
  local out = pipe:read("a"):gsub("\r", "")
  pipe:close()
  local done = tonumber(out:match("DONE=(%d+)"))
  check.check(done ~= nil and done > 0,
    "jobs finished while the REPL waited for input (" .. tostring(done) .. " done): " .. out)
  check.check(contains(out, "[1] "), "loom.jobs() lists the batch on a terminal")
  check.check(count_lines(out_path) > 0, "results were written in the background")

  -- Ctrl-C interrupts a wait at the prompt, well before the sleep ends
  local feed2 = dir .. "/feed2.sh"
  write_file(feed2, "echo 'loom.async.sleep(20000)'; sleep 0.5; printf '\\003'; sleep 0.3; "
    .. "echo 'print(\"AFTER\")'; sleep 0.2; echo 'os.exit(0)'\n")
  local t0 = os.time()
  pipe = assert(io.popen(string.format("sh '%s' | LOOM_HISTORY='%s/history' script -qfec '%s' /dev/null 2>&1",
    feed2, dir, loom_exe), "r"))
  out = pipe:read("a"):gsub("\r", "")
  pipe:close()
  check.check(contains(out, "interrupted!"), "Ctrl-C raises 'interrupted!' in the waiting chunk: " .. out)
  check.check(contains(out, "AFTER\n"), "the session goes on")
  check.check(os.time() - t0 < 10, "the 20 s sleep was cut short")
end

for _, dir in ipairs(temp_dirs) do os.execute("rm -rf '" .. dir .. "'") end
check.summary()
