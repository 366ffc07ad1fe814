-- OpenFlamingo (open_flamingo.Flamingo): an open_clip vision tower, the
-- perceiver resampler and an MPT language model (Hugging Face
-- MptForCausalLM) with a gated cross-attention block before every decoder
-- layer i where (i + 1) % cross_attn_every_n_layers == 0. Prompts use
-- "<image>" before each image and "<|endofchunk|>" after each shot.
--
-- A checkpoint directory contains model.safetensors with Flamingo's full state
-- dict (vision_encoder.*, perceiver.*, lang_encoder.*), a config.json with
-- model_type "openflamingo" (see M.load), preprocessor_config.json for
-- open_clip's eval transform and optionally tokenizer.json.
local loom = require("loom.core")
local flamingo = require("loom.flamingo")
local openclip_vision = require("loom.models.openclip_vision")
local mpt = require("loom.models.mpt")
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
-- (unless the text already ends with it). No BOS, as OpenFlamingo's
-- tokenizers add none.
function Model:build_prompt(items)
  local tok = self.tokenizer
  if tok == nil then
    error(string.format("no tokenizer.json in '%s' to encode the prompt (pass input_ids instead)", self.dir), 2)
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
  local ids = tok:encode(table.concat(parts), { add_bos = false, add_eos = false, parse_special = true })
  return ids, images
end

-- The name prefix of decoder block i: Flamingo's state dict has it both as
-- transformer.blocks.<i>.decoder_layer and as old_decoder_blocks.<i>; a
-- plain MPT state dict as transformer.blocks.<i>.
local function block_prefix(weights, i)
  local candidates = {
    string.format("lang_encoder.transformer.blocks.%d.decoder_layer", i),
    string.format("lang_encoder.old_decoder_blocks.%d", i),
    string.format("lang_encoder.transformer.blocks.%d", i),
  }
  for _, p in ipairs(candidates) do
    if weights[p .. ".norm_1.weight"] then return p end
  end
  return candidates[1]
end

-- The name prefix of the gated block before decoder layer i.
local function xattn_prefix(weights, i)
  local nested = string.format("lang_encoder.transformer.blocks.%d.gated_cross_attn_layer", i)
  if weights[nested .. ".attn_gate"] then return nested end
  return string.format("lang_encoder.gated_cross_attn_layers.%d", i)
end

-- Load an OpenFlamingo checkpoint directory. config.json fields:
--   model_type "openflamingo"; media_token_id, eoc_token_id, pad_token_id;
--   cross_attn_every_n_layers; vision_encoder.open_clip_model_config (open_clip's
--   model config: quick_gelu, vision_cfg) and vision_encoder.ln_post_on_tokens
--   (true for open_clip 2.23 and later); perceiver {depth, heads, dim_head,
--   num_latents}; gated_cross_attn {heads, dim_head, only_attend_immediate_media};
--   lang_encoder.config (MptConfig, model_type "mpt").
-- opts.preprocessor = false and opts.tokenizer = false skip those files.
function M.load(dir, opts)
  opts = opts or {}
  local cfg = flamingo.read_json(dir, "config.json", "model config")
  local where = flamingo.path_join(dir, "config.json")
  if cfg.model_type ~= "openflamingo" then
    error(string.format("'%s' has model_type '%s', but loom.openflamingo loads 'openflamingo' checkpoints",
      where, tostring(cfg.model_type)), 2)
  end
  local lang = cfg.lang_encoder and cfg.lang_encoder.config
  if lang == nil or lang.model_type ~= "mpt" then
    error(string.format("%s: lang_encoder.config.model_type is '%s', but only 'mpt' language models are supported",
      where, tostring(lang and lang.model_type)), 2)
  end
  local vision_cfg = cfg.vision_encoder and (cfg.vision_encoder.open_clip_model_config or cfg.vision_encoder)
  if vision_cfg == nil then error(string.format("%s has no vision_encoder section", where), 2) end
  for _, key in ipairs({ "media_token_id", "eoc_token_id" }) do
    if cfg[key] == nil then error(string.format("%s has no %s", where, key), 2) end
  end
  local pcfg, xcfg = section(cfg, "perceiver"), section(cfg, "gated_cross_attn")
  local weights = loom.load(dir)
  weights.__label = dir

  local self = setmetatable({ dir = dir, config = cfg, weights = weights }, Model)
  self.vision = openclip_vision.new(vision_cfg, weights, "vision_encoder",
    { ln_post_on_tokens = cfg.vision_encoder.ln_post_on_tokens == true })
  self.perceiver = perceiver.new({ weights = weights, prefix = "perceiver", layout = "openflamingo",
    heads = pcfg.heads, head_dim = pcfg.dim_head, depth = pcfg.depth, num_latents = pcfg.num_latents })
  self.lm = mpt.new(lang, weights, "lang_encoder.transformer", "lang_encoder.lm_head.weight",
    { block_prefix = function(i) return block_prefix(weights, i) end })

  -- gated blocks before layers i with (i + 1) % every == 0 (0-based i)
  local every = cfg.cross_attn_every_n_layers or M.defaults.cross_attn_every_n_layers
  local immediate = xcfg.only_attend_immediate_media ~= false
  local blocks = {}
  for i = 0, #self.lm.layers - 1 do
    if (i + 1) % every == 0 then
      blocks[i + 1] = gated_xattn.new({ weights = weights, prefix = xattn_prefix(weights, i), layout = "openflamingo",
        dim = self.lm.cfg.d_model, heads = xcfg.heads, head_dim = xcfg.dim_head, name = "xattn." .. i,
        without_media = immediate and "zero" or "uniform" })
    end
  end
  self.blocks = blocks
  self.state = flamingo.attach(self.lm, blocks)

  -- text_time as MaskedCrossAttention computes it: cached decoding attends to the last image
  self.media_token_id, self.eoc_token_id = cfg.media_token_id, cfg.eoc_token_id
  self.mask_mode = immediate and "latest" or "all"
  self.decode_media = "last_image"
  self.eos_id, self.pad_id = cfg.eoc_token_id, cfg.pad_token_id or lang.pad_token_id
  self.context = self.lm.cfg.max_seq_len
  if opts.tokenizer ~= false then self.tokenizer = flamingo.load_tokenizer(dir) end
  if opts.preprocessor ~= false then
    self.preprocessor = flamingo.read_json(dir, "preprocessor_config.json", "image preprocessor config")
  end
  return self
end

M.Model = Model
return M
