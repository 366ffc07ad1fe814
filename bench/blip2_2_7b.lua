-- Benchmark of BLIP-2 at the shapes of Salesforce/blip2-opt-2.7b, with
-- random bf16 weights that it writes once to a cache directory in the
-- Hugging Face layout (about 7.5 GB):
--   bin/loom bench/blip2_2_7b.lua [--cache DIR] [--tokens N] [--reps N]
-- It reports each figure beside the bound measured in the same run. The
-- image encoder and the Q-Former are compared with their FLOP count at the
-- sgemm rate, on the f32 and on the bf16 linear path. Decoding is compared
-- with the weight bytes read per token at the streaming-read bandwidth of
-- those same weights: the higher of two reads, right before and right after
-- each decode run.
package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
local bounds = require("bounds")
local loom = require("loom")
local json = require("loom.json")
local blip2 = require("loom.blip2")
local log = require("loom.log")

local HELP = [[
usage: loom bench/blip2_2_7b.lua [--cache DIR] [--tokens N] [--reps N] [--sgemm-seconds S] [--idle-wait S]

  --cache DIR         where the random checkpoint is written once and then
                      reused (default /tmp/loom-bench/blip2)
  --tokens N          tokens timed per decode run (default 32)
  --reps N            timed runs of each measurement (default 3)
  --sgemm-seconds S   time spent measuring the sgemm rate (default 3)
  --idle-wait S       before each measurement, wait up to S seconds for other
                      processes to take less than 5% of the CPU time
                      (default 600; 0 measures at once)
]]

local opts = { cache = "/tmp/loom-bench/blip2", tokens = 32, reps = 3, sgemm_seconds = 3, idle_wait = 600 }
do
  local i = 1
  while arg and i <= #arg do
    local a, v = arg[i], arg[i + 1]
    if a == "-h" or a == "--help" then
      io.write(HELP)
      os.exit(0)
    elseif a == "--cache" and v then
      opts.cache = v
    elseif (a == "--tokens" or a == "--reps") and math.tointeger(tonumber(v or "")) then
      opts[a:sub(3)] = math.tointeger(tonumber(v))
    elseif a == "--sgemm-seconds" and tonumber(v or "") then
      opts.sgemm_seconds = tonumber(v)
    elseif a == "--idle-wait" and tonumber(v or "") then
      opts.idle_wait = tonumber(v)
    else
      io.stderr:write("blip2_2_7b: invalid argument '", a, "' (see --help)\n")
      os.exit(2)
    end
    i = i + 2
  end
end

-- ---------------------------------------------------------------------------
-- Configuration: Salesforce/blip2-opt-2.7b's shapes, written out in full.

local CONFIG = {
  model_type = "blip-2",
  architectures = { "Blip2ForConditionalGeneration" },
  num_query_tokens = 32,
  use_decoder_only_language_model = true,
  vision_config = {
    model_type = "blip_2_vision_model",
    hidden_size = 1408, intermediate_size = 6144, num_hidden_layers = 39, num_attention_heads = 16,
    image_size = 224, patch_size = 14, hidden_act = "gelu", layer_norm_eps = 1e-6, qkv_bias = true,
  },
  qformer_config = {
    model_type = "blip_2_qformer",
    hidden_size = 768, intermediate_size = 3072, num_hidden_layers = 12, num_attention_heads = 12,
    cross_attention_frequency = 2, encoder_hidden_size = 1408, layer_norm_eps = 1e-12, hidden_act = "gelu",
  },
  text_config = {
    model_type = "opt",
    vocab_size = 50272, hidden_size = 2560, word_embed_proj_dim = 2560, ffn_dim = 10240, num_hidden_layers = 32,
    num_attention_heads = 32, max_position_embeddings = 2048, do_layer_norm_before = true,
    activation_function = "relu", enable_bias = true, tie_word_embeddings = true,
    bos_token_id = 2, eos_token_id = 2, pad_token_id = 1,
  },
  torch_dtype = "bfloat16",
}

-- Largest size of a shard file.
local SHARD_BYTES = 2 ^ 30

local function path_join(dir, name)
  return (dir:gsub("/+$", "")) .. "/" .. name
end

