-- OpenFlamingo (open_flamingo.Flamingo 2.0): an open_clip vision tower, the
-- perceiver resampler and an MPT (Hugging Face MptForCausalLM) or LLaMA
-- language model with a gated cross-attention block before every decoder
-- layer i where (i + 1) % cross_attn_every_n_layers == 0. Prompts use
-- "<image>" before each image and "<|endofchunk|>" after each shot.
--
-- Two layouts load:
--   * one directory with model.safetensors holding Flamingo's full state
--     dict (vision_encoder.*, perceiver.*, lang_encoder.*) and a config.json
--     with model_type "openflamingo" (see M.load);
--   * OpenFlamingo's release layout: checkpoint.pt with the trained tensors
--     beside separate open_clip, language model and tokenizer checkpoints
--     (openflamingo_original.lua), given as a table or by a config.json
--     with a "checkpoint" field.
-- Both end in M.build, which reads tensors by Flamingo's state dict names.
local loom = require("loom.core")
local log = require("loom.log")
local flamingo = require("loom.flamingo")
local openclip_vision = require("loom.models.openclip_vision")
local perceiver = require("loom.connectors.perceiver")
local gated_xattn = require("loom.connectors.gated_xattn")

local M = {}

-- Defaults of open_flamingo's Flamingo, PerceiverResampler and
-- GatedCrossAttentionBlock (2.0.1) for keys the config omits.
M.defaults = {
  cross_attn_every_n_layers = 1,
  perceiver = { depth = 6, heads = 8, dim_head = 64, num_latents = 64 },
  gated_cross_attn = { heads = 8, dim_head = 64, only_attend_immediate_media = true },
}

