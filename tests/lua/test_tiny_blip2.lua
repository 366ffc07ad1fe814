-- Tests of the shipped BLIP-2 checkpoint (examples/models/tiny-blip2).
-- scripts/make_tiny_blip2.lua rewrites it byte for byte. Its cut-down GPT-2
-- tokenizer gives GPT-2's tokens (ids shifted past OPT's four special
-- tokens) wherever GPT-2 uses only the kept merges. scripts/blip2.lua
-- captions and answers with it, and logs the model unless --quiet is given.
package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
local check = require("check")
local loom = require("loom")
local json = require("loom.json")
local blip2 = require("loom.blip2")
local log = require("loom.log")

local root = arg[0]:gsub("tests/lua/[^/]*$", "")
local MODEL_DIR = root .. "examples/models/tiny-blip2"
local IMAGE = root .. "examples/images/cat.png"
local GPT2_DIR = root .. "tests/golden/tokenizers/gpt2_bpe"
local loom_exe = arg[-1]

-- Ids before the GPT-2 tokens: <s> <pad> </s> <unk>.
local SHIFT = 4

local function run(name, fn)
  local ok, err = xpcall(fn, debug.traceback)
  check.check(ok, name .. ": " .. tostring(err))
end

local function quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

-- Run a command line; returns its standard output, standard error and exit code.
local function command(cmdline)
  local err_path = os.tmpname()
  local pipe = assert(io.popen(cmdline .. " 2>" .. quote(err_path), "r"))
  local out = pipe:read("a")
  local _, _, code = pipe:close()
  local f = assert(io.open(err_path, "rb"))
  local err = f:read("a")
  f:close()
  os.remove(err_path)
  return out, err, code
end

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local data = f:read("a")
  f:close()
  return data
end

-- The model is loaded once, without its load summary on stderr.
log.set_level("warning")
local MODEL = blip2.load(MODEL_DIR)
log.set_level("info")
local TOK = MODEL.tokenizer

-- ---------------------------------------------------------------------------
-- Files

run("maker script rewrites the shipped files", function()
  local dir = os.tmpname()
  os.remove(dir)
  local out, err, code = command(quote(loom_exe) .. " " .. quote(root .. "scripts/make_tiny_blip2.lua") .. " "
    .. quote(dir) .. " " .. quote(GPT2_DIR .. "/vocab.bpe"))
  check.equal(code, 0, "make_tiny_blip2.lua exit status (stderr: " .. err .. ")")
  check.check(out:find("wrote", 1, true), "make_tiny_blip2.lua reports what it wrote: " .. out)
  for _, name in ipairs({ "config.json", "model.safetensors", "preprocessor_config.json", "vocab.json", "merges.txt",
    "tokenizer_config.json", "special_tokens_map.json" }) do
    local shipped, written = read_file(MODEL_DIR .. "/" .. name), read_file(dir .. "/" .. name)
    check.check(shipped ~= nil, name .. " is shipped")
    check.check(shipped == written, name .. " is what the script writes")
  end
  os.execute("rm -rf " .. quote(dir))
end)

run("shipped checkpoint size", function()
  local total = 0
  for _, name in ipairs({ "config.json", "model.safetensors", "preprocessor_config.json", "vocab.json", "merges.txt",
    "tokenizer_config.json", "special_tokens_map.json" }) do
    total = total + #(read_file(MODEL_DIR .. "/" .. name) or "")
  end
  check.check(total < 3 * 2 ^ 20, string.format("tiny-blip2 takes %d bytes, expected under 3 MiB", total))
end)

