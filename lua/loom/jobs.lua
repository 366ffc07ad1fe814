-- Background jobs of the session (batches started with loom.batch.start):
-- `loom.jobs()` prints one line per job with its progress, and
-- loom.jobs.list() returns the job objects.
local M = {}

local registry = {}

-- Add a job: an object with a `name` and a progress() method returning
-- {state, done, total, failed, running, jobs_per_s, eta_s, error}.
function M.register(job)
  registry[#registry + 1] = job
  job.number = #registry
  return job
end

-- The jobs registered so far, finished ones included.
function M.list()
  local out = {}
  for i, job in ipairs(registry) do out[i] = job end
  return out
end

-- The job with this number (as loom.jobs() prints it).
function M.get(number)
  return registry[number]
end

-- Forget the finished jobs.
function M.clear()
  local kept = {}
  for _, job in ipairs(registry) do
    local state = job:progress().state
    if state ~= "done" and state ~= "failed" and state ~= "stopped" and state ~= "cancelled" then
      kept[#kept + 1] = job
      job.number = #kept
    end
  end
  registry = kept
end

local function describe(job)
  local p = job:progress()
  local parts = { string.format("[%d] %-9s %s", job.number, p.state or "?", job.name) }
  if p.total then
    parts[#parts + 1] = string.format("%d/%d done", p.done or 0, p.total)
  end
  if p.failed and p.failed > 0 then parts[#parts + 1] = string.format("%d failed", p.failed) end
  if p.running and p.running > 0 then parts[#parts + 1] = string.format("%d running", p.running) end
  if p.jobs_per_s and p.jobs_per_s > 0 then parts[#parts + 1] = string.format("%.2f jobs/s", p.jobs_per_s) end
  if p.eta_s and p.state == "running" then parts[#parts + 1] = string.format("ETA %.0f s", p.eta_s) end
  if p.error then parts[#parts + 1] = "error: " .. p.error end
  return table.concat(parts, ", ")
end
M.describe = describe

-- Print every job's progress (nothing is returned, so the REPL shows only
-- these lines).
setmetatable(M, {
  __call = function()
    if #registry == 0 then
      print("no background jobs")
    end
    for _, job in ipairs(registry) do print(describe(job)) end
  end,
})

return M
