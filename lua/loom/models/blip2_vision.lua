-- BLIP-2 vision transformer (Hugging Face Blip2VisionModel, the EVA ViT-g of
-- BLIP-2). It has a patch embedding with bias, a class token and learned
-- position embeddings, but no layer norm before the encoder. Its pre-LN
-- layers use one fused qkv projection (query and value bias, key bias zero)
-- and exact GELU, and post_layernorm covers the whole last hidden state.
local loom = require("loom.core")
local nn = require("loom.nn")

local M = {}

-- Defaults of transformers' Blip2VisionConfig (4.44) for keys a saved
-- config.json omits because they equal the default.
M.defaults = {
  hidden_size = 1408,
  intermediate_size = 6144,
  num_hidden_layers = 39,
  num_attention_heads = 16,
  image_size = 224,
  patch_size = 14,
  hidden_act = "gelu",
  layer_norm_eps = 1e-6,
  qkv_bias = true,
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
    error(string.format("vision image_size %d is not a multiple of patch_size %d", out.image_size, out.patch_size), 2)
  end
  out.head_dim = out.hidden_size // out.num_attention_heads
  local side = out.image_size // out.patch_size -- patches along each image side
  out.num_patches = side * side
  -- post_layernorm_eps differs from layer_norm_eps only for LAVIS checkpoints,
  -- whose ln_vision is a LayerNorm with PyTorch's default eps
  out.post_layernorm_eps = out.post_layernorm_eps or out.layer_norm_eps
  return out
end

-- ---------------------------------------------------------------------------
-- One encoder layer: h + projection(attn(layer_norm1(h))), then
-- h + mlp(layer_norm2(h)).

local Layer = {}
Layer.__index = Layer

local function new_layer(weights, prefix, cfg)
  local d, f = cfg.hidden_size, cfg.intermediate_size
  local self = setmetatable({ cfg = cfg }, Layer)
  self.layer_norm1 = nn.LayerNorm(weights, prefix .. ".layer_norm1", cfg.layer_norm_eps, d)
  self.qkv = nn.Linear(weights, prefix .. ".self_attn.qkv",
    { bias = cfg.qkv_bias and true or false, in_features = d, out_features = 3 * d })
  if self.qkv.bias then nn.check_shape(self.qkv.bias, { 3 * d }, prefix .. ".self_attn.qkv.bias") end
  self.projection = nn.Linear(weights, prefix .. ".self_attn.projection", { in_features = d, out_features = d })
  self.layer_norm2 = nn.LayerNorm(weights, prefix .. ".layer_norm2", cfg.layer_norm_eps, d)
  self.mlp = nn.MLP(nn.Linear(weights, prefix .. ".mlp.fc1", { in_features = d, out_features = f }),
    nn.Linear(weights, prefix .. ".mlp.fc2", { in_features = f, out_features = d }), cfg.hidden_act)
  return self
end

function Layer:attention(x)
  local b, n = x:size(1), x:size(2)
  local h, hd = self.cfg.num_attention_heads, self.cfg.head_dim

  -- one projection gives queries, keys and values; the checkpoint's bias is
  -- cat(q_bias, 0, v_bias), so keys get no bias
  local qkv = self.qkv:forward(x):view(b, n, 3, h, hd):permute(3, 1, 4, 2, 5) -- (B, N, 3D) -> (3, B, H, N, D/H)
  local q, k, v = qkv:select(1, 1), qkv:select(1, 2), qkv:select(1, 3) -- (B, H, N, D/H) each

  local o = loom.attention(q, k, v, { causal = false })
  o = o:transpose(2, 3):reshape(b, n, h * hd) -- (B, H, N, D/H) -> (B, N, D)
  return self.projection:forward(o)
end

function Layer:forward(x)
  local h = x + self:attention(self.layer_norm1:forward(x))
  return h + self.mlp:forward(self.layer_norm2:forward(h))
end

-- ---------------------------------------------------------------------------
-- The vision tower.

local Vision = {}
Vision.__index = Vision

-- Build the tower from a config table and a checkpoint table whose names
-- follow Hugging Face's Blip2VisionModel under `prefix` ("vision_model").
-- opts.name names the intermediates given to the hook (default "vision").
function M.new(cfg, weights, prefix, opts)
  opts = opts or {}
  cfg = M.config(cfg)
  local d, p = cfg.hidden_size, cfg.patch_size
  local self = setmetatable({ cfg = cfg, name = opts.name or "vision" }, Vision)

  local emb = prefix .. ".embeddings"
  self.patch_weight = nn.check_shape(nn.param(weights, emb .. ".patch_embedding.weight"), { d, 3, p, p },
    emb .. ".patch_embedding.weight")
  self.patch_bias = nn.check_shape(nn.param(weights, emb .. ".patch_embedding.bias"), { d },
    emb .. ".patch_embedding.bias")
  self.class_embedding = nn.check_shape(nn.param(weights, emb .. ".class_embedding"), { 1, 1, d },
    emb .. ".class_embedding")
  self.position_embedding = nn.check_shape(nn.param(weights, emb .. ".position_embedding"),
    { 1, cfg.num_patches + 1, d }, emb .. ".position_embedding")

  self.layers = {}
  for i = 0, cfg.num_hidden_layers - 1 do
    self.layers[i + 1] = new_layer(weights, string.format("%s.encoder.layers.%d", prefix, i), cfg)
  end
  self.post_layernorm = nn.LayerNorm(weights, prefix .. ".post_layernorm", cfg.post_layernorm_eps, d)
  return self
end

-- Patch, class and position embeddings: hidden_states[0].
function Vision:embed(pixels)
  local cfg = self.cfg
  local shape = pixels:shape()
  if #shape ~= 4 or shape[2] ~= 3 or shape[3] ~= cfg.image_size or shape[4] ~= cfg.image_size then
    error(string.format("pixel_values has shape [%s], expected [B, 3, %d, %d]", table.concat(shape, ", "),
      cfg.image_size, cfg.image_size), 3)
  end
  local b, d = shape[1], cfg.hidden_size

  local patches = loom.patch_embed(pixels, self.patch_weight, self.patch_bias) -- (B, 3, S, S) -> (B, N, D)
  local cls = self.class_embedding:expand(b, 1, d) -- (1, 1, D) -> (B, 1, D)
  return loom.cat({ cls, patches }, 2) + self.position_embedding -- (B, N + 1, D)
end

-- Run the tower on pixel_values (B, 3, S, S). Returns a table with
-- last_hidden_state (B, N + 1, D) after post_layernorm (what the Q-Former
-- attends to), pooler_output (B, D) = post_layernorm applied once more to the
-- class token, as Hugging Face does, and hidden_states {[0] = embeddings,
-- [i] = output of layer i}. `hook` receives "<name>.hidden_states.<i>",
-- "<name>.last_hidden_state" and "<name>.pooler_output".
function Vision:forward(pixels, hook)
  local hidden = {}
  local x = nn.tap(hook, self.name .. ".hidden_states.0", self:embed(pixels))
  hidden[0] = x
  for i, layer in ipairs(self.layers) do
    x = layer:forward(x)
    hidden[i] = nn.tap(hook, self.name .. ".hidden_states." .. i, x)
  end

  local last = nn.tap(hook, self.name .. ".last_hidden_state", self.post_layernorm:forward(x))
  local pooled = self.post_layernorm:forward(last:select(2, 1)) -- (B, N + 1, D) -> (B, D)
  nn.tap(hook, self.name .. ".pooler_output", pooled)
  return { last_hidden_state = last, pooler_output = pooled, hidden_states = hidden }
end

M.Vision = Vision
return M
