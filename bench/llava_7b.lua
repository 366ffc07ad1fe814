-- Benchmark of LLaVA-1.5-7B shapes with random bf16 weights. Each figure
-- is printed beside a bound measured in the same run. The rates are the
-- instruction peaks, the GEMM rates of both paths and the streaming read
-- bandwidth. Image encode and prefill on the f32 and bf16 paths are set
-- against their FLOP bounds, decode seconds per token against weight bytes
-- over the bandwidth measured beside each step (also for batched steps of
-- 8 and 16 sequences, as the scheduler runs them), and the peak resident
-- size against the bytes of the memory-mapped weights.
-- The weights (about 14 GB) are written once by Loom as sharded safetensors
-- into a cache directory and reused. Usage (bin/loom, or lua5.4 with the
-- loom paths):
--   bin/loom bench/llava_7b.lua [--cache DIR] [--layers N] [--decode-steps N] [--reps N] [--idle-wait S]
local loom = require("loom")
local llava = require("loom.llava")
local json = require("loom.json")

local HELP = [[
usage: loom bench/llava_7b.lua [options]

  --cache DIR         directory of the random weights (default /tmp/loom-bench/llava7b,
                      or DIR-L<N> with fewer decoder layers); written when missing
  --layers N          decoder layers (default 32, fewer when disk or memory is short)
  --decode-steps N    decode steps measured (default 8)
  --reps N            repetitions of the image encode per path (default 3)
  --idle-wait N       seconds to wait, before each measurement, for other processes to
                      take under 5% of the CPU (default 60)
  -h, --help          show this help
]]

-- LLaVA-1.5-7B shapes: CLIP ViT-L/14 at 336 pixels (577 tokens), the
-- mlp2x_gelu projector 1024 -> 4096 -> 4096 and LLaMA-7B.
local SHAPES = {
  vision = { hidden = 1024, intermediate = 4096, layers = 24, heads = 16, image = 336, patch = 14 },
  lm = { hidden = 4096, intermediate = 11008, layers = 32, heads = 32, vocab = 32000 },
}
local FEATURE_LAYER = -2 -- LLaVA-1.5 takes the penultimate CLIP layer
local PEAK_NAMES = { fma_f32 = "vfmadd231ps zmm", dpbf16 = "vdpbf16ps zmm (AVX512-BF16)",
  amx_bf16 = "tdpbf16ps (AMX)" }
local TEXT_TOKENS = 24   -- with 576 image tokens: a 600-position prompt
local GiB = 1024 ^ 3

-- ---------------------------------------------------------------------------
-- Options and small helpers

local function parse_args(args)
  local opts = { layers = nil, decode_steps = 8, reps = 3, idle_wait = 60 }
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
    elseif (a == "--layers" or a == "--decode-steps" or a == "--reps" or a == "--idle-wait")
        and math.tointeger(tonumber(v or "")) then
      opts[a:sub(3):gsub("-", "_")], i = math.tointeger(tonumber(v)), i + 2
    else
      io.stderr:write("llava_7b: invalid argument '", a, "'", v and (" '" .. v .. "'") or "", "\n", HELP)
      os.exit(2)
    end
  end
  return opts
end

-- The helpers of lua/l_bench.c: from the executable (bin/loom), else from
-- the loom.core module that a stock lua5.4 loaded.
local function open_bench_module()
  local open = package.loadlib("", "luaopen_loom_bench")
  if not open then
    local path = package.searchpath("loom.core", package.cpath)
    open = path and package.loadlib(path, "luaopen_loom_bench")
  end
  if not open then error("this build of loom has no luaopen_loom_bench (lua/l_bench.c)") end
  return open()
end
local bench = open_bench_module()

local function read_file(path)
  local f = io.open(path, "r")
  if not f then return nil end
  local text = f:read("a")
  f:close()
  return text
end

local function command_output(cmd)
  local pipe = io.popen(cmd, "r")
  if not pipe then return "" end
  local out = pipe:read("a")
  pipe:close()
  return out
end

-- KiB fields of /proc/self/status (VmHWM, VmRSS, RssAnon, RssFile).
local function status_kib(field)
  local text = read_file("/proc/self/status") or ""
  return tonumber(text:match(field .. ":%s*(%d+)")) or 0
end

