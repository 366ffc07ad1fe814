/* Declarations shared by the Lua binding files (lua/l_*.c) and lua/main.c:
 * the tensor userdata, argument checkers that speak Lua's 1-based dimension
 * convention, core error raising and garbage-collector pacing. */
#ifndef LOOM_LUA_H
#define LOOM_LUA_H

#include <lauxlib.h>
#include <lua.h>

#include "tensor.h"

/* Metatable names (also the __name shown in type errors). */
#define LOOM_TENSOR_MT "loom.Tensor"
#define LOOM_KVCACHE_MT "loom.KVCache"

/* A tensor userdata contains a loom_tensor by value. storage == NULL means
 * the tensor was released (t:free(), __close, __gc) or is a result still
 * being built. Every live tensor has a storage, even one of zero elements. */

/* The tensor at `idx`; raises "loom.Tensor expected, got X" for other values
 * and "attempt to use a released tensor" for a released one. */
loom_tensor *loom_checktensor(lua_State *L, int idx);
/* The tensor at `idx`, or NULL when the value is not a tensor; raises for a
 * released tensor. */
loom_tensor *loom_testtensor(lua_State *L, int idx);
/* loom_checktensor, or NULL when the argument is absent or nil. */
loom_tensor *loom_opttensor(lua_State *L, int idx);
/* Push a new, empty tensor userdata (metatable set, storage NULL) and return
 * it, so that a result exists on the stack before any step that can raise.
 * The caller fills it and then calls loom_gc_pace. */
loom_tensor *loom_newtensor(lua_State *L);
/* Push a new userdata holding another view of `t` (one more storage
 * reference, no copy). */
void loom_pushtensor(lua_State *L, const loom_tensor *t);
/* The tensor at `idx`. A number there is converted into a 0-dimensional
 * tensor of `dtype`, which replaces the number on the stack. Anything else
 * raises "loom.Tensor or number expected". */
loom_tensor *loom_totensor(lua_State *L, int idx, loom_dtype dtype);

/* The tokenizer inside the "loom.Tokenizer" userdata at `idx`
 * (lua/l_tokenizer.c). Raises "loom.Tokenizer expected, got X" for other
 * values and "attempt to use a released tokenizer" after tok:free(). */
struct loom_tokenizer *loom_checktokenizer(lua_State *L, int idx);

/* Push the text form of a live tensor (l_format.c). */
int loom_format_tensor(lua_State *L, const loom_tensor *t);

/* Drive the collector after new owned storage was allocated: a full
 * collection runs when the bytes held by owned storages exceed twice the
 * amount that stayed alive after the previous collection plus 32 MiB. */
void loom_gc_pace(lua_State *L);

/* Raise the core's last error message prefixed by "fname: " (not repeated
 * when the core message already starts with it). Never returns. */
int loom_core_error(lua_State *L, const char *fname);

/* Open failures of the functions that return nil, message, code
 * (lua/l_core.c). The errno name of `err`: "ENOENT", "EACCES", "EISDIR",
 * "ENOTDIR", "ENAMETOOLONG", "ELOOP", "EMFILE", "ENOMEM", otherwise "EIO". */
const char *loom_errno_name(int err);
/* Open `path` for reading and close it again: 0 when that works on a file
 * that is not a directory, else the errno value (EISDIR for a directory). */
int loom_open_errno(const char *path);
/* Push nil, "path: <strerror(err)>" and loom_errno_name(err); returns 3. */
int loom_push_open_failure(lua_State *L, const char *path, int err);

/* A dtype name ("f32", "bf16", "i64", ...) at `idx`; the optional form
 * returns `def` for nil or none. */
loom_dtype loom_checkdtype(lua_State *L, int idx);
loom_dtype loom_optdtype(lua_State *L, int idx, loom_dtype def);

/* A 1-based (or negative, -1 = last) dimension argument for tensor `t`,
 * returned 0-based; the error names t's shape. `extra` widens the range (1
 * for unsqueeze, where ndim + 1 positions exist). The optional form returns
 * `def0` (0-based, may be negative) for nil or none. */
int loom_checkdim(lua_State *L, int idx, const loom_tensor *t, int extra);
int loom_optdim(lua_State *L, int idx, const loom_tensor *t, int def0);

/* Read a shape given either as a table at `idx` or as integer arguments from
 * `idx` on. `allow_minus_one` accepts -1 entries (view, reshape, expand).
 * Stores the dimensions and returns the index of the first argument after
 * the shape. */
int loom_checkshape(lua_State *L, int idx, int *ndim, int64_t *shape, int allow_minus_one);

/* Registration of each area into the module table at the top of the stack.
 * loom_open_tensor must run first: it creates the "loom.Tensor" metatable
 * that the other areas add methods to. */
void loom_open_tensor(lua_State *L);
void loom_open_ops(lua_State *L);
void loom_open_checkpoint(lua_State *L);
void loom_open_image(lua_State *L);

/* Entry point of the C module "loom.core". */
int luaopen_loom_core(lua_State *L);
/* The tokenizer library table (lua/l_tokenizer.c), stored as loom.core.tokenizer. */
int luaopen_loom_tokenizer(lua_State *L);

#endif
