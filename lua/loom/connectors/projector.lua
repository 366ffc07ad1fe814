-- The LLaVA projector: maps vision features to the language model's
-- embedding size. LLaVA 1 uses one Linear; LLaVA-1.5 uses "mlp2x_gelu",
-- Linear -> GELU -> Linear. Both checkpoint layouts are read: Hugging Face's
-- multi_modal_projector.linear_1 / linear_2 and the original repository's
-- model.mm_projector.0 / .2 (an nn.Sequential) or model.mm_projector (Linear).
local nn = require("loom.nn")

local M = {}

local Projector = {}
Projector.__index = Projector

-- Build a projector.
--   opts.weights  checkpoint table
--   opts.prefix   "multi_modal_projector", "model.mm_projector", ...
--   opts.kind     "linear", "mlp2x_gelu" (any "mlp<N>x_gelu"), or nil to
--                 detect it from the tensor names
--   opts.act      activation between the layers (default "gelu", exact)
--   opts.in_features, opts.out_features  checked against the weights if set
--   opts.name     prefix of the hook's intermediate names (default "projector")
function M.new(opts)
  local weights, prefix = opts.weights, opts.prefix
  local self = setmetatable({ name = opts.name or "projector", layers = {} }, Projector)
  self.act_name = opts.act or "gelu"
  self.act = nn.activation(self.act_name)

  -- collect the Linear layers in order, by whichever layout is present
  local names = {}
  if weights[prefix .. ".linear_1.weight"] then
    local i = 1
    while weights[string.format("%s.linear_%d.weight", prefix, i)] do
      names[i] = string.format("%s.linear_%d", prefix, i)
      i = i + 1
    end
  elseif weights[prefix .. ".0.weight"] then
    -- nn.Sequential(Linear, GELU, Linear, ...): Linear layers at even indices
    local i = 0
    while weights[string.format("%s.%d.weight", prefix, i)] do
      names[#names + 1] = string.format("%s.%d", prefix, i)
      i = i + 2
    end
  elseif weights[prefix .. ".weight"] then
    names[1] = prefix
  else
    error(string.format("no projector weights under '%s' (expected %s.linear_1.weight, %s.0.weight or %s.weight)",
      prefix, prefix, prefix, prefix), 2)
  end

  -- the kind named by the config must agree with the tensors found
  local found = #names == 1 and "linear" or string.format("mlp%dx_gelu", #names)
  if opts.kind and opts.kind ~= found then
    error(string.format("projector kind '%s' does not match the checkpoint, whose tensors under '%s' form '%s'",
      opts.kind, prefix, found), 2)
  end
  self.kind = found

  for i, name in ipairs(names) do
    self.layers[i] = nn.Linear(weights, name, { bias = nil })
    if i > 1 and self.layers[i].in_features ~= self.layers[i - 1].out_features then
      error(string.format("projector layer '%s' takes %d features but the previous layer gives %d",
        name, self.layers[i].in_features, self.layers[i - 1].out_features), 2)
    end
  end
  self.in_features = self.layers[1].in_features
  self.out_features = self.layers[#self.layers].out_features
  if opts.in_features and opts.in_features ~= self.in_features then
    error(string.format("projector '%s' takes %d features, but the vision tower gives %d",
      prefix, self.in_features, opts.in_features), 2)
  end
  if opts.out_features and opts.out_features ~= self.out_features then
    error(string.format("projector '%s' gives %d features, but the language model's embeddings have %d",
      prefix, self.out_features, opts.out_features), 2)
  end
  return self
end

-- Project features (B, N, in_features) -> (B, N, out_features). The hook
-- receives "<name>.linear_<i>_<act>" after each activated layer and
-- "<name>.output".
function Projector:forward(x, hook)
  for i, layer in ipairs(self.layers) do
    x = layer:forward(x)
    if i < #self.layers then
      x = nn.tap(hook, string.format("%s.linear_%d_%s", self.name, i, self.act_name), self.act(x))
    end
  end
  return nn.tap(hook, self.name .. ".output", x)
end

M.Projector = Projector
return M
