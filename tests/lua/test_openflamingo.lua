-- Tests of OpenFlamingo's release layout: the reference case's
-- model.safetensors split into checkpoint.pt (a torch.save zip written by
-- write_pytorch_checkpoint.py), an open_clip checkpoint and a Hugging Face
-- MPT directory with a smaller base vocabulary must give the single-file
-- logits exactly, with both names of the gated blocks and from a
-- config.json; a LLaMA-based model built from random tensors must match the
-- plain LLaMA decoder when its gates are zero, agree between layouts, and
-- decode with the cache as it recomputes; and the loader's errors.
package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
local check = require("check")
local loom = require("loom")
local json = require("loom.json")
local openflamingo = require("loom.openflamingo")
local original = require("loom.openflamingo_original")
local llama = require("loom.models.llama")
local fixtures = require("flamingo_fixtures")

local OF_DIR = "tests/golden/openflamingo"
local root = arg[0]:gsub("[^/]*$", "") .. "../../"
local WRITER = root .. "tests/lua/write_pytorch_checkpoint.py"

require("loom.log").set_level("warning")

local function run(name, fn)
  local ok, err = xpcall(fn, debug.traceback)
  check.check(ok, name .. ": " .. tostring(err))
end

-- Temporary directories, removed at the end.
local temp_dirs = {}
local function temp_dir()
  local dir = fixtures.temp_dir()
  temp_dirs[#temp_dirs + 1] = dir
  return dir
end

local function mkdir(path)
  assert(os.execute("mkdir -p '" .. path .. "'"))
  return path
end

local HAVE_PYTHON = os.execute("python3 -c '' 2>/dev/null") == true
if not HAVE_PYTHON then
  io.stderr:write("SKIP: python3 is not installed, so checkpoint.pt cannot be written; "
    .. "the release-layout tests read safetensors in its place\n")
end

-- Save `tensors` as checkpoint.pt (a torch.save zip) at `path`, or as
-- safetensors when python3 is missing.
local function write_pt(path, tensors)
  if not HAVE_PYTHON then
    loom.save(path, tensors)
    return
  end
  local st = path .. ".safetensors"
  loom.save(st, tensors)
  local ok = os.execute(string.format("python3 '%s' '%s' '%s'", WRITER, st, path))
  assert(ok, "write_pytorch_checkpoint.py failed")
  os.remove(st)
end

-- Whether a file starts with the zip signature "PK\3\4".
local function is_zip(path)
  local f = assert(io.open(path, "rb"))
  local head = f:read(4)
  f:close()
  return head == "PK\3\4"
end

-- ---------------------------------------------------------------------------
-- The reference case in the release layout

local BASE_VOCAB = 297 -- the case's tokens before OpenFlamingo's three

-- Split the case's state dict into a release layout under a new directory:
-- clip/ (open_clip_config.json, open_clip_model.safetensors with a whole
-- CLIP state dict), mpt/ (config.json and model.safetensors with a base
-- vocabulary of 297 random rows), tok/ (tokenizer.json without the added
-- tokens) and checkpoint.pt. `gated_names` is "list"
-- (lang_encoder.gated_cross_attn_layers.<i>) or "wrapped"
-- (lang_encoder.transformer.blocks.<i>.gated_cross_attn_layer).
local function release_case(gated_names)
  local src = loom.load(OF_DIR .. "/model.safetensors")
  local cfg = json.read(OF_DIR .. "/config.json")
  local dir = temp_dir()

  -- open_clip: visual.* plus text tower tensors the loader must skip
  local clip = { ["token_embedding.weight"] = loom.zeros({ 64, 16 }), ["transformer.resblocks.0.ln_1.weight"] = loom.ones({ 16 }) }
  for name, t in pairs(src) do
    local rest = name:match("^vision_encoder%.(.+)$")
    if rest then clip["visual." .. rest] = t end
  end
  mkdir(dir .. "/clip")
  loom.save(dir .. "/clip/open_clip_model.safetensors", clip)
  fixtures.write_file(dir .. "/clip/open_clip_config.json", json.encode({
    model_cfg = cfg.vision_encoder.open_clip_model_config,
    preprocess_cfg = { mean = original.OPENAI_MEAN, std = original.OPENAI_STD },
  }))

  -- the language model before resize_token_embeddings, with untrained embeddings
  local lm = {
    ["transformer.wte.weight"] = loom.randn({ BASE_VOCAB, 64 }, { seed = 41 }),
    ["transformer.norm_f.weight"] = src["lang_encoder.transformer.norm_f.weight"],
  }
  for name, t in pairs(src) do
    local i, rest = name:match("^lang_encoder%.transformer%.blocks%.(%d+)%.decoder_layer%.(.+)$")
    if i then lm["transformer.blocks." .. i .. "." .. rest] = t end
  end
  mkdir(dir .. "/mpt")
  loom.save(dir .. "/mpt/model.safetensors", lm)
  local lang = cfg.lang_encoder.config
  lang.vocab_size = BASE_VOCAB
  lang.pad_token_id = nil
  fixtures.write_file(dir .. "/mpt/config.json", json.encode(lang))

  mkdir(dir .. "/tok")
  fixtures.write_tokenizer(dir .. "/tok/tokenizer.json", 0, BASE_VOCAB, {})

  -- checkpoint.pt: the perceiver, the gated blocks and the trained embedding
  local ckpt = { ["lang_encoder.transformer.wte.weight"] = src["lang_encoder.transformer.wte.weight"] }
  for name, t in pairs(src) do
    if name:match("^perceiver%.") then ckpt[name] = t end
    local i, rest = name:match("^lang_encoder%.gated_cross_attn_layers%.(%d+)%.(.+)$")
    if i and gated_names == "list" then ckpt[name] = t end
    if i and gated_names == "wrapped" then
      ckpt[string.format("lang_encoder.transformer.blocks.%s.gated_cross_attn_layer.%s", i, rest)] = t
    end
  end
  write_pt(dir .. "/checkpoint.pt", ckpt)
  return dir
end

local function release_spec(dir, extra)
  local spec = { checkpoint = dir .. "/checkpoint.pt", vision = dir .. "/clip", lm = dir .. "/mpt",
    tokenizer = dir .. "/tok", cross_attn_every_n_layers = 2 }
  for k, v in pairs(extra or {}) do spec[k] = v end
  return spec
end

local CASE_DIR = release_case("list")
local single = openflamingo.load(OF_DIR, { tokenizer = false })
local inputs = loom.load(OF_DIR .. "/inputs.safetensors")
local outputs = loom.load(OF_DIR .. "/outputs.safetensors")
local FORWARD = { input_ids = inputs.lang_x, pixel_values = inputs.vision_x }
local SINGLE_LOGITS = single:forward(FORWARD)

run("checkpoint.pt is a torch.save zip", function()
  if not HAVE_PYTHON then return end
  check.check(is_zip(CASE_DIR .. "/checkpoint.pt"), "checkpoint.pt starts with a zip signature")
  local ckpt = loom.load(CASE_DIR .. "/checkpoint.pt")
  check.check(ckpt["perceiver.latents"] ~= nil, "loom.load reads it back")
end)

run("release layout equals the single file", function()
  local model = openflamingo.load(release_spec(CASE_DIR))
  check.equal(model.eoc_token_id, 297, "<|endofchunk|> added after the base vocabulary")
  check.equal(model.media_token_id, 298, "<image> added next")
  check.equal(model.pad_id, 299, "<PAD> added when the tokenizer has no pad token")
  check.equal(model.tokenizer:vocab_size(), 300, "vocabulary after the added tokens")
  local logits = model:forward(FORWARD)
  check.check(loom.equal(logits, SINGLE_LOGITS), "logits equal the single-file layout's exactly")
  check.check(loom.max_abs_diff(logits, outputs.logits) < 1e-4, "logits match the reference within 1e-4")

  -- the prompt the tokenizer builds uses the added ids
  local ids = model:encode_prompts({ prompt = "<image>A cat.<|endofchunk|><image>A",
    images = { OF_DIR .. "/chelsea.png", OF_DIR .. "/rocket.jpg" } })
  check.equal(ids[1], fixtures.concat({ 298 }, fixtures.text_ids("A cat.", 0), { 297, 298 }, fixtures.text_ids("A", 0)),
    "prompt ids with the added tokens")
end)

run("wrapped gated block names", function()
  local dir = release_case("wrapped")
  local spec = release_spec(dir)
  spec.cross_attn_every_n_layers = nil
  local model = openflamingo.load(spec)
  check.equal(model.every, 2, "cross_attn_every_n_layers read from the blocks present")
  check.check(loom.equal(model:forward(FORWARD), SINGLE_LOGITS), "logits equal the single-file layout's")
end)

run("release layout from config.json", function()
  fixtures.write_file(CASE_DIR .. "/config.json", json.encode({ model_type = "openflamingo",
    checkpoint = "checkpoint.pt", vision = "clip", lm = "mpt", tokenizer = "tok" }))
  local model = openflamingo.load(CASE_DIR)
  check.check(loom.equal(model:forward(FORWARD), SINGLE_LOGITS), "logits equal the single-file layout's")
  check.equal(model.preprocessor.image_size, 56, "open_clip transform at the tower's image size")
  local pixels = model:preprocess(OF_DIR .. "/chelsea.png")
  check.check(loom.equal(pixels, inputs.vision_x:select(1, 1):select(1, 1):select(1, 1)),
    "open_clip transform gives the reference pixels")
  local result = model:generate({ prompt = "<image>A cat.<|endofchunk|><image>A",
    images = { OF_DIR .. "/chelsea.png", OF_DIR .. "/rocket.jpg" }, max_new_tokens = 3 })
  check.equal(#result.tokens, 3, "generates from a text prompt")
end)

run("vision tower from one file", function()
  -- the tower's own state dict, bare names, in a torch.save zip
  local src = loom.load(OF_DIR .. "/model.safetensors")
  local tower = {}
  for name, t in pairs(src) do
    local rest = name:match("^vision_encoder%.(.+)$")
    if rest then tower[rest] = t end
  end
  local path = CASE_DIR .. "/visual.pt"
  write_pt(path, tower)
  local cfg = json.read(OF_DIR .. "/config.json").vision_encoder.open_clip_model_config
  local model = openflamingo.load(release_spec(CASE_DIR, { vision = path, vision_config = cfg }))
  check.check(loom.equal(model:forward(FORWARD), SINGLE_LOGITS), "logits equal the single-file layout's")
end)

run("vision config from the shapes", function()
  local raw = {
    ["visual.conv1.weight"] = loom.zeros({ 128, 3, 16, 16 }),
    ["visual.positional_embedding"] = loom.zeros({ 50, 128 }),
    ["visual.transformer.resblocks.0.ln_1.weight"] = loom.zeros({ 128 }),
    ["visual.transformer.resblocks.0.mlp.c_fc.weight"] = loom.zeros({ 512, 128 }),
    ["visual.transformer.resblocks.1.ln_1.weight"] = loom.zeros({ 128 }),
  }
  local path = CASE_DIR .. "/shapes.safetensors"
  loom.save(path, raw)
  local _, cfg, pre = original.vision({ vision = path })
  check.equal(cfg, { quick_gelu = true, vision_cfg = { image_size = 112, patch_size = 16, width = 128, layers = 2,
    head_width = 64, mlp_ratio = 4.0 } }, "ViT config read from conv1, positions, resblocks and c_fc")
  check.equal(pre.image_size, 112, "transform size")
  check.equal(pre.mean, original.OPENAI_MEAN, "OpenAI CLIP mean by default")
  local _, cfg2 = original.vision({ vision = path, quick_gelu = false })
  check.equal(cfg2.quick_gelu, false, "quick_gelu option")
  raw["visual.positional_embedding"] = loom.zeros({ 48, 128 })
  loom.save(path, raw)
  check.checkerror(function() original.vision({ vision = path }) end,
    "'visual.positional_embedding' in " .. path .. " has 48 rows, which is not a square grid plus the class token")
end)

run("release layout errors", function()
  check.checkerror(function() openflamingo.load(release_spec(CASE_DIR, { cross_attn_every_n_layers = 1 })) end,
    CASE_DIR .. "/checkpoint.pt has no gated cross-attention block for decoder layer 0, but cross_attn_every_n_layers = 1")
  check.checkerror(function() openflamingo.load(release_spec(CASE_DIR, { cross_attn_every_n_layers = 4 })) end,
    "has a gated cross-attention block for decoder layer 1, which cross_attn_every_n_layers = 4 does not place there")
  check.checkerror(function() openflamingo.load(release_spec(CASE_DIR, { checkpoints = "x" })) end,
    "unknown OpenFlamingo option 'checkpoints'")
  check.checkerror(function() openflamingo.load(release_spec(CASE_DIR, { vision = CASE_DIR .. "/mpt" })) end,
    "no open_clip vision tower in '" .. CASE_DIR .. "/mpt'")
  local no_lm = release_spec(CASE_DIR)
  no_lm.lm = nil
  check.checkerror(function() openflamingo.load(no_lm) end,
    "OpenFlamingo's release layout needs 'lm' (a path), got nil")
  check.checkerror(function() openflamingo.load(release_spec(CASE_DIR, { checkpoint = CASE_DIR .. "/missing.pt" })) end,
    "cannot load the OpenFlamingo checkpoint: ")
  check.checkerror(function() openflamingo.load(release_spec(CASE_DIR, { checkpoint = CASE_DIR .. "/mpt/model.safetensors" })) end,
    "has no perceiver.latents: not an OpenFlamingo checkpoint")

  -- one more base token: the checkpoint's embedding no longer fits
  local tok = mkdir(CASE_DIR .. "/tok298")
  fixtures.write_tokenizer(tok .. "/tokenizer.json", 0, BASE_VOCAB + 1, {})
  check.checkerror(function() openflamingo.load(release_spec(CASE_DIR, { tokenizer = tok })) end,
    "'lang_encoder.transformer.wte.weight' in " .. CASE_DIR .. "/checkpoint.pt has 300 rows but the tokenizer "
      .. "with OpenFlamingo's added tokens has 301")
end)

-- ---------------------------------------------------------------------------
-- LLaMA-based OpenFlamingo from random tensors

local L = { width = 64, layers = 4, heads = 4, kv_heads = 2, ffn = 96, vocab = 300 }

-- Flamingo state dict names of a LLaMA-based model: the case's vision tower
-- and perceiver, random LLaMA layers, random gated blocks (dim 64, visual
-- width 48, 8 heads of 64) before layers 1 and 3 with both gates set to
-- `gate`. Every tensor has its own seed.
local function llama_state(gate)
  local src = loom.load(OF_DIR .. "/model.safetensors")
  local w, seed = {}, 900
  local function randn(shape, std, mean)
    seed = seed + 1
    return loom.randn(shape, { seed = seed, std = std or 0.1, mean = mean or 0 })
  end
  for name, t in pairs(src) do
    if name:match("^vision_encoder%.") or name:match("^perceiver%.") then w[name] = t end
  end
  local d, kv = L.width, L.kv_heads * (L.width // L.heads)
  w["lang_encoder.model.embed_tokens.weight"] = randn({ L.vocab, d }, 1)
  w["lang_encoder.model.norm.weight"] = randn({ d }, 0.1, 1)
  w["lang_encoder.lm_head.weight"] = randn({ L.vocab, d })
  for i = 0, L.layers - 1 do
    local p = string.format("lang_encoder.model.layers.%d.decoder_layer.", i)
    w[p .. "input_layernorm.weight"] = randn({ d }, 0.1, 1)
    w[p .. "post_attention_layernorm.weight"] = randn({ d }, 0.1, 1)
    w[p .. "self_attn.q_proj.weight"] = randn({ d, d })
    w[p .. "self_attn.k_proj.weight"] = randn({ kv, d })
    w[p .. "self_attn.v_proj.weight"] = randn({ kv, d })
    w[p .. "self_attn.o_proj.weight"] = randn({ d, d })
    w[p .. "mlp.gate_proj.weight"] = randn({ L.ffn, d })
    w[p .. "mlp.up_proj.weight"] = randn({ L.ffn, d })
    w[p .. "mlp.down_proj.weight"] = randn({ d, L.ffn })
    if (i + 1) % 2 == 0 then
      local g = string.format("lang_encoder.model.layers.%d.gated_cross_attn_layer.", i)
      w[g .. "attn.norm.weight"], w[g .. "attn.norm.bias"] = randn({ d }, 0.1, 1), randn({ d })
      w[g .. "attn.to_q.weight"] = randn({ 512, d })
      w[g .. "attn.to_kv.weight"] = randn({ 1024, 48 })
      w[g .. "attn.to_out.weight"] = randn({ d, 512 })
      w[g .. "ff.0.weight"], w[g .. "ff.0.bias"] = randn({ d }, 0.1, 1), randn({ d })
      w[g .. "ff.1.weight"] = randn({ 4 * d, d })
      w[g .. "ff.3.weight"] = randn({ d, 4 * d })
      w[g .. "attn_gate"], w[g .. "ff_gate"] = loom.tensor({ gate }), loom.tensor({ gate })
    end
  end
  return w
end

local LLAMA_CONFIG = { model_type = "llama", hidden_size = L.width, intermediate_size = L.ffn,
  num_hidden_layers = L.layers, num_attention_heads = L.heads, num_key_value_heads = L.kv_heads,
  vocab_size = L.vocab, max_position_embeddings = 128, rms_norm_eps = 1e-6, tie_word_embeddings = false }

local function llama_parts(gate)
  local cfg = json.read(OF_DIR .. "/config.json")
  local weights = openflamingo.canonical_names(llama_state(gate), "model.layers")
  weights.__label = "llama test state"
  return {
    weights = weights, label = "llama test state", dir = OF_DIR, vision_cfg = cfg.vision_encoder.open_clip_model_config,
    lang_cfg = LLAMA_CONFIG, cross_attn_every_n_layers = 2, media_token_id = 298, eoc_token_id = 297, pad_token_id = 299,
  }
end

local LLAMA_IDS = { { 298, 45, 67, 89, 12, 297, 298, 33, 150, 7, 210 } }

run("LLaMA with zero gates equals plain LLaMA", function()
  local model = openflamingo.build(llama_parts(0))
  local logits = model:forward({ input_ids = LLAMA_IDS, pixel_values = inputs.vision_x })
  local plain_weights = {}
  for name, t in pairs(llama_state(0)) do
    local rest = name:match("^lang_encoder%.(.+)$")
    if rest then plain_weights[(rest:gsub("%.decoder_layer%.", "."))] = t end
  end
  local plain = llama.new(LLAMA_CONFIG, plain_weights, "model", "lm_head.weight")
  local expected = plain:forward({ input_ids = loom.tensor(LLAMA_IDS, "i64") })
  check.check(loom.max_abs_diff(logits, expected) < 1e-5, "tanh(0) gates leave the LLaMA logits unchanged")
end)

-- The LLaMA model's release layout in a new directory: checkpoint.pt with
-- the perceiver, the gated blocks (old and wrapped names) and the trained
-- embedding; llama/ with the base vocabulary; clip/ with the tower.
local function llama_release(state)
  local dir = temp_dir()
  local ckpt, lm, clip = {}, {}, {}
  for name, t in pairs(state) do
    local rest = name:match("^vision_encoder%.(.+)$")
    if rest then clip["visual." .. rest] = t end
    if name:match("^perceiver%.") or name:match("gated_cross_attn_layer%.") then ckpt[name] = t end
    rest = name:match("^lang_encoder%.(.+)$")
    if rest and not rest:match("gated_cross_attn_layer") then lm[(rest:gsub("%.decoder_layer%.", "."))] = t end
  end
  ckpt["lang_encoder.model.embed_tokens.weight"] = state["lang_encoder.model.embed_tokens.weight"]
  lm["model.embed_tokens.weight"] = loom.randn({ BASE_VOCAB, L.width }, { seed = 77 })
  lm["lm_head.weight"] = state["lang_encoder.lm_head.weight"]:narrow(1, 1, BASE_VOCAB):contiguous()
  write_pt(dir .. "/checkpoint.pt", ckpt)
  mkdir(dir .. "/llama")
  loom.save(dir .. "/llama/model.safetensors", lm)
  local cfg = {}
  for k, v in pairs(LLAMA_CONFIG) do cfg[k] = v end
  cfg.vocab_size = BASE_VOCAB
  fixtures.write_file(dir .. "/llama/config.json", json.encode(cfg))
  fixtures.write_tokenizer(dir .. "/llama/tokenizer.json", 0, BASE_VOCAB, {})
  mkdir(dir .. "/clip")
  loom.save(dir .. "/clip/open_clip_model.safetensors", clip)
  return dir
end

run("LLaMA release layout against the single file", function()
  local state = llama_state(0.5)
  local dir = llama_release(state)
  local cfg = json.read(OF_DIR .. "/config.json")
  local model = openflamingo.load({ checkpoint = dir .. "/checkpoint.pt", vision = dir .. "/clip",
    lm = dir .. "/llama", vision_config = cfg.vision_encoder.open_clip_model_config })
  check.equal(model.every, 2, "cross_attn_every_n_layers read from the blocks present")
  check.equal(model.media_token_id, 298, "<image> id")

  -- the single file: the same tensors, the head's added rows zero as the
  -- release layout leaves them (their trained values are never saved)
  local head = state["lang_encoder.lm_head.weight"]:clone()
  head:narrow(1, BASE_VOCAB + 1, L.vocab - BASE_VOCAB):fill(0)
  state["lang_encoder.lm_head.weight"] = head
  local parts = llama_parts(0.5)
  parts.weights["lang_encoder.lm_head.weight"] = head
  local reference = openflamingo.build(parts)

  local args = { input_ids = LLAMA_IDS, pixel_values = inputs.vision_x }
  local logits = model:forward(args)
  check.check(loom.equal(logits, reference:forward(args)), "logits equal the single-file layout's")
  check.check(loom.equal(logits:select(3, 299), loom.zeros({ 1, #LLAMA_IDS[1] })), "added head rows give logit 0")

  -- images change only the tokens from the first <image> on: swap them
  local swapped = loom.cat({ inputs.vision_x:narrow(2, 2, 1), inputs.vision_x:narrow(2, 1, 1) }, 2)
  local other = model:forward({ input_ids = { { 45, 67, 298, 89, 12 } }, pixel_values = swapped })
  local base = model:forward({ input_ids = { { 45, 67, 298, 89, 12 } }, pixel_values = inputs.vision_x:narrow(2, 1, 1) })
  check.check(loom.max_abs_diff(other:narrow(2, 1, 2), base:narrow(2, 1, 2)) == 0, "tokens before <image> ignore it")
  check.check(loom.max_abs_diff(other:narrow(2, 3, 3), base:narrow(2, 3, 3)) > 1e-4, "tokens after it see it")

  -- cached greedy decoding against recomputing the whole sequence
  local result = model:generate({ input_ids = LLAMA_IDS, pixel_values = inputs.vision_x, max_new_tokens = 4 })
  check.check(#result.tokens > 0, "generates tokens")
  local seq = { table.unpack(LLAMA_IDS[1]) }
  for _ = 1, #result.tokens do
    local step = model:forward({ input_ids = { seq }, pixel_values = inputs.vision_x, logits = "last" })
    seq[#seq + 1] = loom.argmax(step:select(1, 1):select(1, 1)):item()
  end
  check.equal(result.tokens, { table.unpack(seq, #LLAMA_IDS[1] + 1) }, "cached tokens equal recomputed tokens")
end)

-- ---------------------------------------------------------------------------
-- The shipped tiny checkpoint

local TINY = root .. "examples/models/tiny-openflamingo"
local SHOTS = root .. "examples/shots/captions.jsonl"

local function read_bytes(path)
  local f = io.open(path, "rb")
  if f == nil then return nil end
  local bytes = f:read("a")
  f:close()
  return bytes
end

local function shell(cmd)
  local p = io.popen(cmd .. " 2>&1")
  local out = p:read("a")
  local _, _, code = p:close()
  return out, code
end

run("make_tiny_flamingo.lua rewrites the shipped files", function()
  local dir = temp_dir()
  local out, code = shell(string.format("cd '%s' && '%s' scripts/make_tiny_flamingo.lua '%s/model' "
    .. "tests/golden/tokenizers/gpt2_bpe/vocab.bpe '%s/shots/captions.jsonl'", root, arg[-1], dir, dir))
  check.equal(code, 0, "make_tiny_flamingo.lua exits 0: " .. out)
  for _, name in ipairs({ "config.json", "model.safetensors", "preprocessor_config.json", "vocab.json", "merges.txt",
      "added_tokens.json", "tokenizer_config.json", "special_tokens_map.json" }) do
    check.check(read_bytes(dir .. "/model/" .. name) == read_bytes(TINY .. "/" .. name),
      name .. " is what the script writes")
  end
  check.check(read_bytes(dir .. "/shots/captions.jsonl") == read_bytes(SHOTS), "captions.jsonl is what the script writes")
end)

run("tiny checkpoint size and tokens", function()
  local size = #assert(read_bytes(TINY .. "/model.safetensors"))
  check.check(size < 3 * 2 ^ 20, string.format("model.safetensors is %d bytes, under 3 MiB", size))
  local model = openflamingo.load(TINY)
  local tok = model.tokenizer
  check.equal(model.media_token_id, tok:token_to_id("<image>"), "<image> id matches the tokenizer")
  check.equal(model.eoc_token_id, tok:token_to_id("<|endofchunk|>"), "<|endofchunk|> id matches the tokenizer")
  check.equal(tok:vocab_size(), model.lm.cfg.vocab_size, "tokenizer and embedding sizes agree")
  local ids = tok:encode("<image>An image of a cat.<|endofchunk|>", { parse_special = true })
  check.equal(ids[1], model.media_token_id, "<image> encodes as one token")
  check.equal(ids[#ids], model.eoc_token_id, "<|endofchunk|> encodes as one token")
  check.equal(tok:decode({ table.unpack(ids, 2, #ids - 1) }), "An image of a cat.", "text round trip")
end)

run("few-shot script with the tiny checkpoint", function()
  local out, code = shell(string.format("cd '%s' && '%s' scripts/flamingo.lua --model examples/models/tiny-openflamingo "
    .. "--shots examples/shots/captions.jsonl --image examples/images/cat.png 2>/dev/null",
    root, arg[-1]))
  check.equal(code, 0, "script exits 0: " .. out)
  check.check(out:match("%S") ~= nil, "script prints the generated text: '" .. out .. "'")

  -- without --shots the query image and prompt alone (zero-shot), the same
  -- text as model:generate gives for that prompt list
  local zero = shell(string.format("cd '%s' && '%s' scripts/flamingo.lua --model examples/models/tiny-openflamingo "
    .. "--image examples/images/cat.png --prompt 'An image of' --max-new-tokens 4 --quiet 2>/dev/null", root, arg[-1]))
  local tiny = require("loom.openflamingo").load(root .. "examples/models/tiny-openflamingo")
  local expected = tiny:generate({ loom.image.load(root .. "examples/images/cat.png", { keep_alpha = true }),
    "An image of", max_new_tokens = 4 })
  check.equal(zero, expected.text .. "\n", "zero-shot prints the text of that prompt")

  -- the model summary goes to stderr, and --quiet drops it
  local cmd = string.format("cd '%s' && '%s' scripts/flamingo.lua --model examples/models/tiny-openflamingo "
    .. "--shots examples/shots/captions.jsonl --image examples/images/cat.png --max-new-tokens 2", root, arg[-1])
  local logged = shell("(" .. cmd .. " 2>&1 >/dev/null)")
  check.check(logged:find("loaded OpenFlamingo", 1, true) ~= nil, "the summary is logged: " .. logged)
  local quiet = shell("(" .. cmd .. " --quiet 2>&1 >/dev/null)")
  check.equal(quiet, "", "--quiet logs nothing")
end)

for _, dir in ipairs(temp_dirs) do os.execute("rm -rf '" .. dir .. "'") end
check.summary()
