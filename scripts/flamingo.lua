-- Few-shot captioning or visual question answering with a Flamingo-style
-- checkpoint (IDEFICS or OpenFlamingo):
--   loom scripts/flamingo.lua --model DIR [--shots FILE.jsonl] --image FILE [--prompt TEXT]
-- Each line of the shots file is one example: an image and the text that
-- follows it. The query image comes last, followed by --prompt.
local flamingo = require("loom.flamingo")
local json = require("loom.json")

local HELP = [[
usage: loom scripts/flamingo.lua --model DIR [--shots FILE.jsonl] --image FILE [--prompt TEXT] [options]

Few-shot captioning or visual question answering with an IDEFICS or
OpenFlamingo checkpoint directory (config.json with model_type "idefics" or
"openflamingo", model.safetensors, preprocessor_config.json and a tokenizer),
or an OpenFlamingo release layout whose config.json names checkpoint.pt and
the vision, language model and tokenizer directories.
The prompt is each shot's image and text in order, then the query image and
--prompt; OpenFlamingo's <|endofchunk|> closes each shot. Without --shots
the model sees the query image and --prompt alone (zero-shot).

  --model DIR               checkpoint directory
  --shots FILE              JSON Lines file, one shot per line:
                              {"image": "cat.jpg", "text": "An image of a cat."}
                              {"image": "dog.jpg", "question": "What is it?", "answer": "a dog"}
                            a question and answer become "Question: Q Answer: A";
                            image paths are relative to the shots file's folder
  --image FILE              query image (PNG, JPEG, BMP or GIF)
  --prompt TEXT             text after the query image (default empty: the
                            model continues with a caption); for questions,
                            e.g. "Question: What is it? Answer:"
  --max-new-tokens N        maximum number of tokens to generate (default 20)
  --temperature T           sampling temperature; 0 decodes greedily (default 0)
  --top-k K                 sample only among the K most likely tokens (default 0: all)
  --top-p P                 sample from the smallest set of tokens whose
                            probability reaches P (default 1: all)
  --seed N                  seed of the sampler (default 0)
  --stop TEXT               stop when the text contains TEXT (repeatable)
  --stream                  print the text while it is generated
  --quiet                   do not log the model's configuration to stderr
  -h, --help                show this help
]]

local function fail(message, status)
  io.stderr:write("flamingo: ", message, "\n")
  if status == 2 then io.stderr:write("(see --help)\n") end
  os.exit(status or 1)
end

local NUMBER_OPTIONS = {
  ["--max-new-tokens"] = "max_new_tokens", ["--temperature"] = "temperature", ["--top-k"] = "top_k",
  ["--top-p"] = "top_p", ["--seed"] = "seed",
}
local INTEGER_OPTIONS = { max_new_tokens = true, top_k = true, seed = true }
local VALUE_OPTIONS = {
  ["--model"] = "model", ["--shots"] = "shots", ["--image"] = "image", ["--prompt"] = "prompt", ["--stop"] = "stop",
}

