/* Lua binding of core/tensor.h: the "loom.Tensor" userdata (a loom_tensor
 * stored by value), creation, queries, views, copies, indexing and the
 * shared argument checkers. Dimensions and positions are 1-based here and
 * 0-based in the core. Every result userdata is pushed before the core call
 * that fills it, so a Lua error never orphans C storage. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "loom_lua.h"

static void store_elem(lua_State *L, loom_tensor *t, const int64_t *index, int vidx);

/* ---------------------------------------------------------------------------
 * userdata access */

static const char released_message[] = "attempt to use a released tensor";

loom_tensor *loom_testtensor(lua_State *L, int idx) {
    loom_tensor *t = luaL_testudata(L, idx, LOOM_TENSOR_MT);
    if (t && !t->storage)
        luaL_error(L, "%s", released_message);
    return t;
}

loom_tensor *loom_checktensor(lua_State *L, int idx) {
    loom_tensor *t = luaL_checkudata(L, idx, LOOM_TENSOR_MT);
    if (!t->storage)
        luaL_error(L, "%s", released_message);
    return t;
}

loom_tensor *loom_opttensor(lua_State *L, int idx) {
    if (lua_isnoneornil(L, idx))
        return NULL;
    return loom_checktensor(L, idx);
}

loom_tensor *loom_newtensor(lua_State *L) {
    loom_tensor *t = lua_newuserdatauv(L, sizeof *t, 0);
    *t = LOOM_TENSOR_EMPTY;
    luaL_setmetatable(L, LOOM_TENSOR_MT);
    return t;
}

void loom_pushtensor(lua_State *L, const loom_tensor *t) {
    loom_tensor *r = loom_newtensor(L);
    if (loom_tensor_view_of(r, t) != LOOM_OK)
        loom_core_error(L, "tensor");
}

loom_tensor *loom_totensor(lua_State *L, int idx, loom_dtype dtype) {
    idx = lua_absindex(L, idx);
    loom_tensor *t = loom_testtensor(L, idx);
    if (t)
        return t;
    if (lua_type(L, idx) != LUA_TNUMBER && lua_type(L, idx) != LUA_TBOOLEAN)
        luaL_typeerror(L, idx, "loom.Tensor or number");
    int64_t none[1] = {0};
    t = loom_newtensor(L);
    if (loom_tensor_init(t, dtype, 0, none) != LOOM_OK)
        loom_core_error(L, "tensor");
    store_elem(L, t, none, idx);
    lua_replace(L, idx);
    return t;
}

/* The finalizer shared by __gc, __close and t:free(): drop the storage
 * reference once; later calls do nothing. */
static int l_tensor___gc(lua_State *L) {
    loom_tensor *t = lua_touserdata(L, 1);
    if (t && t->storage)
        loom_tensor_free(t);
    return 0;
}

static int l_tensor_free(lua_State *L) {
    luaL_checkudata(L, 1, LOOM_TENSOR_MT);
    return l_tensor___gc(L);
}

/* ---------------------------------------------------------------------------
 * errors, garbage-collector pacing, argument checkers */

int loom_core_error(lua_State *L, const char *fname) {
    const char *msg = loom_last_error();
    size_t n = strlen(fname);
    if (strncmp(msg, fname, n) == 0 && msg[n] == ':')
        return luaL_error(L, "%s", msg);
    return luaL_error(L, "%s: %s", fname, msg[0] ? msg : "failed");
}

/* Owned bytes above which the next tensor allocation runs a full collection.
 * The floor is 32 MiB rather than more because glibc keeps freed blocks
 * resident: bench/gc_loop.lua peaks near 1.5 to 2 times the owned bytes.
 * NOTE: process-wide, like loom_owned_bytes(), so several Lua states in one
 * process share the budget. */
#define GC_FLOOR_BYTES ((size_t)32 << 20)
static size_t gc_limit = GC_FLOOR_BYTES;

void loom_gc_pace(lua_State *L) {
    if (loom_owned_bytes() <= gc_limit)
        return;
    lua_gc(L, LUA_GCCOLLECT);
    size_t live = loom_owned_bytes();
    gc_limit = (live > SIZE_MAX / 4 ? SIZE_MAX / 2 : 2 * live) + GC_FLOOR_BYTES;
}

loom_dtype loom_checkdtype(lua_State *L, int idx) {
    const char *name = luaL_checkstring(L, idx);
    loom_dtype d;
    if (loom_dtype_parse(name, &d) != 0)
        luaL_argerror(L, idx, lua_pushfstring(L, "unknown dtype '%s' (expected f32, f16, bf16, i32, i64 or u8)", name));
    return d;
}

loom_dtype loom_optdtype(lua_State *L, int idx, loom_dtype def) {
    return lua_isnoneornil(L, idx) ? def : loom_checkdtype(L, idx);
}

/* Map a 1-based or negative Lua dimension into [0, n), or return -1. */
static int lua_dim_to_core(lua_Integer d, int n) {
    if (d >= 1 && d <= n)
        return (int)d - 1;
    if (d < 0 && d >= -n)
        return n + (int)d;
    return -1;
}

int loom_checkdim(lua_State *L, int idx, const loom_tensor *t, int extra) {
    lua_Integer d = luaL_checkinteger(L, idx);
    int n = t->ndim + extra;
    int r = lua_dim_to_core(d, n);
    if (r < 0) {
        if (n == 0)
            return luaL_argerror(L, idx, lua_pushfstring(L, "dimension %I out of range for %s (it has no dimensions)",
                                                          d, loom_shape_str(t).s));
        return luaL_argerror(L, idx, lua_pushfstring(L, "dimension %I out of range for %s (expected 1..%d or -%d..-1)",
                                                      d, loom_shape_str(t).s, n, n));
    }
    return r;
}

int loom_optdim(lua_State *L, int idx, const loom_tensor *t, int def0) {
    return lua_isnoneornil(L, idx) ? def0 : loom_checkdim(L, idx, t, 0);
}

