-- CLIP vision transformer (Hugging Face CLIPVisionModel): patch embedding
-- without bias, class token, learned position embeddings, pre_layrnorm and
-- pre-LN encoder layers. Weights keep the checkpoint's names under a prefix
-- such as "vision_tower.vision_model".
local loom = require("loom.core")
local nn = require("loom.nn")

local M = {}

-- Defaults of transformers' CLIPVisionConfig (4.44), used for keys that a
-- saved config.json omits because they equal the default.
M.defaults = {
  hidden_size = 768,
  intermediate_size = 3072,
  num_hidden_layers = 12,
  num_attention_heads = 12,
  num_channels = 3,
  image_size = 224,
  patch_size = 32,
  hidden_act = "quick_gelu",
  layer_norm_eps = 1e-5,
}

-- A config table with every field set, from a (possibly partial) config.
function M.config(cfg)
  local out = {}
  for k, v in pairs(M.defaults) do out[k] = v end
  for k, v in pairs(cfg or {}) do out[k] = v end
  if out.hidden_size % out.num_attention_heads ~= 0 then
    error(string.format("vision hidden_size %d is not a multiple of num_attention_heads %d",
      out.hidden_size, out.num_attention_heads), 2)
  end
  if out.image_size % out.patch_size ~= 0 then
    error(string.format("vision image_size %d is not a multiple of patch_size %d",
      out.image_size, out.patch_size), 2)
  end
  out.head_dim = out.hidden_size // out.num_attention_heads
  local side = out.image_size // out.patch_size -- patches along each image side
  out.num_patches = side * side
  return out
end

-- ---------------------------------------------------------------------------
-- One encoder layer: h + attn(ln1(h)), then h + mlp(ln2(h)).

local Layer = {}
Layer.__index = Layer

local function new_layer(weights, prefix, cfg)
  local d, f = cfg.hidden_size, cfg.intermediate_size
  local self = setmetatable({ cfg = cfg }, Layer)
  self.layer_norm1 = nn.LayerNorm(weights, prefix .. ".layer_norm1", cfg.layer_norm_eps, d)
  self.q_proj = nn.Linear(weights, prefix .. ".self_attn.q_proj", { in_features = d, out_features = d })
  self.k_proj = nn.Linear(weights, prefix .. ".self_attn.k_proj", { in_features = d, out_features = d })
  self.v_proj = nn.Linear(weights, prefix .. ".self_attn.v_proj", { in_features = d, out_features = d })
  self.out_proj = nn.Linear(weights, prefix .. ".self_attn.out_proj", { in_features = d, out_features = d })
  self.layer_norm2 = nn.LayerNorm(weights, prefix .. ".layer_norm2", cfg.layer_norm_eps, d)
  self.mlp = nn.MLP(nn.Linear(weights, prefix .. ".mlp.fc1", { in_features = d, out_features = f }),
    nn.Linear(weights, prefix .. ".mlp.fc2", { in_features = f, out_features = d }), cfg.hidden_act)
  return self
end

function Layer:attention(x)
  local b, n = x:size(1), x:size(2)
  local h, hd = self.cfg.num_attention_heads, self.cfg.head_dim

  -- project and split heads
  local q = self.q_proj:forward(x):view(b, n, h, hd):transpose(2, 3) -- (B, N, D) -> (B, H, N, D/H)
  local k = self.k_proj:forward(x):view(b, n, h, hd):transpose(2, 3) -- (B, N, D) -> (B, H, N, D/H)
  local v = self.v_proj:forward(x):view(b, n, h, hd):transpose(2, 3) -- (B, N, D) -> (B, H, N, D/H)

  -- full (non-causal) attention over all patches and the class token
  local o = loom.attention(q, k, v, { causal = false })

  -- merge heads and project back
  o = o:transpose(2, 3):reshape(b, n, h * hd) -- (B, H, N, D/H) -> (B, N, D)
  return self.out_proj:forward(o)
end

function Layer:forward(x)
  local h = x + self:attention(self.layer_norm1:forward(x))
  local mlp_out = self.mlp:forward(self.layer_norm2:forward(h))
  return h + mlp_out
end

-- ---------------------------------------------------------------------------
-- The vision tower.

local Vision = {}
Vision.__index = Vision

-- Build the tower from a config table and a checkpoint table; `prefix` is the
-- name of the vision_model part ("vision_tower.vision_model" in LLaVA).
-- opts.name names the intermediates given to the hook (default "vision").
function M.new(cfg, weights, prefix, opts)
  opts = opts or {}
  cfg = M.config(cfg)
  local d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
  local self = setmetatable({ cfg = cfg, name = opts.name or "vision" }, Vision)

  local emb = prefix .. ".embeddings"
  self.patch_weight = nn.check_shape(nn.param(weights, emb .. ".patch_embedding.weight"), { d, c, p, p },
    emb .. ".patch_embedding.weight")
  self.class_embedding = nn.check_shape(nn.param(weights, emb .. ".class_embedding"), { d },
    emb .. ".class_embedding")
  self.position_embedding = nn.check_shape(nn.param(weights, emb .. ".position_embedding.weight"),
    { cfg.num_patches + 1, d }, emb .. ".position_embedding.weight")

  -- "pre_layrnorm" is the checkpoint's own spelling
  self.pre_layrnorm = nn.LayerNorm(weights, prefix .. ".pre_layrnorm", cfg.layer_norm_eps, d)
  self.layers = {}
  for i = 0, cfg.num_hidden_layers - 1 do
    self.layers[i + 1] = new_layer(weights, string.format("%s.encoder.layers.%d", prefix, i), cfg)
  end
  if weights[prefix .. ".post_layernorm.weight"] then
    self.post_layernorm = nn.LayerNorm(weights, prefix .. ".post_layernorm", cfg.layer_norm_eps, d)
  end
  return self
