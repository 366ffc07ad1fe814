-- Tests of loom.tokenizers, the tokenizer loader of checkpoint directories:
-- which file wins, added_tokens.json, the settings of tokenizer_config.json,
-- and the nil, message, code results of a directory without a tokenizer or
-- with a broken file.
package.path = arg[0]:gsub("[^/]*$", "") .. "?.lua;" .. package.path
local check = require("check")
local loom = require("loom")
local json = require("loom.json")
local tokenizers = require("loom.tokenizers")

local root = arg[0]:gsub("tests/lua/[^/]*$", "")
local BLIP2_DIR = root .. "examples/models/tiny-blip2"
local LLAVA_DIR = root .. "examples/models/tiny-llava"
local SP_MODEL = root .. "tests/golden/tokenizers/sentencepiece_bpe/sp_bpe.model"

local function run(name, fn)
  local ok, err = xpcall(fn, debug.traceback)
  check.check(ok, name .. ": " .. tostring(err))
end

local function quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

local dirs = {}
local function temp_dir()
  local path = os.tmpname()
  os.remove(path)
  assert(os.execute("mkdir -p " .. quote(path)))
  dirs[#dirs + 1] = path
  return path
end

local function read_file(path)
  local f = assert(io.open(path, "rb"))
  local data = f:read("a")
  f:close()
  return data
end

local function write_file(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end

local function copy_files(src, dst, names)
  for _, name in ipairs(names) do write_file(dst .. "/" .. name, read_file(src .. "/" .. name)) end
end

-- A tokenizer.json with the tiny BLIP-2 vocabulary and merges, whose
-- special tokens are <s> <pad> </s> <unk> and which adds no BOS.
local function write_tokenizer_json(path)
  local vocab = json.read(BLIP2_DIR .. "/vocab.json")
  local merges = {}
  for line in read_file(BLIP2_DIR .. "/merges.txt"):gmatch("[^\n]+") do
    if not line:match("^#version") then merges[#merges + 1] = line end
  end
  local added = {}
  for i, text in ipairs({ "<s>", "<pad>", "</s>", "<unk>" }) do
    added[i] = { id = i - 1, content = text, single_word = false, lstrip = false, rstrip = false,
      normalized = true, special = true }
  end
  local byte_level = { type = "ByteLevel", add_prefix_space = false, trim_offsets = true, use_regex = true }
  write_file(path, json.encode({
    version = "1.0", added_tokens = added, normalizer = json.null, pre_tokenizer = byte_level,
    post_processor = byte_level, decoder = byte_level,
    model = { type = "BPE", dropout = json.null, unk_token = json.null, continuing_subword_prefix = "",
      end_of_word_suffix = "", fuse_unk = false, byte_fallback = false, vocab = vocab, merges = merges },
  }))
end

local BPE_FILES = { "vocab.json", "merges.txt" }

run("no tokenizer file", function()
  local dir = temp_dir()
  local tok, message, code = tokenizers.load(dir)
  check.equal(tok, nil, "no tokenizer")
  check.equal(code, "ENOENT", "code")
  check.check(message:find("no tokenizer in '" .. dir .. "': expected tokenizer.json or tokenizer.model", 1, true),
    "message names the directory and the files: " .. message)
  check.check(message:find("vocab.json and merges.txt", 1, true), "message names vocab.json and merges.txt")

  -- vocab.json alone is not a tokenizer
  copy_files(BLIP2_DIR, dir, { "vocab.json" })
  local half, _, half_code = tokenizers.load(dir)
  check.equal(half, nil, "vocab.json without merges.txt gives no tokenizer")
  check.equal(half_code, "ENOENT", "vocab.json without merges.txt")
end)

run("vocab.json and merges.txt", function()
  local dir = temp_dir()
  copy_files(BLIP2_DIR, dir, BPE_FILES)
  local tok, settings = tokenizers.load(dir)
  check.check(tok ~= nil, "loads: " .. tostring(settings))
  check.equal(settings.path, dir .. "/vocab.json", "settings.path")
  check.equal(tok:source(), "bpe_files", "source")
  -- without tokenizer_config.json the loader's defaults stay: <s> is BOS,
  -- and encode adds nothing
  check.equal(tok:special_id("bos"), 0, "bos without tokenizer_config.json")
  check.equal(tok:encode(" the"), { tok:token_to_id("Ġthe") }, "no BOS by default")

  -- OPT's tokenizer_config.json: </s> is BOS and comes first
  copy_files(BLIP2_DIR, dir, { "tokenizer_config.json" })
  tok, settings = tokenizers.load(dir)
  check.equal(tok:special_id("bos"), 2, "bos from tokenizer_config.json")
  check.equal(tok:special_id("unk"), 2, "unk from tokenizer_config.json")
  check.equal(tok:special_id("pad"), 1, "pad from tokenizer_config.json")
  check.equal(tok:encode(" the"), { 2, tok:token_to_id("Ġthe") }, "add_bos_token from tokenizer_config.json")
  check.equal(settings.add_bos_token, true, "settings.add_bos_token")
  check.equal(settings.bos_token, "</s>", "settings.bos_token")
  check.equal(settings.tokenizer_class, "GPT2Tokenizer", "settings.tokenizer_class")

  -- AddedToken tables give their content; unknown tokens leave the id alone
  write_file(dir .. "/tokenizer_config.json", json.encode({
    bos_token = { content = "<unk>", special = true }, eos_token = "<not in the vocabulary>",
  }))
  tok, settings = tokenizers.load(dir)
  check.equal(tok:special_id("bos"), 3, "bos from an AddedToken table")
  check.equal(tok:special_id("eos"), 2, "eos stays when its token is unknown")
  check.equal(settings.add_bos_token, nil, "settings.add_bos_token absent")
end)

run("tokenizer.json wins and is not changed", function()
  local dir = temp_dir()
  copy_files(BLIP2_DIR, dir, { "vocab.json", "merges.txt", "tokenizer_config.json" })
  write_tokenizer_json(dir .. "/tokenizer.json")
  local tok, settings = tokenizers.load(dir)
  check.check(tok ~= nil, "loads: " .. tostring(settings))
  check.equal(settings.path, dir .. "/tokenizer.json", "tokenizer.json is read first")
  check.equal(tok:source(), "hf_json", "source")
  check.equal(settings.add_bos_token, true, "settings are still returned")
  check.equal(tok:encode(" the"), { tok:token_to_id("Ġthe") }, "add_bos_token does not apply to tokenizer.json")

  -- the same ids as the vocab.json + merges.txt pair
  local pair = assert(loom.tokenizer.load_bpe_files(dir .. "/vocab.json", dir .. "/merges.txt"))
  local text = "A cat sat on the mat, and then it left."
  check.equal(tok:encode(text), pair:encode(text), "tokenizer.json and vocab.json agree")
end)

run("tokenizer.model with added tokens", function()
  -- the LLaVA layout: a SentencePiece model, added_tokens.json and
  -- tokenizer_config.json with legacy
  local tok, settings = tokenizers.load(LLAVA_DIR)
  check.check(tok ~= nil, "loads: " .. tostring(settings))
  check.equal(tok:source(), "sentencepiece", "source")
  local added = json.read(LLAVA_DIR .. "/added_tokens.json")
  for text, id in pairs(added) do check.equal(tok:token_to_id(text), id, "added token " .. text) end
  check.equal(settings.legacy, true, "settings.legacy")

  -- the ids match the SentencePiece model itself
  local sp = assert(loom.tokenizer.load(SP_MODEL))
  local text = "Describe the image in one sentence."
  check.equal(tok:encode(text, { add_bos = false }), sp:encode(text), "ids of the SentencePiece model")
end)

run("broken files", function()
  local dir = temp_dir()
  write_file(dir .. "/tokenizer.json", "{ not json")
  local tok, message, code = tokenizers.load(dir)
  check.equal(tok, nil, "broken tokenizer.json")
  check.equal(code, "EFORMAT", "code of a broken tokenizer.json")
  check.check(message:find("tokenizer.json", 1, true), "message names the file: " .. message)

  dir = temp_dir()
  copy_files(BLIP2_DIR, dir, BPE_FILES)
  write_file(dir .. "/added_tokens.json", "[1, 2")
  tok, message, code = tokenizers.load(dir)
  check.equal(tok, nil, "no tokenizer with a broken added_tokens.json")
  check.equal(code, "EFORMAT", "code of a broken added_tokens.json")
  check.check(message:find("added_tokens.json: invalid JSON", 1, true), "message names the file: " .. message)

  -- an added token must get the id the file gives it
  write_file(dir .. "/added_tokens.json", json.encode({ ["<image>"] = 5000 }))
  tok, message, code = tokenizers.load(dir)
  check.equal(tok, nil, "no tokenizer with a wrong added token id")
  check.equal(code, "EFORMAT", "code of a wrong added token id")
  check.check(message:find("token '<image>' has id 5000 but the tokenizer gives it id 3260", 1, true),
    "message gives both ids: " .. message)

  os.remove(dir .. "/added_tokens.json")
  write_file(dir .. "/tokenizer_config.json", "{")
  tok, message, code = tokenizers.load(dir)
  check.equal(tok, nil, "no tokenizer with a broken tokenizer_config.json")
  check.equal(code, "EFORMAT", "code of a broken tokenizer_config.json")
  check.check(message:find("tokenizer_config.json: invalid JSON", 1, true), "message names the file: " .. message)
end)

run("unreadable files", function()
  -- a directory in place of a file is opened but cannot be read
  local dir = temp_dir()
  assert(os.execute("mkdir " .. quote(dir .. "/tokenizer.json")))
  local tok, message, code = tokenizers.load(dir)
  check.equal({ tok, code }, { nil, "EISDIR" }, "tokenizer.json is a directory")
  check.check(message:find(dir .. "/tokenizer.json: Is a directory", 1, true), "message names the file: " .. message)

  dir = temp_dir()
  copy_files(BLIP2_DIR, dir, BPE_FILES)
  assert(os.execute("mkdir " .. quote(dir .. "/added_tokens.json")))
  tok, message, code = tokenizers.load(dir)
  check.equal({ tok, code }, { nil, "EISDIR" }, "added_tokens.json is a directory")
  check.check(message:find("added_tokens.json: Is a directory", 1, true), "message names the file: " .. message)
end)

-- The loaders of the binding return an errno name when a file cannot be
-- opened and "EFORMAT" when its content is not a tokenizer.
run("loader codes", function()
  local tk = loom.tokenizer
  local dir = temp_dir()
  local missing = dir .. "/missing.model"
  local cases = {
    { "load of a missing file", function() return tk.load(missing) end, "ENOENT", missing },
    { "load of a directory", function() return tk.load(dir) end, "EISDIR", dir },
    { "load_wordpiece of a missing file", function() return tk.load_wordpiece(missing, true) end, "ENOENT", missing },
    { "load_bpe_files without vocab", function() return tk.load_bpe_files(missing, BLIP2_DIR .. "/merges.txt") end,
      "ENOENT", missing },
    { "load_bpe_files without merges", function() return tk.load_bpe_files(BLIP2_DIR .. "/vocab.json", missing) end,
      "ENOENT", missing },
  }
  for _, case in ipairs(cases) do
    local tok, message, code = case[2]()
    check.equal({ tok, code }, { nil, case[3] }, case[1])
    check.check(message and message:find(case[4], 1, true),
      case[1] .. ": message names the path: " .. tostring(message))
  end

  local binary = dir .. "/binary.model"
  write_file(binary, "\1\2\0\3")
  local tok, message, code = tk.load(binary)
  check.equal({ tok, code }, { nil, "EFORMAT" }, "load of binary data")
  check.check(message:find("not a tokenizer file", 1, true), "binary data message: " .. message)
  tok, message, code = tk.load_buffer("{ not json", "broken.json")
  check.equal({ tok, code }, { nil, "EFORMAT" }, "load_buffer of broken JSON")
  check.check(message:find("broken.json", 1, true), "load_buffer message names the buffer: " .. message)
  local bad_merges = dir .. "/merges.txt"
  write_file(bad_merges, "#version: 0.2\nonly-one-field\n")
  tok, message, code = tk.load_bpe_files(BLIP2_DIR .. "/vocab.json", bad_merges)
  check.equal({ tok, code }, { nil, "EFORMAT" }, "load_bpe_files of a malformed merges file")
  check.check(message:find(bad_merges, 1, true), "malformed merges message names the file: " .. message)
end)

for _, dir in ipairs(dirs) do os.execute("rm -rf " .. quote(dir)) end
check.summary()