static void check_size(lua_State *L, int idx, lua_Integer v, int isnum, int pos, int allow_minus_one) {
    const char *where = pos > 0 ? lua_pushfstring(L, " at position %d of the shape", pos) : "";
    if (!isnum)
        luaL_argerror(L, idx, lua_pushfstring(L, "size must be an integer%s", where));
    if (v < 0 && !(allow_minus_one && v == -1))
        luaL_argerror(L, idx, lua_pushfstring(L, "invalid size %I%s (sizes must be >= 0%s)", v, where,
                                              allow_minus_one ? ", or -1 once" : ""));
    if (pos > 0)
        lua_pop(L, 1);
}

int loom_checkshape(lua_State *L, int idx, int *ndim, int64_t *shape, int allow_minus_one) {
    idx = lua_absindex(L, idx);
    if (lua_istable(L, idx)) {
        lua_Unsigned n = lua_rawlen(L, idx);
        if (n > LOOM_MAX_DIMS)
            luaL_argerror(L, idx, lua_pushfstring(L, "shape has %d dimensions, the maximum is %d", (int)n, LOOM_MAX_DIMS));
        for (int i = 0; i < (int)n; i++) {
            int isnum;
            lua_rawgeti(L, idx, i + 1);
            lua_Integer v = lua_tointegerx(L, -1, &isnum);
            lua_pop(L, 1);
            check_size(L, idx, v, isnum, i + 1, allow_minus_one);
            shape[i] = v;
        }
        *ndim = (int)n;
        return idx + 1;
    }
    int n = 0;
    while (lua_type(L, idx + n) == LUA_TNUMBER) {
        int isnum;
        lua_Integer v = lua_tointegerx(L, idx + n, &isnum);
        if (n >= LOOM_MAX_DIMS)
            luaL_argerror(L, idx + n, lua_pushfstring(L, "too many sizes, the maximum is %d dimensions", LOOM_MAX_DIMS));
        check_size(L, idx + n, v, isnum, 0, allow_minus_one);
        shape[n++] = v;
    }
    if (n == 0)
        luaL_typeerror(L, idx, "shape (a table or sizes)");
    *ndim = n;
    return idx + n;
}

/* ---------------------------------------------------------------------------
 * element access: integers are read and written exactly (an i64 beyond 2^53
 * would not survive a double), floats through the core's conversions */

static char *elem_ptr(const loom_tensor *t, const int64_t *index) {
    int64_t off = 0;
    for (int i = 0; i < t->ndim; i++)
        off += index[i] * t->strides[i];
    return (char *)loom_tensor_data(t) + off * (int64_t)loom_dtype_size(t->dtype);
}

static int64_t read_int(const loom_tensor *t, const int64_t *index) {
    const char *p = elem_ptr(t, index);
    switch (t->dtype) {
    case LOOM_I64: { int64_t v; memcpy(&v, p, 8); return v; }
    case LOOM_I32: { int32_t v; memcpy(&v, p, 4); return v; }
    case LOOM_U8: return (unsigned char)*p;
    default: return (int64_t)loom_tensor_get(t, index);
    }
}

static void push_elem(lua_State *L, const loom_tensor *t, const int64_t *index) {
    if (loom_dtype_is_float(t->dtype))
        lua_pushnumber(L, loom_tensor_get(t, index));
    else
        lua_pushinteger(L, read_int(t, index));
}

/* Store the Lua number or boolean at `vidx` (already checked) into t. */
static void store_elem(lua_State *L, loom_tensor *t, const int64_t *index, int vidx) {
    if (lua_isinteger(L, vidx) && !loom_dtype_is_float(t->dtype)) {
        lua_Integer v = lua_tointeger(L, vidx);
        char *p = elem_ptr(t, index);
        switch (t->dtype) {
        case LOOM_I64: { int64_t w = v; memcpy(p, &w, 8); return; }
        case LOOM_I32: { int32_t w = (int32_t)v; memcpy(p, &w, 4); return; }
        default: *p = (char)(unsigned char)v; return;
        }
    }
    double v = lua_isboolean(L, vidx) ? lua_toboolean(L, vidx) : lua_tonumber(L, vidx);
    loom_tensor_set(t, index, v);
}

static int next_index(int64_t *index, const loom_tensor *t) {
    for (int d = t->ndim - 1; d >= 0; d--) {
        if (++index[d] < t->shape[d])
            return 1;
        index[d] = 0;
    }
    return 0;
}

static void check_writable(lua_State *L, const loom_tensor *t, const char *fname) {
    if (t->storage->readonly)
        luaL_error(L, "%s: %s is read-only (its storage is %s)", fname, loom_shape_str(t).s,
                   t->storage->kind == LOOM_STORAGE_MMAP ? "a memory-mapped file" : "borrowed read-only");
}

static int is_scalar_value(lua_State *L, int idx) {
    return lua_type(L, idx) == LUA_TNUMBER || lua_type(L, idx) == LUA_TBOOLEAN;
}

/* ---------------------------------------------------------------------------
 * creation */

/* Default seed source for randn/rand without opts.seed: a process-wide
 * counter, so a script's random tensors are the same on every run. */
static uint64_t next_seed = 0x5eed;

/* Walk a nested table at the stack top to find its shape: the length of
 * each first element, down to the first non-table. */
static int nested_shape(lua_State *L, int idx, int64_t *shape) {
    int ndim = 0;
    lua_pushvalue(L, idx);
    while (lua_istable(L, -1)) {
        if (ndim == LOOM_MAX_DIMS)
            luaL_argerror(L, 1, lua_pushfstring(L, "nested deeper than %d dimensions", LOOM_MAX_DIMS));
        lua_Unsigned n = lua_rawlen(L, -1);
        shape[ndim++] = (int64_t)n;
        if (n == 0)
            break;
        lua_rawgeti(L, -1, 1);
        lua_remove(L, -2);
    }
    lua_pop(L, 1);
    return ndim;
}

