-- The tokenizer of a Hugging Face checkpoint directory, shared by the model
-- families: tokenizer.json, a SentencePiece tokenizer.model, or GPT-2 style
-- vocab.json + merges.txt, then the ids of added_tokens.json and the
-- settings of tokenizer_config.json. Loading opens files, so failures return
-- nil, message, code (as io.open does) instead of raising.
local loom = require("loom.core")
local json = require("loom.json")

local M = {}

local function path_join(dir, name)
  return (dir:gsub("/+$", "")) .. "/" .. name
end

local function file_exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

-- The value of an optional JSON file of the checkpoint: nil when the file
-- does not exist, or nil, a message and a code ("EFORMAT" for invalid JSON)
-- when it cannot be read.
local function read_optional_json(path)
  local ok, value, message, code = pcall(json.read, path)
  if not ok then return nil, value, "EFORMAT" end
  if value == nil and code ~= "ENOENT" then return nil, message, code end
  return value
end

-- Add the tokens of added_tokens.json ({"text": id}) in id order. Each must
-- get the id the file gives it. Returns true, or nil, a message and a code.
local function add_tokens(tok, path)
  local added, message, code = read_optional_json(path)
  if message then return nil, message, code end
  if added == nil then return true end
  local list = {}
  for text, id in pairs(added) do list[#list + 1] = { text, id } end
  table.sort(list, function(a, b) return a[2] < b[2] end)
  for _, entry in ipairs(list) do
    local id = tok:add_token(entry[1], true)
    if id ~= entry[2] then
      return nil, string.format("%s: token '%s' has id %s but the tokenizer gives it id %d", path, entry[1],
        tostring(entry[2]), id), "EFORMAT"
    end
  end
  return true
end

-- The text of a special-token entry of tokenizer_config.json: a string, or
-- an AddedToken table with a "content" field.
local function token_text(entry)
  if type(entry) == "string" then return entry end
  if type(entry) == "table" and type(entry.content) == "string" then return entry.content end
  return nil
end

-- Settings of tokenizer_config.json that encoding callers may need. Keys are
-- absent when the file or the entry is.
local function read_settings(path)
  local cfg, message, code = read_optional_json(path)
  if message then return nil, message, code end
  local settings = {}
  if cfg == nil then return settings end
  for _, key in ipairs({ "legacy", "add_bos_token", "add_eos_token" }) do
    if type(cfg[key]) == "boolean" then settings[key] = cfg[key] end
  end
  for _, key in ipairs({ "bos_token", "eos_token", "pad_token", "unk_token" }) do
    settings[key] = token_text(cfg[key])
  end
  if type(cfg.tokenizer_class) == "string" then settings.tokenizer_class = cfg.tokenizer_class end
  return settings
end

-- Apply tokenizer_config.json's special tokens and add_bos_token /
-- add_eos_token to a tokenizer read from tokenizer.model or vocab.json, as
-- Hugging Face's slow tokenizers take them from that file. A special token
-- that is not in the vocabulary is left as the loader set it.
local function apply_settings(tok, settings)
  for _, which in ipairs({ "bos", "eos", "pad", "unk" }) do
    local text = settings[which .. "_token"]
    local id = text and tok:token_to_id(text)
    if id then tok:set_special_id(which, id) end
  end
  local defaults = {}
  if settings.add_bos_token ~= nil then defaults.add_bos = settings.add_bos_token end
  if settings.add_eos_token ~= nil then defaults.add_eos = settings.add_eos_token end
  if next(defaults) then tok:set_defaults(defaults) end
end

-- Load the tokenizer of checkpoint directory `dir`. The first of these that
-- exists is read: tokenizer.json, tokenizer.model, vocab.json with
-- merges.txt. added_tokens.json, when present, adds its tokens with their
-- ids. For tokenizer.model and vocab.json, tokenizer_config.json sets the
-- special token ids and whether encode adds BOS/EOS by default (OPT's
-- tokenizer prepends "</s>"). A tokenizer.json carries its own, so it is not
-- changed. Returns the tokenizer and the settings read from
-- tokenizer_config.json (legacy, add_bos_token, add_eos_token, bos_token,
-- eos_token, pad_token, unk_token, tokenizer_class, plus `path`, the file the
-- vocabulary came from). On failure returns nil, a message and a code: "ENOENT" when the
-- directory has no tokenizer file, else the code of the file that failed: an
-- errno name when it cannot be read, "EFORMAT" when its content is invalid.
-- Raises only when this build of loom has no tokenizer binding.
function M.load(dir)
  local tk = loom.tokenizer
  if tk == nil then error("this build of loom has no tokenizer binding (loom.tokenizer)", 2) end

  local tok, err, code, path
  local json_path, model_path = path_join(dir, "tokenizer.json"), path_join(dir, "tokenizer.model")
  local vocab_path, merges_path = path_join(dir, "vocab.json"), path_join(dir, "merges.txt")
  if file_exists(json_path) then
    path = json_path
  elseif file_exists(model_path) then
    path = model_path
  elseif file_exists(vocab_path) and file_exists(merges_path) then
    path = vocab_path
    tok, err, code = tk.load_bpe_files(vocab_path, merges_path)
  else
    return nil, string.format("no tokenizer in '%s': expected tokenizer.json or tokenizer.model, "
      .. "or vocab.json and merges.txt", dir), "ENOENT"
  end
  if path ~= vocab_path then tok, err, code = tk.load(path) end
  if tok == nil then return nil, err, code end

  local ok, added_err, added_code = add_tokens(tok, path_join(dir, "added_tokens.json"))
  if not ok then return nil, added_err, added_code end
  local settings, settings_err, settings_code = read_settings(path_join(dir, "tokenizer_config.json"))
  if settings == nil then return nil, settings_err, settings_code end
  if path ~= json_path then apply_settings(tok, settings) end
  settings.path = path
  return tok, settings
end

return M
