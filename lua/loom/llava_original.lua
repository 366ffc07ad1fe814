-- The original LLaVA repository's checkpoint layouts (haotian-liu/LLaVA),
-- mapped onto the parts loom.llava builds a model from:
--   * a LlavaLlamaForCausalLM directory: config.json with the mm_* keys,
--     weights model.embed_tokens..., model.layers..., model.mm_projector...,
--     lm_head.weight, and the CLIP vision tower in a separate directory
--     (Hugging Face CLIPVisionModel or CLIPModel names);
--   * a base LLaMA directory plus a stand-alone mm_projector.bin, as LLaVA's
--     pretraining stage saves it, plus the CLIP directory.
-- Facts about the original code cite its files (llava/model/builder.py,
-- llava/mm_utils.py, llava/constants.py, ...).
local loom = require("loom.core")
local json = require("loom.json")
local clip_vision = require("loom.models.clip_vision")

local M = {}

-- llava/constants.py: IMAGE_TOKEN_INDEX, the id tokenizer_image_token puts
-- in place of each "<image>" marker, and the tokens the builder may add.
M.IMAGE_TOKEN_ID = -200
M.IM_PATCH_TOKEN = "<im_patch>"
M.IM_START_TOKEN = "<im_start>"
M.IM_END_TOKEN = "<im_end>"

-- Tensor name prefixes of the original layout.
M.names = {
  lm = "model",                     -- model.embed_tokens, model.layers.<i>..., model.norm
  head = "lm_head.weight",
  projector = "model.mm_projector", -- .weight ("linear") or .0 and .2 (nn.Sequential, "mlp2x_gelu")
  -- the tower inside the checkpoint (CLIPVisionTower.vision_tower is a
  -- CLIPVisionModel), used when the config sets unfreeze_mm_vision_tower
  embedded_vision = "model.vision_tower.vision_tower.vision_model",
  -- a CLIP checkpoint directory (CLIPVisionModel or the whole CLIPModel)
  clip_vision = "vision_model",
}

-- Prefixes under which a stand-alone projector file may hold the projector.
-- LLaVA's trainer saves full parameter names (model.mm_projector.0.weight);
-- the shorter mm_projector.* names are accepted too.
M.projector_file_prefixes = { "model.mm_projector", "mm_projector" }

-- Values of the original code for keys a LLaVA config.json omits:
-- build_vision_projector (mm_projector_type), CLIPVisionTower
-- (mm_vision_select_feature) and load_pretrained_model (mm_use_im_start_end,
-- mm_use_im_patch_token). CLIPVisionTower reads mm_vision_select_layer
-- without a default, so a config must give it.
M.config_defaults = {
  mm_projector_type = "linear",
  mm_vision_select_feature = "patch",
  mm_use_im_start_end = false,
  mm_use_im_patch_token = true,
}

-- Settings used when a projector file comes without any LLaVA config: those
-- of LLaVA-1.5's pretraining (scripts/v1_5/pretrain.sh). The projector kind
-- is then read from the tensor names.
M.pretrain_settings = {
  mm_vision_select_layer = -2,
  mm_vision_select_feature = "patch",
  mm_use_im_start_end = false,
  mm_use_im_patch_token = false,
}

local MM_KEYS = { "mm_vision_tower", "mm_hidden_size", "mm_projector_type", "mm_vision_select_layer",
  "mm_vision_select_feature", "mm_use_im_start_end", "mm_use_im_patch_token", "image_aspect_ratio" }

-- ---------------------------------------------------------------------------
-- Files

local function path_join(dir, name)
  return (dir:gsub("/+$", "")) .. "/" .. name
end

local function dirname(path)
  return path:match("^(.*)/[^/]*$") or "."
end

local function file_exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

-- A directory is a path that io.open can open but not read (Linux).
local function is_directory(path)
  local f = io.open(path, "rb")
  if f == nil then return false end
  local _, _, code = f:read(1)
  f:close()
  return code == 21 -- EISDIR
end

local function read_json(path, what, level)
  local v, err = json.read(path)
  if v == nil then error(string.format("cannot read the %s: %s", what, err), level + 1) end
  return v
end

local function has_mm_keys(cfg)
  for _, k in ipairs(MM_KEYS) do
    if cfg[k] ~= nil then return true end
  end
  return false
end