static const char *path_str(lua_State *L, const int64_t *path, int depth) {
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (int i = 0; i < depth; i++) {
        char piece[32];
        snprintf(piece, sizeof piece, "[%lld]", (long long)path[i] + 1);
        luaL_addstring(&b, piece);
    }
    luaL_pushresult(&b);
    return lua_tostring(L, -1);
}

/* Check that the table at the stack top has exactly `shape` with numbers
 * or booleans at the leaves; `path` collects the position for messages. */
static void nested_check(lua_State *L, int depth, int ndim, const int64_t *shape, int64_t *path) {
    luaL_checkstack(L, 4, "nested table too deep");
    if (depth == ndim) {
        if (!is_scalar_value(L, -1)) {
            const char *type = luaL_typename(L, -1);
            const char *where = path_str(L, path, depth);
            luaL_argerror(L, 1, lua_pushfstring(L, "number expected at %s, got %s", where, type));
        }
        return;
    }
    if (!lua_istable(L, -1)) {
        const char *type = luaL_typename(L, -1);
        const char *where = path_str(L, path, depth);
        luaL_argerror(L, 1, lua_pushfstring(L, "ragged nested table: table of %I entries expected at %s, got %s",
                                            (lua_Integer)shape[depth], where, type));
    }
    lua_Unsigned n = lua_rawlen(L, -1);
    if ((int64_t)n != shape[depth])
        luaL_argerror(L, 1, lua_pushfstring(L, "ragged nested table: %I entries expected at %s, got %I",
                                            (lua_Integer)shape[depth], path_str(L, path, depth), (lua_Integer)n));
    for (int64_t i = 0; i < shape[depth]; i++) {
        path[depth] = i;
        lua_rawgeti(L, -1, i + 1);
        nested_check(L, depth + 1, ndim, shape, path);
        lua_pop(L, 1);
    }
}

static void nested_fill(lua_State *L, loom_tensor *t, int depth, int64_t *index) {
    if (depth == t->ndim) {
        store_elem(L, t, index, -1);
        return;
    }
    for (int64_t i = 0; i < t->shape[depth]; i++) {
        index[depth] = i;
        lua_rawgeti(L, -1, i + 1);
        nested_fill(L, t, depth + 1, index);
        lua_pop(L, 1);
    }
}

/* loom.tensor(nested_table | number | tensor, dtype?): a new tensor with a
 * copy of the values; the default dtype is f32 (a tensor argument keeps its
 * own). */
static int l_tensor_tensor(lua_State *L) {
    int64_t shape[LOOM_MAX_DIMS], path[LOOM_MAX_DIMS] = {0}, index[LOOM_MAX_DIMS] = {0};
    loom_tensor *src = loom_testtensor(L, 1);
    if (src) {
        loom_dtype dt = loom_optdtype(L, 2, src->dtype);
        loom_tensor *r = loom_newtensor(L);
        if (loom_tensor_to(r, src, dt) != LOOM_OK)
            loom_core_error(L, "tensor");
        loom_gc_pace(L);
        return 1;
    }
    loom_dtype dt = loom_optdtype(L, 2, LOOM_F32);
    int ndim = 0;
    if (lua_istable(L, 1)) {
        ndim = nested_shape(L, 1, shape);
        lua_pushvalue(L, 1);
        nested_check(L, 0, ndim, shape, path);
        lua_pop(L, 1);
    } else if (!is_scalar_value(L, 1)) {
        luaL_typeerror(L, 1, "table, number or loom.Tensor");
    }
    loom_tensor *r = loom_newtensor(L);
    if (loom_tensor_init(r, dt, ndim, shape) != LOOM_OK)
        loom_core_error(L, "tensor");
    lua_pushvalue(L, 1);
    nested_fill(L, r, 0, index);
    lua_pop(L, 1);
    loom_gc_pace(L);
    return 1;
}

/* zeros/ones/empty(shape, dtype?) share this: shape as a table or sizes. */
static int new_filled(lua_State *L, const char *fname, int zeroed, double value) {
    int ndim;
    int64_t shape[LOOM_MAX_DIMS];
    int next = loom_checkshape(L, 1, &ndim, shape, 0);
    loom_dtype dt = loom_optdtype(L, next, LOOM_F32);
    luaL_argcheck(L, lua_gettop(L) <= next, next + 1, "too many arguments");
    loom_tensor *r = loom_newtensor(L);
    int rc = zeroed ? loom_tensor_zeros(r, dt, ndim, shape) : loom_tensor_init(r, dt, ndim, shape);
    if (rc == LOOM_OK && value != 0)
        rc = loom_tensor_fill(r, value);
    if (rc != LOOM_OK)
        loom_core_error(L, fname);
    loom_gc_pace(L);
    return 1;
}

static int l_tensor_zeros(lua_State *L) { return new_filled(L, "zeros", 1, 0); }
static int l_tensor_ones(lua_State *L) { return new_filled(L, "ones", 1, 1); }
static int l_tensor_empty(lua_State *L) { return new_filled(L, "empty", 0, 0); }

/* loom.full(shape, value, dtype?): shape is a table or one size. */
static int l_tensor_full(lua_State *L) {
    int ndim = 1;
    int64_t shape[LOOM_MAX_DIMS];
    if (lua_istable(L, 1)) {
        loom_checkshape(L, 1, &ndim, shape, 0);
    } else {
        lua_Integer n = luaL_checkinteger(L, 1);
        check_size(L, 1, n, 1, 0, 0);
        shape[0] = n;
    }
    luaL_argexpected(L, is_scalar_value(L, 2), 2, "number");
    loom_dtype dt = loom_optdtype(L, 3, LOOM_F32);
    loom_tensor *r = loom_newtensor(L);
    if (loom_tensor_init(r, dt, ndim, shape) != LOOM_OK)
        loom_core_error(L, "full");
    int64_t index[LOOM_MAX_DIMS] = {0};
    if (loom_tensor_numel(r) > 0) {
        /* Store element 0 exactly (an i64 may not survive a double), then
         * broadcast it through a 0-dimensional view that borrows r's
         * storage without a reference of its own. */
        store_elem(L, r, index, 2);
        loom_tensor first = *r;
        first.ndim = 0;
        if (ndim > 0 && loom_tensor_copy_into(r, &first) != LOOM_OK)
            loom_core_error(L, "full");
    }
    loom_gc_pace(L);
    return 1;
}

