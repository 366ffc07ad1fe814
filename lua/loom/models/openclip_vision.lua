-- open_clip's VisionTransformer (as OpenFlamingo uses it) run by the CLIP
-- vision tower of clip_vision.lua: open_clip's tensor names (conv1,
-- positional_embedding, ln_pre, resblocks with a fused in_proj) are mapped
-- onto Hugging Face CLIP's, with the fused projection split into row views,
-- so the computation is shared. OpenFlamingo feeds the perceiver the last
-- block's tokens without the class token and, before open_clip 2.23,
-- without ln_post.
local clip_vision = require("loom.models.clip_vision")
local nn = require("loom.nn")

local M = {}

-- open_clip name (after the tower's prefix) -> CLIP name (after the
-- vision_model prefix), for names outside the residual blocks.
local TOP_NAMES = {
  ["conv1.weight"] = "embeddings.patch_embedding.weight",
  ["class_embedding"] = "embeddings.class_embedding",
  ["positional_embedding"] = "embeddings.position_embedding.weight",
  ["ln_pre.weight"] = "pre_layrnorm.weight",
  ["ln_pre.bias"] = "pre_layrnorm.bias",
  ["ln_post.weight"] = "post_layernorm.weight",
  ["ln_post.bias"] = "post_layernorm.bias",
}

-- Names inside resblock i, without the fused in_proj.
local BLOCK_NAMES = {
  ["ln_1.weight"] = "layer_norm1.weight",
  ["ln_1.bias"] = "layer_norm1.bias",
  ["attn.out_proj.weight"] = "self_attn.out_proj.weight",
  ["attn.out_proj.bias"] = "self_attn.out_proj.bias",
  ["ln_2.weight"] = "layer_norm2.weight",
  ["ln_2.bias"] = "layer_norm2.bias",
  ["mlp.c_fc.weight"] = "mlp.fc1.weight",
  ["mlp.c_fc.bias"] = "mlp.fc1.bias",
  ["mlp.c_proj.weight"] = "mlp.fc2.weight",
  ["mlp.c_proj.bias"] = "mlp.fc2.bias",
}

-- Tensors of the tower that do not change the image tokens: the projection
-- of the pooled class token.
local UNUSED = { ["proj"] = true }

