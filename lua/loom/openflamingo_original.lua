-- OpenFlamingo's release layout (open_flamingo 2.0): a checkpoint.pt with
-- the tensors training changed (perceiver.*, the gated blocks under
-- lang_encoder.gated_cross_attn_layers.<i>.* or
-- lang_encoder.<layers>.<i>.gated_cross_attn_layer.*, and the resized input
-- embedding), combined as create_model_and_transforms does with an
-- open_clip vision tower, a Hugging Face language model directory (MPT or
-- LLaMA) and its tokenizer, to which "<|endofchunk|>", "<image>" and, when
-- the tokenizer has no pad token, "<PAD>" are added. The result is the
-- parts table of openflamingo.build.
local loom = require("loom.core")
local json = require("loom.json")
local flamingo = require("loom.flamingo")
local openflamingo = require("loom.openflamingo")

local M = {}

-- open_clip's OPENAI_DATASET_MEAN and OPENAI_DATASET_STD (open_clip
-- constants.py), the normalisation of OpenAI's CLIP towers.
M.OPENAI_MEAN = { 0.48145466, 0.4578275, 0.40821073 }
M.OPENAI_STD = { 0.26862954, 0.26130258, 0.27577711 }

-- Weight files of an open_clip checkpoint directory (the Hugging Face hub
-- layout of open_clip models), in the order they are tried.
M.OPEN_CLIP_FILES = { "open_clip_model.safetensors", "open_clip_pytorch_model.bin" }

-- Prefixes under which a file may hold the vision tower: a whole open_clip
-- CLIP state dict (visual.*), Flamingo's name (vision_encoder.*) or the
-- tower's own state dict (no prefix).
M.VISION_PREFIXES = { "visual.", "vision_encoder.", "" }

local function resolve(dir, path)
  if type(path) ~= "string" or path:sub(1, 1) == "/" then return path end
  return flamingo.path_join(dir, path)
end

-- The spec of a directory whose config.json (model_type "openflamingo")
-- names the parts. Its "checkpoint", "vision", "lm", "tokenizer" and
-- "preprocessor" paths are relative to the directory, and the other keys
-- pass on unchanged.
function M.from_config(dir, cfg)
  local spec = {}
  for k, v in pairs(cfg) do spec[k] = v end
  for _, key in ipairs({ "checkpoint", "vision", "lm", "tokenizer", "preprocessor" }) do
    if type(spec[key]) == "string" then spec[key] = resolve(dir, spec[key]) end
  end
  spec.dir = dir
  return spec
end

local function load_checkpoint(path, what)
  local ok, weights = pcall(loom.load, path)
  if not ok then error(string.format("cannot load the %s: %s", what, weights), 0) end
  return weights
end

-- ---------------------------------------------------------------------------
-- Vision tower

-- The open_clip vision config of a tower's tensors under `prefix`, read
-- from their shapes: width and patch size from conv1, the image size from
-- the position count, the layer count, the MLP ratio from c_fc. Heads are
-- 64 wide, as in open_clip's ViT-B and ViT-L configs (pass vision_config
-- for towers with other head widths).
local function infer_vision_cfg(raw, prefix, label)
  local conv = raw[prefix .. "conv1.weight"]
  local positions = raw[prefix .. "positional_embedding"]
  if positions == nil then
    error(string.format("missing tensor '%spositional_embedding' in %s", prefix, label), 4)
  end
  local width, patch = conv:size(1), conv:size(3)
  local grid = math.tointeger(math.floor(math.sqrt(positions:size(1) - 1) + 0.5))
  if grid * grid + 1 ~= positions:size(1) then
    error(string.format("'%spositional_embedding' in %s has %d rows, which is not a square grid plus the class token",
      prefix, label, positions:size(1)), 4)
  end
  local layers = 0
  while raw[string.format("%stransformer.resblocks.%d.ln_1.weight", prefix, layers)] do layers = layers + 1 end
  local fc = raw[prefix .. "transformer.resblocks.0.mlp.c_fc.weight"]
  return {
    image_size = grid * patch, patch_size = patch, width = width, layers = layers, head_width = 64,
    mlp_ratio = fc and fc:size(1) / width or 4.0,
  }
end