local function write_file(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end

local function file_exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

-- ---------------------------------------------------------------------------
-- The cached checkpoint

-- Write the random checkpoint: shards of about SHARD_BYTES, an index, and
-- config.json. Weights are normal(0, 0.02), layer norm weights
-- 1 + normal(0, 0.02), and the key third of the vision qkv bias is zero.
-- Each tensor's seed is its position in the layout, so the files are the
-- same on every run.
local function write_checkpoint(dir)
  local layout = blip2.checkpoint_layout(CONFIG)
  local total = 0
  local shards, current, current_bytes = {}, nil, 0
  for i, entry in ipairs(layout) do
    local n = 1
    for _, s in ipairs(entry.shape) do n = n * s end
    entry.bytes, entry.seed = n * 2, i
    if current == nil or current_bytes + entry.bytes > SHARD_BYTES then
      current, current_bytes = {}, 0
      shards[#shards + 1] = current
    end
    current[#current + 1] = entry
    current_bytes, total = current_bytes + entry.bytes, total + entry.bytes
  end

  local free = bounds.free_bytes(dir)
  if free and free < total * 1.05 then
    error(string.format("'%s' has %.1f GB free, but the checkpoint takes %.1f GB", dir, free / 1e9, total / 1e9), 0)
  end

  local weight_map = {}
  local start = bounds.clock()
  for s, shard in ipairs(shards) do
    local name = string.format("model-%05d-of-%05d.safetensors", s, #shards)
    local tensors = {}
    for _, entry in ipairs(shard) do
      local t = loom.randn(entry.shape, { seed = entry.seed, mean = entry.kind == "norm" and 1.0 or 0.0, std = 0.02,
        dtype = "bf16" })
      if entry.kind == "qkv_bias" then t:narrow(1, entry.shape[1] // 3 + 1, entry.shape[1] // 3):fill(0) end
      tensors[entry.name], weight_map[entry.name] = t, name
    end
    loom.save(path_join(dir, name), tensors, { format = "pt" })
    for _, t in pairs(tensors) do t:free() end
    io.stderr:write(string.format("wrote %s (%d of %d, %.0f s)\n", name, s, #shards, bounds.clock() - start))
  end
  write_file(path_join(dir, "model.safetensors.index.json"),
    json.encode({ metadata = { total_size = total }, weight_map = weight_map }, "  ") .. "\n")
  -- config.json last: its presence marks a complete checkpoint
  write_file(path_join(dir, "config.json"), json.encode(CONFIG, "  ") .. "\n")
end

-- ---------------------------------------------------------------------------
-- FLOP counts (a multiply-add is 2 FLOPs; norms, activations and softmax
-- are left out)

local function vision_flops(v)
  local patches = (v.image_size // v.patch_size) ^ 2
  local t, d, f = patches + 1, v.hidden_size, v.intermediate_size
  local patch_embed = 2 * patches * 3 * v.patch_size ^ 2 * d
  -- qkv, projection and the two MLP layers, then q k^T and the weighted sum of v
  local layer = 2 * t * (4 * d * d + 2 * d * f) + 4 * t * t * d
  return patch_embed + v.num_hidden_layers * layer
end

local function qformer_flops(q, queries, image_tokens)
  local h, f, e = q.hidden_size, q.intermediate_size, q.encoder_hidden_size
  local self_attention = 2 * queries * 4 * h * h + 4 * queries * queries * h
  local feed_forward = 2 * queries * 2 * h * f
  -- queries and output from the queries; keys and values from the image tokens
  local cross = 2 * queries * 2 * h * h + 2 * image_tokens * 2 * e * h + 4 * queries * image_tokens * h
  local cross_layers = (q.num_hidden_layers + q.cross_attention_frequency - 1) // q.cross_attention_frequency
  return q.num_hidden_layers * (self_attention + feed_forward) + cross_layers * cross
end

-- ---------------------------------------------------------------------------
-- Measurements

local function median(list)
  local s = { table.unpack(list) }
  table.sort(s)
  return s[(#s + 1) // 2]
end

local function min(list)
  return math.min(table.unpack(list))
end

-- Wait for the other processes on the machine to go quiet, and print a
-- note when they do not.
local function wait_for_idle()
  if opts.idle_wait <= 0 then return end
  local load, idle = bounds.wait_for_idle(0.05, 2, opts.idle_wait)
  if not idle then
    print(string.format("  (other processes still take %.0f%% of the CPU time after %g s; measuring anyway)",
      load * 100, opts.idle_wait))
  end
end

-- Run measure(), which returns its result and bounds.other_load's two
-- figures, after waiting for a quiet machine. A run during which other
-- processes took more than 5% of the CPU time, or weights were read from
-- disk again (more than 100 major page faults), is repeated, up to
-- MAX_ATTEMPTS times in all. Returns the least disturbed run's result and a
-- text giving its disturbance.
local MAX_ATTEMPTS = 5
local function undisturbed(measure)
  local best, best_score, best_text
  for _ = 1, opts.idle_wait > 0 and MAX_ATTEMPTS or 1 do
    wait_for_idle()
    local result, load, faults = measure()
    local score = load + faults / 1000
    if best == nil or score < best_score then
      best, best_score = result, score
      best_text = string.format("other load %.0f%%, %d major faults", load * 100, faults)
    end
    if load <= 0.05 and faults <= 100 then break end
  end
  return best, best_text
end

-- Time fn() `reps` times after one warm-up call. Returns the times and the
-- text giving how much other processes disturbed them.
local function timed(reps, fn)
  fn()
  return undisturbed(function()
    local times = {}
    local other = bounds.other_load()
    for r = 1, reps do
      local t = bounds.clock()
      fn()
      times[r] = bounds.clock() - t
    end
    return times, other()
  end)
end

local function report_compute(label, times, flops, sgemm, disturbance)
  local best = min(times)
  print(string.format("  %-26s best %6.3f s, median %6.3f s | %6.1f GFLOP, bound %6.3f s at sgemm rate, "
    .. "%4.2f of bound (%5.1f GFLOPS) | %s", label, best, median(times), flops / 1e9,
    flops / (sgemm * 1e9), flops / (sgemm * 1e9) / best, flops / best / 1e9, disturbance))
end

-- ---------------------------------------------------------------------------
-- Run

local machine = bounds.machine()
print(string.format("machine: %s, %d CPUs, %.1f GiB, avx512_bf16 %s", machine.cpu, machine.cpus, machine.memory_gib,
  machine.avx512_bf16 and "yes" or "no"))

os.execute("mkdir -p '" .. opts.cache:gsub("'", "'\\''") .. "'")
if not file_exists(path_join(opts.cache, "config.json")) then
  io.stderr:write("writing the random checkpoint to " .. opts.cache .. "\n")
  write_checkpoint(opts.cache)
end

local t0 = bounds.clock()
local model = blip2.load(opts.cache, { tokenizer = false, preprocessor = false })
print(string.format("load: %.2f s (memory-mapped)", bounds.clock() - t0))


local v, q = model.vision.cfg, model.qformer.cfg
local image_tokens = v.num_patches + 1
local pixels = loom.randn({ 1, 3, v.image_size, v.image_size }, { seed = 7 })
local v_flops = vision_flops(v)
local q_flops = qformer_flops(q, model.qformer.num_query_tokens, image_tokens)
local p_flops = 2 * model.qformer.num_query_tokens * q.hidden_size * model.lm.cfg.hidden_size

local features
for _, path in ipairs({ "f32", "bf16" }) do
  loom.set_linear_path(path)
  local sgemm = undisturbed(function()
    local other = bounds.other_load()
    local rate = bounds.sgemm_gflops(4096, opts.sgemm_seconds)
    return rate, other()
  end)
  print(string.format("image encoding, one 224 px image, linear path %s; sgemm rate measured before it "
    .. "(loom.matmul f32 4096^3, best): %.1f GFLOPS", path, sgemm))
  if path == "bf16" then
    -- the instruction the bf16 path multiplies with, and AMX for comparison
    local dp, amx = bounds.peak_gflops("dpbf16"), bounds.peak_gflops("amx_bf16")
    print(string.format("  instruction peaks: vdpbf16ps %s, AMX tdpbf16ps %s GFLOPS",
      dp and string.format("%.0f", dp) or "n/a", amx and string.format("%.0f", amx) or "n/a"))
  end
  local vision_out
  local times, other = timed(opts.reps, function() vision_out = model.vision:forward(pixels) end)
  report_compute("vision tower (ViT-g/14)", times, v_flops, sgemm, other)
  local image = vision_out.last_hidden_state
  times, other = timed(opts.reps, function() model.qformer:forward(image) end)
  report_compute("Q-Former", times, q_flops, sgemm, other)
  times, other = timed(opts.reps, function() features = model:encode_images(pixels) end)
  report_compute("whole encode_images", times, v_flops + q_flops + p_flops, sgemm, other)
end

-- The vision tower's four linear shapes on their own, one layer's weights:
-- an f32 copy of the weight (plain sgemm), and the bf16 weight on each path.
local function linear_gflops(x, w, b, seconds)
  local out = loom.linear(x, w, b)
  local flops = 2 * x:size(1) * x:size(2) * w:size(1)
  local best, start = 0, bounds.clock()
  repeat
    local t = bounds.clock()
    loom.linear(x, w, b, out)
    t = bounds.clock() - t
    if t > 0 then best = math.max(best, flops / t * 1e-9) end
  until bounds.clock() - start >= seconds
  return best
end

local layer = model.vision.layers[1]
print(string.format("vision linear layers alone, x (%d, K) @ w (N, K)^T, best GFLOPS:", image_tokens))
for _, entry in ipairs({ { "qkv", layer.qkv }, { "projection", layer.projection }, { "fc1", layer.mlp.fc1 },
  { "fc2", layer.mlp.fc2 } }) do
  local name, lin = entry[1], entry[2]
  local n, k = lin.weight:size(1), lin.weight:size(2)
  local x = loom.randn({ image_tokens, k }, { seed = 5 })
  local rates, load = undisturbed(function()
    local other = bounds.other_load()
    local w32 = lin.weight:to("f32")
    local r = { f32_weight = linear_gflops(x, w32, lin.bias, 1) }
    w32:free()
    loom.set_linear_path("f32")
    r.f32_path = linear_gflops(x, lin.weight, lin.bias, 1)
    loom.set_linear_path("bf16")
    r.bf16_path = linear_gflops(x, lin.weight, lin.bias, 1)
    return r, other()
  end)
  print(string.format("  %-10s N %5d K %5d | f32 weight (sgemm) %6.1f | bf16 weight: f32 path %6.1f, bf16 path %6.1f "
    .. "| %s", name, n, k, rates.f32_weight, rates.f32_path, rates.bf16_path, load))
end

-- Where the bf16-path tower spends its time: each step of every layer
-- timed on its own, summed over the layers (mean of 3 passes).
local function profile_tower()
  local vision, sums = model.vision, {}
  local function step(name, fn, ...)
    local t = bounds.clock()
    local out = fn(...)
    sums[name] = (sums[name] or 0) + bounds.clock() - t
    return out
  end
  local function pass()
    local x = step("embeddings", vision.embed, vision, pixels)
    for _, l in ipairs(vision.layers) do
      local h, hd = l.cfg.num_attention_heads, l.cfg.head_dim
      local qkv = step("qkv", l.qkv.forward, l.qkv, step("layer norms", l.layer_norm1.forward, l.layer_norm1, x))
      qkv = qkv:view(1, image_tokens, 3, h, hd):permute(3, 1, 4, 2, 5) -- (1, N, 3D) -> (3, 1, H, N, D/H)
      local o = step("attention", loom.attention, qkv:select(1, 1), qkv:select(1, 2), qkv:select(1, 3))
      o = step("other", function() return o:transpose(2, 3):reshape(1, image_tokens, h * hd) end) -- -> (1, N, D)
      local a = step("projection", l.projection.forward, l.projection, o)
      local r = step("other", function() return x + a end)
      local z = step("layer norms", l.layer_norm2.forward, l.layer_norm2, r)
      local g = step("gelu", l.mlp.act, step("fc1", l.mlp.fc1.forward, l.mlp.fc1, z))
      local f = step("fc2", l.mlp.fc2.forward, l.mlp.fc2, g)
      x = step("other", function() return r + f end)
    end
    step("layer norms", vision.post_layernorm.forward, vision.post_layernorm, x)
  end
  pass()
  sums = {}
  local t = bounds.clock()
  for _ = 1, 3 do pass() end
  return sums, (bounds.clock() - t) / 3
end

loom.set_linear_path("bf16")
local sums, disturbance = undisturbed(function()
  local other = bounds.other_load()
  local steps, total = profile_tower()
  steps.total = total
  return steps, other()
end)
local order = {}
for name in pairs(sums) do
  if name ~= "total" then order[#order + 1] = name end
end
table.sort(order, function(a, b) return sums[a] > sums[b] end)
local parts = {}
for i, name in ipairs(order) do parts[i] = string.format("%s %.0f", name, sums[name] / 3 * 1e3) end
print(string.format("vision tower by step, bf16 path, ms per image (of %.0f ms): %s | %s", sums.total * 1e3,
  table.concat(parts, ", "), disturbance))

-- fc1 with a weight that stays in cache against the 39 layers' weights in
-- turn, which come from memory as in a forward pass
do
  local x = loom.randn({ image_tokens, v.hidden_size }, { seed = 6 })
  local out = loom.empty({ image_tokens, v.intermediate_size })
  local function per_call(cycle)
    local t = bounds.clock()
    for round = 1, 3 do
      for i = 1, #model.vision.layers do
        local fc1 = model.vision.layers[cycle and i or 1].mlp.fc1
        loom.linear(x, fc1.weight, fc1.bias, out)
      end
    end
    return (bounds.clock() - t) / (3 * #model.vision.layers)
  end
  local r, load = undisturbed(function()
    local other = bounds.other_load()
    per_call(false)
    local warm = per_call(false)
    local cold = per_call(true)
    return { warm = warm, cold = cold }, other()
  end)
  print(string.format("fc1 on the bf16 path: %.2f ms a call with one weight repeated, %.2f ms with the %d layers' "
    .. "weights in turn (%.1f MB each) | %s", r.warm * 1e3, r.cold * 1e3, #model.vision.layers,
    model.vision.layers[1].mlp.fc1.weight:numel() * 2 / 1e6, load))
end

-- Decoding: the projected queries and a 10-token prompt, then `tokens`
-- greedy steps. Weight bytes per token are the decoder's parameters except
-- the position table, because a step reads one row of it. The tied output
-- head reads the whole token embedding table.
local lm = model.lm
local prompt = { 2, 45641, 35, 99, 16, 11, 116, 116, 31652, 35 }
local inputs_embeds, mask_rows = model:build_inputs(features, { prompt })
local stats = log.parameter_stats(lm)
local weight_bytes = stats.bytes - lm.embed_positions.weight:numel() * 2

-- the tensors one decoding step reads in full, for the bandwidth bound
local step_tensors, seen = {}, { [lm.embed_positions.weight] = true }
local function collect(value)
  if seen[value] then return end
  seen[value] = true
  if loom.is_tensor(value) then
    step_tensors[#step_tensors + 1] = value
  elseif type(value) == "table" then
    for _, item in pairs(value) do collect(item) end
  end
end
collect(lm)
local step_bytes = 0
for _, t in ipairs(step_tensors) do step_bytes = step_bytes + t:numel() * 2 end
assert(step_bytes == weight_bytes, "the tensors read for the bound differ from the weight bytes per token")
local cfg = lm.cfg
local context = inputs_embeds:size(2) + opts.tokens
-- the decoders keep a bf16 KV cache on the bf16 linear path, an f32 one otherwise
local kv_dtype = loom.get_linear_path() == "bf16" and "bf16" or "f32"
local kv_bytes = 2 * cfg.num_hidden_layers * cfg.hidden_size * (kv_dtype == "bf16" and 2 or 4)
  * (context - opts.tokens / 2)
print(string.format("decoding, batch 1, %d query + %d prompt positions, %d timed tokens:",
  features:size(2), #prompt, opts.tokens))
print(string.format("  weight bytes per token: %.3f GB (%s); KV cache read per token about %.1f MB (%s, mean length)",
  weight_bytes / 1e9, "bf16", kv_bytes / 1e6, kv_dtype))

-- one generate_from_embeds run: returns prefill seconds and seconds per token
local function decode_run(tokens)
  local stamps = {}
  local start = bounds.clock()
  model:generate_from_embeds(inputs_embeds, mask_rows, { max_new_tokens = tokens + 1, min_new_tokens = tokens + 1,
    on_logits = function(step) stamps[step] = bounds.clock() end })
  return stamps[1] - start, (stamps[tokens + 1] - stamps[1]) / tokens
end

-- the decoder's forward steps alone, without token selection in Lua
local function forward_run(tokens)
  local cache = lm:new_cache(1, inputs_embeds:size(2) + tokens + 1)
  lm:forward({ inputs_embeds = inputs_embeds, attention_mask = mask_rows, cache = cache, logits = "last" })
  local ids, ones = loom.tensor({ { 100 } }, "i64"), { { 1 } }
  local start = bounds.clock()
  for _ = 1, tokens do lm:forward({ input_ids = ids, attention_mask = ones, cache = cache, logits = "last" }) end
  return (bounds.clock() - start) / tokens
end

-- the decoder's linear layers and the output head alone, with the
-- single-row kernel: the same weight bytes as a decoding step
local function linears_run(tokens)
  local d, f = cfg.hidden_size, cfg.ffn_dim
  local x_d, x_f = loom.randn({ 1, d }, { seed = 3 }), loom.randn({ 1, f }, { seed = 4 })
  local out_d, out_f, out_v = loom.empty({ 1, d }), loom.empty({ 1, f }), loom.empty({ 1, cfg.vocab_size })
  local start = bounds.clock()
  for _ = 1, tokens do
    for _, l in ipairs(lm.layers) do
      for _, proj in ipairs({ l.q_proj, l.k_proj, l.v_proj, l.out_proj }) do
        loom.linear(x_d, proj.weight, proj.bias, out_d)
      end
      loom.linear(x_d, l.fc1.weight, l.fc1.bias, out_f)
      loom.linear(x_f, l.fc2.weight, l.fc2.bias, out_d)
    end
    loom.linear(x_d, lm.lm_head.weight, nil, out_v)
  end
  return (bounds.clock() - start) / tokens
end

decode_run(4) -- warm-up: maps every decoder weight in
for rep = 1, opts.reps do
  local r, load = undisturbed(function()
    local other = bounds.other_load()
    local m = { bw_before = bounds.read_gbps(step_tensors) }
    m.prefill, m.per_token = decode_run(opts.tokens)
    m.forward_only = forward_run(opts.tokens)
    m.linears_only = linears_run(opts.tokens)
    m.bw_after = bounds.read_gbps(step_tensors)
    return m, other()
  end)
  local bw_before, bw_after, prefill, per_token = r.bw_before, r.bw_after, r.prefill, r.per_token
  local forward_only, linears_only = r.forward_only, r.linears_only
  -- the higher of the two reads: a read slowed by another process would
  -- otherwise lower the bound and flatter the result
  local bw = math.max(bw_before, bw_after)
  local bound = weight_bytes / (bw * 1e9)
  print(string.format("  run %d: bound %.1f ms/token at %.1f GB/s (%.1f before, %.1f after) | %s",
    rep, bound * 1e3, bw, bw_before, bw_after, load))
  print(string.format("    generate loop  %6.1f ms/token, %4.2f of bound (prefill %.2f s)", per_token * 1e3,
    bound / per_token, prefill))
  print(string.format("    forward alone  %6.1f ms/token, %4.2f of bound", forward_only * 1e3, bound / forward_only))
  print(string.format("    linears alone  %6.1f ms/token, %4.2f of bound (%.1f GB/s)", linears_only * 1e3,
    bound / linears_only, weight_bytes / linears_only / 1e9))
end

print(string.format("peak resident memory (VmHWM): %.0f MiB; now: %.0f MiB (%.0f MiB file-backed, %.0f MiB anonymous)",
  bounds.status_mib("VmHWM"), bounds.status_mib("VmRSS"), bounds.status_mib("RssFile") or 0,
  bounds.status_mib("RssAnon") or 0))