/* loom.arange(start, stop, step?, dtype?) with stop exclusive, or
 * loom.arange(stop) counting from 0. */
static int l_tensor_arange(lua_State *L) {
    double start = 0, stop, step = 1;
    int next;
    lua_Number a = luaL_checknumber(L, 1);
    if (lua_type(L, 2) == LUA_TNUMBER) {
        start = a;
        stop = lua_tonumber(L, 2);
        next = 3;
        if (lua_type(L, 3) == LUA_TNUMBER) {
            step = lua_tonumber(L, 3);
            next = 4;
        }
    } else {
        stop = a;
        next = 2;
    }
    luaL_argcheck(L, step != 0, 3, "step must not be 0");
    loom_dtype dt = loom_optdtype(L, next, LOOM_F32);
    loom_tensor *r = loom_newtensor(L);
    if (loom_tensor_arange(r, dt, start, stop, step) != LOOM_OK)
        loom_core_error(L, "arange");
    loom_gc_pace(L);
    return 1;
}

static lua_Number opt_field_number(lua_State *L, int opts, const char *key, lua_Number def) {
    if (opts == 0)
        return def;
    lua_getfield(L, opts, key);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return def;
    }
    if (lua_type(L, -1) != LUA_TNUMBER)
        luaL_argerror(L, opts, lua_pushfstring(L, "field '%s' must be a number, got %s", key, luaL_typename(L, -1)));
    lua_Number v = lua_tonumber(L, -1);
    lua_pop(L, 1);
    return v;
}

/* randn/rand(shape, opts?): opts.seed, opts.dtype and the distribution's
 * two parameters. */
static int new_random(lua_State *L, const char *fname, int normal) {
    int ndim;
    int64_t shape[LOOM_MAX_DIMS];
    int next = loom_checkshape(L, 1, &ndim, shape, 0);
    int opts = 0;
    if (!lua_isnoneornil(L, next)) {
        luaL_checktype(L, next, LUA_TTABLE);
        opts = next;
    }
    uint64_t seed;
    if (opts && lua_getfield(L, opts, "seed") != LUA_TNIL) {
        int isnum;
        lua_Integer s = lua_tointegerx(L, -1, &isnum);
        if (!isnum)
            luaL_argerror(L, opts, "field 'seed' must be an integer");
        seed = (uint64_t)s;
    } else {
        seed = next_seed++;
    }
    if (opts)
        lua_pop(L, 1);

    double p1 = opt_field_number(L, opts, normal ? "mean" : "low", 0);
    double p2 = opt_field_number(L, opts, normal ? "std" : "high", 1);
    loom_dtype dt = LOOM_F32;
    if (opts) {
        lua_getfield(L, opts, "dtype");
        dt = loom_optdtype(L, -1, LOOM_F32);
        lua_pop(L, 1);
    }
    if (!loom_dtype_is_float(dt))
        luaL_argerror(L, opts, lua_pushfstring(L, "dtype must be f32, f16 or bf16, got %s", loom_dtype_name(dt)));

    loom_tensor *r = loom_newtensor(L);
    int rc = loom_tensor_init(r, dt, ndim, shape);
    if (rc == LOOM_OK)
        rc = normal ? loom_tensor_randn(r, seed, p1, p2) : loom_tensor_rand(r, seed, p1, p2);
    if (rc != LOOM_OK)
        loom_core_error(L, fname);
    loom_gc_pace(L);
    return 1;
}

static int l_tensor_randn(lua_State *L) { return new_random(L, "randn", 1); }
static int l_tensor_rand(lua_State *L) { return new_random(L, "rand", 0); }

/* Bytes held by owned tensor storages in this process (memory-mapped
 * checkpoints not included). */
static int l_tensor_owned_bytes(lua_State *L) {
    lua_pushinteger(L, (lua_Integer)loom_owned_bytes());
    return 1;
}

static int l_tensor_is_tensor(lua_State *L) {
    lua_pushboolean(L, luaL_testudata(L, 1, LOOM_TENSOR_MT) != NULL);
    return 1;
}

/* ---------------------------------------------------------------------------
 * queries */

static void push_dims(lua_State *L, int ndim, const int64_t *v) {
    lua_createtable(L, ndim, 0);
    for (int i = 0; i < ndim; i++) {
        lua_pushinteger(L, v[i]);
        lua_rawseti(L, -2, i + 1);
    }
}

static int l_tensor_shape(lua_State *L) {
    loom_tensor *t = loom_checktensor(L, 1);
    push_dims(L, t->ndim, t->shape);
    return 1;
}

/* t:size() is the shape table, t:size(dim) one size. */
static int l_tensor_size(lua_State *L) {
    loom_tensor *t = loom_checktensor(L, 1);
    if (lua_isnoneornil(L, 2))
        return l_tensor_shape(L);
    lua_pushinteger(L, t->shape[loom_checkdim(L, 2, t, 0)]);
    return 1;
}

static int l_tensor_stride(lua_State *L) {
    loom_tensor *t = loom_checktensor(L, 1);
    if (lua_isnoneornil(L, 2))
        push_dims(L, t->ndim, t->strides);
    else
        lua_pushinteger(L, t->strides[loom_checkdim(L, 2, t, 0)]);
    return 1;
}

static int l_tensor_dim(lua_State *L) {
    lua_pushinteger(L, loom_checktensor(L, 1)->ndim);
    return 1;
}

