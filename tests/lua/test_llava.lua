-- Tests of the LLaVA pipeline on the shipped tiny checkpoint
-- (examples/models/tiny-llava): prompt errors, loading errors, the original
-- LLaVA layouts built from it (and tests/data/llava/mm_projector.bin),
-- tokenizer and image errors, batching with left padding, seeded sampling,
-- stop strings and streaming.
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
-- Original LLaVA layouts, built from the tiny Hugging Face checkpoint

local PROJECTOR_BIN = root .. "tests/data/llava/mm_projector.bin"
local PROJECTOR_NUMPY = root .. "tests/data/llava/mm_projector_numpy.bin"

-- Hugging Face prefix -> original-layout prefix of every tensor group.
local ORIGINAL_NAMES = {
  { "language_model.model.", "model." },
  { "language_model.lm_head.", "lm_head." },
  { "multi_modal_projector.linear_1.", "model.mm_projector.0." },
  { "multi_modal_projector.linear_2.", "model.mm_projector.2." },
}

local function write_json(path, value)
  local fh = assert(io.open(path, "w"))
  fh:write(json.encode(value))
  fh:close()
end

-- The tensors of `weights` whose names start with a prefix of `map`
-- ({from, to} pairs), renamed.
local function renamed(weights, map)
  local out = {}
  for name, t in pairs(weights) do
    for _, pair in ipairs(map) do
      if name:sub(1, #pair[1]) == pair[1] then out[pair[2] .. name:sub(#pair[1] + 1)] = t end
    end
  end
  return out
end

local function copy_files(names, dst)
  for _, name in ipairs(names) do copy_file(MODEL_DIR .. "/" .. name, dst .. "/" .. name) end
end

local TOKENIZER_FILES = { "tokenizer.model", "added_tokens.json", "tokenizer_config.json" }

local hf_config = json.read(MODEL_DIR .. "/config.json")
local hf_weights = loom.load(MODEL_DIR .. "/model.safetensors")

-- A CLIP checkpoint directory with the tiny vision tower: a CLIPVisionModel
-- (kind "vision") or the vision half of a CLIPModel (kind "clip").
local function make_tower(kind, with_weights)
  local dir = temp_dir()
  local vcfg = {}
  for k, v in pairs(hf_config.vision_config) do vcfg[k] = v end
  if kind == "clip" then
    write_json(dir .. "/config.json", { model_type = "clip", vision_config = vcfg, projection_dim = 64 })
  else
    write_json(dir .. "/config.json", vcfg)
  end
  if with_weights ~= false then
    loom.save(dir .. "/model.safetensors", renamed(hf_weights, { { "vision_tower.vision_model.", "vision_model." } }))
  end
  copy_files({ "preprocessor_config.json" }, dir)
  return dir
end

-- The LLaVA keys of an original config.json, with `extra` on top of
-- LLaVA-1.5's values.
local function original_config(tower, extra)
  local cfg = {}
  for k, v in pairs(hf_config.text_config) do cfg[k] = v end
  cfg.architectures = { "LlavaLlamaForCausalLM" }
  cfg.model_type = "llava"
  cfg.mm_vision_tower = tower
  cfg.mm_hidden_size = 64
  cfg.mm_projector_type = "mlp2x_gelu"
  cfg.mm_vision_select_layer = -2
  cfg.mm_vision_select_feature = "patch"
  cfg.mm_use_im_start_end = false
  cfg.mm_use_im_patch_token = false
  cfg.image_aspect_ratio = "pad"
  for k, v in pairs(extra or {}) do cfg[k] = v end
  return cfg
end

-- An original LlavaLlamaForCausalLM directory; `extra_weights` adds tensors.
local function make_original(tower, extra, extra_weights)
  local dir = temp_dir()
  write_json(dir .. "/config.json", original_config(tower, extra))
  local weights = renamed(hf_weights, ORIGINAL_NAMES)
  for name, t in pairs(extra_weights or {}) do weights[name] = t end
  loom.save(dir .. "/model.safetensors", weights)
  copy_files(TOKENIZER_FILES, dir)
  return dir
end

-- The same input for both layouts: ids with the Hugging Face image token
-- (1000) or LLaVA's IMAGE_TOKEN_INDEX (-200), and one image's pixels.
local HF_IDS = { 1, 319, 1000, 13, 724, 338, 445, 973 }
local function original_ids(ids)
  local out = {}
  for i, id in ipairs(ids) do out[i] = id == 1000 and -200 or id end
  return out
end
local pixels = loom.randn({ 1, 3, 112, 112 }, { seed = 11 })
local hf_model = llava.load(MODEL_DIR)
local hf_logits = hf_model:forward({ input_ids = { HF_IDS }, pixel_values = pixels })

run("original layout logits", function()
  local tower = make_tower("vision")
  local dir = make_original(tower)
  local model = llava.load(dir)
  check("original layout name", model.config.layout == "original", tostring(model.config.layout))
  check("original image token id", model.image_token_id == -200, tostring(model.image_token_id))
  local logits = model:forward({ input_ids = { original_ids(HF_IDS) }, pixel_values = pixels })
  local diff = loom.max_abs_diff(logits, hf_logits)
  check("original logits equal Hugging Face", diff <= 1e-6, string.format("max abs diff %g", diff))

  -- vision_tower = DIR replaces an mm_vision_tower that is not local
  local remote = make_original(nil, { mm_vision_tower = "openai/clip-vit-large-patch14-336" })
  checkerror("remote vision tower", "vision tower 'openai/clip-vit-large-patch14-336' (mm_vision_tower in "
    .. remote .. "/config.json) is not a local directory: download that CLIP checkpoint and pass vision_tower = DIR",
    llava.load, remote)
  local given = llava.load(remote, { vision_tower = tower })
  diff = loom.max_abs_diff(given:forward({ input_ids = { original_ids(HF_IDS) }, pixel_values = pixels }), hf_logits)
  check("vision_tower option", diff <= 1e-6, string.format("max abs diff %g", diff))
  checkerror("vision_tower not a directory", "vision tower '" .. dir .. "/config.json' is not a directory",
    llava.load, remote, { vision_tower = dir .. "/config.json" })
  os.execute("rm -rf '" .. tower .. "' '" .. dir .. "' '" .. remote .. "'")
end)

run("original layout generation", function()
  local tower = make_tower("vision")
  local dir = make_original(tower)
  local model = llava.load(dir)

  -- LLaVA's tokenizer_image_token: -200 in place of the marker, one BOS
  local r = model:generate({ image = IMAGE, question = "What is shown?", max_new_tokens = 6 })
  local images = 0
  for _, id in ipairs(r.prompt_ids) do
    if id == -200 then images = images + 1 end
  end
  check("one image token -200", images == 1 and r.prompt_ids[1] == 1, list_text(r.prompt_ids))

  -- the same ids and pixels through the Hugging Face layout give the same tokens
  local hf_ids = {}
  for i, id in ipairs(r.prompt_ids) do hf_ids[i] = id == -200 and 1000 or id end
  local px = model:preprocess({ IMAGE })
  local expected = hf_model:generate({ input_ids = hf_ids, image = px[1], max_new_tokens = 6 })
  check("original generation equals Hugging Face", same_list(r.tokens, expected.tokens),
    list_text(r.tokens) .. " vs " .. list_text(expected.tokens))
  os.execute("rm -rf '" .. tower .. "' '" .. dir .. "'")
end)

run("pad to square preprocessing", function()
  local tower = make_tower("vision")
  local dir = make_original(tower)
  local model = llava.load(dir)
  local wide = loom.image.load(IMAGE):narrow(1, 1, 200):contiguous() -- (300, 451, 3) -> (200, 451, 3)
  local tall = loom.image.load(IMAGE):narrow(2, 1, 150):contiguous() -- (300, 451, 3) -> (300, 150, 3)

  -- expand2square by hand: a square of int(mean * 255) with the image
  -- centred, offset (side - short) // 2 (LLaVA's mm_utils.expand2square)
  local mean = json.read(tower .. "/preprocessor_config.json").image_mean
  local function expand2square(img)
    local h, w = img:size(1), img:size(2)
    local side = math.max(h, w)
    local square = loom.zeros({ side, side, 3 }, "u8")
    for c = 1, 3 do square:select(3, c):fill(math.floor(mean[c] * 255)) end
    square:narrow(1, (side - h) // 2 + 1, h):narrow(2, (side - w) // 2 + 1, w):copy(img)
    return square
  end
  for name, img in pairs({ wide = wide, tall = tall }) do
    local padded = model:preprocess({ img })
    local expected = hf_model:preprocess({ expand2square(img) })
    check("pad " .. name .. " equals expand2square", loom.equal(padded, expected),
      string.format("max abs diff %g", loom.max_abs_diff(padded, expected)))
    check("pad " .. name .. " differs from no padding", not loom.equal(padded, hf_model:preprocess({ img })))
  end

  -- image_aspect_ratio "square" keeps the plain preprocessing
  local square_dir = make_original(tower, { image_aspect_ratio = "square" })
  local plain = llava.load(square_dir):preprocess({ wide })
  check("square aspect ratio does not pad", loom.equal(plain, hf_model:preprocess({ wide })))
  os.execute("rm -rf '" .. tower .. "' '" .. dir .. "' '" .. square_dir .. "'")
end)

run("base LLaMA with mm_projector.bin", function()
  local tower = make_tower("clip")
  local base = temp_dir()
  local cfg = {}
  for k, v in pairs(hf_config.text_config) do cfg[k] = v end
  cfg.architectures = { "LlamaForCausalLM" }
  write_json(base .. "/config.json", cfg)
  loom.save(base .. "/model.safetensors", renamed(hf_weights, { ORIGINAL_NAMES[1], ORIGINAL_NAMES[2] }))
  copy_files(TOKENIZER_FILES, base)

  -- the committed file contains the tiny projector rounded to bf16
  local file = loom.load(PROJECTOR_BIN)
  local pairs_checked = 0
  for _, pair in ipairs({ { "linear_1", "0" }, { "linear_2", "2" } }) do
    for _, part in ipairs({ "weight", "bias" }) do
      local got = file["model.mm_projector." .. pair[2] .. "." .. part]
      local want = hf_weights["multi_modal_projector." .. pair[1] .. "." .. part]
      check("projector file " .. pair[2] .. "." .. part .. " is bf16", got:dtype() == "bf16", got:dtype())
      check("projector file " .. pair[2] .. "." .. part .. " rounds the tiny one", loom.equal(got, want:to("bf16")))
      pairs_checked = pairs_checked + 1
    end
  end
  check("projector file tensors", pairs_checked == 4)

  -- the Hugging Face model with that projector gives the same logits
  local hf_dir = temp_dir()
  local swapped = {}
  for name, t in pairs(hf_weights) do swapped[name] = t end
  for name, t in pairs(renamed(file, { { "model.mm_projector.0.", "multi_modal_projector.linear_1." },
    { "model.mm_projector.2.", "multi_modal_projector.linear_2." } })) do
    swapped[name] = t
  end
  loom.save(hf_dir .. "/model.safetensors", swapped)
  copy_files({ "config.json", "preprocessor_config.json" }, hf_dir)
  copy_files(TOKENIZER_FILES, hf_dir)
  local expected = llava.load(hf_dir):forward({ input_ids = { HF_IDS }, pixel_values = pixels })

  local model = llava.load(base, { projector = PROJECTOR_BIN, vision_tower = tower })
  check("base+projector layout name", model.config.layout == "base+projector", tostring(model.config.layout))
  check("projector kind read from the tensors", model.projector.kind == "mlp2x_gelu", model.projector.kind)
  local logits = model:forward({ input_ids = { original_ids(HF_IDS) }, pixel_values = pixels })
  local diff = loom.max_abs_diff(logits, expected)
  check("base+projector logits equal Hugging Face", diff <= 1e-6, string.format("max abs diff %g", diff))

  -- scripts/llava.lua passes --projector and --vision-tower to load
  local script = string.format("'%s' '%sscripts/llava.lua' --model '%s' --projector '%s' --vision-tower '%s' "
    .. "--image '%s' --prompt Hi --max-new-tokens 4 --quiet 2>&1", arg[-1], root, base, PROJECTOR_BIN, tower, IMAGE)
  local pipe = assert(io.popen(script, "r"))
  local printed = pipe:read("a")
  local ok = pipe:close()
  local by_api = model:generate({ image = IMAGE, question = "Hi", max_new_tokens = 4 })
  check("script with --projector", ok and #by_api.text > 0 and printed == by_api.text .. "\n",
    string.format("%q vs %q", printed, by_api.text))

  -- a runtime error in the script is one line naming the file, with status 1
  local missing = string.format("'%s' '%sscripts/llava.lua' --model '%s' --projector '%s' --vision-tower '%s' "
    .. "--image /nonexistent/cat.png --prompt Hi 2>&1", arg[-1], root, base, PROJECTOR_BIN, tower)
  pipe = assert(io.popen(missing, "r"))
  printed = pipe:read("a")
  local _, _, status = pipe:close()
  check("script error status", status == 1, tostring(status))
  check("script error names the image", printed:find("llava: /nonexistent/cat.png", 1, true) ~= nil, printed)
  check("script error has no traceback", printed:find("stack traceback", 1, true) == nil, printed)

  -- a config.json beside the projector file gives the LLaVA settings
  local beside = temp_dir()
  copy_file(PROJECTOR_BIN, beside .. "/mm_projector.bin")
  write_json(beside .. "/config.json", { mm_projector_type = "linear", mm_vision_select_layer = -2 })
  checkerror("projector config beside the file", "projector kind 'linear' does not match the checkpoint",
    llava.load, base, { projector = beside .. "/mm_projector.bin", vision_tower = tower })

  -- embeddings saved in the projector file replace the base model's
  local with_embeddings = {}
  for name, t in pairs(file) do with_embeddings[name] = t end
  local scaled = hf_weights["language_model.model.embed_tokens.weight"] * 2
  with_embeddings["model.embed_tokens.weight"] = scaled
  local alone = temp_dir()
  loom.save(alone .. "/with_embeddings.safetensors", with_embeddings)
  local replaced = llava.load(base, { projector = alone .. "/with_embeddings.safetensors", vision_tower = tower,
    tokenizer = false })
  check("projector file embeddings used", loom.equal(replaced.lm.embed_tokens.weight, scaled))
  os.execute("rm -rf '" .. alone .. "'")

  -- errors
  checkerror("foreign pickle global", "global 'numpy.core.multiarray._reconstruct' is not allowed",
    llava.load, base, { projector = PROJECTOR_NUMPY, vision_tower = tower })
  checkerror("projector file without a projector", "projector file '" .. tower .. "/model.safetensors' holds no "
    .. "projector weights (expected model.mm_projector.0.weight or model.mm_projector.weight; found vision_model.",
    llava.load, base, { projector = tower .. "/model.safetensors", vision_tower = tower })
  checkerror("base without projector", "'" .. base .. "' is a LLaMA checkpoint without a projector: pass "
    .. "projector = FILE", llava.load, base, { vision_tower = tower })
  checkerror("base without vision tower", "LLaVA-1.5's pretraining settings names no vision tower (mm_vision_tower)",
    llava.load, base, { projector = PROJECTOR_BIN })
  checkerror("projector on the Hugging Face layout", "is a Hugging Face LLaVA checkpoint: projector = FILE applies",
    llava.load, MODEL_DIR, { projector = PROJECTOR_BIN })
  os.execute("rm -rf '" .. tower .. "' '" .. base .. "' '" .. hf_dir .. "' '" .. beside .. "'")
end)

run("original layout variants", function()
  local tower = make_tower("vision")

  -- a vision tower trained with the model is saved inside the checkpoint;
  -- the tower directory then gives only its config and preprocessor
  local bare = make_tower("vision", false)
  local embedded = make_original(bare, { unfreeze_mm_vision_tower = true }, renamed(hf_weights,
    { { "vision_tower.vision_model.", "model.vision_tower.vision_tower.vision_model." } }))
  local diff = loom.max_abs_diff(llava.load(embedded):forward({ input_ids = { original_ids(HF_IDS) },
    pixel_values = pixels }), hf_logits)
  check("embedded vision tower", diff <= 1e-6, string.format("max abs diff %g", diff))
  local missing_tower = make_original(bare, { unfreeze_mm_vision_tower = true })
  checkerror("unfrozen tower without weights", "sets unfreeze_mm_vision_tower, but '" .. missing_tower
    .. "' has no vision tower weights", llava.load, missing_tower)
  os.execute("rm -rf '" .. missing_tower .. "'")

  -- a sharded PyTorch index (pytorch_model.bin.index.json); the reader finds
  -- each shard's format by content, so safetensors shards stand in here
  local sharded = temp_dir()
  write_json(sharded .. "/config.json", original_config(tower))
  copy_files(TOKENIZER_FILES, sharded)
  local weights = renamed(hf_weights, ORIGINAL_NAMES)
  local shards, weight_map, i = { {}, {} }, {}, 0
  for name, t in pairs(weights) do
    i = i + 1
    local shard = i % 2 + 1
    shards[shard][name] = t
    weight_map[name] = string.format("pytorch_model-%05d-of-00002.bin", shard)
  end
  for s = 1, 2 do loom.save(string.format("%s/pytorch_model-%05d-of-00002.bin", sharded, s), shards[s]) end
  write_json(sharded .. "/pytorch_model.bin.index.json", { metadata = {}, weight_map = weight_map })
  diff = loom.max_abs_diff(llava.load(sharded):forward({ input_ids = { original_ids(HF_IDS) },
    pixel_values = pixels }), hf_logits)
  check("sharded PyTorch index", diff <= 1e-6, string.format("max abs diff %g", diff))
  weight_map["model.extra.weight"] = "pytorch_model-00001-of-00002.bin"
  write_json(sharded .. "/pytorch_model.bin.index.json", { metadata = {}, weight_map = weight_map })
  checkerror("index names a missing tensor", "lists tensor 'model.extra.weight' in 'pytorch_model-00001-of-00002.bin', "
    .. "but that file does not contain it", llava.load, sharded)

  -- mm_use_im_start_end: "<im_start>" and "<im_end>" around each image token,
  -- with embedding rows for the two added tokens
  local grown = {}
  for _, name in ipairs({ "model.embed_tokens.weight", "lm_head.weight" }) do
    grown[name] = loom.cat({ weights[name], loom.randn({ 2, 64 }, { seed = 5, std = 0.02 }) }, 1)
  end
  local start_end = make_original(tower, { mm_use_im_start_end = true, vocab_size = 1004 }, grown)
  local model = llava.load(start_end)
  check("im_start id", model.im_start_id == 1002 and model.im_end_id == 1003,
    tostring(model.im_start_id) .. " " .. tostring(model.im_end_id))
  local r = model:generate({ image = IMAGE, question = "Hi", max_new_tokens = 1 })
  local at
  for k, id in ipairs(r.prompt_ids) do
    if id == -200 then at = k end
  end
  check("image token wrapped", at and r.prompt_ids[at - 1] == 1002 and r.prompt_ids[at + 1] == 1003,
    list_text(r.prompt_ids))

  -- configuration errors
  local function rejects(name, extra, expected)
    local d = make_original(tower, extra)
    checkerror(name, expected, llava.load, d)
    os.execute("rm -rf '" .. d .. "'")
  end
  rejects("mm_hidden_size mismatch", { mm_hidden_size = 1024 },
    "gives mm_hidden_size 1024, but the vision tower '" .. tower .. "' has hidden_size 64")
  rejects("anyres", { image_aspect_ratio = "anyres" }, "image_aspect_ratio 'anyres' (LLaVA-NeXT) is not supported")
  rejects("select feature", { mm_vision_select_feature = "cls" }, "mm_vision_select_feature 'cls' is not supported")
  rejects("projector type mismatch", { mm_projector_type = "linear" }, "projector kind 'linear' does not match")
  local no_layer = make_original(tower)
  local cfg = json.read(no_layer .. "/config.json")
  cfg.mm_vision_select_layer = nil
  write_json(no_layer .. "/config.json", cfg)
  checkerror("select layer required", "has no mm_vision_select_layer (LLaVA's CLIPVisionTower requires it)",
    llava.load, no_layer)
  os.execute("rm -rf '" .. tower .. "' '" .. bare .. "' '" .. embedded .. "' '" .. sharded .. "' '" .. start_end
    .. "' '" .. no_layer .. "'")
end)

run("tokenizer files", function()
  local tower = make_tower("vision")
  local dir = make_original(tower)

  -- missing
  local no_tok = make_original(tower)
  for _, name in ipairs(TOKENIZER_FILES) do os.remove(no_tok .. "/" .. name) end
  checkerror("original without tokenizer", "no tokenizer in '" .. no_tok .. "': expected tokenizer.json or tokenizer.model",
    llava.load, no_tok)
  check("tokenizer = false skips it", (pcall(llava.load, no_tok, { tokenizer = false })))

  -- fewer ids than embedding rows: added_tokens.json left out
  local small = make_original(tower)
  os.remove(small .. "/added_tokens.json")
  checkerror("tokenizer smaller than the embeddings", "the tokenizer in '" .. small .. "' has 1000 ids but the "
    .. "embedding table 'model.embed_tokens.weight' has 1002 rows: LLaVA resizes the embeddings to the tokenizer's "
    .. "length, so the tokenizer files do not belong to this checkpoint", llava.load, small)

  -- mm_use_im_patch_token (true when the config omits it) adds "<im_patch>"
  local patch = make_original(tower, { mm_use_im_patch_token = true })
  checkerror("im_patch token beyond the embeddings", "has 1003 ids (after adding <im_patch> as LLaVA's builder does) "
    .. "but the embedding table 'model.embed_tokens.weight' has 1002 rows: ids 1002..1002 would have no embedding",
    llava.load, patch)

  -- more ids than embedding rows in the Hugging Face layout
  local hf_dir = temp_dir()
  copy_files({ "config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.model",
    "tokenizer_config.json" }, hf_dir)
  write_json(hf_dir .. "/added_tokens.json", { ["<image>"] = 1000, ["<pad>"] = 1001, ["<extra>"] = 1002 })
  checkerror("Hugging Face tokenizer larger than the embeddings", "the tokenizer in '" .. hf_dir .. "' has 1003 ids "
    .. "but the embedding table 'language_model.model.embed_tokens.weight' has 1002 rows: ids 1002..1002 would have "
    .. "no embedding", llava.load, hf_dir)
  os.execute("rm -rf '" .. tower .. "' '" .. dir .. "' '" .. no_tok .. "' '" .. small .. "' '" .. patch .. "' '"
    .. hf_dir .. "'")
end)

run("corrupt images", function()
  local dir = temp_dir()
  local garbage = dir .. "/garbage.png"
  local fh = assert(io.open(garbage, "wb"))
  fh:write("not an image at all")
  fh:close()
  local truncated = dir .. "/truncated.png"
  fh = assert(io.open(IMAGE, "rb"))
  local head = fh:read(300)
  fh:close()
  fh = assert(io.open(truncated, "wb"))
  fh:write(head)
  fh:close()
  checkerror("unknown image format", "cannot decode image '" .. garbage .. "': unknown format",
    hf_model.generate, hf_model, { image = garbage, question = "Hi", max_new_tokens = 1 })
  checkerror("truncated PNG", "decoding PNG image '" .. truncated .. "' failed",
    hf_model.generate, hf_model, { image = truncated, question = "Hi", max_new_tokens = 1 })
  checkerror("missing image", dir .. "/none.png: No such file or directory",
    hf_model.generate, hf_model, { image = dir .. "/none.png", question = "Hi", max_new_tokens = 1 })
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

  -- an input that fills the context exactly: 193 ids, one of them the image
  -- token, which stands for the image's 64 positions
  local full = { 1, 1000 }
  for i = 3, 193 do full[i] = 5 + i % 50 end
  checkerror("input filling the context", "input is 256 positions long and fills the context of 256: no room for new tokens",
    model.generate, model, { input_ids = full, image = IMAGE, max_new_tokens = 2 })
  local none = model:generate({ input_ids = full, image = IMAGE, max_new_tokens = 0 })
  check("no new tokens asked for a full context", #none.tokens == 0, list_text(none.tokens))
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