end

-- Patch and position embeddings followed by pre_layrnorm: hidden_states[0].
function Vision:embed(pixels)
  local cfg = self.cfg
  local b = pixels:size(1)
  local shape = pixels:shape()
  if #shape ~= 4 or shape[2] ~= cfg.num_channels or shape[3] ~= cfg.image_size or shape[4] ~= cfg.image_size then
    error(string.format("pixel_values has shape [%s], expected [B, %d, %d, %d]", table.concat(shape, ", "),
      cfg.num_channels, cfg.image_size, cfg.image_size), 3)
  end

  local patches = loom.patch_embed(pixels, self.patch_weight) -- (B, 3, S, S) -> (B, N, D)
  local cls = self.class_embedding:view(1, 1, cfg.hidden_size):expand(b, 1, cfg.hidden_size) -- (D) -> (B, 1, D)
  local x = loom.cat({ cls, patches }, 2) + self.position_embedding -- (B, N + 1, D)
  return self.pre_layrnorm:forward(x)
end

-- Run the tower on pixel_values (B, C, S, S). Returns the list of hidden
-- states {[0] = embeddings, [i] = output of layer i} up to layer `depth`
-- (default all layers); post_layernorm is not applied to them (LLaVA does
-- not use it). `hook` receives "<name>.hidden_states.<i>" for each.
function Vision:forward(pixels, depth, hook)
  depth = depth or #self.layers
  local hidden = {}
  hidden[0] = nn.tap(hook, self.name .. ".embeddings_after_pre_layrnorm", self:embed(pixels))
  nn.tap(hook, self.name .. ".hidden_states.0", hidden[0])
  local x = hidden[0]
  for i = 1, depth do
    x = self.layers[i]:forward(x)
    hidden[i] = nn.tap(hook, self.name .. ".hidden_states." .. i, x)
  end

  -- CLIPVisionModel's own outputs, computed only for a hook that may
  -- compare them: the last layer's output and post_layernorm of its class token
  if hook and depth == #self.layers then
    nn.tap(hook, self.name .. ".last_hidden_state", x)
    if self.post_layernorm then
      nn.tap(hook, self.name .. ".pooler_output", self.post_layernorm:forward(x:select(2, 1))) -- (B, N + 1, D) -> (B, D)
    end
  end
  return hidden
end

-- Index into hidden_states (0..L) of a feature layer given as in configs:
-- non-negative counts from the embeddings, negative from the end (-1 = last
-- layer, -2 = penultimate).
function Vision:resolve_layer(layer)
  local n = #self.layers
  local index = layer < 0 and n + 1 + layer or layer
  if index < 0 or index > n then
    error(string.format("vision feature layer %d is out of range for %d layers (valid %d..%d)",
      layer, n, -(n + 1), n), 2)
  end
  return index
end

-- Image features as LLaVA selects them: hidden_states at `layers` (a number
-- or a list whose selections are concatenated along the feature dimension),
-- with the class token dropped for strategy "default" and kept for "full".
-- Returns (B, N, D * #layers) or (B, N + 1, ...) for "full".
function Vision:features(pixels, layers, strategy, hook, all_layers)
  if type(layers) ~= "table" then layers = { layers } end
  local indices, depth = {}, 0
  for i, layer in ipairs(layers) do
    indices[i] = self:resolve_layer(layer)
    depth = math.max(depth, indices[i])
  end
  local hidden = self:forward(pixels, all_layers and #self.layers or depth, hook)

  local picked = {}
  for i, index in ipairs(indices) do picked[i] = hidden[index] end
  local selected = #picked == 1 and picked[1] or loom.cat(picked, -1)
  nn.tap(hook, self.name .. ".selected_layer_with_cls", selected)

  if strategy == "default" then
    selected = selected:narrow(2, 2, selected:size(2) - 1) -- (B, N + 1, D) -> (B, N, D)
  elseif strategy ~= "full" then
    error(string.format("unsupported vision_feature_select_strategy '%s' (expected 'default' or 'full')",
      tostring(strategy)), 2)
  end
  return nn.tap(hook, self.name .. ".selected_features", selected)
end

-- Number of feature tokens one image gives for a selection strategy.
function Vision:tokens_per_image(strategy)
  return self.cfg.num_patches + (strategy == "full" and 1 or 0)
end

M.Vision = Vision
return M
