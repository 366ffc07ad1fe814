-- Perceiver Resampler (Flamingo): a fixed set of learned latents
-- cross-attends to concat(image features, latents), then passes a
-- feed-forward block, `depth` times, and a final LayerNorm. Two checkpoint
-- layouts: IDEFICS' (Hugging Face IdeficsPerceiverResampler) and
-- OpenFlamingo's (lucidrains' PerceiverResampler, with optional media-time
-- and frame embeddings). Each image is resampled on its own.
local loom = require("loom.core")
local nn = require("loom.nn")

local M = {}

-- Tensor names of one layout. `block(prefix, i)` is the prefix of block i
-- (0-based); the attention and feed-forward names follow it.
M.layouts = {
  idefics = {
    latents = "latents",
    block = function(prefix, i) return string.format("%s.blocks.%d", prefix, i) end,
    media_norm = ".0.context_layer_norm",
    latents_norm = ".0.latents_layer_norm",
    q = ".0.q_proj", k = ".0.k_proj", v = ".0.v_proj", out = ".0.output_proj",
    q_norm = ".0.q_layer_norm", k_norm = ".0.k_layer_norm",
    ff_norm = ".1.ln", ff_in = ".1.fc", ff_out = ".1.c_proj",
    ff_act = "relu",
    final_norm = "layer_norm",
  },
  openflamingo = {
    latents = "latents",
    block = function(prefix, i) return string.format("%s.layers.%d", prefix, i) end,
    media_norm = ".0.norm_media",
    latents_norm = ".0.norm_latents",
    q = ".0.to_q", kv = ".0.to_kv", out = ".0.to_out",
    q_norm = ".0.q_layer_norm", k_norm = ".0.k_layer_norm",
    ff_norm = ".1.0", ff_in = ".1.1", ff_out = ".1.3",
    ff_act = "gelu",
    final_norm = "norm",
    media_time_embs = "media_time_embs",
    frame_embs = "frame_embs",
  },
}

-- A Linear over rows start..start+count-1 of another Linear's weight (a
-- view, no copy): the key or value half of a fused projection.
function M.linear_rows(linear, start, count)
  local part = setmetatable({}, getmetatable(linear))
  part.weight = linear.weight:narrow(1, start, count)
  part.bias = linear.bias and linear.bias:narrow(1, start, count)
  part.in_features, part.out_features = linear.in_features, count
  return part
end

local function count_blocks(weights, layout, prefix)
  local n = 0
  while weights[layout.block(prefix, n) .. layout.latents_norm .. ".weight"] do n = n + 1 end
  return n
end

-- ---------------------------------------------------------------------------
-- One block: latents += attn(LN(media), LN(latents)); latents += FF(latents).

local Block = {}
Block.__index = Block

local function new_block(weights, name, layout, cfg)
  local d, inner = cfg.dim, cfg.heads * cfg.head_dim
  local self = setmetatable({ cfg = cfg }, Block)
  self.media_norm = nn.LayerNorm(weights, name .. layout.media_norm, cfg.eps, d)
  self.latents_norm = nn.LayerNorm(weights, name .. layout.latents_norm, cfg.eps, d)
  self.q = nn.Linear(weights, name .. layout.q, { bias = false, in_features = d, out_features = inner })
  if layout.kv then
    -- a fused (2 * inner, dim) projection whose first half gives keys
    local kv = nn.Linear(weights, name .. layout.kv, { bias = false, in_features = d, out_features = 2 * inner })
    self.k = M.linear_rows(kv, 1, inner)
    self.v = M.linear_rows(kv, inner + 1, inner)
  else
    self.k = nn.Linear(weights, name .. layout.k, { bias = false, in_features = d, out_features = inner })
    self.v = nn.Linear(weights, name .. layout.v, { bias = false, in_features = d, out_features = inner })
  end
  self.out = nn.Linear(weights, name .. layout.out, { bias = false, in_features = inner, out_features = d })
  if weights[name .. layout.q_norm .. ".weight"] then
    self.q_norm = nn.LayerNorm(weights, name .. layout.q_norm, cfg.eps, cfg.head_dim)
    self.k_norm = nn.LayerNorm(weights, name .. layout.k_norm, cfg.eps, cfg.head_dim)
  end
  self.ff_norm = nn.LayerNorm(weights, name .. layout.ff_norm, cfg.eps, d)
  local ff_in = nn.Linear(weights, name .. layout.ff_in, { bias = false })
  self.ff = nn.MLP(ff_in, nn.Linear(weights, name .. layout.ff_out, { bias = false,
    in_features = ff_in.out_features, out_features = d }), layout.ff_act)
  return self
end

-- Attention of the latents (N, L, D) to the image tokens media (N, S, D)
-- and to themselves.
function Block:attention(media, latents)
  local n, s, l = media:size(1), media:size(2), latents:size(2)
  local h, hd = self.cfg.heads, self.cfg.head_dim
  local x = self.latents_norm:forward(latents)
  local kv_in = loom.cat({ self.media_norm:forward(media), x }, 2) -- (N, S + L, D)

  local q = self.q:forward(x):view(n, l, h, hd):transpose(2, 3) -- (N, L, H*Dh) -> (N, H, L, Dh)
  local k = self.k:forward(kv_in):view(n, s + l, h, hd):transpose(2, 3) -- (N, S+L, H*Dh) -> (N, H, S+L, Dh)
  local v = self.v:forward(kv_in):view(n, s + l, h, hd):transpose(2, 3) -- (N, S+L, H*Dh) -> (N, H, S+L, Dh)
  if self.q_norm then
    q, k = self.q_norm:forward(q), self.k_norm:forward(k)
  end

  -- every latent attends to every image token and every latent
  local o = loom.attention(q, k, v, { scale = hd ^ -0.5 })
  o = o:transpose(2, 3):reshape(n, l, h * hd) -- (N, H, L, Dh) -> (N, L, H*Dh)
  return self.out:forward(o)
