-- Tests of the LLaVA pipeline on the shipped tiny checkpoint
-- (examples/models/tiny-llava): prompt errors, loading errors, batching
-- with left padding, seeded sampling, stop strings and streaming.
package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
local shared = require("check")
local loom = require("loom")
local llava = require("loom.llava")
local prompt = require("loom.prompt")
local generate = require("loom.generate")
local json = require("loom.json")

local root = arg[0]:gsub("tests/lua/[^/]*$", "")
local MODEL_DIR = root .. "examples/models/tiny-llava"
local IMAGE = root .. "examples/images/cat.png"

-- Count one named check; `detail` explains a failure.
local function check(name, ok, detail)
  return shared.check(ok, name .. (detail and (": " .. detail) or ""))
end

-- Count one check that fn(...) raises an error containing `expected`.
local function checkerror(name, expected, fn, ...)
  local args = table.pack(...)
  local ok = shared.checkerror(function() fn(table.unpack(args, 1, args.n)) end, expected)
  if not ok then io.stderr:write("  in check '" .. name .. "'\n") end
  return ok
end

local function run(name, fn)
  local ok, err = xpcall(fn, debug.traceback)
  if not ok then check(name, false, err) end
end

local function same_list(a, b)
  if #a ~= #b then return false end
  for i = 1, #a do
    if a[i] ~= b[i] then return false end
  end
  return true
end

local function list_text(t)
  local parts = {}
  for i, v in ipairs(t) do parts[i] = tostring(v) end
  return "{" .. table.concat(parts, ", ") .. "}"
end

local function temp_dir()
  local path = os.tmpname()
  os.remove(path)
  assert(os.execute("mkdir -p '" .. path .. "'"))
  return path
end

local function copy_file(src, dst)
  local fh = assert(io.open(src, "rb"))
  local bytes = fh:read("a")
  fh:close()
  fh = assert(io.open(dst, "wb"))
  fh:write(bytes)
  fh:close()
end

-- ---------------------------------------------------------------------------
-- Pure-Lua parts

run("llava_v1 template", function()
  local text = prompt.llava_v1("What is shown?")
  check("llava_v1 template", text == "A chat between a curious human and an artificial intelligence assistant. "
    .. "The assistant gives helpful, detailed, and polite answers to the human's questions. "
    .. "USER: <image>\nWhat is shown? ASSISTANT:", text)
  local multi = prompt.conversation({
    { role = "user", content = "<image>\nHi" }, { role = "assistant", content = "Hello" },
    { role = "user", content = "More?" } }, { system = "S" })
  check("conversation turns", multi == "S USER: <image>\nHi ASSISTANT: Hello</s>USER: More? ASSISTANT:", multi)
end)

run("seeded generator", function()
  local a, b, c = generate.rng(7), generate.rng(7), generate.rng(8)
  local same, differ = true, false
  for _ = 1, 100 do
    local x, y, z = a:random(), b:random(), c:random()
    if x ~= y then same = false end
    if x ~= z then differ = true end
    if x < 0 or x >= 1 then same = false end
  end
  check("rng same seed same draws", same)
  check("rng other seed other draws", differ)
end)

run("next_token filters", function()
  local logits = { 0.0, 3.0, 1.0, 2.0 }
  check("greedy picks the largest", generate.next_token({ table.unpack(logits) }, {}, {}, nil) == 1)
  -- a penalty of 4 turns 3.0 into 0.75, so 2.0 (id 3) wins
  check("repetition penalty", generate.next_token({ table.unpack(logits) }, { repetition_penalty = 4 }, { [1] = true },
    nil) == 3)
  local rng = generate.rng(1)
  local all_top = true
  for _ = 1, 50 do
    if generate.next_token({ table.unpack(logits) }, { temperature = 1.0, top_k = 1 }, {}, rng) ~= 1 then
      all_top = false
    end
  end
  check("top_k 1 sampling is greedy", all_top)
  local counts = {}
  for _ = 1, 2000 do
    local id = generate.next_token({ table.unpack(logits) }, { temperature = 1.0, top_p = 0.5 }, {}, rng)
    counts[id] = (counts[id] or 0) + 1
  end
  -- softmax: id 1 has about 0.64 of the mass, so top_p 0.5 keeps only it
  check("top_p keeps the smallest set reaching p", counts[1] == 2000, list_text(counts))
end)

run("json round trip", function()
  local v = json.decode('{"a": [1, 2.5, "x\\u00e9"], "b": null, "c": {"d": true}}')
  check("json decode", v.a[2] == 2.5 and v.a[3] == "xé" and v.b == json.null and v.c.d == true)
  check("json encode", json.encode({ a = { 1, 2 }, b = "q\"" }) == '{"a":[1,2],"b":"q\\""}')
end)

