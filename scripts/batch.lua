-- Run a JSON Lines file of generation jobs through a LLaVA, BLIP-2 or
-- Flamingo checkpoint and append one result line per job:
--   loom scripts/batch.lua --pipeline llava --model DIR --input jobs.jsonl --output results.jsonl
-- docs/batch.md describes the formats, resuming and cluster job arrays.
local async = require("loom.async")
local batch = require("loom.batch")
local json = require("loom.json")

local HELP = [[
usage: loom scripts/batch.lua --pipeline llava|blip2|flamingo --model DIR
                              --input JOBS.jsonl --output RESULTS.jsonl [options]

Generate text for every job of a JSON Lines file, one job per line:
  {"id": "cat-1", "image": "cat.png", "prompt": "What is shown?", "max_new_tokens": 32}
  {"id": "two", "images": ["a.png", "b.png"], "prompt": "<image> <image> Compare them."}
  {"id": "fs", "inputs": [{"image": "a.png"}, "A cat.", {"image": "b.png"}, "A"]}
Each job gets one result line in RESULTS: {"id", "text", "tokens",
"finish_reason", "prompt_tokens", "timings"}, or {"id", "error",
"error_kind", "timings"} when it fails (missing or corrupt image, prompt
too long, malformed line); the batch goes on. A rerun with the same
RESULTS skips the ids already there, so an interrupted batch continues
where it stopped.

  --pipeline NAME          llava, blip2 or flamingo
  --model DIR              checkpoint directory
  --input FILE             jobs, one JSON object per line
  --output FILE            results, appended (created when missing)
  --concurrency N          jobs in flight at once (default 1): images load
                           on the thread pool, waiting images share one
                           vision forward, and generation steps run as one
                           batch (beam search jobs run on their own)
  --max-batch N            sequences per batched step (default 8)
  --no-batching            run each generation on its own
  --linear-path PATH       f32 (default: matches the reference
                           implementations) or bf16 (activations rounded
                           to bf16, AMX where the CPU has it; faster)
  --shard K/N              only the jobs whose id hashes to shard K of N
                           (0 <= K < N); K may be "env" to read it from
                           SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX
  --image-root DIR         directory of relative image paths (default: the
                           directory of the input file)
  --max-new-tokens N       default for jobs that do not set it (default 64)
  --temperature T          default sampling temperature (default 0: greedy)
  --progress MODE          auto (default), bar, lines or none
  --progress-interval S    seconds between progress lines when stderr is
                           not a terminal (default 10)
  --fsync-every N          results between fsync calls (default 16; also
                           every 2 seconds)
  --stats FILE             write a JSON summary (jobs/s, peak RSS) to FILE
  --verbose                print the traceback of unexpected job errors
  -h, --help               show this help

Ctrl-C (or SIGTERM) stops taking jobs and finishes the ones in flight; a
second one abandons them. The batch then exits with status 130 (143 for
SIGTERM), and rerunning the same command finishes it.
Exit status: 0 when every job has a result line (failed jobs included),
1 on an error that stops the batch, 2 on invalid arguments.
]]

local function fail(message, status)
  io.stderr:write("batch: ", message, "\n")
  if status == 2 then io.stderr:write("(see --help)\n") end
  os.exit(status or 1)
end

local VALUE_OPTIONS = {
  ["--pipeline"] = "pipeline", ["--model"] = "model", ["--input"] = "input", ["--output"] = "output",
  ["--shard"] = "shard", ["--image-root"] = "image_root", ["--progress"] = "progress", ["--stats"] = "stats",
  ["--linear-path"] = "linear_path",
}
local NUMBER_OPTIONS = {
  ["--concurrency"] = { "concurrency", "integer", 1 }, ["--max-batch"] = { "max_batch", "integer", 1 },
  ["--max-new-tokens"] = { "max_new_tokens", "integer", 0 }, ["--temperature"] = { "temperature", "number", 0 },
  ["--progress-interval"] = { "progress_interval", "number", 0.001 },
  ["--fsync-every"] = { "fsync_every", "integer", 1 },
}