-- Tensors of a checkpoint directory: whatever loom.load reads
-- (model.safetensors, its index, pytorch_model.bin), and also a sharded
-- PyTorch checkpoint (pytorch_model.bin.index.json), as the original LLaVA
-- releases ship.
function M.load_weights(dir)
  local index_path = path_join(dir, "pytorch_model.bin.index.json")
  if file_exists(path_join(dir, "model.safetensors")) or file_exists(path_join(dir, "model.safetensors.index.json"))
      or not file_exists(index_path) then
    return loom.load(dir)
  end

  local index = read_json(index_path, "PyTorch shard index", 2)
  if type(index.weight_map) ~= "table" then
    error(string.format("%s: no 'weight_map' object", index_path), 2)
  end
  local names = {}
  for name in pairs(index.weight_map) do names[#names + 1] = name end
  table.sort(names)
  local shards, weights = {}, {}
  for _, name in ipairs(names) do
    local file = index.weight_map[name]
    if type(file) ~= "string" then
      error(string.format("%s: weight_map['%s'] is not a file name", index_path, name), 2)
    end
    shards[file] = shards[file] or loom.load(path_join(dir, file))
    local t = shards[file][name]
    if t == nil then
      error(string.format("%s lists tensor '%s' in '%s', but that file does not contain it", index_path, name, file), 2)
    end
    weights[name] = t
  end
  return weights
end

-- ---------------------------------------------------------------------------
-- Detection

-- Whether `cfg` (a config.json table) and the load options call for the
-- original layout: a projector file was given, the config is a base LLaMA's
-- (which needs one), or the config is LlavaLlamaForCausalLM's (mm_* keys, no
-- Hugging Face text_config).
function M.detect(cfg, opts)
  if opts.projector or cfg.model_type == "llama" then return true end
  if cfg.text_config ~= nil or cfg.vision_config ~= nil then return false end
  local arch = type(cfg.architectures) == "table" and cfg.architectures[1]
  return arch == "LlavaLlamaForCausalLM" or cfg.model_type == "llava_llama" or cfg.mm_vision_tower ~= nil
end

-- ---------------------------------------------------------------------------
-- The parts of a model

-- The LLaVA settings and where they come from: the config.json beside the
-- projector file (LLaVA's pretraining writes one there, and LLaVA's builder
-- reads it), else the checkpoint's own config when it has mm_* keys, else
-- LLaVA-1.5's pretraining settings.
local function llava_settings(dir, cfg, opts)
  if opts.projector then
    local beside = path_join(dirname(opts.projector), "config.json")
    if file_exists(beside) then
      local pcfg = read_json(beside, "projector's LLaVA config", 4)
      if has_mm_keys(pcfg) then return pcfg, beside end
    end
  end
  if has_mm_keys(cfg) then return cfg, path_join(dir, "config.json") end
  local settings = {}
  for k, v in pairs(M.pretrain_settings) do settings[k] = v end
  settings.detect_projector = true
  return settings, "LLaVA-1.5's pretraining settings"
end

-- The vision tower directory: opts.vision_tower, else mm_vision_tower when
-- it names a local directory.
local function vision_tower_dir(settings, source, opts)
  if opts.vision_tower then
    if not is_directory(opts.vision_tower) then
      error(string.format("vision tower '%s' is not a directory (expected a CLIP checkpoint directory)",
        opts.vision_tower), 4)
    end
    return opts.vision_tower
  end
  local name = settings.mm_vision_tower or settings.vision_tower
  if name == nil then
    error(string.format("%s names no vision tower (mm_vision_tower): pass vision_tower = DIR, a CLIP checkpoint directory",
      source), 4)
  end
  if not is_directory(name) then
    error(string.format("vision tower '%s' (mm_vision_tower in %s) is not a local directory: download that CLIP "
      .. "checkpoint and pass vision_tower = DIR", name, source), 4)
  end
  return name
end

-- The CLIP vision config of a tower directory: a CLIPVisionModel's config or
-- the vision_config of a whole CLIPModel.
local function clip_vision_config(tower)
  local path = path_join(tower, "config.json")
  local cfg = read_json(path, "vision tower config", 4)
  if cfg.model_type == "clip" then
    return cfg.vision_config or {}
  elseif cfg.model_type == "clip_vision_model" or cfg.model_type == nil then
    return cfg
  end
  error(string.format("%s has model_type '%s', but the vision tower must be a CLIP model ('clip' or 'clip_vision_model')",
    path, tostring(cfg.model_type)), 4)
end