static int l_tensor_numel(lua_State *L) {
    lua_pushinteger(L, loom_tensor_numel(loom_checktensor(L, 1)));
    return 1;
}

static int l_tensor_dtype(lua_State *L) {
    lua_pushstring(L, loom_dtype_name(loom_checktensor(L, 1)->dtype));
    return 1;
}

static int l_tensor_is_contiguous(lua_State *L) {
    lua_pushboolean(L, loom_tensor_is_contiguous(loom_checktensor(L, 1)));
    return 1;
}

static int l_tensor_storage_kind(lua_State *L) {
    static const char *const names[] = {"owned", "mmap", "borrowed"};
    loom_tensor *t = loom_checktensor(L, 1);
    unsigned k = (unsigned)t->storage->kind;
    lua_pushstring(L, k < 3 ? names[k] : "unknown");
    return 1;
}

static int l_tensor___len(lua_State *L) {
    loom_tensor *t = loom_checktensor(L, 1);
    if (t->ndim == 0)
        return luaL_error(L, "attempt to get the length of a 0-dimensional tensor (%s)", loom_shape_str(t).s);
    lua_pushinteger(L, t->shape[0]);
    return 1;
}

static int l_tensor___tostring(lua_State *L) {
    loom_tensor *t = luaL_checkudata(L, 1, LOOM_TENSOR_MT);
    if (!t->storage) {
        lua_pushliteral(L, "loom.Tensor (released)");
        return 1;
    }
    return loom_format_tensor(L, t);
}

/* ---------------------------------------------------------------------------
 * views: each pushes a new userdata sharing t's storage */

static int l_tensor_narrow(lua_State *L) {
    loom_tensor *t = loom_checktensor(L, 1);
    int d = loom_checkdim(L, 2, t, 0);
    lua_Integer start = luaL_checkinteger(L, 3), length = luaL_checkinteger(L, 4);
    int64_t size = t->shape[d];
    if (start < 0)
        start += size + 1; /* -1 is the last position */
    luaL_argcheck(L, start >= 1 && start <= size + 1, 3,
                  lua_pushfstring(L, "start %I out of range for dimension %d of %s", lua_tointeger(L, 3), d + 1,
                                  loom_shape_str(t).s));
    luaL_argcheck(L, length >= 0 && length <= size - (start - 1), 4,
                  lua_pushfstring(L, "length %I from start %I exceeds dimension %d of %s", length, start, d + 1,
                                  loom_shape_str(t).s));
    loom_tensor *r = loom_newtensor(L);
    if (loom_tensor_narrow(r, t, d, start - 1, length) != LOOM_OK)
        loom_core_error(L, "narrow");
    return 1;
}

/* Convert a 1-based or negative position within a dimension of `size`, or
 * raise an argument error. */
static int64_t check_position(lua_State *L, int idx, lua_Integer i, int64_t size, const loom_tensor *t, int d) {
    if (i >= 1 && i <= size)
        return i - 1;
    if (i < 0 && i >= -size)
        return size + i;
    luaL_argerror(L, idx, lua_pushfstring(L, "index %I out of range for dimension %d of %s", i, d + 1,
                                          loom_shape_str(t).s));
    return 0;
}

static int l_tensor_select(lua_State *L) {
    loom_tensor *t = loom_checktensor(L, 1);
    int d = loom_checkdim(L, 2, t, 0);
    int64_t i = check_position(L, 3, luaL_checkinteger(L, 3), t->shape[d], t, d);
    loom_tensor *r = loom_newtensor(L);
    if (loom_tensor_select(r, t, d, i) != LOOM_OK)
        loom_core_error(L, "select");
    return 1;
}

static int l_tensor_transpose(lua_State *L) {
    loom_tensor *t = loom_checktensor(L, 1);
    int a = loom_checkdim(L, 2, t, 0), b = loom_checkdim(L, 3, t, 0);
    loom_tensor *r = loom_newtensor(L);
    if (loom_tensor_transpose(r, t, a, b) != LOOM_OK)
        loom_core_error(L, "transpose");
    return 1;
}

/* t:permute(d1, d2, ...) or t:permute({d1, d2, ...}). */
static int l_tensor_permute(lua_State *L) {
    loom_tensor *t = loom_checktensor(L, 1);
    int dims[LOOM_MAX_DIMS];
    int seen[LOOM_MAX_DIMS] = {0};
    int table = lua_istable(L, 2);
    int n = table ? (int)lua_rawlen(L, 2) : lua_gettop(L) - 1;
    if (n != t->ndim)
        luaL_argerror(L, 2, lua_pushfstring(L, "expected %d dimensions for %s, got %d", t->ndim, loom_shape_str(t).s, n));
    for (int i = 0; i < n; i++) {
        int arg = table ? 2 : i + 2;
        lua_Integer d;
        if (table) {
            int isnum;
            lua_rawgeti(L, 2, i + 1);
            d = lua_tointegerx(L, -1, &isnum);
            lua_pop(L, 1);
            if (!isnum)
                luaL_argerror(L, 2, lua_pushfstring(L, "dimension expected at position %d", i + 1));
        } else {
            d = luaL_checkinteger(L, arg);
        }
        int c = lua_dim_to_core(d, t->ndim);
        if (c < 0 || seen[c])
            luaL_argerror(L, arg, lua_pushfstring(L, "dimension %I %s for %s", d, c < 0 ? "out of range" : "repeated",
                                                  loom_shape_str(t).s));
        seen[c] = 1;
        dims[i] = c;
    }
    loom_tensor *r = loom_newtensor(L);
    if (loom_tensor_permute(r, t, dims) != LOOM_OK)
        loom_core_error(L, "permute");
    return 1;
}

