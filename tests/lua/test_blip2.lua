-- Tests of BLIP-2 on the tiny reference checkpoint in tests/golden/blip2.
-- They cover loading errors (Q-Former width, missing tensors, no images),
-- batches against one image at a time, and OPT positions under left padding.
-- Then end tokens and prompts, the LAVIS name mapping, the Q-Former's
-- stage-1 heads, and beam search against a plain reference on a toy model.
package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
local check = require("check")
local loom = require("loom")
local json = require("loom.json")
local blip2 = require("loom.blip2")
local qformer = require("loom.connectors.qformer")
local beam = require("loom.beam")

local DIR = "tests/golden/blip2"
local CONFIG = json.read(DIR .. "/config.json")
local WEIGHTS = loom.load(DIR .. "/model.safetensors")
local INPUTS = loom.load(DIR .. "/inputs.safetensors")
local VALUES = json.read(DIR .. "/values.json")

local function run(name, fn)
  local ok, err = xpcall(fn, debug.traceback)
  check.check(ok, name .. ": " .. tostring(err))
end

local function deep_copy(t)
  if type(t) ~= "table" then return t end
  local out = {}
  for k, v in pairs(t) do out[k] = deep_copy(v) end
  return out
end

-- A shallow copy of a checkpoint table with some names changed: `changes`
-- maps a name to a tensor, or to false to drop it.
local function edited(weights, changes)
  local out = {}
  for k, v in pairs(weights) do out[k] = v end
  for k, v in pairs(changes or {}) do
    if v == false then out[k] = nil else out[k] = v end
  end
  return out
end

local function build(cfg, weights)
  return blip2.build(deep_copy(cfg or CONFIG), weights or WEIGHTS)
end

local function temp_dir()
  local path = os.tmpname()
  os.remove(path)
  assert(os.execute("mkdir -p '" .. path .. "'"))
  return path
end