-- The tower's tensors (Flamingo names, vision_encoder.*), its open_clip
-- model config and the open_clip eval transform of spec.vision.
function M.vision(spec)
  local path = spec.vision
  if type(path) ~= "string" then
    error("OpenFlamingo's release layout needs 'vision': an open_clip checkpoint directory or file", 3)
  end
  local raw, label, clip_config
  if flamingo.is_directory(path) then
    local config_path = flamingo.path_join(path, "open_clip_config.json")
    if flamingo.file_exists(config_path) then
      local cfg, err = json.read(config_path)
      if cfg == nil then error(string.format("cannot read the open_clip config: %s", err), 3) end
      clip_config = flamingo.strip_nulls(cfg)
    end
    for _, name in ipairs(M.OPEN_CLIP_FILES) do
      local file = flamingo.path_join(path, name)
      if raw == nil and flamingo.file_exists(file) then raw, label = load_checkpoint(file, "open_clip checkpoint"), file end
    end
    if raw == nil then raw, label = load_checkpoint(path, "open_clip checkpoint"), path end
  else
    raw, label = load_checkpoint(path, "open_clip checkpoint"), path
  end

  local prefix
  for _, p in ipairs(M.VISION_PREFIXES) do
    if prefix == nil and raw[p .. "conv1.weight"] then prefix = p end
  end
  if prefix == nil then
    error(string.format("no open_clip vision tower in '%s': expected visual.conv1.weight (an open_clip CLIP state dict), "
      .. "vision_encoder.conv1.weight or conv1.weight", label), 3)
  end
  local tensors = {}
  for name, t in pairs(raw) do
    if type(name) == "string" and name:sub(1, #prefix) == prefix then
      tensors["vision_encoder." .. name:sub(#prefix + 1)] = t
    end
  end

  -- the model config: given, from open_clip_config.json, or from the shapes
  local model_cfg = spec.vision_config or (clip_config and clip_config.model_cfg)
  if model_cfg == nil then
    -- NOTE: QuickGELU cannot be read from the weights. OpenFlamingo's towers
    -- are OpenAI's CLIP ViT-L/14, which open_clip builds with QuickGELU, so
    -- that is the default here; pass quick_gelu = false for other towers.
    model_cfg = { vision_cfg = infer_vision_cfg(raw, prefix, label), quick_gelu = true }
  end
  if spec.quick_gelu ~= nil then
    local copy = {}
    for k, v in pairs(model_cfg) do copy[k] = v end
    copy.quick_gelu = spec.quick_gelu
    model_cfg = copy
  end

  -- open_clip's image_transform(image_size, is_train=False)
  local preprocessor = spec.preprocessor
  if type(preprocessor) == "string" then
    local cfg, err = json.read(preprocessor)
    if cfg == nil then error(string.format("cannot read the image preprocessor config: %s", err), 3) end
    preprocessor = flamingo.strip_nulls(cfg)
  elseif preprocessor == nil then
    local pre = clip_config and clip_config.preprocess_cfg or {}
    local size = (model_cfg.vision_cfg or model_cfg).image_size
    preprocessor = {
      source = "open_clip image_transform(image_size, is_train=False)",
      image_size = size, mean = pre.mean or M.OPENAI_MEAN, std = pre.std or M.OPENAI_STD,
    }
  end
  return tensors, model_cfg, preprocessor, label
end

-- ---------------------------------------------------------------------------
-- Tokenizer

-- The pad token a Hugging Face tokenizer directory names in
-- tokenizer_config.json or special_tokens_map.json, or nil.
local function pad_token_text(dir, settings)
  if settings.pad_token then return settings.pad_token end
  local map = json.read(flamingo.path_join(dir, "special_tokens_map.json"))
  local pad = map and map.pad_token
  if type(pad) == "table" then pad = pad.content end
  return type(pad) == "string" and pad or nil
end

-- The tokenizer of `dir` with OpenFlamingo's tokens added as
-- create_model_and_transforms adds them, and their ids.
function M.tokenizer(dir)
  local tok, settings = require("loom.tokenizers").load(dir)
  if tok == nil then error(string.format("cannot load the tokenizer: %s", settings), 3) end
  local ids = {}
  ids.eoc = tok:add_token("<|endofchunk|>", true)
  ids.media = tok:add_token("<image>", true)
  local pad_text = pad_token_text(dir, settings)
  ids.pad = pad_text and tok:token_to_id(pad_text)
  if ids.pad == nil then ids.pad = tok:add_token("<PAD>", true) end
  tok:set_special_id("pad", ids.pad)
  return tok, ids
end

-- ---------------------------------------------------------------------------
-- Language model and embeddings

-- Rows 1..rows of `t` (rows <= t:size(1)) or `t` with zero rows appended.
local function resize_rows(t, rows)
  if t:size(1) >= rows then return t:narrow(1, 1, rows) end
  local pad = loom.zeros({ rows - t:size(1), t:size(2) }, t:dtype())
  return loom.cat({ t, pad }, 1)
end

-- Put the input embedding and output head of a vocabulary of `vocab`
-- tokens into `weights`, as resize_token_embeddings(len(tokenizer)) leaves
-- them, with the checkpoint's trained embedding taking precedence.
local function resize_embeddings(weights, ckpt, lm_weights, entry, lang_cfg, vocab, labels)
  local embed_name = "lang_encoder." .. entry.embed
  local trained = ckpt[embed_name]
  if trained then
    if trained:size(1) ~= vocab then
      error(string.format("'%s' in %s has %d rows but the tokenizer with OpenFlamingo's added tokens has %d",
        embed_name, labels.checkpoint, trained:size(1), vocab), 4)
    end
  else
    local own = lm_weights[entry.embed]
    if own == nil then error(string.format("missing tensor '%s' in %s", entry.embed, labels.lm), 4) end
    if own:size(1) < vocab then
      error(string.format("%s has no '%s', and the language model's embedding has %d rows for %d tokens: "
        .. "the rows of OpenFlamingo's added tokens are missing", labels.checkpoint, embed_name, own:size(1), vocab), 4)
    end
    weights[embed_name] = resize_rows(own, vocab)
  end

  local head_name = "lang_encoder." .. entry.head
  local tied = lang_cfg.model_type == "mpt" or lang_cfg.tie_word_embeddings == true
  if ckpt[head_name] then
    if ckpt[head_name]:size(1) ~= vocab then
      error(string.format("'%s' in %s has %d rows but the vocabulary has %d", head_name, labels.checkpoint,
        ckpt[head_name]:size(1), vocab), 4)
    end
  elseif tied then
    weights[head_name] = nil
  else
    local own = lm_weights[entry.head]
    if own == nil then error(string.format("missing tensor '%s' in %s", entry.head, labels.lm), 4) end
    -- NOTE: resize_token_embeddings gives the new output rows random values
    -- that OpenFlamingo neither trains nor saves, so no checkpoint can
    -- reproduce them. Zero rows give the added tokens a logit of 0.
    weights[head_name] = resize_rows(own, vocab)
  end
end

-- ---------------------------------------------------------------------------
-- Assembly

local SPEC_KEYS = {
  checkpoint = true, vision = true, lm = true, tokenizer = true, cross_attn_every_n_layers = true,
  vision_config = true, quick_gelu = true, ln_post_on_tokens = true, preprocessor = true, perceiver = true,
  gated_cross_attn = true, media_token_id = true, eoc_token_id = true, pad_token_id = true, dir = true,
  model_type = true,
}

-- The parts of openflamingo.build for a spec:
--   spec.checkpoint   checkpoint.pt (PyTorch zip) or a safetensors file with
--                     perceiver.* and lang_encoder.* tensors
--   spec.vision       open_clip checkpoint directory (open_clip_config.json
--                     and open_clip_model.safetensors or
--                     open_clip_pytorch_model.bin) or file (visual.*,
--                     vision_encoder.* or bare tower names)
--   spec.lm           Hugging Face language model directory (config.json
--                     with model_type "mpt" or "llama")
--   spec.tokenizer    tokenizer directory (default: spec.lm)
--   spec.cross_attn_every_n_layers  (default: read from the checkpoint)
--   spec.vision_config open_clip model config table (default: the
--                     directory's open_clip_config.json, else the shapes)
--   spec.quick_gelu, spec.ln_post_on_tokens, spec.preprocessor (table or
--                     path), spec.perceiver, spec.gated_cross_attn
--   spec.media_token_id, spec.eoc_token_id, spec.pad_token_id: ids when no
--                     tokenizer is loaded
-- opts.tokenizer = false skips the tokenizer, opts.preprocessor = false the
-- image transform.
function M.parts(spec, opts)
  for key in pairs(spec) do
    if not SPEC_KEYS[key] then
      error(string.format("unknown OpenFlamingo option '%s' (expected checkpoint, vision, lm, tokenizer, "
        .. "cross_attn_every_n_layers, ...)", tostring(key)), 3)
    end
  end
  for _, key in ipairs({ "checkpoint", "lm" }) do
    if type(spec[key]) ~= "string" then
      error(string.format("OpenFlamingo's release layout needs '%s' (a path), got %s", key, type(spec[key])), 3)
    end
  end
  local labels = { checkpoint = spec.checkpoint, lm = spec.lm }

  -- the language model and its config
  local lang_path = flamingo.path_join(spec.lm, "config.json")
  local lang_cfg, err = json.read(lang_path)
  if lang_cfg == nil then error(string.format("cannot read the language model config: %s", err), 3) end
  lang_cfg = flamingo.strip_nulls(lang_cfg)
  local entry = openflamingo.language_model(lang_cfg, lang_path)
  local lm_weights = require("loom.llava_original").load_weights(spec.lm)

  -- the vision tower, then the checkpoint's tensors on top of everything
  local vision, vision_cfg, preprocessor = M.vision(spec)
  local weights = {}
  for name, t in pairs(vision) do weights[name] = t end
  for name, t in pairs(lm_weights) do
    if type(name) == "string" then weights["lang_encoder." .. name] = t end
  end
  -- open_flamingo's training saves {"model_state_dict": ..., "optimizer_state_dict": ...}
  -- with DDP's "module." prefix; the released checkpoint.pt is the bare state dict
  local loaded = load_checkpoint(spec.checkpoint, "OpenFlamingo checkpoint")
  local nested = false
  for name in pairs(loaded) do
    if type(name) == "string" and name:match("^model_state_dict%.") then nested = true end
  end
  local ckpt = {}
  for name, t in pairs(loaded) do
    if type(name) == "string" and (not nested or name:match("^model_state_dict%.")) then
      name = name:gsub("^model_state_dict%.", ""):gsub("^module%.", "")
      ckpt[name] = t
    end
  end
  if ckpt["perceiver.latents"] == nil then
    error(string.format("'%s' has no perceiver.latents: not an OpenFlamingo checkpoint", spec.checkpoint), 3)
  end
  for name, t in pairs(ckpt) do weights[name] = t end

  -- the tokenizer with the added tokens sets the vocabulary size
  local tok, ids
  if opts.tokenizer ~= false and spec.tokenizer ~= false then
    tok, ids = M.tokenizer(spec.tokenizer or spec.lm)
  end
  local media_id = spec.media_token_id or (ids and ids.media)
  local eoc_id = spec.eoc_token_id or (ids and ids.eoc)
  if media_id == nil or eoc_id == nil then
    error("without a tokenizer, OpenFlamingo's release layout needs media_token_id and eoc_token_id", 3)
  end
  local trained = ckpt["lang_encoder." .. entry.embed]
  local vocab = tok and tok:vocab_size() or (trained and trained:size(1)) or lang_cfg.vocab_size
  resize_embeddings(weights, ckpt, lm_weights, entry, lang_cfg, vocab, labels)
  local lang = {}
  for k, v in pairs(lang_cfg) do lang[k] = v end
  lang.vocab_size = vocab

  weights = openflamingo.canonical_names(weights, entry.layers)
  weights.__label = string.format("'%s' (with '%s' and '%s')", spec.checkpoint, spec.vision, spec.lm)
  return {
    weights = weights, label = spec.checkpoint, dir = spec.dir or spec.checkpoint, config = spec,
    vision_cfg = vision_cfg, ln_post_on_tokens = spec.ln_post_on_tokens, lang_cfg = lang,
    perceiver = spec.perceiver, gated_cross_attn = spec.gated_cross_attn,
    cross_attn_every_n_layers = spec.cross_attn_every_n_layers or openflamingo.infer_every(weights, spec.checkpoint),
    media_token_id = media_id, eoc_token_id = eoc_id,
    pad_token_id = spec.pad_token_id or (ids and ids.pad) or lang_cfg.pad_token_id,
    tokenizer = tok, preprocessor = opts.preprocessor ~= false and preprocessor or nil,
  }
end

return M