/* view/reshape(shape) with one -1 allowed; reshape copies when needed. */
static int reshape_like(lua_State *L, const char *fname, int copy_ok) {
    loom_tensor *t = loom_checktensor(L, 1);
    int ndim;
    int64_t shape[LOOM_MAX_DIMS];
    loom_checkshape(L, 2, &ndim, shape, 1);
    loom_tensor *r = loom_newtensor(L);
    int rc = copy_ok ? loom_tensor_reshape(r, t, ndim, shape) : loom_tensor_view(r, t, ndim, shape);
    if (rc != LOOM_OK)
        loom_core_error(L, fname);
    if (copy_ok)
        loom_gc_pace(L);
    return 1;
}

static int l_tensor_view(lua_State *L) { return reshape_like(L, "view", 0); }
static int l_tensor_reshape(lua_State *L) { return reshape_like(L, "reshape", 1); }

static int l_tensor_expand(lua_State *L) {
    loom_tensor *t = loom_checktensor(L, 1);
    int ndim;
    int64_t shape[LOOM_MAX_DIMS];
    loom_checkshape(L, 2, &ndim, shape, 1);
    luaL_argcheck(L, ndim >= t->ndim, 2,
                  lua_pushfstring(L, "cannot expand %s to %s (fewer dimensions)", loom_shape_str(t).s,
                                  loom_dims_str(ndim, shape).s));
    for (int i = 0; i < t->ndim; i++) {
        int64_t have = t->shape[i], want = shape[ndim - t->ndim + i];
        if (want != -1 && want != have && have != 1)
            luaL_argerror(L, 2, lua_pushfstring(L, "cannot expand %s to %s (dimension %d has size %I)", loom_shape_str(t).s,
                                                loom_dims_str(ndim, shape).s, i + 1, (lua_Integer)have));
    }
    loom_tensor *r = loom_newtensor(L);
    if (loom_tensor_expand(r, t, ndim, shape) != LOOM_OK)
        loom_core_error(L, "expand");
    return 1;
}

static int l_tensor_unsqueeze(lua_State *L) {
    loom_tensor *t = loom_checktensor(L, 1);
    int d = loom_checkdim(L, 2, t, 1);
    luaL_argcheck(L, t->ndim < LOOM_MAX_DIMS, 1, "tensor already has the maximum number of dimensions");
    loom_tensor *r = loom_newtensor(L);
    if (loom_tensor_unsqueeze(r, t, d) != LOOM_OK)
        loom_core_error(L, "unsqueeze");
    return 1;
}

static int l_tensor_squeeze(lua_State *L) {
    loom_tensor *t = loom_checktensor(L, 1);
    int d = lua_isnoneornil(L, 2) ? INT32_MIN : loom_checkdim(L, 2, t, 0);
    loom_tensor *r = loom_newtensor(L);
    if (loom_tensor_squeeze(r, t, d) != LOOM_OK)
        loom_core_error(L, "squeeze");
    return 1;
}

/* t:flatten(start_dim?, end_dim?) merges dimensions start..end (default all)
 * into one, copying when the strides do not allow a view. */
static int l_tensor_flatten(lua_State *L) {
    loom_tensor *t = loom_checktensor(L, 1);
    int64_t shape[LOOM_MAX_DIMS];
    int ndim = 0;
    if (t->ndim == 0) {
        shape[ndim++] = 1;
    } else {
        int s = loom_optdim(L, 2, t, 0), e = loom_optdim(L, 3, t, t->ndim - 1);
        luaL_argcheck(L, s <= e, 3, "end dimension comes before the start dimension");
        for (int i = 0; i < s; i++)
            shape[ndim++] = t->shape[i];
        int64_t merged = 1;
        for (int i = s; i <= e; i++)
            merged *= t->shape[i];
        shape[ndim++] = merged;
        for (int i = e + 1; i < t->ndim; i++)
            shape[ndim++] = t->shape[i];
    }
    loom_tensor *r = loom_newtensor(L);
    if (loom_tensor_reshape(r, t, ndim, shape) != LOOM_OK)
        loom_core_error(L, "flatten");
    loom_gc_pace(L);
    return 1;
}

/* ---------------------------------------------------------------------------
 * copies */

static int l_tensor_contiguous(lua_State *L) {
    loom_tensor *t = loom_checktensor(L, 1);
    loom_tensor *r = loom_newtensor(L);
    if (loom_tensor_contiguous(r, t) != LOOM_OK)
        loom_core_error(L, "contiguous");
    loom_gc_pace(L);
    return 1;
}

static int l_tensor_clone(lua_State *L) {
    loom_tensor *t = loom_checktensor(L, 1);
    loom_tensor *r = loom_newtensor(L);
    if (loom_tensor_clone(r, t) != LOOM_OK)
        loom_core_error(L, "clone");
    loom_gc_pace(L);
    return 1;
}

/* t:to(dtype) returns t itself when it already has that dtype, as PyTorch's
 * Tensor.to does; otherwise a converted contiguous copy. */
static int l_tensor_to(lua_State *L) {
    loom_tensor *t = loom_checktensor(L, 1);
    loom_dtype dt = loom_checkdtype(L, 2);
    if (dt == t->dtype) {
        lua_settop(L, 1);
        return 1;
    }
    loom_tensor *r = loom_newtensor(L);
    if (loom_tensor_to(r, t, dt) != LOOM_OK)
        loom_core_error(L, "to");
    loom_gc_pace(L);
    return 1;
}

/* t:copy(src) copies (broadcasting, converting) into t and returns t; a
 * number fills. */
static int l_tensor_copy(lua_State *L) {
    loom_tensor *t = loom_checktensor(L, 1);
    loom_tensor *src = loom_testtensor(L, 2);
    if (!src && !is_scalar_value(L, 2))
        luaL_typeerror(L, 2, "loom.Tensor or number");
    check_writable(L, t, "copy");
    int rc = src ? loom_tensor_copy_into(t, src)
                 : loom_tensor_fill(t, lua_isboolean(L, 2) ? lua_toboolean(L, 2) : lua_tonumber(L, 2));
    if (rc != LOOM_OK)
        loom_core_error(L, "copy");
    lua_settop(L, 1);
    return 1;
}

