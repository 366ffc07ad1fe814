-- Benchmark of OpenFlamingo-3B shapes (OpenFlamingo-3B-vitl-mpt1b) with
-- random bf16 weights, each figure beside a bound measured in the same run:
--   * the sgemm rate (loom.matmul, f32) and the rate of loom.linear on the
--     bf16 path;
--   * image encode plus resampler per image on the f32 and bf16 paths, and
--     prefill tokens/s of a few-shot prompt, against FLOPs at those rates;
--   * decode seconds per token against weight bytes per token divided by
--     the streaming-read bandwidth measured right before each step, with
--     and without the gated blocks (their cost per token);
--   * peak resident memory.
-- The weights (CLIP ViT-L/14 at 224 px, a 6-layer perceiver resampler, a
-- 24-layer 2048-wide MPT with a gated cross-attention block before every
-- layer: about 2.6 G parameters, 5.2 GB) are written once by Loom as
-- sharded safetensors in OpenFlamingo's single-file layout and reused.
--   bin/loom bench/openflamingo_3b.lua [options]   (--help lists them)
package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
local loom = require("loom")
local json = require("loom.json")
local openflamingo = require("loom.openflamingo")
local bounds = require("bounds")

local HELP = [[
usage: loom bench/openflamingo_3b.lua [options]

  --cache DIR          directory of the random weights (default /tmp/loom-bench/openflamingo3b,
                       with -L<N> and -P<H> suffixes for other --layers and --perceiver-heads);
                       written when missing
  --layers N           MPT layers, each with its gated block (default 24)
  --perceiver-heads H  perceiver attention heads of 64 (default 8, as OpenFlamingo's
                       PerceiverResampler)
  --shots N            shots before the query in the prefill prompt (default 4)
  --shot-tokens N      text tokens per shot (default 30)
  --decode-steps N     decode steps measured per run (default 16)
  --reps N             repetitions of the image encode and the prefill per path (default 3)
  --idle-wait S        seconds to wait, before each measurement, for other processes to
                       take under 5% of the CPU (default 60)
  --attempts N         runs of a measurement at most, while other processes took more
                       than 5% of the CPU during it; the quietest is kept (default 3)
  --parts LIST         comma-separated parts to measure: encode, prefill, decode (default
                       all three); the rates and the read bandwidth are always measured
  -h, --help           show this help
]]

-- OpenFlamingo-3B-vitl-mpt1b: open_clip ViT-L-14 (openai, QuickGELU) at
-- 224 px, PerceiverResampler(dim=1024) with its defaults (depth 6, 8 heads
-- of 64, 64 latents, ff_mult 4), MPT-1B (24 layers, width 2048, 16 heads,
-- expansion 4) with its vocabulary resized to 50280 tokens after the added
-- <|endofchunk|>, <image> and <PAD>, and GatedCrossAttentionBlock(dim=2048,
-- dim_visual=1024, 8 heads of 64, ff_mult 4) before every layer
-- (cross_attn_every_n_layers 1).
local SHAPES = {
  vision = { width = 1024, layers = 24, heads = 16, image = 224, patch = 14, mlp = 4096, embed = 768 },
  perceiver = { depth = 6, heads = 8, dim_head = 64, latents = 64, ff_mult = 4 },
  lm = { width = 2048, layers = 24, heads = 16, ffn = 8192, vocab = 50280, context = 2048 },
  xattn = { heads = 8, dim_head = 64, ff_mult = 4 },
}
local GiB = 1024 ^ 3

local function shell_quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