-- Record the peak resident size so far under `label`, to print at the end.
local peak_steps = {}
local function note_peak(label)
  peak_steps[#peak_steps + 1] = string.format("%s %.2f", label, status_kib("VmHWM") * 1024 / 1e9)
end

-- ---------------------------------------------------------------------------
-- Other processes: the machine may be shared, so each measurement records
-- the share of the machine's CPU time that other processes took meanwhile.

local CLOCK_TICKS = 100 -- USER_HZ, the unit of /proc/stat and /proc/self/stat on Linux x86-64

-- CPU seconds this process has used (utime + stime of /proc/self/stat).
local function process_cpu()
  local rest = (read_file("/proc/self/stat") or ""):match("%) (.*)$") or ""
  local fields = {}
  for f in rest:gmatch("%S+") do fields[#fields + 1] = f end
  -- utime and stime are fields 14 and 15 of the line, 12 and 13 after the command name
  return ((tonumber(fields[12]) or 0) + (tonumber(fields[13]) or 0)) / CLOCK_TICKS
end

-- Busy and total CPU seconds of the machine since boot (/proc/stat).
local function machine_cpu()
  local line = (read_file("/proc/stat") or ""):match("^cpu%s+([^\n]+)") or ""
  local v = {}
  for n in line:gmatch("%d+") do v[#v + 1] = tonumber(n) end
  local total = 0
  for i = 1, math.min(#v, 8) do total = total + v[i] end
  local idle = (v[4] or 0) + (v[5] or 0) -- idle and iowait
  return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS
end

-- Start a measurement of other processes' CPU share; the returned function
-- gives the share of the machine's CPU time they took since (0 to 1).
local function others_share()
  local own0, busy0, total0 = process_cpu(), machine_cpu()
  return function()
    local own1, busy1, total1 = process_cpu(), machine_cpu()
    if total1 - total0 <= 0 then return 0 end
    return math.max(0, (busy1 - busy0) - (own1 - own0)) / (total1 - total0)
  end
end

-- Wait until other processes take under 5% of the CPU over one second, for
-- at most `max_wait` seconds. Returns the last share.
local function wait_for_idle(max_wait)
  local start = bench.now()
  while true do
    local share = others_share()
    os.execute("sleep 1")
    local s = share()
    if s < 0.05 or bench.now() - start >= max_wait then return s end
  end
end

local function median(list)
  local sorted = { table.unpack(list) }
  table.sort(sorted)
  local n = #sorted
  return n % 2 == 1 and sorted[(n + 1) // 2] or (sorted[n // 2] + sorted[n // 2 + 1]) / 2
end

local function shell_quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

-- ---------------------------------------------------------------------------
-- Sizes and FLOPs

-- Parameters of one CLIP layer, one decoder layer and the fixed parts.
local function param_counts(layers)
  local v, l = SHAPES.vision, SHAPES.lm
  local patches = (v.image // v.patch) ^ 2 // 1
  local vision_layer = 4 * (v.hidden * v.hidden + v.hidden) + 2 * v.hidden * v.intermediate + v.intermediate
    + v.hidden + 4 * v.hidden
  local vision = v.layers * vision_layer + v.hidden * 3 * v.patch * v.patch + v.hidden + (patches + 1) * v.hidden
    + 4 * v.hidden
  local projector = v.hidden * l.hidden + l.hidden + l.hidden * l.hidden + l.hidden
  local lm_layer = 4 * l.hidden * l.hidden + 3 * l.hidden * l.intermediate + 2 * l.hidden
  local embed = l.vocab * l.hidden
  return {
    vision = vision, projector = projector, lm_layer = lm_layer, embed = embed, head = embed + l.hidden,
    total = vision + projector + layers * lm_layer + 2 * embed + l.hidden,
  }
end

-- FLOPs of one image through the tower up to the feature layer and the
-- projector: every GEMM at 2 * M * N * K, attention as the two products
-- Q K^T and P V over all query-key pairs. Norms, softmax and activations
-- are left out.
local function encode_flops()
  local v, l = SHAPES.vision, SHAPES.lm
  local patches = (v.image // v.patch) ^ 2 // 1
  local n = patches + 1
  local run = v.layers + 1 + FEATURE_LAYER
  local per_layer = 2 * n * (4 * v.hidden * v.hidden + 2 * v.hidden * v.intermediate) + 2 * 2 * n * n * v.hidden
  return 2 * patches * v.hidden * 3 * v.patch * v.patch + run * per_layer
    + 2 * patches * (v.hidden * l.hidden + l.hidden * l.hidden), run
end

-- FLOPs of a prefill of t positions over `layers` decoder layers, with the
-- output head on the last position only (the same counting rules).
local function prefill_flops(t, layers)
  local l = SHAPES.lm
  local per_layer = 2 * t * (4 * l.hidden * l.hidden + 3 * l.hidden * l.intermediate) + 2 * 2 * t * t * l.hidden
  return layers * per_layer + 2 * l.hidden * l.vocab
end

-- ---------------------------------------------------------------------------
-- Writing the random weights (run in a child process, so that its memory
-- does not count in the benchmark's peak)

local function hf_config(layers)
  local v, l = SHAPES.vision, SHAPES.lm
  return {
    architectures = { "LlavaForConditionalGeneration" },
    model_type = "llava",
    image_token_index = l.vocab,
    projector_hidden_act = "gelu",
    vision_feature_layer = FEATURE_LAYER,
    vision_feature_select_strategy = "default",
    text_config = {
      model_type = "llama", hidden_size = l.hidden, intermediate_size = l.intermediate, num_hidden_layers = layers,
      num_attention_heads = l.heads, num_key_value_heads = l.heads, vocab_size = l.vocab,
      max_position_embeddings = 4096, rms_norm_eps = 1e-5, rope_theta = 10000.0, hidden_act = "silu",
    },
    vision_config = {
      model_type = "clip_vision_model", hidden_size = v.hidden, intermediate_size = v.intermediate,
      num_hidden_layers = v.layers, num_attention_heads = v.heads, image_size = v.image, patch_size = v.patch,
      hidden_act = "quick_gelu", layer_norm_eps = 1e-5, projection_dim = 768,
    },
  }
end

-- The tensors of each shard as a list of {name, shape, kind}, kind "w"
-- (random, std 0.02), "one" (norm weights) or "zero" (norm biases).
local function shard_plan(layers)
  local v, l = SHAPES.vision, SHAPES.lm
  local patches = (v.image // v.patch) ^ 2 // 1
  local shards = {}

  local vt = {}
  local vp = "vision_tower.vision_model."
  vt[#vt + 1] = { vp .. "embeddings.patch_embedding.weight", { v.hidden, 3, v.patch, v.patch }, "w" }
  vt[#vt + 1] = { vp .. "embeddings.class_embedding", { v.hidden }, "w" }
  vt[#vt + 1] = { vp .. "embeddings.position_embedding.weight", { patches + 1, v.hidden }, "w" }
  for _, norm in ipairs({ "pre_layrnorm", "post_layernorm" }) do
    vt[#vt + 1] = { vp .. norm .. ".weight", { v.hidden }, "one" }
    vt[#vt + 1] = { vp .. norm .. ".bias", { v.hidden }, "zero" }
  end
  for i = 0, v.layers - 1 do
    local p = string.format("%sencoder.layers.%d.", vp, i)
    for _, norm in ipairs({ "layer_norm1", "layer_norm2" }) do
      vt[#vt + 1] = { p .. norm .. ".weight", { v.hidden }, "one" }
      vt[#vt + 1] = { p .. norm .. ".bias", { v.hidden }, "zero" }
    end
    for _, proj in ipairs({ "q_proj", "k_proj", "v_proj", "out_proj" }) do
      vt[#vt + 1] = { p .. "self_attn." .. proj .. ".weight", { v.hidden, v.hidden }, "w" }
      vt[#vt + 1] = { p .. "self_attn." .. proj .. ".bias", { v.hidden }, "w" }
    end
    vt[#vt + 1] = { p .. "mlp.fc1.weight", { v.intermediate, v.hidden }, "w" }
    vt[#vt + 1] = { p .. "mlp.fc1.bias", { v.intermediate }, "w" }
    vt[#vt + 1] = { p .. "mlp.fc2.weight", { v.hidden, v.intermediate }, "w" }
    vt[#vt + 1] = { p .. "mlp.fc2.bias", { v.hidden }, "w" }
  end
  vt[#vt + 1] = { "multi_modal_projector.linear_1.weight", { l.hidden, v.hidden }, "w" }
  vt[#vt + 1] = { "multi_modal_projector.linear_1.bias", { l.hidden }, "w" }
  vt[#vt + 1] = { "multi_modal_projector.linear_2.weight", { l.hidden, l.hidden }, "w" }
  vt[#vt + 1] = { "multi_modal_projector.linear_2.bias", { l.hidden }, "w" }
  shards[#shards + 1] = vt

  local lp = "language_model.model."
  shards[#shards + 1] = {
    { lp .. "embed_tokens.weight", { l.vocab, l.hidden }, "w" },
    { lp .. "norm.weight", { l.hidden }, "one" },
    { "language_model.lm_head.weight", { l.vocab, l.hidden }, "w" },
  }
  local per_shard = 4
  for first = 0, layers - 1, per_shard do
    local shard = {}
    for i = first, math.min(first + per_shard, layers) - 1 do
      local p = string.format("%slayers.%d.", lp, i)
      shard[#shard + 1] = { p .. "input_layernorm.weight", { l.hidden }, "one" }
      shard[#shard + 1] = { p .. "post_attention_layernorm.weight", { l.hidden }, "one" }
      for _, proj in ipairs({ "q_proj", "k_proj", "v_proj", "o_proj" }) do
        shard[#shard + 1] = { p .. "self_attn." .. proj .. ".weight", { l.hidden, l.hidden }, "w" }
      end
      shard[#shard + 1] = { p .. "mlp.gate_proj.weight", { l.intermediate, l.hidden }, "w" }
      shard[#shard + 1] = { p .. "mlp.up_proj.weight", { l.intermediate, l.hidden }, "w" }
      shard[#shard + 1] = { p .. "mlp.down_proj.weight", { l.hidden, l.intermediate }, "w" }
    end
    shards[#shards + 1] = shard
  end
  return shards
end

-- Write config.json, the shards and, last, model.safetensors.index.json
-- (whose presence marks a complete cache).
local function write_weights(dir, layers)
  assert(os.execute("mkdir -p " .. shell_quote(dir)))
  local f = assert(io.open(dir .. "/config.json", "w"))
  f:write(json.encode(hf_config(layers)))
  f:close()

  local plan = shard_plan(layers)
  local weight_map, seed = {}, 1
  for s, shard in ipairs(plan) do
    local file = string.format("model-%05d-of-%05d.safetensors", s, #plan)
    local tensors = {}
    for _, entry in ipairs(shard) do
      local name, shape, kind = entry[1], entry[2], entry[3]
      if kind == "w" then
        tensors[name] = loom.randn(shape, { seed = seed, std = 0.02, dtype = "bf16" })
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
  f:write(json.encode({ metadata = { writer = "bench/llava_7b.lua", layers = tostring(layers) },
    weight_map = weight_map }))
  f:close()
end

-- ---------------------------------------------------------------------------
-- Choosing the size and the cache

-- Free bytes on the file system of `dir` (created if missing).
local function free_disk_bytes(dir)
  os.execute("mkdir -p " .. shell_quote(dir))
  local out = command_output("df -Pk " .. shell_quote(dir) .. " 2>/dev/null")
  local avail = out:match("\n%S+%s+%d+%s+%d+%s+(%d+)")
  return avail and tonumber(avail) * 1024 or 0
end

local function mem_total_bytes()
  local text = read_file("/proc/meminfo") or ""
  return (tonumber(text:match("MemTotal:%s*(%d+)")) or 0) * 1024
end

-- Decoder layers to run: the full 32 unless the weights would not fit in
-- the free disk space (less 2 GiB) or in 80% of the memory, so that they
-- stay in the page cache.
local function choose_layers(opts, cache_root)
  if opts.layers then return opts.layers, "--layers" end
  local full = param_counts(SHAPES.lm.layers)
  local index = cache_root .. "/model.safetensors.index.json"
  if read_file(index) then return SHAPES.lm.layers, "cached" end
  local disk = free_disk_bytes(cache_root:match("^(.*)/[^/]*$") or ".")
  local memory = mem_total_bytes()
  local room = math.min(disk - 2 * GiB, 0.8 * memory)
  if 2 * full.total <= room then return SHAPES.lm.layers, "fits" end
  local fixed = 2 * (full.total - SHAPES.lm.layers * full.lm_layer)
  local layers = math.max(1, math.floor((room - fixed) / (2 * full.lm_layer)))
  return math.min(layers, SHAPES.lm.layers), string.format("only %.1f GB free on disk and %.1f GB of memory",
    disk / 1e9, memory / 1e9)
end

-- ---------------------------------------------------------------------------
-- Measurements

-- Best GFLOP/s over repetitions of `fn` (one n x n x n product) for at
-- least `seconds`, after one warm-up call.
local function best_rate(n, seconds, fn)
  fn()
  local best, start = 0, bench.now()
  repeat
    local t = bench.now()
    fn()
    best = math.max(best, 2 * n ^ 3 / (bench.now() - t) / 1e9)
  until bench.now() - start >= seconds
  return best
end

-- Best GFLOP/s of a square f32 matmul through loom.matmul.
local function sgemm_rate(n, seconds)
  local a = loom.randn({ n, n }, { seed = 101 })
  local b = loom.randn({ n, n }, { seed = 102 })
  local c = loom.empty({ n, n })
  local best = best_rate(n, seconds, function() loom.matmul(a, b, c) end)
  a:free()
  b:free()
  c:free()
  return best
end

-- Best GFLOP/s of loom.linear with a bf16 weight on the bf16 path: x (n, n)
-- f32 against w (n, n) bf16.
local function bf16_linear_rate(n, seconds)
  local x = loom.randn({ n, n }, { seed = 103 })
  local w = loom.randn({ n, n }, { seed = 104, std = 0.02, dtype = "bf16" })
  local y = loom.empty({ n, n })
  local saved = loom.get_linear_path()
  loom.set_linear_path("bf16")
  local best = best_rate(n, seconds, function() loom.linear(x, w, nil, y) end)
  loom.set_linear_path(saved)
  x:free()
  w:free()
  y:free()
  return best
end

-- Bytes per second of one read-sum over `tensors`.
local function read_bandwidth(tensors)
  local _, bytes, seconds = bench.read_sum(tensors)
  return bytes / seconds, bytes, seconds
end

-- The weights one decode step reads in full: every decoder layer's
-- tensors, the final norm and the output head (the embedding table gives
-- one row, so it is left out).
local function decode_weights(model)
  local list = {}
  local function add(t) list[#list + 1] = t end
  for _, layer in ipairs(model.lm.layers) do
    add(layer.input_layernorm.weight)
    add(layer.post_attention_layernorm.weight)
    for _, proj in ipairs({ "q_proj", "k_proj", "v_proj", "o_proj" }) do add(layer[proj].weight) end
    add(layer.mlp.gate.weight)
    add(layer.mlp.up.weight)
    add(layer.mlp.down.weight)
  end
  add(model.lm.norm.weight)
  add(model.lm.lm_head.weight)
  return list
end

local function all_weights(model)
  local list = {}
  for _, t in pairs(model.weights) do list[#list + 1] = t end
  return list
end

-- Seconds of each of `reps` image encodes on `path` (after one warm-up).
local function time_encode(model, pixels, path, reps)
  loom.set_linear_path(path)
  local times = {}
  for i = 0, reps do
    collectgarbage()
    local t = bench.now()
    local features = model:encode_images(pixels)
    local dt = bench.now() - t
    features:free()
    if i > 0 then times[#times + 1] = dt end
  end
  collectgarbage()
  return times
end

-- The 600-position prompt: BOS, text ids, the image token, text ids.
local function prompt_ids()
  local ids, rng = { 1 }, 12345
  for i = 1, TEXT_TOKENS - 1 do
    rng = (rng * 1103515245 + 12345) % 2147483648
    ids[#ids + 1] = 100 + rng % 31000
    if i == 5 then ids[#ids + 1] = SHAPES.lm.vocab end -- the image token (image_token_index)
  end
  return ids
end

-- A full collection after each decoder layer keeps garbage from adding to
-- the peak resident size while the KV cache is live.
local function collect_hook(name)
  if name:find("hidden_states", 1, true) then collectgarbage() end
end

-- Prefill on `path`; returns seconds, the cache and the last logits.
local function time_prefill(model, inputs_embeds, positions, path, capacity)
  loom.set_linear_path(path)
  local cache = model.lm:new_cache(1, capacity)
  collectgarbage()
  local t = bench.now()
  local logits = model.lm:forward({ inputs_embeds = inputs_embeds, positions = positions, cache = cache,
    logits = "last", hook = collect_hook })
  return bench.now() - t, cache, logits
end

local function free_cache(cache)
  for _, kv in ipairs(cache.layers) do kv:free() end
  cache.key_mask:free()
end

-- ---------------------------------------------------------------------------
-- Report

local function machine()
  local cpuinfo = read_file("/proc/cpuinfo") or ""
  local model = cpuinfo:match("model name%s*:%s*([^\n]+)") or "unknown"
  local cpus = 0
  for _ in cpuinfo:gmatch("\nprocessor%s*:") do cpus = cpus + 1 end
  if cpuinfo:match("^processor") then cpus = cpus + 1 end
  local flags = cpuinfo:match("flags%s*:%s*([^\n]+)") or ""
  local isa = {}
  for _, f in ipairs({ "avx512f", "avx512_bf16", "amx_bf16" }) do
    if (" " .. flags .. " "):find(" " .. f .. " ", 1, true) then isa[#isa + 1] = f end
  end
  local l3 = command_output("lscpu 2>/dev/null"):match("L3 cache:%s*([^\n]+)") or "?"
  return string.format("%s, %d logical CPUs, L3 %s, %s, %.1f GB RAM", model, cpus, l3, table.concat(isa, " "),
    mem_total_bytes() / 1e9)
end

local rows = {}
local function row(figure, path, value, bound, fraction, target, others)
  rows[#rows + 1] = { figure, path, value, bound or "", fraction and string.format("%.2f", fraction) or "",
    target or "", others and string.format("%.0f%%", 100 * others) or "" }
end

local function print_table()
  local header = { "figure", "path", "measured", "bound", "fraction", "target", "others' CPU" }
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

-- ---------------------------------------------------------------------------
-- Main

local opts = parse_args(arg or {})
local default_cache = "/tmp/loom-bench/llava7b"

if opts.write_only then
  write_weights(opts.cache, opts.layers)
  os.exit(0)
end

local layers, why = choose_layers(opts, opts.cache or default_cache)
local cache_dir = opts.cache or (layers == SHAPES.lm.layers and default_cache or default_cache .. "-L" .. layers)
local counts = param_counts(layers)
print("machine: " .. machine())
print("load average at start: " .. ((read_file("/proc/loadavg") or "?"):match("^(%S+ %S+ %S+)") or "?"))
print(string.format("model: LLaVA-1.5-7B shapes, %d of %d decoder layers (%s), %.2f G parameters, %.2f GB bf16",
  layers, SHAPES.lm.layers, why, counts.total / 1e9, 2 * counts.total / 1e9))

-- write the cache in a child process when it is missing
if not read_file(cache_dir .. "/model.safetensors.index.json") then
  print("writing the random weights to " .. cache_dir .. " (once)")
  local t = bench.now()
  local cmd = string.format("%s %s --write-weights --cache %s --layers %d", shell_quote(arg[-1]), shell_quote(arg[0]),
    shell_quote(cache_dir), layers)
  assert(os.execute(cmd), "writing the weights failed: " .. cmd)
  print(string.format("  written in %.0f s", bench.now() - t))
end
local cached = json.read(cache_dir .. "/config.json")
if cached.text_config.num_hidden_layers ~= layers then
  error(string.format("%s holds %d decoder layers, not %d: remove it or pass --cache", cache_dir,
    cached.text_config.num_hidden_layers, layers))
end

-- Run `fn` after waiting (up to opts.idle_wait seconds) for other
-- processes to go quiet, and measure their CPU share meanwhile. If they took
-- over 10%, run it again, up to `attempts` times (default 3). The run they
-- disturbed least is kept, and `discard` receives the results of the others.
-- Returns that share and fn's results.
local function measured(fn, attempts, discard)
  local best
  for _ = 1, attempts or 3 do
    wait_for_idle(opts.idle_wait)
    local share = others_share()
    local results = table.pack(fn())
    local s = share()
    local dropped = results
    if best == nil or s < best.share then
      dropped = best and best.results
      best = { share = s, results = results }
    end
    if dropped and discard then discard(table.unpack(dropped, 1, dropped.n)) end
    if s < 0.1 then break end
  end
  return best.share, table.unpack(best.results, 1, best.results.n)
end

local function numbers_text(list, format)
  local out = {}
  for i, v in ipairs(list) do out[i] = string.format(format, v) end
  return table.concat(out, " ")
end

-- (1) compute rates, before the weights are touched so that their buffers
-- do not count in the peak resident size of the model run: the peak of
-- each multiply-add instruction on all threads, then the GEMMs of both paths
local peaks = {}
for _, kind in ipairs({ "fma_f32", "dpbf16", "amx_bf16" }) do
  local share, rate, why_not = measured(function() return bench.peak_gflops(kind, 1) end)
  peaks[kind] = rate
  row(string.format("peak of %s", PEAK_NAMES[kind]), kind == "fma_f32" and "f32" or "bf16",
    rate and string.format("%.0f GFLOP/s", rate) or why_not, nil, nil, nil, share)
end
local others, sgemm = measured(function() return sgemm_rate(4096, 3) end)
row("sgemm 4096^3 (loom.matmul)", "f32", string.format("%.0f GFLOP/s", sgemm),
  peaks.fma_f32 and string.format("%.0f GFLOP/s", peaks.fma_f32), peaks.fma_f32 and sgemm / peaks.fma_f32, nil, others)
-- LOOM_PATH_BF16 multiplies with AMX tiles when the CPU and the kernel
-- allow them (as peak_gflops found), else with vdpbf16ps
local bf16_peak = peaks.amx_bf16 or peaks.dpbf16
local bf16_label = peaks.amx_bf16 and "bf16 (AMX)" or "bf16 (AVX512-BF16)"
local bf16_rate
others, bf16_rate = measured(function() return bf16_linear_rate(4096, 3) end)
row("GEMM 4096^3 (loom.linear, bf16 weight)", bf16_label, string.format("%.0f GFLOP/s", bf16_rate),
  bf16_peak and string.format("%.0f GFLOP/s", bf16_peak), bf16_peak and bf16_rate / bf16_peak, nil, others)
collectgarbage()
note_peak("rates")

-- load: every tensor a view of the file mapping
local t_load = bench.now()
local model = llava.load(cache_dir, { tokenizer = false, preprocessor = false })
local weights = all_weights(model)
local mapped, weight_bytes = 0, 0
for _, t in ipairs(weights) do
  if t:storage_kind() == "mmap" then mapped = mapped + 1 end
  weight_bytes = weight_bytes + t:numel() * 2
end
print(string.format("loaded in %.2f s: %d of %d tensors memory-mapped, %.2f GB", bench.now() - t_load, mapped,
  #weights, weight_bytes / 1e9))

-- first read of every weight: from the page cache (or the disk) into this
-- process's page tables
local bw_first, _, s_first = read_bandwidth(weights)
note_peak("first read")
print(string.format("first read of all weights: %.2f s (%.1f GB/s)", s_first, bw_first / 1e9))

-- (2) bandwidth
local dweights = decode_weights(model)
local _, decode_bytes = read_bandwidth(dweights)
local bws
others, bws = measured(function()
  local list = {}
  for i = 1, 3 do list[i] = read_bandwidth(dweights) end
  return list
end)
row(string.format("read-sum of the decode weights (%.2f GiB)", decode_bytes / GiB), "",
  string.format("%.1f GB/s (%.1f-%.1f)", median(bws) / 1e9, math.min(table.unpack(bws)) / 1e9,
  math.max(table.unpack(bws)) / 1e9), nil, nil, nil, others)

-- (3) one request on the bf16 path: image encode, prefill of the
-- 600-position prompt and the timed decode steps. The peak resident size is
-- reset first (Linux: "5" in /proc/self/clear_refs) and read right after,
-- so that it covers the mapped weights and this request, not the timing
-- runs before and after it.
local flops, run_layers = encode_flops()
local pixels = loom.randn({ 1, 3, SHAPES.vision.image, SHAPES.vision.image }, { seed = 7 })
collectgarbage()
local clear = io.open("/proc/self/clear_refs", "w")
local peak_reset = clear ~= nil and clear:write("5") ~= nil and clear:close() == true
loom.set_linear_path("bf16")
local features = model:encode_images(pixels)
local inputs_embeds, _, positions, next_positions = model:build_inputs({ prompt_ids() }, nil, features)
features:free()
local t_prompt = inputs_embeds:size(2)
local capacity = t_prompt + opts.decode_steps + 1
local _, cache, logits = time_prefill(model, inputs_embeds, positions, "bf16", capacity)

-- decode: a read-sum of the same weights just before and just after each
-- step gives that step's bound
local step_times, step_bounds, step_others = {}, {}, {}
local position = next_positions[1]
for i = 1, opts.decode_steps do
  collectgarbage()
  local next_id = logits:select(1, 1):select(1, 1):argmax():item() -- (1, 1, V) -> (V)
  local before, after
  step_others[i] = measured(function()
    before = read_bandwidth(dweights)
    local t = bench.now()
    logits = model.lm:forward({ input_ids = loom.tensor({ { next_id } }, "i64"),
      positions = loom.tensor({ { position } }, "i64"), cache = cache, logits = "last" })
    step_times[i] = bench.now() - t
    after = read_bandwidth(dweights)
  end, 1)
  step_bounds[i] = decode_bytes / ((before + after) / 2)
  position = position + 1
end
local request_peak = status_kib("VmHWM") * 1024
note_peak("request")
free_cache(cache)
collectgarbage()

-- (4) image encode, f32 and bf16 paths
for _, path in ipairs({ "f32", "bf16" }) do
  local times
  others, times = measured(function() return time_encode(model, pixels, path, opts.reps) end)
  local rate = path == "f32" and sgemm or bf16_rate
  local bound = flops / (rate * 1e9)
  row(string.format("image encode (%d CLIP layers + projector, %.0f GFLOP)", run_layers, flops / 1e9),
    path == "bf16" and bf16_label or path,
    string.format("%.3f s", median(times)), string.format("%.3f s", bound), bound / median(times),
    path == "bf16" and "<= 1.5 s" or nil, others)
  print(string.format("image encode on the %s path: %s s", path, numbers_text(times, "%.3f")))
end
note_peak("encode")

-- (5) prefill of the same prompt on both paths. Each timed run's cache is
-- freed at once, so that a repeated run never keeps two caches alive
local pflops = prefill_flops(t_prompt, layers)
for _, path in ipairs({ "f32", "bf16" }) do
  local seconds
  others, seconds = measured(function()
    local dt, timed_cache = time_prefill(model, inputs_embeds, positions, path, capacity)
    free_cache(timed_cache)
    return dt
  end)
  local rate = path == "f32" and sgemm or bf16_rate
  local bound = pflops / (rate * 1e9)
  row(string.format("prefill %d positions (%.0f GFLOP)", t_prompt, pflops / 1e9), path == "bf16" and bf16_label or path,
    string.format("%.1f tok/s (%.2f s)", t_prompt / seconds, seconds),
    string.format("%.1f tok/s", t_prompt / bound), bound / seconds, nil, others)
end
note_peak("prefill")

-- (6) decode and memory
local ratios = {}
for i = 1, #step_times do ratios[i] = step_bounds[i] / step_times[i] end
row(string.format("decode, %.2f GB of weights per token", decode_bytes / 1e9), "bf16 weights, " .. loom.linear_kernel() .. " kernel",
  string.format("%.3f s/token", median(step_times)), string.format("%.3f s/token", median(step_bounds)),
  median(ratios), ">= 0.85", median(step_others))
print("decode steps (s): " .. numbers_text(step_times, "%.3f"))
print("their bounds (s): " .. numbers_text(step_bounds, "%.3f"))
-- (7) batched decoding, as loom.scheduler runs it: one step of S sequences
-- through lm:forward_segments, each on its own cache after a short prompt of
-- its own. The step reads the weights once for all S rows, so the bound is
-- S tokens per weight read. Short prompts keep the caches small.
local BATCH_PROMPT = 16
for _, nseq in ipairs({ 1, 8, 16 }) do
  local caches, segs = {}, {}
  for i = 1, nseq do
    caches[i] = model.lm:new_cache(1, BATCH_PROMPT + 4)
    segs[i] = { embeds = loom.randn({ 1, BATCH_PROMPT, SHAPES.lm.hidden }, { seed = 100 + i, std = 0.02 }),
      positions = loom.arange(0, BATCH_PROMPT, 1, "i64"):view(1, BATCH_PROMPT), cache = caches[i] }
  end
  model.lm:forward_segments(segs)
  local step = 0
  local before, after, dt
  local share = measured(function()
    step = step + 1
    for i = 1, nseq do
      segs[i] = { embeds = loom.randn({ 1, 1, SHAPES.lm.hidden }, { seed = 200 + i, std = 0.02 }),
        positions = loom.tensor({ { BATCH_PROMPT + step - 1 } }, "i64"), cache = caches[i] }
    end
    collectgarbage()
    before = read_bandwidth(dweights)
    local t = bench.now()
    model.lm:forward_segments(segs)
    dt = bench.now() - t
    after = read_bandwidth(dweights)
  end, 3)
  local bound = decode_bytes / ((before + after) / 2)
  row(string.format("batched decode step, %d sequence%s", nseq, nseq > 1 and "s" or ""), "bf16 (scheduler)",
    string.format("%.1f tok/s (%.3f s)", nseq / dt, dt), string.format("%.1f tok/s", nseq / bound), bound / dt, nil,
    share)
  for i = 1, nseq do free_cache(caches[i]) end
  collectgarbage()
end

local run_peak = status_kib("VmHWM") * 1024
row(peak_reset and "peak resident, one request (VmHWM)" or "peak resident, whole run (VmHWM)", "",
  string.format("%.2f GB", request_peak / 1e9), string.format("%.2f GB weights", weight_bytes / 1e9),
  request_peak / weight_bytes, "<= 1.10")
if peak_reset then
  row("peak resident, request and timing runs", "", string.format("%.2f GB", run_peak / 1e9),
    string.format("%.2f GB weights", weight_bytes / 1e9), run_peak / weight_bytes)
end
print(string.format("resident at the end: %.2f GB file-backed, %.2f GB anonymous", status_kib("RssFile") * 1024 / 1e9,
  status_kib("RssAnon") * 1024 / 1e9))
print("peak resident (GB) after each phase: " .. table.concat(peak_steps, ", ")
  .. (peak_reset and " (reset before the request)" or ""))

print()
print_table()
print()
print("fraction: bound / measured time (for rates and tok/s: measured / bound); peak resident: resident /")
print("weight bytes. Bounds use the rates measured in this run: the f32 path at the sgemm rate, the bf16")
print("path at the bf16 GEMM rate. others' CPU: share of the machine's CPU time that other processes took")
print("during the measurement.")