static int l_tensor_fill(lua_State *L) {
    loom_tensor *t = loom_checktensor(L, 1);
    luaL_argexpected(L, is_scalar_value(L, 2), 2, "number");
    check_writable(L, t, "fill");
    if (loom_tensor_fill(t, lua_isboolean(L, 2) ? lua_toboolean(L, 2) : lua_tonumber(L, 2)) != LOOM_OK)
        loom_core_error(L, "fill");
    lua_settop(L, 1);
    return 1;
}

static void push_nested(lua_State *L, const loom_tensor *t, int depth, int64_t *index) {
    if (depth == t->ndim) {
        push_elem(L, t, index);
        return;
    }
    luaL_checkstack(L, 3, "tensor too deep");
    int64_t n = t->shape[depth];
    lua_createtable(L, n > INT32_MAX ? 0 : (int)n, 0);
    for (int64_t i = 0; i < n; i++) {
        index[depth] = i;
        push_nested(L, t, depth + 1, index);
        lua_rawseti(L, -2, i + 1);
    }
}

/* Nested tables of numbers (integers for integer dtypes); a 0-dimensional
 * tensor gives a number. */
static int l_tensor_totable(lua_State *L) {
    loom_tensor *t = loom_checktensor(L, 1);
    int64_t index[LOOM_MAX_DIMS] = {0};
    push_nested(L, t, 0, index);
    return 1;
}

static int l_tensor_tolist(lua_State *L) { return l_tensor_totable(L); }

static int l_tensor_item(lua_State *L) {
    loom_tensor *t = loom_checktensor(L, 1);
    int64_t index[LOOM_MAX_DIMS] = {0};
    luaL_argcheck(L, loom_tensor_numel(t) == 1, 1,
                  lua_pushfstring(L, "expected a tensor of one element, got %s", loom_shape_str(t).s));
    push_elem(L, t, index);
    return 1;
}

/* ---------------------------------------------------------------------------
 * indexing: t[i] selects along dimension 1, t.name finds a method */

/* A view of t at the position given by the key at `key` (1-based or
 * negative) of dimension 1. It takes no storage reference of its own, so
 * nothing leaks if a later step raises, and it is valid while t is. */
static loom_tensor borrowed_row(lua_State *L, const loom_tensor *t, int key) {
    int isnum;
    lua_Integer i = lua_tointegerx(L, key, &isnum);
    if (!isnum)
        luaL_error(L, "tensor index must be an integer, got %s", lua_type(L, key) == LUA_TNUMBER
                                                                      ? lua_pushfstring(L, "%f", lua_tonumber(L, key))
                                                                      : luaL_typename(L, key));
    if (t->ndim == 0)
        luaL_error(L, "cannot index a 0-dimensional tensor (%s)", loom_shape_str(t).s);
    int64_t size = t->shape[0];
    if (!(i >= 1 && i <= size) && !(i < 0 && i >= -size))
        luaL_error(L, "index %I out of range for dimension 1 of %s", i, loom_shape_str(t).s);
    int64_t pos = i > 0 ? i - 1 : size + i;
    loom_tensor v = *t;
    v.offset = (size_t)((int64_t)t->offset + pos * t->strides[0] * (int64_t)loom_dtype_size(t->dtype));
    for (int d = 0; d < t->ndim - 1; d++) {
        v.shape[d] = t->shape[d + 1];
        v.strides[d] = t->strides[d + 1];
    }
    v.ndim = t->ndim - 1;
    return v;
}

/* Upvalue 1 is the metatable, which also contains the methods. */
static int l_tensor___index(lua_State *L) {
    loom_tensor *t = luaL_checkudata(L, 1, LOOM_TENSOR_MT);
    if (lua_type(L, 2) == LUA_TSTRING) {
        const char *key = lua_tostring(L, 2);
        if (key[0] == '_' && key[1] == '_')
            return 0;
        lua_pushvalue(L, 2);
        lua_rawget(L, lua_upvalueindex(1));
        return 1;
    }
    if (!t->storage)
        return luaL_error(L, "%s", released_message);
    loom_tensor row = borrowed_row(L, t, 2);
    if (row.ndim == 0) {
        int64_t none[1] = {0};
        push_elem(L, &row, none);
        return 1;
    }
    loom_pushtensor(L, &row);
    return 1;
}

/* t[i] = number fills position i; t[i] = tensor copies into it (with
 * broadcasting). */
static int l_tensor___newindex(lua_State *L) {
    loom_tensor *t = loom_checktensor(L, 1);
    if (lua_type(L, 2) != LUA_TNUMBER)
        return luaL_error(L, "cannot set field '%s' of a tensor (only integer positions can be assigned)",
                          luaL_tolstring(L, 2, NULL));
    loom_tensor row = borrowed_row(L, t, 2);
    loom_tensor *src = loom_testtensor(L, 3);
    if (!src && !is_scalar_value(L, 3))
        return luaL_error(L, "cannot assign a %s to a tensor position (expected a number or loom.Tensor)",
                          luaL_typename(L, 3));
    check_writable(L, t, "tensor assignment");
    int rc;
    if (src) {
        rc = loom_tensor_copy_into(&row, src);
    } else if (row.ndim == 0) {
        int64_t none[1] = {0};
        store_elem(L, &row, none, 3);
        rc = LOOM_OK;
    } else {
        rc = loom_tensor_fill(&row, lua_isboolean(L, 3) ? lua_toboolean(L, 3) : lua_tonumber(L, 3));
    }
    if (rc != LOOM_OK)
        loom_core_error(L, "tensor assignment");
    return 0;
}

/* ---------------------------------------------------------------------------
 * comparisons of whole tensors */

static void check_same_shape(lua_State *L, const loom_tensor *a, const loom_tensor *b, int arg) {
    int same = a->ndim == b->ndim;
    for (int i = 0; same && i < a->ndim; i++)
        same = a->shape[i] == b->shape[i];
    if (!same)
        luaL_argerror(L, arg, lua_pushfstring(L, "expected the shape %s of argument #%d, got %s",
                                              loom_dims_str(a->ndim, a->shape).s, arg - 1, loom_shape_str(b).s));
}