run("shipped checkpoint layout", function()
  local cfg = json.read(MODEL_DIR .. "/config.json")
  local weights = loom.load(MODEL_DIR)
  local expected = blip2.checkpoint_layout(cfg)
  local names = {}
  for _, entry in ipairs(expected) do
    names[entry.name] = true
    local t = weights[entry.name]
    check.check(t ~= nil, "tensor " .. entry.name .. " is in the checkpoint")
    if t then check.equal(t:shape(), entry.shape, "shape of " .. entry.name) end
  end
  for name in pairs(weights) do check.check(names[name], "tensor " .. name .. " is in the layout") end

  -- the fused qkv bias keeps its key third at zero, as real checkpoints do
  local bias = weights["vision_model.encoder.layers.0.self_attn.qkv.bias"]
  local third = bias:size(1) // 3
  check.equal(loom.max(loom.abs(bias:narrow(1, third + 1, third))):item(), 0.0, "key bias is zero")
  check.check(loom.max(loom.abs(bias:narrow(1, 1, third))):item() > 0, "query bias is not zero")
  check.equal(cfg.text_config.vocab_size % 8, 0, "OPT vocab_size is a multiple of 8")
  check.check(cfg.text_config.vocab_size >= TOK:vocab_size(), "OPT vocab_size covers the tokenizer")
end)

-- ---------------------------------------------------------------------------
-- Tokenizer

run("tokenizer special tokens", function()
  check.equal(TOK:kind(), "byte_level_bpe", "tokenizer kind")
  check.equal({ TOK:token_to_id("<s>"), TOK:token_to_id("<pad>"), TOK:token_to_id("</s>"), TOK:token_to_id("<unk>") },
    { 0, 1, 2, 3 }, "OPT's special tokens come first")
  -- tokenizer_config.json makes "</s>" the BOS, and encode prepends it
  check.equal(TOK:special_id("bos"), 2, "bos id")
  check.equal(TOK:special_id("eos"), 2, "eos id")
  check.equal(TOK:special_id("pad"), 1, "pad id")
  check.equal(TOK:encode("a")[1], 2, "encode prepends </s> by default")
  check.equal(MODEL.bos_id, 2, "model bos id")
end)

run("tokenizer matches GPT-2 reference ids", function()
  local expected = json.read(GPT2_DIR .. "/expected.json")
  local kept = TOK:vocab_size() - SHIFT -- GPT-2 ids below this are kept
  local compared = 0
  for _, case in ipairs(expected.cases) do
    local ref = case.ids_hf_gpt2tokenizer
    local covered = true
    for _, id in ipairs(ref) do covered = covered and id < kept end
    if covered then
      compared = compared + 1
      local shifted = {}
      for i, id in ipairs(ref) do shifted[i] = id + SHIFT end
      check.equal(TOK:encode(case.text, { add_bos = false }), shifted, string.format("ids of case %d", case.index))
    end
    -- every text round-trips, covered or not
    check.equal(TOK:decode(TOK:encode(case.text, { add_bos = false, parse_special = false })), case.text,
      string.format("round trip of case %d", case.index))
  end
  check.check(compared >= 5, string.format("only %d reference cases use the kept merges alone", compared))
end)

run("tokenizer matches full GPT-2 on common words", function()
  -- the full GPT-2 tokenizer passes the parity cases; here it gives the
  -- expected ids of single words, each of which the pre-tokenizer keeps whole
  local full = assert(loom.tokenizer.load_bpe_files(GPT2_DIR .. "/encoder.json", GPT2_DIR .. "/vocab.bpe"))
  local kept = TOK:vocab_size() - SHIFT
  local text = read_file(root .. "tests/golden/blip2/README.txt")
    .. read_file(root .. "tests/golden/tokenizers/README.txt")
  local compared, seen = 0, {}
  for word in text:gmatch(" %a+") do
    if not seen[word] then
      seen[word] = true
      local ids = full:encode(word)
      local covered = true
      for _, id in ipairs(ids) do covered = covered and id < kept end
      if covered then
        compared = compared + 1
        local shifted = {}
        for i, id in ipairs(ids) do shifted[i] = id + SHIFT end
        check.equal(TOK:encode(word, { add_bos = false }), shifted, "ids of '" .. word .. "'")
      end
    end
  end
  check.check(compared >= 100, string.format("only %d words compared", compared))
end)

-- ---------------------------------------------------------------------------
-- Generation and the script