local function parse(args)
  local opts = { max_new_tokens = 64, concurrency = 1 }
  local i = 1
  while i <= #args do
    local a, value = args[i], args[i + 1]
    if a == "-h" or a == "--help" then
      io.write(HELP)
      os.exit(0)
    elseif a == "--no-batching" or a == "--verbose" then
      opts[a:sub(3):gsub("-", "_")] = true
      i = i + 1
    elseif VALUE_OPTIONS[a] then
      if value == nil then fail("option " .. a .. " needs a value", 2) end
      opts[VALUE_OPTIONS[a]] = value
      i = i + 2
    elseif NUMBER_OPTIONS[a] then
      local key, kind, min = table.unpack(NUMBER_OPTIONS[a])
      local n = tonumber(value or "")
      if kind == "integer" then n = n and math.tointeger(n) end
      if n == nil or n < min then
        fail(string.format("option %s needs %s >= %s, got '%s'", a, kind == "integer" and "an integer" or "a number",
          tostring(min), tostring(value)), 2)
      end
      opts[key] = n
      i = i + 2
    else
      fail("unknown argument '" .. a .. "'", 2)
    end
  end
  for _, required in ipairs({ "pipeline", "model", "input", "output" }) do
    if opts[required] == nil then fail("missing --" .. required:gsub("_", "-"), 2) end
  end
  if batch.PIPELINES[opts.pipeline] == nil then
    fail(string.format("unknown pipeline '%s' (expected llava, blip2 or flamingo)", opts.pipeline), 2)
  end
  if opts.progress ~= nil then
    local modes = { auto = "auto", bar = "bar", lines = "lines", none = false }
    if modes[opts.progress] == nil then fail("--progress must be auto, bar, lines or none", 2) end
    opts.progress = modes[opts.progress]
  end
  if opts.linear_path ~= nil and opts.linear_path ~= "f32" and opts.linear_path ~= "bf16" then
    fail(string.format("--linear-path must be f32 or bf16, got '%s'", opts.linear_path), 2)
  end
  if opts.shard then
    local text = opts.shard
    local k_text, n_text = text:match("^(%a+)/(%d+)$")
    if k_text == "env" then
      local index = os.getenv("SLURM_ARRAY_TASK_ID") or os.getenv("JOB_COMPLETION_INDEX")
      if index == nil then
        fail("--shard env/N needs SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX in the environment", 2)
      end
      text = index .. "/" .. n_text
    end
    local k, n = batch.parse_shard(text)
    if k == nil then fail(n, 2) end
    opts.shard = { k, n }
  end
  return opts
end

local opts = parse(arg or {})
if opts.linear_path then require("loom").set_linear_path(opts.linear_path) end
local defaults = { max_new_tokens = opts.max_new_tokens, temperature = opts.temperature }
for key, value in pairs(defaults) do
  if value ~= nil and not batch.PIPELINES[opts.pipeline].options[key] then
    fail(string.format("--%s is not supported by the %s pipeline", key:gsub("_", "-"), opts.pipeline), 2)
  end
end

local ok, summary = pcall(async.run, batch.run, {
  pipeline = opts.pipeline, model = opts.model, input = opts.input, output = opts.output,
  concurrency = opts.concurrency, max_batch = opts.max_batch, batching = not opts.no_batching,
  shard = opts.shard, image_root = opts.image_root, defaults = defaults, progress = opts.progress,
  progress_interval = opts.progress_interval, fsync_every = opts.fsync_every, handle_signals = true,
  verbose = opts.verbose,
})
if not ok then fail(opts.verbose and tostring(summary) or async.error_message(summary)) end

if opts.stats then
  local f, err = io.open(opts.stats, "w")
  if not f then fail("cannot write the stats file: " .. err) end
  f:write(json.encode(summary), "\n")
  f:close()
end

local shard = opts.shard and string.format(" (shard %d/%d)", opts.shard[1], opts.shard[2]) or ""
if summary.interrupted then
  io.stderr:write(string.format("batch: interrupted by %s: %d jobs done in this run, %d of %d%s not done; "
    .. "rerun the same command to continue\n", summary.interrupted, summary.done, summary.remaining, summary.total, shard))
  os.exit(summary.interrupted == "SIGTERM" and 143 or 130)
end
io.stderr:write(string.format("batch: %d jobs done (%d failed) in %.1f s, %.2f jobs/s; %d of %d%s in %s\n",
  summary.done, summary.failed, summary.seconds, summary.jobs_per_s, summary.done + summary.already, summary.total,
  shard, opts.output))