-- Raise for a tensor under `prefix` that this mapping does not cover, such
-- as LayerScale gammas (ls_init_value) or input patch norms, because
-- ignoring it would change the tokens silently.
local function check_unknown(weights, prefix, layers)
  local head = prefix .. "."
  for name in pairs(weights) do
    if type(name) == "string" and name:sub(1, #head) == head then
      local rest = name:sub(#head + 1)
      local block, inner = rest:match("^transformer%.resblocks%.(%d+)%.(.*)$")
      local known
      if block then
        known = tonumber(block) < layers and (BLOCK_NAMES[inner] ~= nil or inner == "attn.in_proj_weight"
          or inner == "attn.in_proj_bias")
      else
        known = TOP_NAMES[rest] ~= nil or UNUSED[rest]
      end
      if not known then
        error(string.format("unsupported open_clip vision tensor '%s' (this tower has no LayerScale, "
          .. "patch norm or attentional pooling)", name), 3)
      end
    end
  end
end

-- A checkpoint table with CLIP names under "vision_model" for the open_clip
-- tower under `prefix`, and the number of resblocks found. Tensors are
-- shared (views), not copied.
function M.map_weights(weights, prefix, width)
  local out = { __label = weights.__label }
  local function get(name)
    return nn.param(weights, prefix .. "." .. name)
  end
  for from, to in pairs(TOP_NAMES) do
    local t = weights[prefix .. "." .. from]
    if t then out["vision_model." .. to] = t end
  end
  local layers = 0
  while weights[string.format("%s.transformer.resblocks.%d.ln_1.weight", prefix, layers)] do
    local src = string.format("transformer.resblocks.%d.", layers)
    local dst = string.format("vision_model.encoder.layers.%d.", layers)
    for from, to in pairs(BLOCK_NAMES) do
      local t = weights[prefix .. "." .. src .. from]
      if t then out[dst .. to] = t end
    end

    -- nn.MultiheadAttention's in_proj rows are [q; k; v]
    local w, b = get(src .. "attn.in_proj_weight"), weights[prefix .. "." .. src .. "attn.in_proj_bias"]
    nn.check_shape(w, { 3 * width, width }, prefix .. "." .. src .. "attn.in_proj_weight")
    for i, part in ipairs({ "q_proj", "k_proj", "v_proj" }) do
      out[dst .. "self_attn." .. part .. ".weight"] = w:narrow(1, (i - 1) * width + 1, width)
      if b then out[dst .. "self_attn." .. part .. ".bias"] = b:narrow(1, (i - 1) * width + 1, width) end
    end
    layers = layers + 1
  end
  check_unknown(weights, prefix, layers)
  return out, layers
end

-- The CLIP vision config of an open_clip vision_cfg table (image_size,
-- patch_size, width, layers, head_width or heads, mlp_ratio) and the
-- quick_gelu flag of the open_clip model config.
function M.clip_config(vision_cfg, quick_gelu)
  local width = vision_cfg.width
  local heads = vision_cfg.heads or width // (vision_cfg.head_width or 64)
  return {
    hidden_size = width,
    intermediate_size = math.floor(width * (vision_cfg.mlp_ratio or 4.0)),
    num_hidden_layers = vision_cfg.layers,
    num_attention_heads = heads,
    image_size = vision_cfg.image_size,
    patch_size = vision_cfg.patch_size,
    hidden_act = quick_gelu and "quick_gelu" or "gelu",
    layer_norm_eps = vision_cfg.layer_norm_eps or 1e-5,
  }
end

local Vision = {}
Vision.__index = Vision

-- Build the tower. `cfg` is open_clip's model config
-- ({quick_gelu, vision_cfg = {...}}) or the vision_cfg itself; `prefix`
-- names the tower in the checkpoint ("vision_encoder").
-- opts.ln_post_on_tokens applies ln_post to the tokens as open_clip >= 2.23
-- does (default false, as OpenFlamingo with open_clip 2.20);
-- opts.name names the hook's intermediates (default "vision").
function M.new(cfg, weights, prefix, opts)
  opts = opts or {}
  local vision_cfg = cfg.vision_cfg or cfg
  local clip_cfg = M.clip_config(vision_cfg, cfg.quick_gelu)
  local mapped, layers = M.map_weights(weights, prefix, clip_cfg.hidden_size)
  if layers ~= clip_cfg.num_hidden_layers then
    error(string.format("open_clip config has %d vision layers but '%s' has %d resblocks",
      clip_cfg.num_hidden_layers, prefix, layers), 2)
  end
  local self = setmetatable({ name = opts.name or "vision", ln_post_on_tokens = opts.ln_post_on_tokens }, Vision)
  self.tower = clip_vision.new(clip_cfg, mapped, "vision_model", { name = "clip" })
  self.cfg = self.tower.cfg
  return self
end

-- Intermediate names of the CLIP tower under open_clip's names.
local function rename(name, base)
  local i = name:match("^clip%.hidden_states%.(%d+)$")
  if i == "0" then return base .. ".ln_pre_output" end
  if i then return string.format("%s.resblocks.%d.output", base, tonumber(i) - 1) end
  return nil
end

-- Image tokens as OpenFlamingo takes them from pixel_values (N, 3, S, S):
-- the last block's output without the class token -> (N, P, D).
-- `hook` receives "<name>.ln_pre_output", "<name>.resblocks.<i>.output" and
-- "<name>.tokens".
function Vision:forward(pixels, hook)
  local inner = hook and function(name, t)
    local renamed = rename(name, self.name)
    if renamed then hook(renamed, t) end
  end
  local hidden = self.tower:forward(pixels, nil, inner)
  local last = hidden[#self.tower.layers]
  local tokens = last:narrow(2, 2, last:size(2) - 1) -- (N, P + 1, D) -> (N, P, D)
  if self.ln_post_on_tokens then
    tokens = self.tower.post_layernorm:forward(tokens)
  end
  return nn.tap(hook, self.name .. ".tokens", tokens)
end

M.Vision = Vision
return M