end

function Block:forward(media, latents)
  latents = latents + self:attention(media, latents)
  return latents + self.ff:forward(self.ff_norm:forward(latents))
end

-- ---------------------------------------------------------------------------
-- The resampler.

local Resampler = {}
Resampler.__index = Resampler

-- Build a resampler from a checkpoint table.
--   opts.weights, opts.prefix   checkpoint table and name prefix
--   opts.layout                 "idefics" or "openflamingo" (or a layout table)
--   opts.heads, opts.head_dim   attention heads and their width
--   opts.eps                    LayerNorm epsilon (default 1e-5)
--   opts.name                   hook name prefix (default "perceiver")
-- The depth, latent count and width come from the weights; opts.depth and
-- opts.num_latents, when given, are checked against them.
function M.new(opts)
  local layout = type(opts.layout) == "table" and opts.layout or M.layouts[opts.layout or "idefics"]
  if layout == nil then
    error(string.format("unknown perceiver layout '%s' (expected 'idefics' or 'openflamingo')", tostring(opts.layout)), 2)
  end
  local weights, prefix = opts.weights, opts.prefix
  local latents = nn.param(weights, prefix .. "." .. layout.latents)
  local cfg = {
    dim = latents:size(2), num_latents = latents:size(1), heads = opts.heads, head_dim = opts.head_dim,
    eps = opts.eps or 1e-5, depth = count_blocks(weights, layout, prefix),
  }
  if cfg.heads == nil or cfg.head_dim == nil then
    error("perceiver needs opts.heads and opts.head_dim", 2)
  end
  for _, key in ipairs({ "depth", "num_latents" }) do
    if opts[key] and opts[key] ~= cfg[key] then
      error(string.format("perceiver %s is %d in the config but the checkpoint '%s' has %d",
        key, opts[key], prefix, cfg[key]), 2)
    end
  end
  if cfg.depth == 0 then
    error(string.format("no perceiver blocks under '%s' in the checkpoint", prefix), 2)
  end

  local self = setmetatable({ cfg = cfg, latents = latents, name = opts.name or "perceiver" }, Resampler)
  self.blocks = {}
  for i = 0, cfg.depth - 1 do
    self.blocks[i + 1] = new_block(weights, layout.block(prefix, i), layout, cfg)
  end
  self.norm = nn.LayerNorm(weights, prefix .. "." .. layout.final_norm, cfg.eps, cfg.dim)
  if layout.media_time_embs then
    self.media_time_embs = weights[prefix .. "." .. layout.media_time_embs] -- (max_media, 1, D)
    self.frame_embs = weights[prefix .. "." .. layout.frame_embs] -- (max_frames, D)
  end
  return self
end

-- Add OpenFlamingo's optional frame and media-time embeddings. x is
-- (N, F, S, D); media_times[i] is the 1-based position of image i among its
-- sequence's images.
function Resampler:add_time_embeddings(x, media_times)
  local n, f = x:size(1), x:size(2)
  if self.frame_embs then
    if f > self.frame_embs:size(1) then
      error(string.format("%d frames per image but the perceiver has frame embeddings for %d", f,
        self.frame_embs:size(1)), 3)
    end
    x = x + self.frame_embs:narrow(1, 1, f):unsqueeze(2) -- (F, D) -> (F, 1, D)
  end
  x = x:reshape(n, f * x:size(3), x:size(4)) -- (N, F, S, D) -> (N, F*S, D)
  if self.media_time_embs then
    local rows = {}
    for i = 1, n do
      local t = media_times and media_times[i] or 1
      if t > self.media_time_embs:size(1) then
        error(string.format("image %d is media %d of its sequence but the perceiver has time embeddings for %d",
          i, t, self.media_time_embs:size(1)), 3)
      end
      rows[i] = self.media_time_embs:select(1, t) -- (1, D)
    end
    x = x + loom.cat(rows, 1):unsqueeze(2) -- (N, D) -> (N, 1, D)
  end
  return x
end

-- Resample image features: x (N, S, D) or (N, F, S, D) with F frames.
-- Returns latents (N, L, D). opts.hook receives
-- "<name>.layers.<i>.latents_in" and "<name>.output"; opts.media_times
-- gives each image's media index for the media-time embeddings.
function Resampler:forward(x, opts)
  opts = opts or {}
  if x:dim() == 3 then x = x:unsqueeze(2) end -- (N, S, D) -> (N, 1, S, D)
  if x:size(4) ~= self.cfg.dim then
    error(string.format("perceiver input has width %d, expected %d", x:size(4), self.cfg.dim), 2)
  end
  local n = x:size(1)
  x = self:add_time_embeddings(x, opts.media_times)

  local latents = self.latents:unsqueeze(1):expand(n, self.cfg.num_latents, self.cfg.dim) -- (L, D) -> (N, L, D)
  for i, block in ipairs(self.blocks) do
    nn.tap(opts.hook, string.format("%s.layers.%d.latents_in", self.name, i - 1), latents)
    latents = block:forward(x, latents)
  end
  return nn.tap(opts.hook, self.name .. ".output", self.norm:forward(latents))
end

M.Resampler = Resampler
return M
