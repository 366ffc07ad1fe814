-- JSON decoding and encoding in pure Lua, for config.json, tokenizer and test
-- case files. Objects become tables with string keys, arrays become sequences
-- (an empty array decodes to a table marked by json.is_array), null becomes
-- json.null so keys holding null stay visible.
local M = {}

M.null = setmetatable({}, { __tostring = function() return "null" end })

local array_mark = setmetatable({}, { __mode = "k" })

-- Whether a decoded table was a JSON array (also true for an empty one).
function M.is_array(t)
  return array_mark[t] == true
end

-- Mark a table so that encode writes it as an array even when empty.
function M.array(t)
  t = t or {}
  array_mark[t] = true
  return t
end

local escapes = { ['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n", r = "\r", t = "\t" }

local function decode_error(text, pos, what)
  local line = 1
  for _ in text:sub(1, pos - 1):gmatch("\n") do line = line + 1 end
  error(string.format("invalid JSON at line %d (byte %d): %s", line, pos, what), 0)
end

local function skip_space(text, pos)
  return text:find("[^ \t\r\n]", pos) or #text + 1
end

local decode_value

local function decode_string(text, pos)
  -- pos is at the opening quote
  local parts, i = {}, pos + 1
  while true do
    local j = text:find('["\\]', i)
    if not j then decode_error(text, pos, "unterminated string") end
    parts[#parts + 1] = text:sub(i, j - 1)
    if text:sub(j, j) == '"' then return table.concat(parts), j + 1 end
    local c = text:sub(j + 1, j + 1)
    if c == "u" then
      local hex = text:sub(j + 2, j + 5)
      if not hex:match("^%x%x%x%x$") then decode_error(text, j, "invalid \\u escape") end
      local code = tonumber(hex, 16)
      local nexti = j + 6
      -- a UTF-16 surrogate pair encodes one code point above U+FFFF
      if code >= 0xD800 and code <= 0xDBFF and text:sub(nexti, nexti + 1) == "\\u" then
        local low = tonumber(text:sub(nexti + 2, nexti + 5), 16)
        if low and low >= 0xDC00 and low <= 0xDFFF then
          code = 0x10000 + (code - 0xD800) * 0x400 + (low - 0xDC00)
          nexti = nexti + 6
        end
      end
      parts[#parts + 1] = utf8.char(code)
      i = nexti
    elseif escapes[c] then
      parts[#parts + 1] = escapes[c]
      i = j + 2
    else
      decode_error(text, j, "invalid escape '\\" .. c .. "'")
    end
  end
end

local function decode_array(text, pos)
  local result, n = M.array({}), 0
  pos = skip_space(text, pos + 1)
  if text:sub(pos, pos) == "]" then return result, pos + 1 end
  while true do
    local value
    value, pos = decode_value(text, pos)
    n = n + 1
    result[n] = value
    pos = skip_space(text, pos)
    local c = text:sub(pos, pos)
    if c == "]" then return result, pos + 1 end
    if c ~= "," then decode_error(text, pos, "expected ',' or ']' in array") end
    pos = skip_space(text, pos + 1)
  end
end

local function decode_object(text, pos)
  local result = {}
  pos = skip_space(text, pos + 1)
  if text:sub(pos, pos) == "}" then return result, pos + 1 end
  while true do
    if text:sub(pos, pos) ~= '"' then decode_error(text, pos, "expected a string key") end
    local key
    key, pos = decode_string(text, pos)
    pos = skip_space(text, pos)
    if text:sub(pos, pos) ~= ":" then decode_error(text, pos, "expected ':' after key") end
    local value
    value, pos = decode_value(text, skip_space(text, pos + 1))
    result[key] = value
    pos = skip_space(text, pos)
    local c = text:sub(pos, pos)
    if c == "}" then return result, pos + 1 end
    if c ~= "," then decode_error(text, pos, "expected ',' or '}' in object") end
    pos = skip_space(text, pos + 1)
  end
end

decode_value = function(text, pos)
  pos = skip_space(text, pos)
  local c = text:sub(pos, pos)
  if c == "{" then return decode_object(text, pos) end
  if c == "[" then return decode_array(text, pos) end
  if c == '"' then return decode_string(text, pos) end
  if text:sub(pos, pos + 3) == "true" then return true, pos + 4 end
  if text:sub(pos, pos + 4) == "false" then return false, pos + 5 end
  if text:sub(pos, pos + 3) == "null" then return M.null, pos + 4 end
  if text:sub(pos, pos + 2) == "NaN" then return 0 / 0, pos + 3 end
  if text:sub(pos, pos + 7) == "Infinity" then return math.huge, pos + 8 end
  if text:sub(pos, pos + 8) == "-Infinity" then return -math.huge, pos + 9 end
  local num = text:match("^-?%d+%.?%d*[eE]?[-+]?%d*", pos)
  if num and #num > 0 then
    local value = math.tointeger(tonumber(num)) or tonumber(num)
    if value == nil then decode_error(text, pos, "invalid number '" .. num .. "'") end
    return value, pos + #num
  end
  decode_error(text, pos, "unexpected character '" .. c .. "'")
end

-- Decode a JSON text; raises "invalid JSON at line L (byte B): ..." on error.
function M.decode(text)
  local value, pos = decode_value(text, 1)
  pos = skip_space(text, pos)
  if pos <= #text then decode_error(text, pos, "trailing characters after the value") end
  return value
end

-- Read and decode a JSON file. Returns the value, or nil, a message and an
-- errno name such as "ENOENT" or "EISDIR" when the file cannot be read.
-- Raises, naming the file, when its content is not valid JSON, so that a
-- caller that takes nil for an absent optional file never skips a corrupt one.
function M.read(path)
  local f, message, errno = io.open(path, "rb")
  if not f then return nil, message, require("loom.core").errno_name(errno) end
  local text
  text, message, errno = f:read("a")
  f:close()
  if text == nil then return nil, path .. ": " .. message, require("loom.core").errno_name(errno) end
  local ok, value = pcall(M.decode, text)
  if not ok then error(path .. ": " .. value, 0) end
  return value
end

local function encode_string(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    local named = { ['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t" }
    return named[c] or string.format("\\u%04x", c:byte())
  end) .. '"'
end

local function is_sequence(t)
  if array_mark[t] then return true end
  local n = #t
  if n == 0 then return false end
  for k in pairs(t) do
    if math.type(k) ~= "integer" or k < 1 or k > n then return false end
  end
  return true
end

local function encode_value(value, indent, depth, out)
  local kind = type(value)
  if value == M.null or value == nil then
    out[#out + 1] = "null"
  elseif kind == "boolean" then
    out[#out + 1] = tostring(value)
  elseif kind == "number" then
    if value ~= value or value == math.huge or value == -math.huge then
      error("cannot encode " .. tostring(value) .. " as JSON", 0)
    end
    if math.type(value) == "integer" then
      out[#out + 1] = tostring(value)
    else
      out[#out + 1] = string.format("%.17g", value)
    end
  elseif kind == "string" then
    out[#out + 1] = encode_string(value)
  elseif kind == "table" then
    local pad = indent and ("\n" .. string.rep(indent, depth + 1)) or ""
    local close = indent and ("\n" .. string.rep(indent, depth)) or ""
    local sep = indent and ": " or ":"
    if is_sequence(value) then
      if #value == 0 then out[#out + 1] = "[]" return end
      out[#out + 1] = "["
      for i, item in ipairs(value) do
        out[#out + 1] = (i > 1 and "," or "") .. pad
        encode_value(item, indent, depth + 1, out)
      end
      out[#out + 1] = close .. "]"
    else
      local keys = {}
      for k in pairs(value) do
        if type(k) ~= "string" then error("cannot encode a non-string key as JSON", 0) end
        keys[#keys + 1] = k
      end
      table.sort(keys)
      if #keys == 0 then out[#out + 1] = "{}" return end
      out[#out + 1] = "{"
      for i, k in ipairs(keys) do
        out[#out + 1] = (i > 1 and "," or "") .. pad .. encode_string(k) .. sep
        encode_value(value[k], indent, depth + 1, out)
      end
      out[#out + 1] = close .. "}"
    end
  else
    error("cannot encode a " .. kind .. " as JSON", 0)
  end
end

-- Encode a value as JSON with sorted object keys; `indent` (a string such as
-- "  ") pretty-prints.
function M.encode(value, indent)
  local out = {}
  encode_value(value, indent, 0, out)
  return table.concat(out)
end

return M
