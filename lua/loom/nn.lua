-- Neural-network building blocks over the C operators: Linear, LayerNorm,
-- RMSNorm, Embedding and activations. Each module is built from a checkpoint
-- table (name -> tensor) and a name prefix, and keeps the checkpoint's names.
local loom = require("loom.core")

local nn = {}

-- The tensor `name` of a checkpoint table; raises naming the tensor and the
-- checkpoint when it is missing.
function nn.param(weights, name, label)
  local t = weights[name]
  if t == nil then
    error(string.format("missing tensor '%s' in %s", name, label or weights.__label or "the checkpoint"), 2)
  end
  return t
end

-- Check that `t` has the expected shape (a table of sizes); raises with both.
function nn.check_shape(t, expected, name)
  local shape = t:shape()
  local ok = #shape == #expected
  for i = 1, #expected do
    if shape[i] ~= expected[i] then ok = false end
  end
  if not ok then
    error(string.format("tensor '%s' has shape [%s], expected [%s]", name,
      table.concat(shape, ", "), table.concat(expected, ", ")), 2)
  end
  return t
end

-- Pass a named intermediate to the debug hook (a function(name, tensor) or
-- nil) and return the tensor unchanged.
function nn.tap(hook, name, t)
  if hook then hook(name, t) end
  return t
end

-- Activation functions by the names configs use (hidden_act,
-- projector_hidden_act). "gelu" is the exact erf form.
local activations = {
  gelu = loom.gelu,
  gelu_new = loom.gelu_tanh,
  gelu_pytorch_tanh = loom.gelu_tanh,
  gelu_tanh = loom.gelu_tanh,
  quick_gelu = loom.quick_gelu,
  silu = loom.silu,
  swish = loom.silu,
  relu = loom.relu,
}

-- The activation function called `name`; raises for an unknown name.
function nn.activation(name)
  local fn = activations[name]
  if fn == nil then
    local known = {}
    for k in pairs(activations) do known[#known + 1] = k end
    table.sort(known)
    error(string.format("unsupported activation '%s' (expected one of %s)", tostring(name),
      table.concat(known, ", ")), 2)
  end
  return fn
end

-- ---------------------------------------------------------------------------
-- Linear: y = x W^T + b, weight (out_features, in_features).

local Linear = {}
Linear.__index = Linear

-- opts.bias: true requires `prefix.bias`, false ignores it, nil uses it when
-- present. opts.in_features / opts.out_features check the weight's shape.
function nn.Linear(weights, prefix, opts)
  opts = opts or {}
  local self = setmetatable({}, Linear)
  self.weight = nn.param(weights, prefix .. ".weight")
  if opts.bias == true then
    self.bias = nn.param(weights, prefix .. ".bias")
  elseif opts.bias == nil then
    self.bias = weights[prefix .. ".bias"]
  end
  if self.weight:dim() ~= 2 then
    error(string.format("tensor '%s.weight' has %d dimensions, expected 2", prefix, self.weight:dim()), 2)
  end
  self.out_features, self.in_features = self.weight:size(1), self.weight:size(2)
  if opts.in_features and opts.out_features then
    nn.check_shape(self.weight, { opts.out_features, opts.in_features }, prefix .. ".weight")
  end
  return self
end

function Linear:forward(x)
  return loom.linear(x, self.weight, self.bias)
end

-- ---------------------------------------------------------------------------
-- LayerNorm over the last dimension, with weight and bias.

local LayerNorm = {}
LayerNorm.__index = LayerNorm

function nn.LayerNorm(weights, prefix, eps, dim)
  local self = setmetatable({}, LayerNorm)
  self.weight = nn.param(weights, prefix .. ".weight")
  self.bias = weights[prefix .. ".bias"]
  self.eps = eps or 1e-5
  if dim then nn.check_shape(self.weight, { dim }, prefix .. ".weight") end
  return self
end

function LayerNorm:forward(x)
  return loom.layer_norm(x, self.weight, self.bias, self.eps)
end

-- ---------------------------------------------------------------------------
-- RMSNorm (LLaMA): x / sqrt(mean(x^2) + eps) * weight.

local RMSNorm = {}
RMSNorm.__index = RMSNorm

function nn.RMSNorm(weights, prefix, eps, dim)
  local self = setmetatable({}, RMSNorm)
  self.weight = nn.param(weights, prefix .. ".weight")
  self.eps = eps or 1e-6
  if dim then nn.check_shape(self.weight, { dim }, prefix .. ".weight") end
  return self
end

function RMSNorm:forward(x)
  return loom.rms_norm(x, self.weight, self.eps)
end

-- ---------------------------------------------------------------------------
-- Embedding: rows of a (num_embeddings, dim) table picked by 0-based ids.

local Embedding = {}
Embedding.__index = Embedding

function nn.Embedding(weights, name)
  local self = setmetatable({}, Embedding)
  self.weight = nn.param(weights, name)
  self.num_embeddings, self.dim = self.weight:size(1), self.weight:size(2)
  return self
end

function Embedding:forward(ids)
  return loom.embedding(self.weight, ids)
end

-- ---------------------------------------------------------------------------
-- MLP: fc2(act(fc1(x))), as CLIP's encoder MLP and the LLaVA projector.

local MLP = {}
MLP.__index = MLP

function nn.MLP(fc1, fc2, act_name)
  return setmetatable({ fc1 = fc1, fc2 = fc2, act = nn.activation(act_name), act_name = act_name }, MLP)
end

-- Returns the output and the activated hidden layer.
function MLP:forward(x)
  local hidden = self.act(self.fc1:forward(x))
  return self.fc2:forward(hidden), hidden
end

-- Gated MLP (SwiGLU in LLaMA): down(act(gate(x)) * up(x)).
local GatedMLP = {}
GatedMLP.__index = GatedMLP

function nn.GatedMLP(gate, up, down, act_name)
  return setmetatable({ gate = gate, up = up, down = down, act = nn.activation(act_name) }, GatedMLP)
end

function GatedMLP:forward(x)
  return self.down:forward(self.act(self.gate:forward(x)) * self.up:forward(x))
end

-- ---------------------------------------------------------------------------
-- Segments of several sequences in one pass (dynamic batching)

-- Join the segments' embeds (1, t_i, D) side by side into x (1, N, D).
-- Returns x and the list of lengths t_i.
function nn.join_segments(segments)
  local parts, lengths = {}, {}
  for i, s in ipairs(segments) do parts[i], lengths[i] = s.embeds, s.embeds:size(2) end
  return #parts == 1 and parts[1] or loom.cat(parts, 2), lengths -- S x (1, t_i, D) -> (1, N, D)
end

-- Gather the last row of each segment of x (1, N, D) into (1, S, D).
function nn.segment_lasts(x, lengths)
  local lasts, offset = {}, 0
  for i, t in ipairs(lengths) do
    offset = offset + t
    lasts[i] = x:narrow(2, offset, 1) -- (1, 1, D)
  end
  return #lasts == 1 and lasts[1] or loom.cat(lasts, 2) -- S x (1, 1, D) -> (1, S, D)
end

return nn