-- The language models Flamingo wraps, by config model_type: the module, the
-- base prefix of the decoder (under "lang_encoder."), the attribute of its
-- layer list (open_flamingo's _infer_decoder_layers_attr_name), the tensor
-- names of the input embedding and output head, and config keys.
M.language_models = {
  mpt = {
    module = "loom.models.mpt", base = "transformer", layers = "transformer.blocks",
    embed = "transformer.wte.weight", head = "lm_head.weight", width = "d_model", context = "max_seq_len",
  },
  llama = {
    module = "loom.models.llama", base = "model", layers = "model.layers",
    embed = "model.embed_tokens.weight", head = "lm_head.weight", width = "hidden_size",
    context = "max_position_embeddings",
  },
}

-- The entry of M.language_models for a language model config; raises
-- naming `where` for another model_type.
function M.language_model(lang_cfg, where)
  local kind = lang_cfg and lang_cfg.model_type
  local entry = M.language_models[kind]
  if entry == nil then
    error(string.format("%s: language model type '%s' is not supported (expected 'mpt' or 'llama')",
      where, tostring(kind)), 3)
  end
  return entry
end

local Model = setmetatable({}, { __index = flamingo.Model })
Model.__index = Model

local function section(cfg, name)
  local out = {}
  for k, v in pairs(M.defaults[name]) do out[k] = v end
  for k, v in pairs(cfg[name] or {}) do out[k] = v end
  return out
end

-- The image tokens Flamingo gives the perceiver: the last resblock's output
-- without the class token.
function Model:vision_tokens(pixels, hook)
  return self.vision:forward(pixels, hook)
end

-- Token ids and images of a prompt's items: "<image>" for each image, text
-- as written, and "<|endofchunk|>" closing a text that an image follows
-- (unless the text already ends with it). BOS follows the tokenizer's own
-- setting, as OpenFlamingo calls the tokenizer with its defaults: none for
-- MPT's GPT-NeoX tokenizer, "<s>" for LLaMA's.
function Model:build_prompt(items)
  local tok = self.tokenizer
  if tok == nil then
    error(string.format("no tokenizer in '%s' to encode the prompt (pass input_ids instead)", self.dir), 2)
  end
  local eoc = "<|endofchunk|>"
  local parts, images = {}, {}
  for i, item in ipairs(items) do
    if item.kind == "image" then
      local prev = items[i - 1]
      if prev and prev.kind == "text" and prev.value:sub(-#eoc) ~= eoc then parts[#parts + 1] = eoc end
      parts[#parts + 1] = "<image>"
      images[#images + 1] = item.value
    else
      parts[#parts + 1] = item.value
    end
  end
  local ids = tok:encode(table.concat(parts), { add_eos = false, parse_special = true })
  return ids, images
end

-- ---------------------------------------------------------------------------
-- State dict names

-- A copy of a Flamingo state dict table with every alias of a wrapped
-- decoder layer and gated block also under its plain name. Flamingo's
-- state dict holds decoder layer i as <layers>.<i>.decoder_layer.* and as
-- old_decoder_blocks.<i>.*, and gated block i as
-- <layers>.<i>.gated_cross_attn_layer.* and as gated_cross_attn_layers.<i>.*;
-- the result also has <layers>.<i>.* and gated_cross_attn_layers.<i>.*, the
-- names M.build reads. Tensors are shared, not copied.
function M.canonical_names(weights, layers_attr)
  local out = {}
  for name, t in pairs(weights) do out[name] = t end
  local function alias(name, t)
    if out[name] == nil then out[name] = t end
  end
  for name, t in pairs(weights) do
    if type(name) == "string" then
      local attr, i, rest = name:match("^lang_encoder%.(.-)%.(%d+)%.decoder_layer%.(.+)$")
      if attr then alias(string.format("lang_encoder.%s.%s.%s", attr, i, rest), t) end
      i, rest = name:match("^lang_encoder%.old_decoder_blocks%.(%d+)%.(.+)$")
      if i then alias(string.format("lang_encoder.%s.%s.%s", layers_attr, i, rest), t) end
      attr, i, rest = name:match("^lang_encoder%.(.-)%.(%d+)%.gated_cross_attn_layer%.(.+)$")
      if attr then alias(string.format("lang_encoder.gated_cross_attn_layers.%s.%s", i, rest), t) end
    end
  end
  return out
end

-- The 0-based decoder layers that have a gated block in `weights`
-- (canonical names), sorted.
local function gated_layers(weights)
  local found, list = {}, {}
  for name in pairs(weights) do
    local i = type(name) == "string" and name:match("^lang_encoder%.gated_cross_attn_layers%.(%d+)%.attn_gate$")
    if i and not found[tonumber(i)] then
      found[tonumber(i)] = true
      list[#list + 1] = tonumber(i)
    end
  end
  table.sort(list)
  return list
end

-- cross_attn_every_n_layers of a checkpoint whose config does not say it:
-- the first gated layer's index + 1. Raises when the checkpoint has no
-- gated block.
function M.infer_every(weights, label)
  local layers = gated_layers(weights)
  if #layers == 0 then
    error(string.format("no gated cross-attention blocks (lang_encoder.gated_cross_attn_layers.<i>.* or "
      .. "lang_encoder.<layers>.<i>.gated_cross_attn_layer.*) in %s", label), 3)
  end
  return layers[1] + 1
end

-- Raise unless the gated blocks of `weights` sit exactly before the layers
-- i < n_layers with (i + 1) % every == 0.
local function check_gated_layers(weights, every, n_layers, label)
  local present = {}
  for _, i in ipairs(gated_layers(weights)) do present[i] = true end
  for i = 0, n_layers - 1 do
    local expected = (i + 1) % every == 0
    if expected and not present[i] then
      error(string.format("%s has no gated cross-attention block for decoder layer %d, but cross_attn_every_n_layers = %d "
        .. "puts one before every layer i with (i + 1) %% %d == 0", label, i, every, every), 3)
    elseif present[i] and not expected then
      error(string.format("%s has a gated cross-attention block for decoder layer %d, which cross_attn_every_n_layers = %d "
        .. "does not place there", label, i, every), 3)
    end
    present[i] = nil
  end
  local extra = next(present)
  if extra then
    error(string.format("%s has a gated cross-attention block for decoder layer %d, but the language model has %d layers",
      label, extra, n_layers), 3)
  end
end

-- ---------------------------------------------------------------------------
-- Assembly

-- Build a model from its parts:
--   parts.weights        Flamingo state dict names (see canonical_names)
--   parts.label          text naming the checkpoint in messages
--   parts.dir            directory named by prompt errors
--   parts.vision_cfg     open_clip model config ({quick_gelu, vision_cfg})
--   parts.ln_post_on_tokens  apply ln_post to the tokens (open_clip >= 2.23)
--   parts.lang_cfg       the language model's config.json table (model_type
--                        "mpt" or "llama"), vocab_size as the embedding has it
--   parts.perceiver, parts.gated_cross_attn   sections as in M.defaults
--   parts.cross_attn_every_n_layers
--   parts.media_token_id, parts.eoc_token_id, parts.pad_token_id
--   parts.tokenizer, parts.preprocessor       optional
function M.build(parts)
  local lm_entry = M.language_model(parts.lang_cfg, parts.label)
  local weights = parts.weights
  local pcfg, xcfg = section(parts, "perceiver"), section(parts, "gated_cross_attn")

  local self = setmetatable({ dir = parts.dir, config = parts.config, weights = weights }, Model)
  self.vision = openclip_vision.new(parts.vision_cfg, weights, "vision_encoder",
    { ln_post_on_tokens = parts.ln_post_on_tokens == true })
  self.perceiver = perceiver.new({ weights = weights, prefix = "perceiver", layout = "openflamingo",
    heads = pcfg.heads, head_dim = pcfg.dim_head, depth = pcfg.depth, num_latents = pcfg.num_latents })
  local base = "lang_encoder." .. lm_entry.base
  self.lm = require(lm_entry.module).new(parts.lang_cfg, weights, base, "lang_encoder." .. lm_entry.head)
  self.lm_kind = parts.lang_cfg.model_type

  -- gated blocks before layers i with (i + 1) % every == 0 (0-based i)
  local every = parts.cross_attn_every_n_layers or M.defaults.cross_attn_every_n_layers
  if math.type(every) ~= "integer" or every < 1 then
    error(string.format("%s: cross_attn_every_n_layers must be a positive integer, got %s", parts.label,
      tostring(every)), 2)
  end
  check_gated_layers(weights, every, #self.lm.layers, parts.label)
  local immediate = xcfg.only_attend_immediate_media ~= false
  local width = self.lm.cfg[lm_entry.width]
  local blocks = {}
  for i = 0, #self.lm.layers - 1 do
    if (i + 1) % every == 0 then
      blocks[i + 1] = gated_xattn.new({ weights = weights, prefix = "lang_encoder.gated_cross_attn_layers." .. i,
        layout = "openflamingo", dim = width, heads = xcfg.heads, head_dim = xcfg.dim_head, name = "xattn." .. i,
        without_media = immediate and "zero" or "uniform" })
    end
  end
  self.blocks = blocks
  self.every = every
  self.state = flamingo.attach(self.lm, blocks)

  -- text_time as MaskedCrossAttention computes it: cached decoding attends to the last image
  self.media_token_id, self.eoc_token_id = parts.media_token_id, parts.eoc_token_id
  self.mask_mode = immediate and "latest" or "all"
  self.decode_media = "last_image"
  self.eos_id, self.pad_id = parts.eoc_token_id, parts.pad_token_id
  self.context = self.lm.cfg[lm_entry.context]
  self.tokenizer, self.preprocessor = parts.tokenizer, parts.preprocessor
  return self
end

-- Log the loaded model at info level.
local function log_model(self, title)
  local tower = self.vision.cfg
  log.model(title, {
    { "vision", string.format("open_clip ViT, %d layers, width %d, %d px, patch %d, %s", tower.num_hidden_layers,
      tower.hidden_size, tower.image_size, tower.patch_size, tower.hidden_act) },
    { "perceiver", string.format("%d layers, %d latents, %d heads of %d", self.perceiver.cfg.depth,
      self.perceiver.cfg.num_latents, self.perceiver.cfg.heads, self.perceiver.cfg.head_dim) },
    { "language_model", string.format("%s, %d layers", self.lm_kind, #self.lm.layers) },
    { "cross_attn_every_n_layers", self.every },
    { "media_token_id", self.media_token_id },
    { "eoc_token_id", self.eoc_token_id },
  }, { { "vision", self.vision }, { "perceiver", self.perceiver }, { "lm", self.lm } })
end

-- ---------------------------------------------------------------------------
-- Loading

-- Load an OpenFlamingo model.
--   M.load(DIR) with DIR/config.json of model_type "openflamingo":
--     with a "checkpoint" field: the release layout, see
--     openflamingo_original.lua (paths relative to DIR);
--     otherwise DIR/model.safetensors with Flamingo's full state dict and
--     these config.json fields: media_token_id, eoc_token_id, pad_token_id;
--     cross_attn_every_n_layers; vision_encoder.open_clip_model_config
--     (open_clip's model config: quick_gelu, vision_cfg) and
--     vision_encoder.ln_post_on_tokens (true for open_clip 2.23 and later);
--     perceiver {depth, heads, dim_head, num_latents}; gated_cross_attn
--     {heads, dim_head, only_attend_immediate_media}; lang_encoder.config
--     (MptConfig or LlamaConfig).
--   M.load{checkpoint = "checkpoint.pt", vision = DIR_OR_FILE, lm = DIR,
--     tokenizer = DIR, cross_attn_every_n_layers = N, ...}: the release
--     layout from explicit paths (openflamingo_original.lua lists the keys).
-- opts.preprocessor = false and opts.tokenizer = false skip those files.
function M.load(dir, opts)
  if type(dir) == "table" then
    local original = require("loom.openflamingo_original")
    local self = M.build(original.parts(dir, opts or {}))
    log_model(self, string.format("loaded OpenFlamingo from '%s' (release layout)", dir.checkpoint))
    return self
  end
  opts = opts or {}
  local cfg = flamingo.read_json(dir, "config.json", "model config")
  local where = flamingo.path_join(dir, "config.json")
  if cfg.model_type ~= "openflamingo" then
    error(string.format("'%s' has model_type '%s', but loom.openflamingo loads 'openflamingo' checkpoints",
      where, tostring(cfg.model_type)), 2)
  end
  if cfg.checkpoint ~= nil then
    local original = require("loom.openflamingo_original")
    local self = M.build(original.parts(original.from_config(dir, cfg), opts))
    log_model(self, string.format("loaded OpenFlamingo from '%s' (release layout)", dir))
    return self
  end

  local lang = cfg.lang_encoder and cfg.lang_encoder.config
  local lm_entry = M.language_model(lang, where)
  local vision_cfg = cfg.vision_encoder and (cfg.vision_encoder.open_clip_model_config or cfg.vision_encoder)
  if vision_cfg == nil then error(string.format("%s has no vision_encoder section", where), 2) end
  for _, key in ipairs({ "media_token_id", "eoc_token_id" }) do
    if cfg[key] == nil then error(string.format("%s has no %s", where, key), 2) end
  end
  local weights = M.canonical_names(loom.load(dir), lm_entry.layers)
  weights.__label = dir

  local self = M.build({
    weights = weights, label = dir, dir = dir, config = cfg,
    vision_cfg = vision_cfg, ln_post_on_tokens = cfg.vision_encoder.ln_post_on_tokens,
    lang_cfg = lang, perceiver = cfg.perceiver, gated_cross_attn = cfg.gated_cross_attn,
    cross_attn_every_n_layers = cfg.cross_attn_every_n_layers,
    media_token_id = cfg.media_token_id, eoc_token_id = cfg.eoc_token_id,
    pad_token_id = cfg.pad_token_id or lang.pad_token_id,
    tokenizer = opts.tokenizer ~= false and flamingo.load_tokenizer(dir) or nil,
    preprocessor = opts.preprocessor ~= false
      and flamingo.read_json(dir, "preprocessor_config.json", "image preprocessor config") or nil,
  })
  log_model(self, string.format("loaded OpenFlamingo from '%s'", dir))
  return self
end

M.Model = Model
return M
