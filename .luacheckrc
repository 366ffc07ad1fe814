-- luacheck settings for Loom's Lua code (lua/loom, scripts, tests, bench).
std = "lua54"
-- bin/loom defines the global `loom` for scripts and the REPL.
read_globals = { "loom" }
max_line_length = 120
-- Unused arguments are common in callbacks and kind modules.
unused_args = false