/* loom.equal(a, b): true when shapes and values are equal (dtypes may
 * differ; integers compare exactly, NaN equals nothing). */
static int l_tensor_equal(lua_State *L) {
    loom_tensor *a = loom_checktensor(L, 1), *b = loom_checktensor(L, 2);
    int same = a->ndim == b->ndim;
    for (int i = 0; same && i < a->ndim; i++)
        same = a->shape[i] == b->shape[i];
    if (same && loom_tensor_numel(a) > 0) {
        int ints = !loom_dtype_is_float(a->dtype) && !loom_dtype_is_float(b->dtype);
        int64_t index[LOOM_MAX_DIMS] = {0};
        do {
            if (ints)
                same = read_int(a, index) == read_int(b, index);
            else
                same = loom_tensor_get(a, index) == loom_tensor_get(b, index);
        } while (same && next_index(index, a));
    }
    lua_pushboolean(L, same);
    return 1;
}

/* loom.allclose(a, b, atol?, rtol?): |a - b| <= atol + rtol * |b| for every
 * element, with PyTorch's defaults atol = 1e-8, rtol = 1e-5; NaN is never
 * close. The shapes must be equal. */
static int l_tensor_allclose(lua_State *L) {
    loom_tensor *a = loom_checktensor(L, 1), *b = loom_checktensor(L, 2);
    double atol = luaL_optnumber(L, 3, 1e-8), rtol = luaL_optnumber(L, 4, 1e-5);
    check_same_shape(L, a, b, 2);
    int close = 1;
    if (loom_tensor_numel(a) > 0) {
        int64_t index[LOOM_MAX_DIMS] = {0};
        do {
            double x = loom_tensor_get(a, index), y = loom_tensor_get(b, index);
            close = (x == y) || fabs(x - y) <= atol + rtol * fabs(y);
        } while (close && next_index(index, a));
    }
    lua_pushboolean(L, close);
    return 1;
}

/* loom.max_abs_diff(a, b): the largest |a - b| over equal shapes (0 for
 * empty tensors, NaN when any difference is NaN). */
static int l_tensor_max_abs_diff(lua_State *L) {
    loom_tensor *a = loom_checktensor(L, 1), *b = loom_checktensor(L, 2);
    check_same_shape(L, a, b, 2);
    double worst = 0;
    if (loom_tensor_numel(a) > 0) {
        int64_t index[LOOM_MAX_DIMS] = {0};
        do {
            double x = loom_tensor_get(a, index), y = loom_tensor_get(b, index);
            double d = x == y ? 0 : fabs(x - y);
            if (isnan(d)) {
                worst = d;
                break;
            }
            if (d > worst)
                worst = d;
        } while (next_index(index, a));
    }
    lua_pushnumber(L, worst);
    return 1;
}

/* ---------------------------------------------------------------------------
 * registration */

static const luaL_Reg tensor_funcs[] = {
    {"tensor", l_tensor_tensor},       {"zeros", l_tensor_zeros},
    {"ones", l_tensor_ones},           {"full", l_tensor_full},
    {"empty", l_tensor_empty},         {"arange", l_tensor_arange},
    {"randn", l_tensor_randn},         {"rand", l_tensor_rand},
    {"is_tensor", l_tensor_is_tensor}, {"equal", l_tensor_equal},
    {"allclose", l_tensor_allclose},   {"max_abs_diff", l_tensor_max_abs_diff},
    {"owned_bytes", l_tensor_owned_bytes}, {NULL, NULL},
};

static const luaL_Reg tensor_methods[] = {
    {"shape", l_tensor_shape},
    {"size", l_tensor_size},
    {"stride", l_tensor_stride},
    {"dim", l_tensor_dim},
    {"numel", l_tensor_numel},
    {"dtype", l_tensor_dtype},
    {"is_contiguous", l_tensor_is_contiguous},
    {"storage_kind", l_tensor_storage_kind},
    {"narrow", l_tensor_narrow},
    {"select", l_tensor_select},
    {"transpose", l_tensor_transpose},
    {"permute", l_tensor_permute},
    {"view", l_tensor_view},
    {"reshape", l_tensor_reshape},
    {"expand", l_tensor_expand},
    {"unsqueeze", l_tensor_unsqueeze},
    {"squeeze", l_tensor_squeeze},
    {"flatten", l_tensor_flatten},
    {"contiguous", l_tensor_contiguous},
    {"clone", l_tensor_clone},
    {"to", l_tensor_to},
    {"copy", l_tensor_copy},
    {"fill", l_tensor_fill},
    {"totable", l_tensor_totable},
    {"tolist", l_tensor_tolist},
    {"item", l_tensor_item},
    {"free", l_tensor_free},
    {"equal", l_tensor_equal},
    {"allclose", l_tensor_allclose},
    {"max_abs_diff", l_tensor_max_abs_diff},
    {NULL, NULL},
};

static const luaL_Reg tensor_meta[] = {
    {"__gc", l_tensor___gc},
    {"__close", l_tensor___gc},
    {"__tostring", l_tensor___tostring},
    {"__len", l_tensor___len},
    {"__newindex", l_tensor___newindex},
    {NULL, NULL},
};

void loom_open_tensor(lua_State *L) {
    luaL_newmetatable(L, LOOM_TENSOR_MT);
    luaL_setfuncs(L, tensor_meta, 0);
    luaL_setfuncs(L, tensor_methods, 0);
    lua_pushvalue(L, -1);
    lua_pushcclosure(L, l_tensor___index, 1);
    lua_setfield(L, -2, "__index");
    /* loom.Tensor is the metatable: Lua code may add methods to it. */
    lua_setfield(L, -2, "Tensor");
    luaL_setfuncs(L, tensor_funcs, 0);
}