-- ---------------------------------------------------------------------------
-- Loading errors

run("load errors", function()
  local other = temp_dir()
  local fh = assert(io.open(other .. "/config.json", "w"))
  fh:write('{"model_type": "blip-2"}')
  fh:close()
  checkerror("other architecture rejected", "has model_type 'blip-2', but loom.llava loads 'llava' checkpoints",
    llava.load, other)

  local no_tok = temp_dir()
  for _, name in ipairs({ "config.json", "model.safetensors", "preprocessor_config.json" }) do
    copy_file(MODEL_DIR .. "/" .. name, no_tok .. "/" .. name)
  end
  checkerror("missing tokenizer rejected", "no tokenizer in '" .. no_tok .. "': expected tokenizer.json or tokenizer.model",
    llava.load, no_tok)
  local ok = pcall(llava.load, no_tok, { tokenizer = false })
  check("tokenizer = false loads without one", ok)
  checkerror("missing config", "cannot read the model config", llava.load, other .. "/nowhere")
  os.execute("rm -rf '" .. other .. "' '" .. no_tok .. "'")
end)

-- ---------------------------------------------------------------------------
-- A sharded checkpoint gives the same model

run("sharded checkpoint", function()
  local dir = temp_dir()
  local weights = loom.load(MODEL_DIR .. "/model.safetensors")
  local names = {}
  for name in pairs(weights) do names[#names + 1] = name end
  table.sort(names)
  local shards, weight_map = { {}, {} }, {}
  for i, name in ipairs(names) do
    local shard = i <= #names // 2 and 1 or 2
    shards[shard][name] = weights[name]
    weight_map[name] = string.format("model-%05d-of-00002.safetensors", shard)
  end
  for i = 1, 2 do loom.save(string.format("%s/model-%05d-of-00002.safetensors", dir, i), shards[i]) end
  local fh = assert(io.open(dir .. "/model.safetensors.index.json", "w"))
  fh:write(json.encode({ metadata = {}, weight_map = weight_map }))
  fh:close()
  for _, name in ipairs({ "config.json", "preprocessor_config.json", "tokenizer.model", "added_tokens.json",
    "tokenizer_config.json" }) do
    copy_file(MODEL_DIR .. "/" .. name, dir .. "/" .. name)
  end

  local single = llava.load(MODEL_DIR):generate({ image = IMAGE, question = "Hi", max_new_tokens = 6 })
  local sharded = llava.load(dir):generate({ image = IMAGE, question = "Hi", max_new_tokens = 6 })
  check("sharded equals single file", same_list(single.tokens, sharded.tokens),
    list_text(single.tokens) .. " vs " .. list_text(sharded.tokens))
  os.execute("rm -rf '" .. dir .. "'")
end)

-- ---------------------------------------------------------------------------
-- Tied output head: without lm_head.weight the token embeddings project

run("tied output head", function()
  local dir = temp_dir()
  local weights = loom.load(MODEL_DIR .. "/model.safetensors")
  local kept = {}
  for name, t in pairs(weights) do
    if name ~= "language_model.lm_head.weight" then kept[name] = t end
  end
  loom.save(dir .. "/model.safetensors", kept)
  local config = json.read(MODEL_DIR .. "/config.json")
  config.text_config.tie_word_embeddings = true
  local fh = assert(io.open(dir .. "/config.json", "w"))
  fh:write(json.encode(config))
  fh:close()

  local tied = llava.load(dir, { tokenizer = false, preprocessor = false })
  local ids = loom.tensor({ { 1, 20, 30 } }, "i64")
  local logits = tied.lm:forward({ input_ids = ids })
  local _, hidden = tied.lm:forward({ input_ids = ids, logits = false })
  local expected = loom.matmul(hidden, weights["language_model.model.embed_tokens.weight"]:transpose(1, 2)) -- (V, D) -> (D, V)
  check("tied head uses the embeddings", loom.max_abs_diff(logits, expected) < 1e-5)
  config.text_config.tie_word_embeddings = false
  fh = assert(io.open(dir .. "/config.json", "w"))
  fh:write(json.encode(config))
  fh:close()
  checkerror("untied head must exist", "missing tensor 'language_model.lm_head.weight'", llava.load, dir,
    { tokenizer = false, preprocessor = false })
  os.execute("rm -rf '" .. dir .. "'")
end)

-- ---------------------------------------------------------------------------
-- Prompt errors and generation on the tiny model

local model = llava.load(MODEL_DIR)

run("prompt errors", function()
  checkerror("more markers than images", "prompt has 2 <image> markers but 1 image was given: 1 marker more than images",
    model.generate, model, { image = IMAGE, prompt = "USER: <image> <image> hi ASSISTANT:", max_new_tokens = 1 })
  checkerror("more images than markers", "prompt has 0 <image> markers but 2 images were given: 2 images more than markers",
    model.generate, model, { images = { IMAGE, IMAGE }, prompt = "USER: hi ASSISTANT:", max_new_tokens = 1 })
  checkerror("image tokens in ids differ from images", "input has 2 image tokens (id 1000) but 1 image was given",
    model.generate, model, { input_ids = { 1, 5, 1000, 1000 }, image = IMAGE, max_new_tokens = 1 })
  local long = "<image>" .. string.rep(" word", 400)
  local ok, err = pcall(model.generate, model, { image = IMAGE, prompt = long, max_new_tokens = 1 })
  check("prompt longer than context", not ok and tostring(err):find("but the context holds 256: %d+ tokens too many") ~= nil,
    tostring(err))
end)

run("greedy generation", function()
  local r = model:generate({ image = IMAGE, question = "What is in the picture?", max_new_tokens = 8 })
  check("greedy returns tokens", #r.tokens >= 1 and #r.tokens <= 8, list_text(r.tokens))
  check("greedy returns text", type(r.text) == "string")
  local bos = 0
  for _, id in ipairs(r.prompt_ids) do
    if id == model.bos_id then bos = bos + 1 end
  end
  check("exactly one BOS", bos == 1 and r.prompt_ids[1] == model.bos_id, list_text(r.prompt_ids))
  local again = model:generate({ image = IMAGE, question = "What is in the picture?", max_new_tokens = 8 })
  check("greedy is deterministic", same_list(r.tokens, again.tokens))
end)

run("batch equals singles", function()
  local prompts = { prompt.llava_v1("Hi"), prompt.llava_v1("Describe this image in a few words, please.") }
  local batch = model:generate({ prompts = prompts, images = { IMAGE, IMAGE }, max_new_tokens = 6 })
  for i, p in ipairs(prompts) do
    local single = model:generate({ prompt = p, image = IMAGE, max_new_tokens = 6 })
    check("batch row " .. i .. " equals single", same_list(batch[i].tokens, single.tokens),
      list_text(batch[i].tokens) .. " vs " .. list_text(single.tokens))
  end
end)

run("seeded sampling", function()
  local args = { image = IMAGE, question = "Tell me", max_new_tokens = 10, temperature = 1.5, top_k = 50, seed = 42 }
  local a = model:generate(args)
  local b = model:generate(args)
  check("same seed same tokens", same_list(a.tokens, b.tokens), list_text(a.tokens) .. " vs " .. list_text(b.tokens))
  local differs = false
  for seed = 1, 5 do
    args.seed = seed
    if not same_list(model:generate(args).tokens, a.tokens) then differs = true end
  end
  check("other seeds other tokens", differs)
end)

run("stop strings and streaming", function()
  -- avoid EOS so the text is long enough to cut
  local args = { image = IMAGE, question = "Go on", max_new_tokens = 24, eos_token_id = -1 }
  local full = model:generate(args)
  check("full text not empty", #full.text >= 4, string.format("%q", full.text))

  -- a stop string taken from the middle of the text (whole characters)
  local chars = {}
  for _, c in utf8.codes(full.text) do chars[#chars + 1] = utf8.char(c) end
  local from = math.max(2, #chars // 2)
  local stop = table.concat(chars, "", from, math.min(#chars, from + 1))
  local cut = full.text:find(stop, 1, true)
  args.stop = { stop }
  local stopped = model:generate(args)
  check("stop string ends the text", stopped.text == full.text:sub(1, cut - 1),
    string.format("%q vs %q (stop %q)", stopped.text, full.text:sub(1, cut - 1), stop))
  check("finish reason stop", stopped.finish_reason == "stop", tostring(stopped.finish_reason))
  check("stopped text is shorter", #stopped.text < #full.text)

  local pieces = {}
  args.stream = function(text, row)
    assert(row == 1)
    pieces[#pieces + 1] = text
  end
  local streamed = model:generate(args)
  check("streamed text equals result", table.concat(pieces) == streamed.text,
    string.format("%q vs %q", table.concat(pieces), streamed.text))
  args.stop, pieces = nil, {}
  local streamed_full = model:generate(args)
  check("streamed text without stop", table.concat(pieces) == streamed_full.text and streamed_full.text == full.text)
end)

shared.summary()
