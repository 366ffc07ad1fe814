-- Tests of loom.generate's loop on scripted sessions. Greedy picks are the
-- same on the C argmax path and the Lua path, and ties go to the lowest id.
-- Generation ends on EOS, length and stop strings, and each ending gives
-- the same text whether it is decoded at every step or once at the end.
package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
local check = require("check")
local loom = require("loom")
local generate = require("loom.generate")

local function run(name, fn)
  local ok, err = pcall(fn)
  check.check(ok, name .. ": " .. tostring(err))
end

-- A session whose row r receives, at step s, logits with the peak at
-- script[r][s] (0-based id) over a vocabulary of V ids. Ties put the same
-- peak value at a second, higher id too.
local V = 12
local function scripted(script, opts)
  opts = opts or {}
  local step = 0
  local function logits()
    step = step + 1
    local rows = {}
    for r, ids in ipairs(script) do
      local row = {}
      for i = 1, V do row[i] = -1.0 - 0.01 * i end
      local id = ids[step] or ids[#ids]
      row[id + 1] = 5.0
      if opts.tie then row[V] = 5.0 end -- id V - 1 ties the peak
      rows[r] = row
    end
    return loom.tensor(rows)
  end
  return { batch = #script, prefill = logits, step = function() return logits() end }
end

-- A tokenizer whose text is one letter per id (id 0 is "a").
local letters = {
  decode = function(_, ids)
    local out = {}
    for i, id in ipairs(ids) do out[i] = string.char(97 + id) end
    return table.concat(out)
  end,
}

run("greedy picks and EOS", function()
  local res = generate.run(scripted({ { 3, 4, 2, 5 }, { 7, 7, 7, 7 } }),
    { max_new_tokens = 6, eos_token_id = 2, tokenizer = letters })
  check.equal(res[1].tokens, { 3, 4, 2 }, "row 1 stops at its EOS, which is kept in tokens")
  check.equal(res[1].finish_reason, "eos", "row 1 ends on EOS")
  check.equal(res[1].text, "de", "row 1's text leaves the EOS out")
  check.equal(res[2].tokens, { 7, 7, 7, 7, 7, 7 }, "row 2 runs to max_new_tokens")
  check.equal(res[2].finish_reason, "length", "row 2 ends on length")
  check.equal(res[2].text, "hhhhhh", "row 2's text has every token")
end)

run("EOS as the first token", function()
  local res = generate.run(scripted({ { 2 } }), { max_new_tokens = 4, eos_token_id = { 9, 2 }, tokenizer = letters })
  check.equal(res[1].tokens, { 2 }, "the EOS is the only token")
  check.equal(res[1].text, "", "the text is empty")
end)

run("ties go to the lowest id on both paths", function()
  local fast = generate.run(scripted({ { 4, 6 } }, { tie = true }), { max_new_tokens = 2 })
  -- any repetition penalty other than 1 sends the pick through the Lua path; this one
  -- only lowers ids already picked, which never win again here
  local slow = generate.run(scripted({ { 4, 6 } }, { tie = true }),
    { max_new_tokens = 2, repetition_penalty = 1.0001 })
  check.equal(fast[1].tokens, { 4, 6 }, "the C argmax takes the first of equal logits")
  check.equal(slow[1].tokens, fast[1].tokens, "the Lua path picks the same ids")
end)

run("stop strings and streaming decode at every step", function()
  local streamed = {}
  local res = generate.run(scripted({ { 0, 1, 2, 3, 4 } }), {
    max_new_tokens = 5, tokenizer = letters, stop = "cd",
    stream = function(text) streamed[#streamed + 1] = text end,
  })
  check.equal(res[1].text, "ab", "the text ends before the stop string")
  check.equal(res[1].finish_reason, "stop", "the row ends on the stop string")
  check.equal(table.concat(streamed), "ab", "the streamed pieces add up to the text")
end)

run("the same text with and without per-step decoding", function()
  local script = { { 1, 5, 8, 2 }, { 4, 4, 6, 9 } }
  local lazy = generate.run(scripted(script), { max_new_tokens = 4, eos_token_id = 2, tokenizer = letters })
  local eager = generate.run(scripted(script), { max_new_tokens = 4, eos_token_id = 2, tokenizer = letters,
    stream = function() end })
  for r = 1, 2 do
    check.equal(lazy[r].text, eager[r].text, "row " .. r .. " text")
    check.equal(lazy[r].tokens, eager[r].tokens, "row " .. r .. " tokens")
  end
end)

check.summary()