local function write_file(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end

local function copy_file(src, dst)
  local f = assert(io.open(src, "rb"))
  local bytes = f:read("a")
  f:close()
  write_file(dst, bytes)
end

local function list(t)
  local out = {}
  for i, v in ipairs(t) do out[i] = v end
  return out
end

local function concat(a, b)
  local out = list(a)
  for _, v in ipairs(b) do out[#out + 1] = v end
  return out
end

local MODEL = build()
local PROMPT = INPUTS.input_ids:totable()[1]

-- ---------------------------------------------------------------------------
-- Loading errors

run("qformer width mismatch", function()
  local cfg = deep_copy(CONFIG)
  cfg.qformer_config.encoder_hidden_size = 32
  check.checkerror(function() build(cfg) end,
    "cross-attends to features of width 32 (encoder_hidden_size)", "vision encoder gives width 64")

  -- config and vision agree, but the cross-attention weights take another width
  local narrow = loom.zeros({ 48, 32 })
  check.checkerror(function()
    build(nil, edited(WEIGHTS, { ["qformer.encoder.layer.0.crossattention.attention.key.weight"] = narrow }))
  end, "tensor 'qformer.encoder.layer.0.crossattention.attention.key.weight' has shape [48, 32], expected [48, 64]")

  -- the Q-Former alone rejects features of the wrong width
  check.checkerror(function() MODEL.qformer:forward(loom.zeros({ 1, 5, 32 })) end,
    "image features have shape [1, 5, 32], expected [B, M, 64]")
end)

run("qformer with another encoder", function()
  -- any encoder giving width-64 features works; rows are independent
  local qf = qformer.new(CONFIG.qformer_config, WEIGHTS, { encoder_hidden_size = 64 })
  local features = loom.randn({ 2, 10, 64 }, { seed = 7 })
  local both = qf:forward(features)
  check.equal(both:shape(), { 2, 8, 48 }, "query output shape")
  for r = 1, 2 do
    local alone = qf:forward(features:narrow(1, r, 1))
    check.check(loom.max_abs_diff(alone, both:narrow(1, r, 1)) <= 1e-6, "row " .. r .. " alone equals the batch row")
  end

  -- the number of cross-attention layers follows cross_attention_frequency
  local crossing = {}
  for i, layer in ipairs(qf.layers) do
    if layer.crossattention then crossing[#crossing + 1] = i - 1 end
  end
  check.equal(crossing, VALUES.qformer_cross_attention_layers, "layers with cross-attention")
end)

run("missing tensors", function()
  check.checkerror(function()
    build(nil, edited(WEIGHTS, { ["qformer.encoder.layer.2.crossattention.attention.value.weight"] = false }))
  end, "missing tensor 'qformer.encoder.layer.2.crossattention.attention.value.weight'")
  check.checkerror(function() build(nil, edited(WEIGHTS, { query_tokens = false })) end,
    "missing tensor 'query_tokens'")
  check.checkerror(function()
    build(nil, edited(WEIGHTS, { ["vision_model.encoder.layers.1.self_attn.qkv.bias"] = false }))
  end, "missing tensor 'vision_model.encoder.layers.1.self_attn.qkv.bias'")
  check.checkerror(function()
    build(nil, edited(WEIGHTS, { ["language_model.model.decoder.embed_positions.weight"] = false }))
  end, "missing tensor 'language_model.model.decoder.embed_positions.weight'")

  -- through load(): the message names the tensor and the checkpoint
  local dir = temp_dir()
  copy_file(DIR .. "/config.json", dir .. "/config.json")
  copy_file(DIR .. "/preprocessor_config.json", dir .. "/preprocessor_config.json")
  loom.save(dir .. "/model.safetensors", edited(WEIGHTS, { ["language_projection.weight"] = false }))
  check.checkerror(function() blip2.load(dir) end, "missing tensor 'language_projection.weight'", dir)
  os.execute("rm -rf '" .. dir .. "'")
end)

run("image tokens in the prompt", function()
  -- a config with image_token_index: image tokens in input_ids are dropped,
  -- because the queries always go in front of the text
  local cfg = deep_copy(CONFIG)
  cfg.image_token_index = 259
  local model = build(cfg)
  local ids = {}
  for i = 1, 8 do ids[i] = 259 end
  for _, id in ipairs(PROMPT) do ids[#ids + 1] = id end
  local with_tokens = model:forward({ pixel_values = INPUTS.pixel_values, input_ids = { ids } })
  local plain = MODEL:forward({ pixel_values = INPUTS.pixel_values, input_ids = { PROMPT } })
  check.equal(with_tokens:shape(), plain:shape(), "logits shape without the image tokens")
  check.check(loom.max_abs_diff(with_tokens, plain) == 0, "logits equal without the image tokens")
end)

run("wrong sizes and model types", function()
  local cfg = deep_copy(CONFIG)
  cfg.num_query_tokens = 4
  check.checkerror(function() build(cfg) end, "'query_tokens' holds 8 query tokens but num_query_tokens is 4")
  cfg = deep_copy(CONFIG)
  cfg.text_config.model_type = "t5"
  check.checkerror(function() build(cfg) end, "'t5' language model is not supported")
  cfg = deep_copy(CONFIG)
  cfg.text_config.word_embed_proj_dim = 32
  check.checkerror(function() build(cfg) end,
    "tensor 'language_model.model.decoder.embed_tokens.weight' has shape [260, 56], expected [260, 32]")
end)

run("empty image list", function()
  check.checkerror(function() MODEL:generate({ images = {}, input_ids = { 2 } }) end,
    "no images given: BLIP-2 needs at least one image")
  check.checkerror(function() MODEL:preprocess({}) end, "no images given")
  check.checkerror(function() MODEL:generate({ input_ids = { 2 } }) end, "no image given")
  local pixels = INPUTS.pixel_values
  check.checkerror(function() MODEL:generate({ pixel_values = pixels, input_ids = { { 2 }, { 2 } } }) end,
    "2 prompts for 1 images")
end)

-- ---------------------------------------------------------------------------
-- Batches

local SECOND_PIXELS = loom.randn({ 1, 3, 56, 56 }, { seed = 11 })
local SECOND_PROMPT = { 2, 45, 99 }

run("batch vs single identical", function()
  local pixels = loom.cat({ INPUTS.pixel_values, SECOND_PIXELS }, 1)
  local prompts = { PROMPT, SECOND_PROMPT }
  for _, settings in ipairs({
    { num_beams = 1, max_new_tokens = 8 },
    { num_beams = 3, max_new_tokens = 8, num_return_sequences = 2 },
    { num_beams = 2, max_new_tokens = 6, length_penalty = 0.5, early_stopping = true, eos_token_id = { 2, 31 } },
  }) do
    local args = deep_copy(settings)
    args.pixel_values, args.input_ids = pixels, prompts
    local batch = MODEL:generate(args)
    check.equal(#batch, 2, "one result per image")
    for r = 1, 2 do
      local single_args = deep_copy(settings)
      single_args.pixel_values = pixels:narrow(1, r, 1)
      single_args.input_ids = { prompts[r] }
      local single = MODEL:generate(single_args)[1]
      local label = string.format("beams %d row %d", settings.num_beams, r)
      check.equal(batch[r].tokens, single.tokens, label .. " tokens")
      check.equal(#batch[r].sequences, #single.sequences, label .. " hypotheses")
      for k, h in ipairs(single.sequences) do
        check.equal(batch[r].sequences[k].tokens, h.tokens, label .. " hypothesis " .. k)
        if h.score then
          check.check(math.abs(batch[r].sequences[k].score - h.score) <= 1e-5,
            string.format("%s score %d: %.7f vs %.7f", label, k, batch[r].sequences[k].score, h.score))
        end
      end
    end
  end
end)

run("left padding positions", function()
  local captured = {}
  local pixels = loom.cat({ INPUTS.pixel_values, SECOND_PIXELS }, 1)
  local logits = MODEL:forward({ pixel_values = pixels, input_ids = { PROMPT, { 2, 45, 99 } },
    attention_mask = { { 1, 1, 1, 1, 1, 1, 1 }, { 1, 1, 1 } }, hook = function(name, t) captured[name] = t end })
  -- queries at 2..9, then 4 padding positions at index 1, then the prompt
  local expected = { { 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16 },
    { 2, 3, 4, 5, 6, 7, 8, 9, 1, 1, 1, 1, 10, 11, 12 } }
  check.equal(captured["lm.position_index_into_embed_positions"]:totable(), expected, "OPT position indices")
  check.equal(captured["lm.attention_mask"]:totable()[2],
    { 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1 }, "padded row mask")

  -- the padded row's real positions match the row run alone
  local alone = MODEL:forward({ pixel_values = SECOND_PIXELS, input_ids = { { 2, 45, 99 } } })
  local q = 8
  check.check(loom.max_abs_diff(logits:narrow(1, 2, 1):narrow(2, 1, q), alone:narrow(2, 1, q)) <= 1e-5,
    "query positions of the padded row")
  check.check(loom.max_abs_diff(logits:narrow(1, 2, 1):narrow(2, q + 5, 3), alone:narrow(2, q + 1, 3)) <= 1e-5,
    "prompt positions of the padded row")
end)

-- ---------------------------------------------------------------------------
-- End tokens and prompts

run("end tokens", function()
  local greedy = VALUES.generate.new_tokens
  local res = MODEL:generate({ pixel_values = INPUTS.pixel_values, input_ids = PROMPT, max_new_tokens = 12,
    eos_token_id = { greedy[2] } })[1]
  check.equal(res.tokens, { greedy[1], greedy[2] }, "greedy stops on the given end token")
  check.equal(res.finish_reason, "eos", "finish reason")

  res = MODEL:generate({ pixel_values = INPUTS.pixel_values, input_ids = PROMPT, max_new_tokens = 4,
    min_new_tokens = 3, eos_token_id = { greedy[2] } })[1]
  for i = 1, 3 do check.check(res.tokens[i] ~= greedy[2], "no end token before min_new_tokens, step " .. i) end

  res = MODEL:generate({ pixel_values = INPUTS.pixel_values, input_ids = PROMPT, max_new_tokens = 12 })[1]
  check.equal(res.tokens, greedy, "greedy tokens from pixel values")
  check.equal(res.finish_reason, "length", "finish reason at the token limit")
end)

-- A byte-level BPE tokenizer.json without merges whose ids are OPT's four
-- special tokens then byte + 4: 260 ids, the tiny model's vocabulary.
local function write_byte_tokenizer(path)
  local order = {}
  for b = 33, 126 do order[#order + 1] = b end
  for b = 161, 172 do order[#order + 1] = b end
  for b = 174, 255 do order[#order + 1] = b end
  local char, printable, shifted = {}, {}, 0
  for _, b in ipairs(order) do char[b], printable[b] = utf8.char(b), true end
  for b = 0, 255 do
    if not printable[b] then char[b], shifted = utf8.char(256 + shifted), shifted + 1 end
  end
  local vocab = { ["<s>"] = 0, ["<pad>"] = 1, ["</s>"] = 2, ["<unk>"] = 3 }
  for b = 0, 255 do vocab[char[b]] = b + 4 end
  local added = {}
  for i, text in ipairs({ "<s>", "<pad>", "</s>", "<unk>" }) do
    added[i] = { id = i - 1, content = text, single_word = false, lstrip = false, rstrip = false,
      normalized = true, special = true }
  end
  local byte_level = { type = "ByteLevel", add_prefix_space = false, trim_offsets = true, use_regex = true }
  write_file(path, json.encode({
    version = "1.0", added_tokens = added, normalizer = json.null, pre_tokenizer = byte_level,
    post_processor = byte_level, decoder = byte_level,
    model = { type = "BPE", dropout = json.null, unk_token = json.null, continuing_subword_prefix = "",
      end_of_word_suffix = "", fuse_unk = false, byte_fallback = false, vocab = vocab, merges = json.array() },
  }))
end

local function byte_ids(text)
  local ids = {}
  for i = 1, #text do ids[i] = text:byte(i) + 4 end
  return ids
end

run("prompts and text", function()
  local dir = temp_dir()
  for _, name in ipairs({ "config.json", "preprocessor_config.json", "model.safetensors" }) do
    copy_file(DIR .. "/" .. name, dir .. "/" .. name)
  end
  write_byte_tokenizer(dir .. "/tokenizer.json")
  local model = blip2.load(dir)

  -- LAVIS ends the text at a new line: "\n" is byte 10, id 14
  check.equal(model:end_tokens({}), { 2, 14 }, "end tokens with a tokenizer")
  check.equal(model:end_tokens({ stop_at_newline = false }), { 2 }, "end tokens without the new line")
  check.equal(MODEL:end_tokens({}), { 2 }, "end tokens without a tokenizer")

  local res = model:generate({ image = DIR .. "/astronaut.png", question = "what is it?", max_new_tokens = 6 })
  check.equal(res.prompt_ids, concat({ 2 }, byte_ids("Question: what is it? Answer:")), "VQA prompt ids")
  local kept = {}
  for _, id in ipairs(res.tokens) do
    if id > 3 and id ~= 14 then kept[#kept + 1] = string.char(id - 4) end
  end
  local expected_text = table.concat(kept):gsub("^%s+", ""):gsub("%s+$", "")
  check.equal(res.text, expected_text, "text is the decoded generated tokens only")

  -- captioning: the prompt is bos alone, and the image file gives the
  -- reference's pixels, so tokens match those from the stored pixel values
  local caption = model:generate({ image = DIR .. "/astronaut.png", max_new_tokens = 5, stop_at_newline = false })
  local from_pixels = MODEL:generate({ pixel_values = INPUTS.pixel_values, input_ids = { 2 }, max_new_tokens = 5 })[1]
  check.equal(caption.prompt_ids, { 2 }, "caption prompt")
  check.equal(caption.tokens, from_pixels.tokens, "caption from the file equals caption from pixel values")

  check.checkerror(function() MODEL:generate({ pixel_values = INPUTS.pixel_values, question = "hi" }) end,
    "no tokenizer was loaded to encode the prompt")
  os.execute("rm -rf '" .. dir .. "'")
end)

-- ---------------------------------------------------------------------------
-- LAVIS names

-- Hugging Face name -> LAVIS name, the inverse of the loader's mapping,
-- written out by hand.
local function lavis_name(name)
  local rules = {
    { "^vision_model%.embeddings%.class_embedding$", "visual_encoder.cls_token" },
    { "^vision_model%.embeddings%.position_embedding$", "visual_encoder.pos_embed" },
    { "^vision_model%.embeddings%.patch_embedding%.", "visual_encoder.patch_embed.proj." },
    { "^vision_model%.encoder%.layers%.(%d+)%.layer_norm1%.", "visual_encoder.blocks.%1.norm1." },
    { "^vision_model%.encoder%.layers%.(%d+)%.layer_norm2%.", "visual_encoder.blocks.%1.norm2." },
    { "^vision_model%.encoder%.layers%.(%d+)%.self_attn%.qkv%.weight$", "visual_encoder.blocks.%1.attn.qkv.weight" },
    { "^vision_model%.encoder%.layers%.(%d+)%.self_attn%.projection%.", "visual_encoder.blocks.%1.attn.proj." },
    { "^vision_model%.encoder%.layers%.(%d+)%.mlp%.", "visual_encoder.blocks.%1.mlp." },
    { "^vision_model%.post_layernorm%.", "ln_vision." },
    { "^qformer%.layernorm%.", "Qformer.bert.embeddings.LayerNorm." },
    { "^qformer%.encoder%.layer%.(%d+)%.attention%.attention%.", "Qformer.bert.encoder.layer.%1.attention.self." },
    { "^qformer%.encoder%.layer%.(%d+)%.crossattention%.attention%.",
      "Qformer.bert.encoder.layer.%1.crossattention.self." },
    { "^qformer%.encoder%.", "Qformer.bert.encoder." },
    { "^language_projection%.", "opt_proj." },
    { "^language_model%.", "opt_model." },
  }
  for _, r in ipairs(rules) do
    local new, n = name:gsub(r[1], r[2], 1)
    if n > 0 then return new end
  end
  return name
end

local function lavis_weights(prefix)
  local out = {}
  for name, t in pairs(WEIGHTS) do
    local layer = name:match("^vision_model%.encoder%.layers%.(%d+)%.self_attn%.qkv%.bias$")
    if layer then
      local d = t:size(1) // 3
      out[prefix .. "visual_encoder.blocks." .. layer .. ".attn.q_bias"] = t:narrow(1, 1, d):clone()
      out[prefix .. "visual_encoder.blocks." .. layer .. ".attn.v_bias"] = t:narrow(1, 2 * d + 1, d):clone()
    else
      out[prefix .. lavis_name(name)] = t
    end
  end
  out[prefix .. "Qformer.cls.predictions.bias"] = loom.zeros({ 4 })
  return out
end

run("lavis names", function()
  local mapped, unmapped = blip2.from_lavis(lavis_weights(""))
  check.equal(unmapped, { "Qformer.cls.predictions.bias" }, "names without a mapping")
  local count = 0
  for name, t in pairs(WEIGHTS) do
    count = count + 1
    check.check(mapped[name] ~= nil and loom.equal(mapped[name], t), "mapped tensor equals " .. name)
  end
  local mapped_count = 0
  for _ in pairs(mapped) do mapped_count = mapped_count + 1 end
  check.equal(mapped_count, count, "no extra tensors after mapping")

  -- a .pth stores {"model": state_dict}: names under "model." load too
  local dir = temp_dir()
  local cfg = deep_copy(CONFIG)
  cfg.vision_config.post_layernorm_eps = 1e-6 -- as the reference, so logits agree exactly
  write_file(dir .. "/config.json", json.encode(cfg))
  copy_file(DIR .. "/preprocessor_config.json", dir .. "/preprocessor_config.json")
  loom.save(dir .. "/model.safetensors", lavis_weights("model."))
  local model = blip2.load(dir)
  local a = model:forward({ pixel_values = INPUTS.pixel_values, input_ids = INPUTS.input_ids })
  local b = MODEL:forward({ pixel_values = INPUTS.pixel_values, input_ids = INPUTS.input_ids })
  check.check(loom.max_abs_diff(a, b) == 0, "LAVIS-named checkpoint gives the same logits")

  -- by default LAVIS's ln_vision uses PyTorch's LayerNorm eps
  write_file(dir .. "/config.json", json.encode(CONFIG))
  check.equal(blip2.load(dir).vision.cfg.post_layernorm_eps, 1e-5, "ln_vision eps")
  os.execute("rm -rf '" .. dir .. "'")
end)

-- ---------------------------------------------------------------------------
-- Q-Former stage-1 heads

local function stage1_weights()
  local extra, seed = {}, 100
  local function add(name, shape)
    seed = seed + 1
    extra[name] = loom.randn(shape, { seed = seed, std = 0.1 })
  end
  add("embeddings.word_embeddings.weight", { 30, 48 })
  add("embeddings.position_embeddings.weight", { 16, 48 })
  for i = 0, 3 do
    local p = "qformer.encoder.layer." .. i
    add(p .. ".intermediate.dense.weight", { 96, 48 })
    add(p .. ".intermediate.dense.bias", { 96 })
    add(p .. ".output.dense.weight", { 48, 96 })
    add(p .. ".output.dense.bias", { 48 })
    extra[p .. ".output.LayerNorm.weight"] = loom.ones({ 48 })
    add(p .. ".output.LayerNorm.bias", { 48 })
  end
  add("itm_head.weight", { 2, 48 })
  add("itm_head.bias", { 2 })
  add("vision_projection.weight", { 16, 48 })
  add("vision_projection.bias", { 16 })
  add("text_projection.weight", { 16, 48 })
  add("text_projection.bias", { 16 })
  return edited(WEIGHTS, extra)
end

run("qformer stage-1 heads", function()
  local model = build(nil, stage1_weights())
  local qf = model.qformer
  local image = model.vision:forward(INPUTS.pixel_values).last_hidden_state
  local ids = { { 5, 9, 11, 3 }, { 7, 8, 0, 0 } }
  local mask = { { 1, 1, 1, 1 }, { 1, 1, 0, 0 } }

  -- contrastive features are unit vectors; similarity is the best query
  local txt = qf:text_features(ids, mask)
  local img = qf:image_features(image)
  check.equal(txt:shape(), { 2, 16 }, "text feature shape")
  check.equal(img:shape(), { 1, 8, 16 }, "image feature shape")
  for _, row in ipairs(txt:totable()) do
    local s = 0
    for _, v in ipairs(row) do s = s + v * v end
    check.check(math.abs(s - 1) <= 1e-5, "text feature has unit norm")
  end
  local sim = qf:similarity(image, ids, mask):totable()
  local img_rows, txt_rows = img:totable()[1], txt:totable()
  for t = 1, 2 do
    local best = -math.huge
    for q = 1, 8 do
      local dot = 0
      for e = 1, 16 do dot = dot + img_rows[q][e] * txt_rows[t][e] end
      best = math.max(best, dot)
    end
    check.check(math.abs(sim[1][t] - best) <= 1e-5, "similarity is the largest query dot product")
  end

  -- masked text does not reach the queries: ITM with all text masked equals
  -- the itm_head averaged over the plain query outputs
  local images = loom.cat({ image, image }, 1)
  local itm = qf:match(images, ids, { { 0, 0, 0, 0 }, { 0, 0, 0, 0 } })
  local plain = loom.mean(qf.itm_head:forward(qf:forward(image)), 2)
  check.check(loom.max_abs_diff(itm:narrow(1, 1, 1), plain) <= 1e-5, "ITM queries ignore masked text")
  local changed = qf:match(images, { { 5, 9, 11, 3 }, { 7, 8, 21, 22 } }, mask)
  local first = qf:match(images, ids, mask)
  check.check(loom.max_abs_diff(changed, first) <= 1e-6, "padded token ids do not change ITM")
  check.check(loom.max_abs_diff(first:narrow(1, 1, 1), plain) > 1e-4, "unmasked text changes ITM")

  -- a retrieval checkpoint without a language model still compares images and texts
  local no_lm = {}
  for name, t in pairs(stage1_weights()) do
    if not name:match("^language_") then no_lm[name] = t end
  end
  local retrieval = build(nil, no_lm)
  local two_pixels = loom.cat({ INPUTS.pixel_values, INPUTS.pixel_values }, 1)
  check.check(loom.max_abs_diff(retrieval:match(two_pixels, ids, mask), first) <= 1e-6, "ITM without a language model")
  check.check(loom.max_abs_diff(retrieval:similarity(INPUTS.pixel_values, ids, mask), qf:similarity(image, ids, mask))
    <= 1e-6, "similarity without a language model")
  check.checkerror(function() retrieval:generate({ pixel_values = INPUTS.pixel_values, input_ids = { 2 } }) end,
    "this checkpoint has no language model")

  -- a checkpoint without the text side raises naming the missing part
  check.checkerror(function() MODEL.qformer:text_features(ids, mask) end,
    "this Q-Former checkpoint has no text embeddings")
  check.checkerror(function() MODEL.qformer:match(image, { { 5 } }) end, "has no itm_head")
end)

-- ---------------------------------------------------------------------------
-- Beam search on a toy model

-- A beam session over a Markov model: input i starts with the logits row
-- first_rows[i], and after token t continues with transitions[i][t + 1].
-- session.steps counts the step calls.
local function markov_session(first_rows, transitions, num_beams)
  local b = #first_rows
  local state = {}
  local session = { batch = b, steps = 0 }
  local function rows_of(list)
    return loom.tensor(list)
  end
  function session.prefill()
    local out = {}
    for i = 1, b do
      for _ = 1, num_beams do out[#out + 1] = first_rows[i]; state[#out] = i end
    end
    return rows_of(out)
  end
  function session.step(tokens, rows)
    session.steps = session.steps + 1
    local new_state, out = {}, {}
    for r, src in ipairs(rows) do
      new_state[r] = state[src]
      out[r] = transitions[state[src]][tokens[r] + 1]
    end
    state = new_state
    return rows_of(out)
  end
  return session
end

local function log_softmax(row)
  local m = -math.huge
  for _, v in ipairs(row) do m = math.max(m, v) end
  local s = 0
  for _, v in ipairs(row) do s = s + math.exp(v - m) end
  local out = {}
  for i, v in ipairs(row) do out[i] = v - m - math.log(s) end
  return out
end

-- A plain beam search written for the test: all candidates of each input
-- sorted, end tokens (opts.eos, a list) among the first num_beams finish a
-- hypothesis, the next num_beams others continue.
local function reference_search(first_rows, transitions, opts)
  local nb, lp = opts.num_beams, opts.length_penalty or 1.0
  local is_eos = {}
  for _, id in ipairs(opts.eos) do is_eos[id] = true end
  local considered = math.max(2, 1 + #opts.eos) * nb
  local results = {}
  for i, first in ipairs(first_rows) do
    local beams = { { tokens = {}, score = 0.0 } }
    local finished, done = {}, false
    local steps = 0
    while not done and steps < opts.max_new_tokens do
      steps = steps + 1
      local cands = {}
      for bi, bm in ipairs(beams) do
        local row = #bm.tokens == 0 and first or transitions[i][bm.tokens[#bm.tokens] + 1]
        local lps = log_softmax(row)
        if steps <= (opts.min_new_tokens or 0) then
          for _, id in ipairs(opts.eos) do lps[id + 1] = -math.huge end
        end
        for v, l in ipairs(lps) do cands[#cands + 1] = { bm.score + l, bi, v - 1 } end
      end
      table.sort(cands, function(a, c)
        if a[1] ~= c[1] then return a[1] > c[1] end
        if a[2] ~= c[2] then return a[2] < c[2] end
        return a[3] < c[3]
      end)
      local next_beams = {}
      for rank, c in ipairs(cands) do
        if rank > considered then break end
        local src = beams[c[2]]
        if is_eos[c[3]] then
          if rank <= nb then
            finished[#finished + 1] = { tokens = concat(src.tokens, { opts.eos[1] }), score = c[1] / steps ^ lp }
          end
        else
          next_beams[#next_beams + 1] = { tokens = concat(src.tokens, { c[3] }), score = c[1] }
        end
        if #next_beams == nb then break end
      end
      beams = next_beams
      table.sort(finished, function(a, c) return a.score > c.score end)
      while #finished > nb do finished[#finished] = nil end
      if #finished == nb then
        local best = cands[1][1]
        if opts.early_stopping == true then
          done = true
        elseif opts.early_stopping == "never" and lp > 0 then
          done = finished[nb].score >= best / opts.max_new_tokens ^ lp
        else
          done = finished[nb].score >= best / steps ^ lp
        end
      end
    end
    if not done then
      for _, bm in ipairs(beams) do
        finished[#finished + 1] = { tokens = bm.tokens, score = bm.score / (#bm.tokens) ^ lp }
      end
      table.sort(finished, function(a, c) return a.score > c.score end)
    end
    local keep = {}
    for k = 1, opts.num_return_sequences or 1 do keep[k] = finished[k] end
    results[i] = keep
  end
  return results
end

run("beam search by hand", function()
  -- token 0 ends; first step p = (0.5, 0.3, 0.2), then (0.6, 0.25, 0.15)
  local first = { math.log(0.5), math.log(0.3), math.log(0.2) }
  local after = { math.log(0.6), math.log(0.25), math.log(0.15) }
  local session = markov_session({ first }, { { after, after, after } }, 2)
  local res = beam.search(session, { num_beams = 2, num_return_sequences = 2, max_new_tokens = 5,
    eos_token_id = 0 })[1]
  -- step 1 finishes "end" with score log 0.5. Step 2 finishes "1 end" with
  -- (log 0.3 + log 0.6) / 2, and then no running beam can do better
  check.equal(res[1].tokens, { 0 }, "best hypothesis ends at once")
  check.check(math.abs(res[1].score - math.log(0.5)) <= 1e-6, "best score")
  check.equal(res[2].tokens, { 1, 0 }, "second hypothesis")
  check.check(math.abs(res[2].score - (math.log(0.3) + math.log(0.6)) / 2) <= 1e-6, "second score")
  check.equal(session.steps, 1, "search stops after the second step")

  -- min_new_tokens keeps the end token out of the first two steps
  session = markov_session({ first }, { { after, after, after } }, 2)
  res = beam.search(session, { num_beams = 2, max_new_tokens = 5, min_new_tokens = 2, eos_token_id = 0 })[1]
  check.equal(res[1].tokens, { 1, 1, 0 }, "min_new_tokens delays the end")
  -- the masked log probabilities are not renormalised, as in the reference
  check.check(math.abs(res[1].score - (math.log(0.3) + math.log(0.25) + math.log(0.6)) / 3) <= 1e-5,
    "score with the end token masked")

  check.checkerror(function() beam.search(session, { num_beams = 1 }) end, "num_beams must be an integer of at least 2")
  check.checkerror(function() beam.search(session, { num_beams = 2, num_return_sequences = 3 }) end,
    "num_return_sequences must be an integer between 1 and num_beams (2)")
  check.checkerror(function() beam.search(session, { num_beams = 2, early_stopping = "soon" }) end,
    "early_stopping must be true, false or \"never\"")
end)

run("beam search against a reference", function()
  local vocab = 6
  -- random logits, with the end tokens made likelier by `eos_bias`
  local function random_rows(n, seed, eos, eos_bias)
    local rows = loom.randn({ n, vocab }, { seed = seed, std = 1.5 }):totable()
    for _, row in ipairs(rows) do
      for _, id in ipairs(eos) do row[id + 1] = row[id + 1] + eos_bias end
    end
    return rows
  end
  local settings = {
    { num_beams = 2, max_new_tokens = 6 },
    { num_beams = 3, max_new_tokens = 7, length_penalty = 2.0, num_return_sequences = 3 },
    { num_beams = 3, max_new_tokens = 5, length_penalty = 0.5, early_stopping = true },
    { num_beams = 2, max_new_tokens = 6, early_stopping = "never", num_return_sequences = 2 },
    { num_beams = 4, max_new_tokens = 6, min_new_tokens = 3, length_penalty = -1.0 },
    { num_beams = 3, max_new_tokens = 8, num_return_sequences = 3, eos = { 1, 0 } },
    { num_beams = 3, max_new_tokens = 8, num_return_sequences = 2, eos = { 1, 0 }, early_stopping = "never" },
  }
  for trial = 1, 6 * #settings do
    local opts = deep_copy(settings[(trial - 1) % #settings + 1])
    opts.eos = opts.eos or { 0 }
    local bias = ({ 0, 1, 2.5 })[(trial - 1) // #settings % 3 + 1]
    local firsts = random_rows(2, 10 * trial, opts.eos, bias)
    local transitions = { random_rows(vocab, 10 * trial + 1, opts.eos, bias),
      random_rows(vocab, 10 * trial + 2, opts.eos, bias) }
    local expected = reference_search(firsts, transitions, opts)
    local session = markov_session(firsts, transitions, opts.num_beams)
    local got = beam.search(session, { num_beams = opts.num_beams, max_new_tokens = opts.max_new_tokens,
      min_new_tokens = opts.min_new_tokens, length_penalty = opts.length_penalty,
      early_stopping = opts.early_stopping, num_return_sequences = opts.num_return_sequences, eos_token_id = opts.eos })
    -- paths through the same transitions in another order tie in score, so
    -- hypotheses of equal score may come in either order
    for i = 1, 2 do
      check.equal(#got[i], #expected[i], string.format("trial %d input %d hypothesis count", trial, i))
      for k, h in ipairs(got[i]) do
        local label = string.format("trial %d input %d hypothesis %d", trial, i, k)
        check.check(expected[i][k] and math.abs(h.score - expected[i][k].score) <= 1e-5, label .. " score")
        local found = false
        for _, e in ipairs(expected[i]) do
          found = found or (math.abs(e.score - h.score) <= 1e-5 and check.deep_equal(e.tokens, h.tokens))
        end
        check.check(found, label .. " tokens " .. check.show(h.tokens) .. " are a reference hypothesis of that score")
      end
    end
  end
end)

-- The layout writers of random checkpoints use must be the one Hugging Face
-- saves: the reference checkpoint's names and shapes, tied head included.
run("checkpoint layout", function()
  local layout = blip2.checkpoint_layout(deep_copy(CONFIG), { tied_head = true })
  local listed = {}
  for _, entry in ipairs(layout) do
    listed[entry.name] = true
    local t = WEIGHTS[entry.name]
    check.check(t ~= nil, "layout tensor " .. entry.name .. " is in the reference checkpoint")
    if t then check.equal(t:shape(), entry.shape, "shape of " .. entry.name) end
  end
  for name in pairs(WEIGHTS) do check.check(listed[name], "reference tensor " .. name .. " is in the layout") end

  -- save_pretrained leaves out the tied head
  local untied = blip2.checkpoint_layout(deep_copy(CONFIG))
  check.equal(#untied, #layout - 1, "tied head left out")
  for _, entry in ipairs(untied) do check.check(entry.name ~= blip2.NAMES.head, "no " .. entry.name) end
  local kinds = {}
  for _, entry in ipairs(layout) do kinds[entry.name] = entry.kind end
  check.equal(kinds["vision_model.encoder.layers.0.self_attn.qkv.bias"], "qkv_bias", "kind of the fused bias")
  check.equal(kinds["qformer.layernorm.weight"], "norm", "kind of a layer norm weight")
  check.equal(kinds["language_projection.bias"], "bias", "kind of a bias")
  check.equal(kinds["query_tokens"], "weight", "kind of the query tokens")

  -- a built model from random weights of that layout runs
  local weights = {}
  for i, entry in ipairs(untied) do weights[entry.name] = loom.randn(entry.shape, { seed = i, std = 0.02 }) end
  local model = build(nil, weights)
  local logits = model:forward({ pixel_values = INPUTS.pixel_values, input_ids = INPUTS.input_ids })
  check.equal(logits:shape(), { 1, 15, 260 }, "logits of a model from the layout")
end)

check.summary()