local function median(list)
  local sorted = { table.unpack(list) }
  table.sort(sorted)
  local n = #sorted
  return n % 2 == 1 and sorted[(n + 1) // 2] or (sorted[n // 2] + sorted[n // 2 + 1]) / 2
end

local function parse_args(args)
  local opts = { layers = SHAPES.lm.layers, perceiver_heads = SHAPES.perceiver.heads, shots = 4, shot_tokens = 30,
    decode_steps = 16, reps = 3, idle_wait = 60, attempts = 3,
    parts = { encode = true, prefill = true, decode = true } }
  local numeric = { ["--layers"] = true, ["--perceiver-heads"] = true, ["--shots"] = true, ["--shot-tokens"] = true,
    ["--decode-steps"] = true, ["--reps"] = true, ["--idle-wait"] = true, ["--attempts"] = true }
  local i = 1
  while i <= #args do
    local a, v = args[i], args[i + 1]
    if a == "-h" or a == "--help" then
      io.write(HELP)
      os.exit(0)
    elseif a == "--write-weights" then
      opts.write_only, i = true, i + 1
    elseif a == "--cache" and v then
      opts.cache, i = v, i + 2
    elseif a == "--parts" and v then
      opts.parts = {}
      for part in v:gmatch("[^,]+") do
        if part ~= "encode" and part ~= "prefill" and part ~= "decode" then
          io.stderr:write("openflamingo_3b: unknown part '", part, "' (expected encode, prefill or decode)\n")
          os.exit(2)
        end
        opts.parts[part] = true
      end
      i = i + 2
    elseif numeric[a] and math.tointeger(tonumber(v or "")) and math.tointeger(tonumber(v)) >= 0 then
      opts[a:sub(3):gsub("-", "_")], i = math.tointeger(tonumber(v)), i + 2
    else
      io.stderr:write("openflamingo_3b: invalid argument '", a, "'", v and (" '" .. v .. "'") or "", "\n", HELP)
      os.exit(2)
    end
  end
  return opts
end

-- ---------------------------------------------------------------------------
-- Parameters, bytes and FLOPs

-- Parameter counts of the parts; `xattn_token` counts the gated block
-- tensors that every text token reads (all but to_kv, which only the
-- image latents pass through).
local function param_counts(layers, perceiver_heads)
  local v, p, l, x = SHAPES.vision, SHAPES.perceiver, SHAPES.lm, SHAPES.xattn
  local patches = (v.image // v.patch) ^ 2
  local vision_layer = 4 * v.width * v.width + 4 * v.width + 2 * v.width * v.mlp + v.mlp + v.width + 4 * v.width
  local vision = v.layers * vision_layer + v.width * 3 * v.patch * v.patch + v.width + (patches + 1) * v.width
    + 4 * v.width + v.width * v.embed
  local inner = perceiver_heads * p.dim_head
  local perceiver_layer = 4 * inner * v.width + 2 * p.ff_mult * v.width * v.width + 6 * v.width
  local perceiver = p.depth * perceiver_layer + p.latents * v.width + 2 * v.width
  local lm_layer = 4 * l.width * l.width + 2 * l.width * l.ffn + 2 * l.width
  local xinner = x.heads * x.dim_head
  local xattn_kv = 2 * xinner * v.width
  local xattn_token = 2 * xinner * l.width + 2 * x.ff_mult * l.width * l.width + 4 * l.width + 2
  return {
    vision = vision, perceiver = perceiver, lm_layer = lm_layer, xattn_token = xattn_token, xattn_kv = xattn_kv,
    embed = l.vocab * l.width,
    total = vision + perceiver + layers * (lm_layer + xattn_token + xattn_kv) + l.vocab * l.width + l.width,
  }
end

-- FLOPs of one image through the tower (every resblock) and the
-- resampler: each GEMM at 2 * M * N * K, attention as the two products
-- over all query-key pairs; norms, softmax and activations left out.
local function encode_flops(perceiver_heads)
  local v, p = SHAPES.vision, SHAPES.perceiver
  local patches = (v.image // v.patch) ^ 2
  local n = patches + 1
  local tower = 2 * patches * v.width * 3 * v.patch * v.patch
    + v.layers * (2 * n * (4 * v.width * v.width + 2 * v.width * v.mlp) + 2 * 2 * n * n * v.width)
  local inner = perceiver_heads * p.dim_head
  local keys = patches + p.latents
  local resampler = p.depth * (2 * p.latents * v.width * inner + 2 * keys * v.width * 2 * inner
    + 2 * 2 * p.latents * keys * inner + 2 * p.latents * inner * v.width
    + 2 * 2 * p.latents * v.width * p.ff_mult * v.width)
  return tower + resampler
end

-- FLOPs of a prefill of t text positions with `images` images over `layers`
-- layers: the decoder and gated blocks on every position, cross-attention
-- over all latents, causal self-attention and the head on the last position
-- (the same counting rules). The media K/V projection runs before the
-- prefill, when the images are set, so it is not counted.
local function prefill_flops(t, images, layers)
  local l, x, p = SHAPES.lm, SHAPES.xattn, SHAPES.perceiver
  local counts = param_counts(layers, SHAPES.perceiver.heads)
  local media = images * p.latents
  local xinner = x.heads * x.dim_head
  local per_layer = 2 * t * (counts.lm_layer + counts.xattn_token) + 2 * 2 * t * media * xinner
    + 2 * 2 * t * t / 2 * l.width
  return layers * per_layer + 2 * l.width * l.vocab
end

-- ---------------------------------------------------------------------------
-- Writing the random weights (in a child process, so that its memory does
-- not count in the benchmark's peak)

local function flamingo_config(layers, perceiver_heads)
  local v, p, l, x = SHAPES.vision, SHAPES.perceiver, SHAPES.lm, SHAPES.xattn
  return {
    model_type = "openflamingo",
    media_token_id = l.vocab - 2, eoc_token_id = l.vocab - 3, pad_token_id = l.vocab - 1,
    cross_attn_every_n_layers = 1,
    vision_encoder = {
      open_clip_model_config = { embed_dim = v.embed, quick_gelu = true, vision_cfg = { image_size = v.image,
        patch_size = v.patch, width = v.width, layers = v.layers, head_width = v.width // v.heads, mlp_ratio = 4.0 } },
      ln_post_on_tokens = false,
    },
    perceiver = { depth = p.depth, heads = perceiver_heads, dim_head = p.dim_head, num_latents = p.latents },
    gated_cross_attn = { heads = x.heads, dim_head = x.dim_head, only_attend_immediate_media = true },
    lang_encoder = { config = { model_type = "mpt", d_model = l.width, n_heads = l.heads, n_layers = layers,
      expansion_ratio = l.ffn // l.width, max_seq_len = l.context, vocab_size = l.vocab, no_bias = true,
      layer_norm_epsilon = 1e-5, attn_config = { alibi = true, alibi_bias_max = 8 } } },
  }
end

-- The tensors of each shard as lists of {name, shape, kind}: kind "w"
-- (normal, std 0.02), "one" (norm weights), "zero" (biases) or "gate".
local function shard_plan(layers, perceiver_heads)
  local v, p, l, x = SHAPES.vision, SHAPES.perceiver, SHAPES.lm, SHAPES.xattn
  local patches = (v.image // v.patch) ^ 2
  local shards = {}
  local function norm(list, name, d, bias)
    list[#list + 1] = { name .. ".weight", { d }, "one" }
    if bias ~= false then list[#list + 1] = { name .. ".bias", { d }, "zero" } end
  end

  -- the vision tower and the resampler
  local vt = {}
  local vp = "vision_encoder."
  vt[#vt + 1] = { vp .. "conv1.weight", { v.width, 3, v.patch, v.patch }, "w" }
  vt[#vt + 1] = { vp .. "class_embedding", { v.width }, "w" }
  vt[#vt + 1] = { vp .. "positional_embedding", { patches + 1, v.width }, "w" }
  norm(vt, vp .. "ln_pre", v.width)
  for i = 0, v.layers - 1 do
    local b = string.format("%stransformer.resblocks.%d.", vp, i)
    norm(vt, b .. "ln_1", v.width)
    vt[#vt + 1] = { b .. "attn.in_proj_weight", { 3 * v.width, v.width }, "w" }
    vt[#vt + 1] = { b .. "attn.in_proj_bias", { 3 * v.width }, "zero" }
    vt[#vt + 1] = { b .. "attn.out_proj.weight", { v.width, v.width }, "w" }
    vt[#vt + 1] = { b .. "attn.out_proj.bias", { v.width }, "zero" }
    norm(vt, b .. "ln_2", v.width)
    vt[#vt + 1] = { b .. "mlp.c_fc.weight", { v.mlp, v.width }, "w" }
    vt[#vt + 1] = { b .. "mlp.c_fc.bias", { v.mlp }, "zero" }
    vt[#vt + 1] = { b .. "mlp.c_proj.weight", { v.width, v.mlp }, "w" }
    vt[#vt + 1] = { b .. "mlp.c_proj.bias", { v.width }, "zero" }
  end
  norm(vt, vp .. "ln_post", v.width)
  vt[#vt + 1] = { vp .. "proj", { v.width, v.embed }, "w" }
  local inner = perceiver_heads * p.dim_head
  vt[#vt + 1] = { "perceiver.latents", { p.latents, v.width }, "w" }
  for i = 0, p.depth - 1 do
    local b = string.format("perceiver.layers.%d.", i)
    norm(vt, b .. "0.norm_media", v.width)
    norm(vt, b .. "0.norm_latents", v.width)
    vt[#vt + 1] = { b .. "0.to_q.weight", { inner, v.width }, "w" }
    vt[#vt + 1] = { b .. "0.to_kv.weight", { 2 * inner, v.width }, "w" }
    vt[#vt + 1] = { b .. "0.to_out.weight", { v.width, inner }, "w" }
    norm(vt, b .. "1.0", v.width)
    vt[#vt + 1] = { b .. "1.1.weight", { p.ff_mult * v.width, v.width }, "w" }
    vt[#vt + 1] = { b .. "1.3.weight", { v.width, p.ff_mult * v.width }, "w" }
  end
  norm(vt, "perceiver.norm", v.width)
  shards[#shards + 1] = vt

  -- the embedding (tied head) and final norm, then 4 layers per shard
  local embed = { { "lang_encoder.transformer.wte.weight", { l.vocab, l.width }, "w" } }
  norm(embed, "lang_encoder.transformer.norm_f", l.width, false)
  shards[#shards + 1] = embed
  local xinner = x.heads * x.dim_head
  for first = 0, layers - 1, 4 do
    local shard = {}
    for i = first, math.min(first + 4, layers) - 1 do
      local b = string.format("lang_encoder.transformer.blocks.%d.", i)
      norm(shard, b .. "norm_1", l.width, false)
      shard[#shard + 1] = { b .. "attn.Wqkv.weight", { 3 * l.width, l.width }, "w" }
      shard[#shard + 1] = { b .. "attn.out_proj.weight", { l.width, l.width }, "w" }
      norm(shard, b .. "norm_2", l.width, false)
      shard[#shard + 1] = { b .. "ffn.up_proj.weight", { l.ffn, l.width }, "w" }
      shard[#shard + 1] = { b .. "ffn.down_proj.weight", { l.width, l.ffn }, "w" }
      local g = string.format("lang_encoder.gated_cross_attn_layers.%d.", i)
      norm(shard, g .. "attn.norm", l.width)
      shard[#shard + 1] = { g .. "attn.to_q.weight", { xinner, l.width }, "w" }
      shard[#shard + 1] = { g .. "attn.to_kv.weight", { 2 * xinner, v.width }, "w" }
      shard[#shard + 1] = { g .. "attn.to_out.weight", { l.width, xinner }, "w" }
      shard[#shard + 1] = { g .. "attn_gate", { 1 }, "gate" }
      norm(shard, g .. "ff.0", l.width)
      shard[#shard + 1] = { g .. "ff.1.weight", { x.ff_mult * l.width, l.width }, "w" }
      shard[#shard + 1] = { g .. "ff.3.weight", { l.width, x.ff_mult * l.width }, "w" }
      shard[#shard + 1] = { g .. "ff_gate", { 1 }, "gate" }
    end
    shards[#shards + 1] = shard
  end
  return shards
end

-- Write config.json, the shards and, last, model.safetensors.index.json,
-- whose presence marks a complete cache.
local function write_weights(dir, layers, perceiver_heads)
  assert(os.execute("mkdir -p " .. shell_quote(dir)))
  local f = assert(io.open(dir .. "/config.json", "w"))
  f:write(json.encode(flamingo_config(layers, perceiver_heads), " "))
  f:close()

  local plan = shard_plan(layers, perceiver_heads)
  local weight_map, seed = {}, 1
  for s, shard in ipairs(plan) do
    local file = string.format("model-%05d-of-%05d.safetensors", s, #plan)
    local tensors = {}
    for _, entry in ipairs(shard) do
      local name, shape, kind = entry[1], entry[2], entry[3]
      if kind == "w" then
        tensors[name] = loom.randn(shape, { seed = seed, std = 0.02, dtype = "bf16" })
      elseif kind == "gate" then
        -- nonzero gates, so that the gated blocks change the text
        tensors[name] = loom.full(shape, 0.5, "bf16")
      else
        tensors[name] = loom.full(shape, kind == "one" and 1 or 0, "bf16")
      end
      seed = seed + 1
      weight_map[name] = file
    end
    loom.save(dir .. "/" .. file, tensors)
    for _, t in pairs(tensors) do t:free() end
    collectgarbage()
    io.stderr:write(string.format("  wrote %s (%d of %d)\n", file, s, #plan))
  end
  f = assert(io.open(dir .. "/model.safetensors.index.json", "w"))
  f:write(json.encode({ metadata = { writer = "bench/openflamingo_3b.lua" }, weight_map = weight_map }))
  f:close()
end

-- ---------------------------------------------------------------------------
-- Measurements

local opts = parse_args(arg or {})
io.stdout:setvbuf("line")
local default_cache = "/tmp/loom-bench/openflamingo3b"
  .. (opts.layers ~= SHAPES.lm.layers and ("-L" .. opts.layers) or "")
  .. (opts.perceiver_heads ~= SHAPES.perceiver.heads and ("-P" .. opts.perceiver_heads) or "")
local cache_dir = opts.cache or default_cache

if opts.write_only then
  write_weights(cache_dir, opts.layers, opts.perceiver_heads)
  os.exit(0)
end

-- Run `fn` after waiting (up to opts.idle_wait seconds) for other processes
-- to go quiet, again up to opts.attempts times while they took more than 5%
-- of the machine's CPU time during the run. Returns the share other
-- processes took during the kept run (the quietest), then its results.
local function measured(fn)
  local best_share, best
  for _ = 1, math.max(1, opts.attempts) do
    bounds.wait_for_idle(0.05, 2, opts.idle_wait)
    local other = bounds.other_load()
    local results = table.pack(fn())
    local share = other()
    if best_share == nil or share < best_share then best_share, best = share, results end
    if share < 0.05 then break end
  end
  return best_share, table.unpack(best, 1, best.n)
end

local rows = {}
-- One table row; `fraction` is a number or already formatted text.
local function row(figure, path, value, bound, fraction, target, others)
  if type(fraction) == "number" then fraction = string.format("%.2f", fraction) end
  rows[#rows + 1] = { figure, path, value, bound or "", fraction or "", target or "",
    others and string.format("%.0f%%", 100 * others) or "" }
end

local function print_table()
  local header = { "figure", "path", "measured", "bound", "fraction of bound", "target", "others' CPU" }
  local widths = {}
  for c = 1, #header do
    widths[c] = #header[c]
    for _, r in ipairs(rows) do widths[c] = math.max(widths[c], #r[c]) end
  end
  local function line(cells)
    local parts = {}
    for c = 1, #header do parts[c] = cells[c] .. string.rep(" ", widths[c] - #cells[c]) end
    print("| " .. table.concat(parts, " | ") .. " |")
  end
  line(header)
  local dashes = {}
  for c = 1, #header do dashes[c] = string.rep("-", widths[c]) end
  line(dashes)
  for _, r in ipairs(rows) do line(r) end
end

-- The weights one decode step reads in full, split into the decoder's (its
-- layers, final norm and the tied head) and the gated blocks' text-side
-- tensors. The embedding gives one row per token and to_kv runs only on
-- the cached image latents, so they are left out.
local function decode_weights(model)
  local lm, gated = {}, {}
  local function add(list, t) list[#list + 1] = t end
  for _, layer in ipairs(model.lm.layers) do
    local inner = layer.inner or layer
    add(lm, inner.norm_1.weight)
    add(lm, inner.Wqkv.weight)
    add(lm, inner.out_proj.weight)
    add(lm, inner.norm_2.weight)
    add(lm, inner.ffn.fc1.weight)
    add(lm, inner.ffn.fc2.weight)
    local block = layer.block
    if block then
      add(gated, block.norm.weight)
      add(gated, block.norm.bias)
      add(gated, block.q.weight)
      add(gated, block.out.weight)
      add(gated, block.ff_norm.weight)
      add(gated, block.ff_norm.bias)
      add(gated, block.ff.fc1.weight)
      add(gated, block.ff.fc2.weight)
    end
  end
  add(lm, model.lm.norm_f.weight)
  add(lm, model.lm.lm_head.weight)
  return lm, gated
end

local function tensor_bytes(list)
  local sizes = { f32 = 4, bf16 = 2, f16 = 2 }
  local total = 0
  for _, t in ipairs(list) do total = total + t:numel() * sizes[t:dtype()] end
  return total
end

local function concat(a, b)
  local out = { table.unpack(a) }
  for _, t in ipairs(b) do out[#out + 1] = t end
  return out
end

-- Pseudo-random text ids in [100, 50000), the same on every run.
local function text_ids(n, state)
  local ids = {}
  for i = 1, n do
    state = (state * 1103515245 + 12345) % 2147483648
    ids[i] = 100 + state % 49900
  end
  return ids, state
end

-- A few-shot prompt: per shot <image>, text, <|endofchunk|>, then the
-- query's <image> and text. Returns the ids and the image count.
local function prompt_ids(model)
  local ids, state = {}, 12345
  for shot = 1, opts.shots + 1 do
    ids[#ids + 1] = model.media_token_id
    local text
    text, state = text_ids(opts.shot_tokens, state)
    for _, id in ipairs(text) do ids[#ids + 1] = id end
    if shot <= opts.shots then ids[#ids + 1] = model.eoc_token_id end
  end
  return ids, opts.shots + 1
end

-- Seconds of the images `pixels` (N, 3, S, S) through the tower and the
-- resampler per rep, after one warm-up, on `path`.
local function time_encode(model, pixels, path, reps)
  loom.set_linear_path(path)
  local times = {}
  for i = 0, reps do
    collectgarbage()
    local t = bounds.clock()
    local tokens = model:vision_tokens(pixels)
    local latents = model.perceiver:forward(tokens:unsqueeze(2)) -- (N, P, D) -> (N, 1, P, D)
    local dt = bounds.clock() - t
    tokens:free()
    latents:free()
    if i > 0 then times[#times + 1] = dt end
  end
  collectgarbage()
  return times
end

-- Machine and settings
local machine = bounds.machine()
print(string.format("machine: %s, %d logical CPUs, AVX512-BF16 %s, %.1f GiB RAM, OMP_NUM_THREADS %s", machine.cpu,
  machine.cpus, machine.avx512_bf16 and "yes" or "no", machine.memory_gib, machine.omp_threads or "unset"))
print("load average at start: " .. (io.open("/proc/loadavg"):read("l"):match("^(%S+ %S+ %S+)") or "?"))
local counts = param_counts(opts.layers, opts.perceiver_heads)
print(string.format("model: OpenFlamingo-3B shapes, %d MPT layers with gated blocks, perceiver %d heads of 64, "
  .. "%.2f G parameters, %.2f GB bf16", opts.layers, opts.perceiver_heads, counts.total / 1e9, 2 * counts.total / 1e9))

-- write the cache in a child process when it is missing
if not io.open(cache_dir .. "/model.safetensors.index.json") then
  local free = bounds.free_bytes(cache_dir:match("^(.*)/[^/]*$") or ".")
  if free and free < 2 * counts.total + 2 * GiB then
    error(string.format("%s needs %.1f GB for the weights but its file system has %.1f GB free", cache_dir,
      2 * counts.total / 1e9, free / 1e9))
  end
  print("writing the random weights to " .. cache_dir .. " (once)")
  local t = bounds.clock()
  os.execute("mkdir -p " .. shell_quote(cache_dir))
  local cmd = string.format("%s %s --write-weights --cache %s --layers %d --perceiver-heads %d", shell_quote(arg[-1]),
    shell_quote(arg[0]), shell_quote(cache_dir), opts.layers, opts.perceiver_heads)
  assert(os.execute(cmd), "writing the weights failed: " .. cmd)
  print(string.format("  written in %.0f s", bounds.clock() - t))
end

-- load: every tensor a view of the file mapping
require("loom.log").set_level("warning")
local t_load = bounds.clock()
local model = openflamingo.load(cache_dir, { tokenizer = false, preprocessor = false })
local all = {}
for name, t in pairs(model.weights) do
  if type(name) == "string" and loom.is_tensor(t) then all[t] = true end
end
local weights = {}
for t in pairs(all) do weights[#weights + 1] = t end
print(string.format("loaded in %.2f s: %d tensors, %.2f GB", bounds.clock() - t_load, #weights,
  tensor_bytes(weights) / 1e9))
local first_read = bounds.read_gbps(weights, 1)
print(string.format("first read of all weights: %.1f GB/s", first_read))

-- (1) the sgemm rate, the bf16 GEMM rate and the read bandwidth
local others, sgemm = measured(function() return bounds.sgemm_gflops(4096, 3) end)
row("sgemm 4096^3 (loom.matmul)", "f32", string.format("%.0f GFLOP/s", sgemm), nil, nil, nil, others)
local bf16_rate
others, bf16_rate = measured(function()
  local n = 4096
  local x = loom.randn({ n, n }, { seed = 103 })
  local w = loom.randn({ n, n }, { seed = 104, std = 0.02, dtype = "bf16" })
  local y = loom.empty({ n, n })
  loom.set_linear_path("bf16")
  loom.linear(x, w, nil, y)
  local best, start = 0, bounds.clock()
  repeat
    local t = bounds.clock()
    loom.linear(x, w, nil, y)
    best = math.max(best, 2 * n ^ 3 / (bounds.clock() - t) / 1e9)
  until bounds.clock() - start >= 3
  x:free()
  w:free()
  y:free()
  return best
end)
row("GEMM 4096^3 (loom.linear, bf16 weight)", "bf16", string.format("%.0f GFLOP/s (%.2fx sgemm)", bf16_rate,
  bf16_rate / sgemm), nil, nil, nil, others)

local lm_weights, gated_weights = decode_weights(model)
local decode_list = concat(lm_weights, gated_weights)
local lm_bytes, gated_bytes = tensor_bytes(lm_weights), tensor_bytes(gated_weights)
local token_bytes = lm_bytes + gated_bytes
local bws = {}
others = measured(function()
  for i = 1, 5 do bws[i] = bounds.read_gbps(decode_list, 1) end
end)
row(string.format("read-sum of the decode weights (%.2f GiB)", token_bytes / GiB), "",
  string.format("%.1f GB/s (%.1f-%.1f)", median(bws), math.min(table.unpack(bws)), math.max(table.unpack(bws))),
  nil, nil, nil, others)

-- (2) image encode plus resampler: one image on the f32 and bf16 paths, and
-- the few-shot prompt's images in one batch, as the pipeline encodes them
-- The bound text and fraction of `seconds` for `work` FLOPs on `path`: at
-- the sgemm rate, and on the bf16 path also at the bf16 GEMM rate (the
-- AMX tiles' rate where the CPU has them, above the sgemm rate).
local function flop_bound(work, seconds, path)
  local at_sgemm = work / (sgemm * 1e9)
  if path ~= "bf16" then
    return string.format("%.3f s at the sgemm rate", at_sgemm), string.format("%.2f", at_sgemm / seconds)
  end
  local at_bf16 = work / (bf16_rate * 1e9)
  return string.format("%.3f s at the sgemm rate, %.3f s at the bf16 GEMM rate", at_sgemm, at_bf16),
    string.format("%.2f, %.2f", at_sgemm / seconds, at_bf16 / seconds)
end

local flops = encode_flops(opts.perceiver_heads)
local pixels = loom.randn({ 1, 3, SHAPES.vision.image, SHAPES.vision.image }, { seed = 7 })
local ids, n_images = prompt_ids(model)
local image_list = {}
for i = 1, n_images do image_list[i] = pixels end
local images = loom.cat(image_list, 1) -- (N, 3, S, S)
for _, path in ipairs(opts.parts.encode and { "f32", "bf16" } or {}) do
  local times
  others, times = measured(function() return time_encode(model, pixels, path, opts.reps) end)
  local t = median(times)
  local bound, fraction = flop_bound(flops, t, path)
  row(string.format("image encode + resampler, 1 image (%.0f GFLOP)", flops / 1e9), path,
    string.format("%.3f s (%.0f GFLOP/s)", t, flops / t / 1e9), bound, fraction, path == "bf16" and "<= 0.7 s" or "",
    others)
end

if opts.parts.encode then
  local times
  others, times = measured(function() return time_encode(model, images, "bf16", opts.reps) end)
  local t = median(times) / n_images
  local bound, fraction = flop_bound(flops, t, "bf16")
  row(string.format("image encode + resampler, batch of %d, per image", n_images), "bf16",
    string.format("%.3f s (%.0f GFLOP/s)", t, flops / t / 1e9), bound, fraction, "<= 0.7 s", others)
end

if opts.parts.prefill or opts.parts.decode then
  -- (3) prefill of a few-shot prompt; the images are encoded once beforehand
  loom.set_linear_path("bf16")
  local t_prepare = bounds.clock()
  local batch = model:prepare({ ids }, nil, { images })
  t_prepare = bounds.clock() - t_prepare
  print(string.format("prompt: %d tokens with %d images; encode + resample + media K/V of all images: %.2f s",
    #ids, n_images, t_prepare))
  local pflops = prefill_flops(#ids, n_images, opts.layers)
  -- the prompt's media masks: a prefill switches the state to the decode masks
  local prompt_mask, prompt_gate = model.state.mask, model.state.gate

  local function run_prefill(path)
    loom.set_linear_path(path)
    model.state.mask, model.state.gate = prompt_mask, prompt_gate
    local session = model:decode_session(batch, { ids }, opts.decode_steps + 1)
    collectgarbage()
    local t = bounds.clock()
    local logits = session.prefill()
    return bounds.clock() - t, session, logits
  end

  for _, path in ipairs(opts.parts.prefill and { "f32", "bf16" } or {}) do
    local times = {}
    others = measured(function()
      for i = 0, opts.reps do
        local dt = run_prefill(path)
        if i > 0 then times[#times + 1] = dt end
        collectgarbage()
      end
    end)
    local t = median(times)
    local bound, fraction = flop_bound(pflops, t, path)
    row(string.format("prefill, %d tokens, %d images (%.0f GFLOP)", #ids, n_images, pflops / 1e9), path,
      string.format("%.0f tokens/s (%.2f s)", #ids / t, t), bound, fraction, nil, others)
  end

  -- (4) decode: each step timed right after a read-sum of the weights it reads
  local function decode_run(with_blocks)
    loom.set_linear_path("bf16")
    local layers = model.lm.layers
    local list, bytes = decode_list, token_bytes
    if not with_blocks then
      local plain = {}
      for i, layer in ipairs(layers) do plain[i] = layer.inner or layer end
      model.lm.layers = plain
      list, bytes = lm_weights, lm_bytes
    end
    local _, session, logits = run_prefill("bf16")
    local times, fractions, bandwidths = {}, {}, {}
    local token = loom.argmax(logits:select(1, 1)):item()
    for _ = 1, opts.decode_steps do
      local bw = bounds.read_gbps(list, 1)
      local t = bounds.clock()
      logits = session.step({ token })
      local dt = bounds.clock() - t
      token = loom.argmax(logits:select(1, 1)):item()
      times[#times + 1], bandwidths[#bandwidths + 1] = dt, bw
      fractions[#fractions + 1] = bytes / (bw * 1e9) / dt
    end
    model.lm.layers = layers
    collectgarbage()
    return times, fractions, bandwidths, bytes
  end

  local decode = {}
  for _, with_blocks in ipairs(opts.parts.decode and { true, false } or {}) do
    local times, fractions, bandwidths, bytes
    others, times, fractions, bandwidths, bytes = measured(function() return decode_run(with_blocks) end)
    local t, bw = median(times), median(bandwidths)
    decode[with_blocks] = t
    local what = with_blocks and "with the gated blocks" or "without the gated blocks"
    row(string.format("decode, %s (%.2f GB per token)", what, bytes / 1e9), "bf16",
      string.format("%.4f s/token (%.1f tokens/s)", t, 1 / t),
      string.format("%.4f s at %.1f GB/s (%.1f-%.1f)", bytes / (bw * 1e9), bw, math.min(table.unpack(bandwidths)),
        math.max(table.unpack(bandwidths))), median(fractions), with_blocks and ">= 0.85" or "", others)
  end
  if opts.parts.decode then
    local gated_seconds = decode[true] - decode[false]
    print(string.format("gated blocks per decoded token: %.4f s of %.4f s (%.0f%%); %.2f GB of %.2f GB "
      .. "weight bytes (%.0f%%)", gated_seconds, decode[true], 100 * gated_seconds / decode[true], gated_bytes / 1e9,
      token_bytes / 1e9, 100 * gated_bytes / token_bytes))
  end
end

-- (5) memory
row("peak resident memory (VmHWM)", "", string.format("%.2f GiB", bounds.status_mib("VmHWM") / 1024),
  string.format("%.2f GiB of mapped weights", tensor_bytes(weights) / GiB), nil, nil, nil)
print(string.format("resident now: %.2f GiB file-backed (mapped weights), %.2f GiB anonymous",
  (bounds.status_mib("RssFile") or 0) / 1024, (bounds.status_mib("RssAnon") or 0) / 1024))
print()
print_table()
print()
print(string.format("rerun: bin/loom bench/openflamingo_3b.lua%s", arg[1] and (" " .. table.concat(arg, " ")) or ""))