local function parse(args)
  local opts = { max_new_tokens = 20, stop = {}, prompt = "" }
  local i = 1
  while i <= #args do
    local a, value = args[i], args[i + 1]
    if a == "-h" or a == "--help" then
      io.write(HELP)
      os.exit(0)
    elseif a == "--stream" then
      opts.stream, i = true, i + 1
    elseif a == "--quiet" then
      opts.quiet, i = true, i + 1
    elseif VALUE_OPTIONS[a] then
      if value == nil then fail("option " .. a .. " needs a value", 2) end
      if a == "--stop" then opts.stop[#opts.stop + 1] = value else opts[VALUE_OPTIONS[a]] = value end
      i = i + 2
    elseif NUMBER_OPTIONS[a] then
      local key = NUMBER_OPTIONS[a]
      local n = tonumber(value or "")
      if n == nil then fail(string.format("option %s needs a number, got '%s'", a, tostring(value)), 2) end
      if INTEGER_OPTIONS[key] then
        n = math.tointeger(n)
        if n == nil then fail(string.format("option %s needs an integer, got '%s'", a, value), 2) end
      end
      opts[key], i = n, i + 2
    else
      fail("unknown argument '" .. a .. "'", 2)
    end
  end
  for _, required in ipairs({ "model", "image" }) do
    if opts[required] == nil then fail("missing --" .. required, 2) end
  end
  return opts
end

-- The prompt list of a shots file: image, text, image, text, ... Raises
-- "FILE:LINE: ..." for a line that is not a JSON object with an image and
-- a text (or question and answer), or whose image does not load.
local function read_shots(path)
  local f, err = io.open(path, "rb")
  if f == nil then error(string.format("cannot open the shots file: %s", err), 0) end
  local folder = path:match("^(.*)/[^/]*$") or "."
  local list, n = {}, 0
  for line in f:lines() do
    n = n + 1
    if line:match("%S") then
      local where = string.format("%s:%d", path, n)
      local ok, shot = pcall(json.decode, line)
      if not ok then
        f:close()
        error(string.format("%s: invalid JSON (%s)", where, shot), 0)
      end
      if type(shot) ~= "table" or type(shot.image) ~= "string" then
        f:close()
        error(string.format("%s: expected an object with \"image\" and \"text\" (or \"question\" and \"answer\")", where), 0)
      end
      local text = shot.text
      if text == nil and type(shot.question) == "string" and type(shot.answer) == "string" then
        text = string.format("Question: %s Answer: %s", shot.question, shot.answer)
      end
      if type(text) ~= "string" then
        f:close()
        error(string.format("%s: missing \"text\" (or \"question\" and \"answer\")", where), 0)
      end
      local image = shot.image:sub(1, 1) == "/" and shot.image or (folder .. "/" .. shot.image)
      local img, load_error = require("loom").image.load(image, { keep_alpha = true })
      if img == nil then
        f:close()
        error(string.format("%s: cannot load the shot's image: %s", where, load_error), 0)
      end
      list[#list + 1] = img
      list[#list + 1] = text
    end
  end
  f:close()
  if #list == 0 then error(string.format("%s has no shots", path), 0) end
  return list
end

-- The family module of a checkpoint directory, from its config.json.
local FAMILIES = { idefics = "loom.idefics", openflamingo = "loom.openflamingo" }

local function load_model(dir)
  local cfg = flamingo.read_json(dir, "config.json", "model config")
  local module = FAMILIES[cfg.model_type]
  if module == nil then
    error(string.format("'%s' has model_type '%s' (expected 'idefics' or 'openflamingo')",
      flamingo.path_join(dir, "config.json"), tostring(cfg.model_type)), 0)
  end
  return require(module).load(dir)
end

local opts = parse(arg or {})
if opts.quiet then require("loom.log").set_level("warning") end
local ok, err = pcall(function()
  local prompt = opts.shots and read_shots(opts.shots) or {}
  local query, load_error = require("loom").image.load(opts.image, { keep_alpha = true })
  if query == nil then error(string.format("cannot load the query image: %s", load_error), 0) end
  prompt[#prompt + 1] = query
  if opts.prompt ~= "" then prompt[#prompt + 1] = opts.prompt end

  local model = load_model(opts.model)
  prompt.max_new_tokens = opts.max_new_tokens
  prompt.temperature, prompt.top_k, prompt.top_p, prompt.seed = opts.temperature, opts.top_k, opts.top_p, opts.seed
  prompt.stop = #opts.stop > 0 and opts.stop or nil
  if opts.stream then
    prompt.stream = function(piece)
      io.write(piece)
      io.flush()
    end
  end
  local result = model:generate(prompt)
  if opts.stream then io.write("\n") else print(result.text) end
end)
if not ok then fail((tostring(err):gsub("^[^:\n]+%.lua:%d+: ", ""))) end