-- The prefix under which a projector file holds the projector.
local function projector_prefix(weights, file)
  for _, prefix in ipairs(M.projector_file_prefixes) do
    if weights[prefix .. ".weight"] or weights[prefix .. ".0.weight"] then return prefix end
  end
  local names = {}
  for name in pairs(weights) do names[#names + 1] = name end
  table.sort(names)
  local shown = table.concat(names, ", ", 1, math.min(#names, 4)) .. (#names > 4 and ", ..." or "")
  error(string.format("projector file '%s' holds no projector weights (expected model.mm_projector.0.weight or "
    .. "model.mm_projector.weight; found %s)", file, #names > 0 and shown or "no tensors"), 4)
end

-- Describe the model parts of an original-layout checkpoint (see
-- loom.llava.load for the fields).
function M.parts(dir, cfg, opts)
  local config_path = path_join(dir, "config.json")
  local is_base = cfg.model_type == "llama"
  if not is_base and cfg.model_type ~= "llava" and cfg.model_type ~= "llava_llama" then
    error(string.format("'%s' has model_type '%s', but the original LLaVA layout needs 'llava' or 'llava_llama' "
      .. "(or a 'llama' base with projector = FILE)", config_path, tostring(cfg.model_type)), 3)
  end
  if is_base and not opts.projector then
    error(string.format("'%s' is a LLaMA checkpoint without a projector: pass projector = FILE (LLaVA's "
      .. "mm_projector.bin) and vision_tower = DIR", dir), 3)
  end

  -- settings, with the original code's defaults for omitted keys
  local settings, source = llava_settings(dir, cfg, opts)
  for k, v in pairs(M.config_defaults) do
    if settings[k] == nil then settings[k] = v end
  end
  if settings.mm_vision_select_layer == nil then
    error(string.format("%s has no mm_vision_select_layer (LLaVA's CLIPVisionTower requires it)", source), 3)
  end
  local feature = settings.mm_vision_select_feature
  if feature ~= "patch" and feature ~= "cls_patch" then
    error(string.format("%s: mm_vision_select_feature '%s' is not supported (expected 'patch' or 'cls_patch')",
      source, tostring(feature)), 3)
  end
  if settings.image_aspect_ratio == "anyres" then
    error(string.format("%s: image_aspect_ratio 'anyres' (LLaVA-NeXT) is not supported (expected 'pad' or 'square')",
      source), 3)
  end

  -- weights: the language model (and, without a projector file, the
  -- projector) from the directory, the projector from its file
  local weights = M.load_weights(dir)
  local probe = M.names.lm .. ".embed_tokens.weight"
  if weights[probe] == nil then
    error(string.format("'%s' holds no LLaMA weights in the original LLaVA layout (expected '%s')", dir, probe), 3)
  end
  local projector_weights, prefix, projector_label = weights, M.names.projector, dir
  if opts.projector then
    projector_weights = loom.load(opts.projector)
    prefix = projector_prefix(projector_weights, opts.projector)
    projector_label = opts.projector

    -- LLaVA's trainer also saves the embeddings there when it trains them
    -- (mm_use_im_start_end), and its builder loads every tensor of the file
    -- over the base model's
    for name, t in pairs(projector_weights) do
      if name:sub(1, #M.names.lm + 1) == M.names.lm .. "." and name:sub(1, #prefix) ~= prefix then
        weights[name] = t
      end
    end
  end

  -- the vision tower: its config and preprocessor from its directory, and
  -- its weights from there too unless the tower was trained with the model
  -- (CLIPVisionTower then builds it before the checkpoint's weights load)
  local tower = vision_tower_dir(settings, source, opts)
  local vcfg = clip_vision_config(tower)
  local vision_weights, vision_prefix = weights, M.names.embedded_vision
  if settings.unfreeze_mm_vision_tower then
    local probe_name = vision_prefix .. ".embeddings.patch_embedding.weight"
    if weights[probe_name] == nil then
      error(string.format("%s sets unfreeze_mm_vision_tower, but '%s' has no vision tower weights (expected '%s')",
        source, dir, probe_name), 3)
    end
  else
    vision_weights, vision_prefix = M.load_weights(tower), M.names.clip_vision
  end
  local hidden = clip_vision.config(vcfg).hidden_size
  if settings.mm_hidden_size and settings.mm_hidden_size ~= hidden then
    error(string.format("%s gives mm_hidden_size %d, but the vision tower '%s' has hidden_size %d",
      source, settings.mm_hidden_size, tower, hidden), 3)
  end

  -- tokens the original builder adds to the tokenizer before resizing the
  -- embeddings to its length
  local added = {}
  if settings.mm_use_im_patch_token then added[#added + 1] = M.IM_PATCH_TOKEN end
  if settings.mm_use_im_start_end then
    added[#added + 1] = M.IM_START_TOKEN
    added[#added + 1] = M.IM_END_TOKEN
  end

  local config = {
    model_type = "llava",
    layout = is_base and "base+projector" or "original",
    source = cfg,
    settings_source = source,
    image_token_index = M.IMAGE_TOKEN_ID,
    projector_hidden_act = "gelu", -- nn.GELU() in build_vision_projector
    mm_projector_type = not settings.detect_projector and settings.mm_projector_type or nil,
    vision_feature_layer = settings.mm_vision_select_layer,
    vision_feature_select_strategy = feature == "patch" and "default" or "full",
    image_aspect_ratio = settings.image_aspect_ratio,
    mm_use_im_start_end = settings.mm_use_im_start_end,
    pad_token_id = cfg.pad_token_id,
    text_config = cfg,
    vision_config = vcfg,
  }
  return {
    config = config,
    weights = weights,
    vision = { cfg = vcfg, weights = vision_weights, prefix = vision_prefix },
    lm = { cfg = cfg, weights = weights, prefix = M.names.lm, head = M.names.head },
    projector = { weights = projector_weights, prefix = prefix, label = projector_label },
    preprocessor_dir = tower,
    tokenizer_dir = dir,
    added_tokens = added,
    -- load_pretrained_model resizes the embeddings to len(tokenizer)
    vocab_must_match = true,
  }
end

return M