run("caption in process", function()
  local res = MODEL:generate({ image = IMAGE, max_new_tokens = 8 })
  check.check(type(res.text) == "string" and #res.text > 0, "caption text: " .. tostring(res.text))
  check.check(#res.tokens >= 1 and #res.tokens <= 8, "caption has 1 to 8 tokens")
  local answer = MODEL:generate({ image = IMAGE, question = "what is in the picture?", max_new_tokens = 8,
    num_beams = 2 })
  check.check(type(answer.text) == "string", "answer text")
  -- the prompt is </s> then the tokens of the question template
  check.equal(answer.prompt_ids[1], 2, "prompt starts with </s>")
  check.equal(TOK:decode(answer.prompt_ids), "Question: what is in the picture? Answer:", "prompt text")
end)

run("prompt that does not fit", function()
  -- OPT's positions count the queries and the prompt ids
  local context = MODEL.lm.cfg.max_position_embeddings
  local queries = MODEL.config.num_query_tokens
  local ids = {}
  for i = 1, context - queries + 5 do ids[i] = 10 + i % 40 end
  local ok, err = pcall(MODEL.generate, MODEL, { image = IMAGE, input_ids = ids, max_new_tokens = 2 })
  check.check(not ok and tostring(err):find(string.format("input is %d positions long but OPT's context holds %d: "
    .. "5 too many", context + 5, context), 1, true) ~= nil, "too long: " .. tostring(err))
  local full = { table.unpack(ids, 1, context - queries) }
  ok, err = pcall(MODEL.generate, MODEL, { image = IMAGE, input_ids = full, max_new_tokens = 2 })
  check.check(not ok and tostring(err):find("fills OPT's context of " .. context .. ": no room for new tokens", 1,
    true) ~= nil, "exactly full: " .. tostring(err))
end)

run("script prints a caption", function()
  local base = quote(loom_exe) .. " " .. quote(root .. "scripts/blip2.lua") .. " --model " .. quote(MODEL_DIR)
    .. " --image " .. quote(IMAGE)
  local out, err, code = command(base .. " --max-new-tokens 8")
  check.equal(code, 0, "exit status (stderr: " .. err .. ")")
  local line = out:match("^([^\n]+)\n$")
  check.check(line ~= nil and line:find("%S"), "one line of text: " .. out)

  -- the same caption as in process
  local res = MODEL:generate({ image = IMAGE, max_new_tokens = 8 })
  check.equal(line, res.text, "script caption equals model:generate")

  -- the load summary goes to stderr at info level
  check.check(err:find("loom: info: loaded BLIP-2 from", 1, true), "stderr has the load summary: " .. err)
  check.check(err:find("loom: info:   lm.num_hidden_layers:%s+2\n"), "summary lists the OPT layers")
  check.check(err:find("loom: info:   parameters:%s+[%d,]+\n"), "summary has the parameter count")
  check.check(err:find("loom: info:   memory:%s+[%d.]+ MiB f32, memory%-mapped\n"), "summary has the memory")

  out, err, code = command(base .. " --max-new-tokens 8 --quiet")
  check.equal(code, 0, "--quiet exit status")
  check.equal(err, "", "--quiet leaves stderr empty")
  check.equal(out, line .. "\n", "--quiet prints the same caption")

  out, err, code = command(base .. " --image " .. quote(IMAGE) .. " --question 'what is it?' --beams 2 --quiet")
  check.equal(code, 0, "batch with a question exit status (stderr: " .. err .. ")")
  local lines = 0
  for _ in out:gmatch("[^\n]*\n") do lines = lines + 1 end
  check.equal(lines, 2, "one line per image")
end)

run("script reports a missing image", function()
  local out, err, code = command(quote(loom_exe) .. " " .. quote(root .. "scripts/blip2.lua") .. " --quiet --model "
    .. quote(MODEL_DIR) .. " --image /nonexistent/cat.png")
  check.equal(code, 1, "exit status")
  check.equal(out, "", "nothing on stdout")
  check.check(err:find("^blip2: .*/nonexistent/cat.png"), "stderr names the file: " .. err)
end)

check.summary()
