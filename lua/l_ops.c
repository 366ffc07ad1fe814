/* Lua binding of core/ops.h. Every operator is a module function and a
 * tensor method (tensor first), with an optional trailing `out` tensor that
 * receives the result in place. Also the arithmetic metamethods and the
 * "loom.KVCache" userdata. Shapes and dtypes are checked here, with 1-based
 * dimensions in the messages, before the core runs. */
#include <math.h>
#include <string.h>

#include "loom_lua.h"
#include "ops.h"

/* ---------------------------------------------------------------------------
 * argument helpers */

static void check_float(lua_State *L, int arg, const loom_tensor *t) {
    if (!loom_dtype_is_float(t->dtype))
        luaL_argerror(L, arg, lua_pushfstring(L, "expected a float tensor (f32, f16 or bf16), got %s", loom_shape_str(t).s));
}

static void check_ids(lua_State *L, int arg, const loom_tensor *t) {
    if (t->dtype != LOOM_I32 && t->dtype != LOOM_I64)
        luaL_argerror(L, arg, lua_pushfstring(L, "expected an i32 or i64 tensor, got %s", loom_shape_str(t).s));
}

static void check_ndim(lua_State *L, int arg, const loom_tensor *t, int ndim, const char *layout) {
    if (t->ndim != ndim)
        luaL_argerror(L, arg, lua_pushfstring(L, "expected a %d-dimensional tensor %s, got %s", ndim, layout,
                                              loom_shape_str(t).s));
}

static void check_min_ndim(lua_State *L, int arg, const loom_tensor *t, int ndim) {
    if (t->ndim < ndim)
        luaL_argerror(L, arg, lua_pushfstring(L, "expected a tensor of at least %d dimension%s, got %s", ndim,
                                              ndim == 1 ? "" : "s", loom_shape_str(t).s));
}

/* Raise unless shapes a and b broadcast against each other (NumPy rules);
 * the error is reported on argument `arg` (b's). */
static void check_broadcast(lua_State *L, int arg, const loom_tensor *a, const loom_tensor *b) {
    int n = a->ndim > b->ndim ? a->ndim : b->ndim;
    for (int i = 1; i <= n; i++) {
        int64_t sa = i <= a->ndim ? a->shape[a->ndim - i] : 1;
        int64_t sb = i <= b->ndim ? b->shape[b->ndim - i] : 1;
        if (sa != sb && sa != 1 && sb != 1)
            luaL_argerror(L, arg, lua_pushfstring(L, "shape %s does not broadcast with %s", loom_shape_str(b).s,
                                                  loom_shape_str(a).s));
    }
}

/* Raise unless `m` broadcasts to exactly x's shape (masks). */
static void check_broadcast_to(lua_State *L, int arg, const loom_tensor *m, const int64_t *shape, int ndim) {
    int ok = m->ndim <= ndim;
    for (int i = 1; ok && i <= m->ndim; i++) {
        int64_t s = m->shape[m->ndim - i];
        ok = s == 1 || s == shape[ndim - i];
    }
    if (!ok)
        luaL_argerror(L, arg, lua_pushfstring(L, "shape %s does not broadcast to %s", loom_shape_str(m).s,
                                              loom_dims_str(ndim, shape).s));
}

static lua_Number opt_number_field(lua_State *L, int opts, const char *key, lua_Number def) {
    if (opts == 0)
        return def;
    int type = lua_getfield(L, opts, key);
    if (type == LUA_TNIL) {
        lua_pop(L, 1);
        return def;
    }
    if (type != LUA_TNUMBER)
        luaL_argerror(L, opts, lua_pushfstring(L, "field '%s' must be a number, got %s", key, lua_typename(L, type)));
    lua_Number v = lua_tonumber(L, -1);
    lua_pop(L, 1);
    return v;
}

/* The options table at `idx`: its index, or 0 when absent. */
static int opt_table(lua_State *L, int idx) {
    if (lua_isnoneornil(L, idx))
        return 0;
    luaL_checktype(L, idx, LUA_TTABLE);
    return lua_absindex(L, idx);
}

/* ---------------------------------------------------------------------------
 * results: every operator first sets the stack to its full argument count
 * (lua_settop), so that values it pushes never take the place of an absent
 * optional argument. The `out` argument at out_idx when given (the result is then
 * written into it and it is returned), otherwise a new empty userdata pushed
 * before the core call. out_idx 0 means the operator takes no `out`. */

static loom_tensor *result_begin(lua_State *L, int out_idx, const loom_tensor *const *inputs, int n) {
    if (out_idx == 0 || lua_isnoneornil(L, out_idx))
        return loom_newtensor(L);
    loom_tensor *out = loom_checktensor(L, out_idx);
    for (int i = 0; i < n; i++)
        if (inputs[i] && inputs[i]->storage == out->storage)
            luaL_argerror(L, out_idx, "out must not share storage with an input");
    return out;
}

static int result_end(lua_State *L, int out_idx) {
    if (out_idx != 0 && !lua_isnoneornil(L, out_idx)) {
        lua_pushvalue(L, out_idx);
        return 1;
    }
    loom_gc_pace(L);
    return 1;
}

/* ---------------------------------------------------------------------------
 * element-wise */

/* op(a, b, out?) with a or b a number; out_idx 0 for the metamethods. */
static int binary(lua_State *L, const char *fname, loom_binary_op op, int out_idx) {
    lua_settop(L, out_idx ? out_idx : 2);
    loom_tensor *a = loom_testtensor(L, 1), *b = loom_testtensor(L, 2);
    if (!a && lua_type(L, 1) != LUA_TNUMBER)
        luaL_typeerror(L, 1, "loom.Tensor or number");
    if (!b && lua_type(L, 2) != LUA_TNUMBER)
        luaL_typeerror(L, 2, "loom.Tensor or number");
    if (!a && !b)
        luaL_argerror(L, 2, "one of the two arguments must be a loom.Tensor");
    if (a && b)
        check_broadcast(L, 2, a, b);
    const loom_tensor *ins[2] = {a, b};
    loom_tensor *r = result_begin(L, out_idx, ins, 2);
    int rc;
    if (a && b)
        rc = loom_binary(r, a, b, op);
    else if (a)
        rc = loom_binary_scalar(r, a, lua_tonumber(L, 2), op, false);
    else
        rc = loom_binary_scalar(r, b, lua_tonumber(L, 1), op, true);
    if (rc != LOOM_OK)
        loom_core_error(L, fname);
    return result_end(L, out_idx);
}

#define BINARY(name, op)                                                                                           \
    static int l_ops_##name(lua_State *L) { return binary(L, #name, op, 3); }
BINARY(add, LOOM_ADD)
BINARY(sub, LOOM_SUB)
BINARY(mul, LOOM_MUL)
BINARY(div, LOOM_DIV)
BINARY(pow, LOOM_POW)
BINARY(maximum, LOOM_MAXIMUM)
BINARY(minimum, LOOM_MINIMUM)
BINARY(eq, LOOM_EQ)
BINARY(ne, LOOM_NE)
BINARY(lt, LOOM_LT)
BINARY(le, LOOM_LE)
BINARY(gt, LOOM_GT)
BINARY(ge, LOOM_GE)
#undef BINARY

static int l_ops___add(lua_State *L) { return binary(L, "__add", LOOM_ADD, 0); }
static int l_ops___sub(lua_State *L) { return binary(L, "__sub", LOOM_SUB, 0); }
static int l_ops___mul(lua_State *L) { return binary(L, "__mul", LOOM_MUL, 0); }
static int l_ops___div(lua_State *L) { return binary(L, "__div", LOOM_DIV, 0); }
static int l_ops___pow(lua_State *L) { return binary(L, "__pow", LOOM_POW, 0); }

static int unary(lua_State *L, const char *fname, loom_unary_op op, int out_idx) {
    lua_settop(L, out_idx ? out_idx : 1);
    loom_tensor *x = loom_checktensor(L, 1);
    const loom_tensor *ins[1] = {x};
    loom_tensor *r = result_begin(L, out_idx, ins, 1);
    if (loom_unary(r, x, op) != LOOM_OK)
        loom_core_error(L, fname);
    return result_end(L, out_idx);
}

#define UNARY(name, op)                                                                                            \
    static int l_ops_##name(lua_State *L) { return unary(L, #name, op, 2); }
UNARY(neg, LOOM_NEG)
UNARY(abs, LOOM_ABS)
UNARY(exp, LOOM_EXP)
UNARY(log, LOOM_LOG)
UNARY(sqrt, LOOM_SQRT)
UNARY(rsqrt, LOOM_RSQRT)
UNARY(sin, LOOM_SIN)
UNARY(cos, LOOM_COS)
UNARY(tanh, LOOM_TANH)
UNARY(sigmoid, LOOM_SIGMOID)
UNARY(relu, LOOM_RELU)
UNARY(gelu, LOOM_GELU)
UNARY(gelu_tanh, LOOM_GELU_TANH)
UNARY(quick_gelu, LOOM_QUICK_GELU)
UNARY(silu, LOOM_SILU)
UNARY(reciprocal, LOOM_RECIPROCAL)
UNARY(square, LOOM_SQUARE)
UNARY(floor, LOOM_FLOOR)
UNARY(ceil, LOOM_CEIL)
UNARY(round, LOOM_ROUND)
#undef UNARY

/* Lua calls __unm with the operand twice. */
static int l_ops___unm(lua_State *L) {
    return unary(L, "__unm", LOOM_NEG, 0);
}

/* where(cond, a, b, out?): a and b may be numbers (taken as f32 scalars). */
static int l_ops_where(lua_State *L) {
    lua_settop(L, 4);
    loom_tensor *cond = loom_checktensor(L, 1);
    if (loom_dtype_is_float(cond->dtype))
        luaL_argerror(L, 1, lua_pushfstring(L, "expected a u8 or integer condition, got %s", loom_shape_str(cond).s));
    loom_tensor *a = loom_totensor(L, 2, LOOM_F32), *b = loom_totensor(L, 3, LOOM_F32);
    check_broadcast(L, 2, cond, a);
    check_broadcast(L, 3, cond, b);
    check_broadcast(L, 3, a, b);
    const loom_tensor *ins[3] = {cond, a, b};
    loom_tensor *r = result_begin(L, 4, ins, 3);
    if (loom_where(r, cond, a, b) != LOOM_OK)
        loom_core_error(L, "where");
    return result_end(L, 4);
}

/* ---------------------------------------------------------------------------
 * reductions: op(x, dim?, keepdim?, out?); without dim, over all elements
 * (keepdim then has no effect) */

static int reduce(lua_State *L, const char *fname, int is_argmax, loom_reduce_op op) {
    lua_settop(L, 4);
    loom_tensor *x = loom_checktensor(L, 1);
    int all = lua_isnoneornil(L, 2);
    int dim = all ? 0 : loom_checkdim(L, 2, x, 0);
    bool keepdim = !all && lua_toboolean(L, 3);
    if (all) {
        /* a flat view (or copy) of every element, held by a userdata */
        int64_t n = loom_tensor_numel(x);
        loom_tensor *flat = loom_newtensor(L);
        if (loom_tensor_reshape(flat, x, 1, &n) != LOOM_OK)
            loom_core_error(L, fname);
        x = flat;
    }
    const loom_tensor *ins[1] = {x};
    loom_tensor *r = result_begin(L, 4, ins, 1);
    int rc = is_argmax ? loom_argmax(r, x, dim, keepdim) : loom_reduce(r, x, dim, keepdim, op);
    if (rc != LOOM_OK)
        loom_core_error(L, fname);
    return result_end(L, 4);
}

static int l_ops_sum(lua_State *L) { return reduce(L, "sum", 0, LOOM_SUM); }
static int l_ops_mean(lua_State *L) { return reduce(L, "mean", 0, LOOM_MEAN); }
static int l_ops_max(lua_State *L) { return reduce(L, "max", 0, LOOM_MAX); }
static int l_ops_min(lua_State *L) { return reduce(L, "min", 0, LOOM_MIN); }
static int l_ops_argmax(lua_State *L) { return reduce(L, "argmax", 1, LOOM_MAX); }

/* ---------------------------------------------------------------------------
 * softmax and normalisation */

static int softmax(lua_State *L, const char *fname, bool log) {
    lua_settop(L, 4);
    loom_tensor *x = loom_checktensor(L, 1);
    check_float(L, 1, x);
    check_min_ndim(L, 1, x, 1);
    int dim = loom_optdim(L, 2, x, x->ndim - 1);
    loom_tensor *mask = loom_opttensor(L, 3);
    if (mask)
        check_broadcast_to(L, 3, mask, x->shape, x->ndim);
    const loom_tensor *ins[2] = {x, mask};
    loom_tensor *r = result_begin(L, 4, ins, 2);
    if (loom_softmax(r, x, mask, dim, log) != LOOM_OK)
        loom_core_error(L, fname);
    return result_end(L, 4);
}

static int l_ops_softmax(lua_State *L) { return softmax(L, "softmax", false); }
static int l_ops_log_softmax(lua_State *L) { return softmax(L, "log_softmax", true); }

/* A weight or bias of the last dimension's size, or nil. */
static loom_tensor *opt_feature_vector(lua_State *L, int arg, const loom_tensor *x) {
    loom_tensor *w = loom_opttensor(L, arg);
    int64_t n = x->shape[x->ndim - 1];
    if (w && (w->ndim != 1 || w->shape[0] != n))
        luaL_argerror(L, arg, lua_pushfstring(L, "expected [%I], got %s", (lua_Integer)n, loom_shape_str(w).s));
    return w;
}

/* layer_norm(x, weight?, bias?, eps?, out?) over the last dimension; eps
 * defaults to 1e-5 (torch.nn.LayerNorm). */
static int l_ops_layer_norm(lua_State *L) {
    lua_settop(L, 5);
    loom_tensor *x = loom_checktensor(L, 1);
    check_float(L, 1, x);
    check_min_ndim(L, 1, x, 1);
    loom_tensor *w = opt_feature_vector(L, 2, x), *b = opt_feature_vector(L, 3, x);
    double eps = luaL_optnumber(L, 4, 1e-5);
    const loom_tensor *ins[3] = {x, w, b};
    loom_tensor *r = result_begin(L, 5, ins, 3);
    if (loom_layer_norm(r, x, w, b, (float)eps) != LOOM_OK)
        loom_core_error(L, "layer_norm");
    return result_end(L, 5);
}

/* rms_norm(x, weight?, eps?, out?); eps defaults to 1e-6 (LLaMA's
 * rms_norm_eps). */
static int l_ops_rms_norm(lua_State *L) {
    lua_settop(L, 4);
    loom_tensor *x = loom_checktensor(L, 1);
    check_float(L, 1, x);
    check_min_ndim(L, 1, x, 1);
    loom_tensor *w = opt_feature_vector(L, 2, x);
    double eps = luaL_optnumber(L, 3, 1e-6);
    const loom_tensor *ins[2] = {x, w};
    loom_tensor *r = result_begin(L, 4, ins, 2);
    if (loom_rms_norm(r, x, w, (float)eps) != LOOM_OK)
        loom_core_error(L, "rms_norm");
    return result_end(L, 4);
}

/* ---------------------------------------------------------------------------
 * products and gathering */

/* linear(x, weight, bias?, out?): x (..., in), weight (out, in). */
static int l_ops_linear(lua_State *L) {
    lua_settop(L, 4);
    loom_tensor *x = loom_checktensor(L, 1), *w = loom_checktensor(L, 2);
    check_float(L, 1, x);
    check_min_ndim(L, 1, x, 1);
    check_float(L, 2, w);
    int64_t in = x->shape[x->ndim - 1];
    if (w->ndim != 2 || w->shape[1] != in)
        luaL_argerror(L, 2, lua_pushfstring(L, "expected [*, %I], got %s", (lua_Integer)in, loom_shape_str(w).s));
    loom_tensor *b = loom_opttensor(L, 3);
    if (b && (b->ndim != 1 || b->shape[0] != w->shape[0]))
        luaL_argerror(L, 3, lua_pushfstring(L, "expected [%I], got %s", (lua_Integer)w->shape[0], loom_shape_str(b).s));
    const loom_tensor *ins[3] = {x, w, b};
    loom_tensor *r = result_begin(L, 4, ins, 3);
    if (loom_linear(r, x, w, b) != LOOM_OK)
        loom_core_error(L, "linear");
    return result_end(L, 4);
}

/* matmul(a, b, out?) as torch.matmul: a (..., n, k), b (..., k, m). */
static int l_ops_matmul(lua_State *L) {
    lua_settop(L, 3);
    loom_tensor *a = loom_checktensor(L, 1), *b = loom_checktensor(L, 2);
    check_float(L, 1, a);
    check_float(L, 2, b);
    check_min_ndim(L, 1, a, 1);
    check_min_ndim(L, 2, b, 1);
    int64_t k = a->shape[a->ndim - 1];
    int64_t kb = b->ndim == 1 ? b->shape[0] : b->shape[b->ndim - 2];
    if (kb != k)
        luaL_argerror(L, 2, lua_pushfstring(L, b->ndim == 1 ? "expected [%I], got %s" :
                                               b->ndim == 2 ? "expected [%I, *], got %s" : "expected [..., %I, *], got %s",
                                            (lua_Integer)k, loom_shape_str(b).s));
    const loom_tensor *ins[2] = {a, b};
    loom_tensor *r = result_begin(L, 3, ins, 2);
    if (loom_matmul(r, a, b) != LOOM_OK)
        loom_core_error(L, "matmul");
    return result_end(L, 3);
}

/* embedding(weight, ids, out?): weight (V, D), 0-based ids. */
static int l_ops_embedding(lua_State *L) {
    lua_settop(L, 3);
    loom_tensor *w = loom_checktensor(L, 1), *ids = loom_checktensor(L, 2);
    check_float(L, 1, w);
    check_ndim(L, 1, w, 2, "(vocabulary, dim)");
    check_ids(L, 2, ids);
    const loom_tensor *ins[2] = {w, ids};
    loom_tensor *r = result_begin(L, 3, ins, 2);
    if (loom_embedding(r, w, ids) != LOOM_OK)
        loom_core_error(L, "embedding");
    return result_end(L, 3);
}

/* cat(list, dim?, out?): dim defaults to 1. */
static int l_ops_cat(lua_State *L) {
    lua_settop(L, 3);
    luaL_checktype(L, 1, LUA_TTABLE);
    int n = (int)lua_rawlen(L, 1);
    luaL_argcheck(L, n > 0, 1, "expected a non-empty list of tensors");
    /* the pointer array is a userdata, which the collector frees after an error */
    const loom_tensor **inputs = lua_newuserdatauv(L, (size_t)n * sizeof *inputs, 0);
    for (int i = 0; i < n; i++) {
        lua_rawgeti(L, 1, i + 1);
        loom_tensor *t = loom_testtensor(L, -1);
        if (!t)
            luaL_argerror(L, 1, lua_pushfstring(L, "loom.Tensor expected at position %d, got %s", i + 1,
                                                luaL_typename(L, -1)));
        lua_pop(L, 1); /* still referenced by the list */
        inputs[i] = t;
    }

    const loom_tensor *first = inputs[0];
    int dim = lua_isnoneornil(L, 2) ? 0 : loom_checkdim(L, 2, first, 0);
    for (int i = 1; i < n; i++) {
        const loom_tensor *t = inputs[i];
        int ok = t->ndim == first->ndim;
        for (int d = 0; ok && d < t->ndim; d++)
            ok = d == dim || t->shape[d] == first->shape[d];
        if (!ok)
            luaL_argerror(L, 1, lua_pushfstring(L, "tensor %d has shape %s, which does not match %s outside dimension %d",
                                                i + 1, loom_shape_str(t).s, loom_shape_str(first).s, dim + 1));
    }

    loom_tensor *r;
    if (lua_isnoneornil(L, 3)) {
        r = loom_newtensor(L);
    } else {
        r = loom_checktensor(L, 3);
        for (int i = 0; i < n; i++)
            if (inputs[i]->storage == r->storage)
                luaL_argerror(L, 3, "out must not share storage with an input");
    }
    if (loom_cat(r, inputs, n, dim) != LOOM_OK)
        loom_core_error(L, "cat");
    return result_end(L, 3);
}

/* index_select(x, dim, index, out?) with a 1-D index of 0-based ids. */
static int l_ops_index_select(lua_State *L) {
    lua_settop(L, 4);
    loom_tensor *x = loom_checktensor(L, 1);
    int dim = loom_checkdim(L, 2, x, 0);
    loom_tensor *index = loom_checktensor(L, 3);
    check_ids(L, 3, index);
    check_ndim(L, 3, index, 1, "(n)");
    const loom_tensor *ins[2] = {x, index};
    loom_tensor *r = result_begin(L, 4, ins, 2);
    if (loom_index_select(r, x, dim, index) != LOOM_OK)
        loom_core_error(L, "index_select");
    return result_end(L, 4);
}

/* gather(x, dim, index, out?) as torch.gather (0-based ids). */
static int l_ops_gather(lua_State *L) {
    lua_settop(L, 4);
    loom_tensor *x = loom_checktensor(L, 1);
    int dim = loom_checkdim(L, 2, x, 0);
    loom_tensor *index = loom_checktensor(L, 3);
    check_ids(L, 3, index);
    if (index->ndim != x->ndim)
        luaL_argerror(L, 3, lua_pushfstring(L, "expected %d dimensions like %s, got %s", x->ndim, loom_shape_str(x).s,
                                            loom_shape_str(index).s));
    const loom_tensor *ins[2] = {x, index};
    loom_tensor *r = result_begin(L, 4, ins, 2);
    if (loom_gather(r, x, dim, index) != LOOM_OK)
        loom_core_error(L, "gather");
    return result_end(L, 4);
}

/* ---------------------------------------------------------------------------
 * position encodings and attention */

/* rope(x, positions, opts?, out?): x (B, H, T, D); positions (T) or (B, T);
 * opts.theta (10000), opts.scaling (1), opts.rotary_dim (D), opts.style
 * ("half" or "interleaved"). */
static int l_ops_rope(lua_State *L) {
    lua_settop(L, 4);
    loom_tensor *x = loom_checktensor(L, 1), *pos = loom_checktensor(L, 2);
    check_float(L, 1, x);
    check_ndim(L, 1, x, 4, "(B, H, T, D)");
    check_ids(L, 2, pos);
    int64_t T = x->shape[2], D = x->shape[3];
    if (!((pos->ndim == 1 && pos->shape[0] == T) || (pos->ndim == 2 && pos->shape[0] == x->shape[0] && pos->shape[1] == T)))
        luaL_argerror(L, 2, lua_pushfstring(L, "expected [%I] or [%I, %I], got %s", (lua_Integer)T,
                                            (lua_Integer)x->shape[0], (lua_Integer)T, loom_shape_str(pos).s));

    int opts = opt_table(L, 3);
    double theta = opt_number_field(L, opts, "theta", 10000.0);
    double scaling = opt_number_field(L, opts, "scaling", 1.0);
    double rotary = opt_number_field(L, opts, "rotary_dim", (double)D);
    loom_rope_style style = LOOM_ROPE_HALF;
    if (opts && lua_getfield(L, opts, "style") != LUA_TNIL) {
        const char *s = lua_tostring(L, -1);
        if (s && strcmp(s, "interleaved") == 0)
            style = LOOM_ROPE_INTERLEAVED;
        else if (!s || strcmp(s, "half") != 0)
            luaL_argerror(L, 3, "field 'style' must be \"half\" or \"interleaved\"");
    }
    if (opts)
        lua_pop(L, 1);
    if (rotary != floor(rotary) || rotary < 2 || rotary > (double)D || fmod(rotary, 2) != 0)
        luaL_argerror(L, 3, lua_pushfstring(L, "field 'rotary_dim' must be an even integer in 2..%I, got %f",
                                            (lua_Integer)D, rotary));
    luaL_argcheck(L, theta > 0 && scaling > 0, 3, "fields 'theta' and 'scaling' must be positive");

    const loom_tensor *ins[2] = {x, pos};
    loom_tensor *r = result_begin(L, 4, ins, 2);
    if (loom_rope(r, x, pos, (float)theta, (float)scaling, (int)rotary, style) != LOOM_OK)
        loom_core_error(L, "rope");
    return result_end(L, 4);
}

/* alibi(n_heads, k_len, alibi_bias_max?, out?) -> (1, H, 1, K); the bias
 * maximum defaults to 8 (MPT's alibi_bias_max). */
static int l_ops_alibi(lua_State *L) {
    lua_settop(L, 4);
    lua_Integer heads = luaL_checkinteger(L, 1), klen = luaL_checkinteger(L, 2);
    luaL_argcheck(L, heads > 0 && heads <= INT32_MAX, 1, "number of heads must be positive");
    luaL_argcheck(L, klen >= 0, 2, "key length must be >= 0");
    double bias_max = luaL_optnumber(L, 3, 8.0);
    loom_tensor *r = result_begin(L, 4, NULL, 0);
    if (loom_alibi(r, (int)heads, klen, (float)bias_max) != LOOM_OK)
        loom_core_error(L, "alibi");
    return result_end(L, 4);
}

/* attention(q, k, v, opts?, out?): q (B, Hq, Q, D), k (B, Hkv, K, D),
 * v (B, Hkv, K, Dv); opts.causal, opts.mask, opts.scale (1/sqrt(D)). */
static int l_ops_attention(lua_State *L) {
    lua_settop(L, 5);
    loom_tensor *q = loom_checktensor(L, 1), *k = loom_checktensor(L, 2), *v = loom_checktensor(L, 3);
    check_float(L, 1, q);
    check_float(L, 2, k);
    check_float(L, 3, v);
    check_ndim(L, 1, q, 4, "(B, Hq, Q, D)");
    check_ndim(L, 2, k, 4, "(B, Hkv, K, D)");
    check_ndim(L, 3, v, 4, "(B, Hkv, K, Dv)");
    if (k->shape[0] != q->shape[0] || k->shape[3] != q->shape[3] || k->shape[1] == 0 || q->shape[1] % k->shape[1] != 0)
        luaL_argerror(L, 2, lua_pushfstring(L, "expected [%I, Hkv, *, %I] with Hkv dividing %I, got %s",
                                            (lua_Integer)q->shape[0], (lua_Integer)q->shape[3],
                                            (lua_Integer)q->shape[1], loom_shape_str(k).s));
    if (v->shape[0] != k->shape[0] || v->shape[1] != k->shape[1] || v->shape[2] != k->shape[2])
        luaL_argerror(L, 3, lua_pushfstring(L, "expected [%I, %I, %I, *], got %s", (lua_Integer)k->shape[0],
                                            (lua_Integer)k->shape[1], (lua_Integer)k->shape[2], loom_shape_str(v).s));

    int opts = opt_table(L, 4);
    loom_attention_opts o = {0};
    o.scale = (float)opt_number_field(L, opts, "scale", 0);
    loom_tensor *mask = NULL;
    if (opts) {
        lua_getfield(L, opts, "causal");
        o.causal = lua_toboolean(L, -1);
        lua_pop(L, 1);
        lua_getfield(L, opts, "mask"); /* stays on the stack while used */
        if (!lua_isnil(L, -1)) {
            mask = loom_testtensor(L, -1);
            if (!mask)
                luaL_argerror(L, 4, lua_pushfstring(L, "field 'mask' must be a loom.Tensor, got %s", luaL_typename(L, -1)));
            int64_t full[4] = {q->shape[0], q->shape[1], q->shape[2], k->shape[2]};
            check_broadcast_to(L, 4, mask, full, 4);
        }
        lua_replace(L, 4); /* keep the mask referenced where opts was */
    }
    o.mask = mask;

    const loom_tensor *ins[4] = {q, k, v, mask};
    loom_tensor *r = result_begin(L, 5, ins, 4);
    if (loom_attention(r, q, k, v, &o) != LOOM_OK)
        loom_core_error(L, "attention");
    return result_end(L, 5);
}

/* patch_embed(pixels, weight, bias?, out?): pixels (B, C, H, W), weight
 * (O, C, P, P), bias (O). */
static int l_ops_patch_embed(lua_State *L) {
    lua_settop(L, 4);
    loom_tensor *px = loom_checktensor(L, 1), *w = loom_checktensor(L, 2);
    check_float(L, 1, px);
    check_float(L, 2, w);
    check_ndim(L, 1, px, 4, "(B, C, H, W)");
    check_ndim(L, 2, w, 4, "(O, C, P, P)");
    int64_t P = w->shape[2];
    if (w->shape[1] != px->shape[1] || w->shape[3] != P || P <= 0)
        luaL_argerror(L, 2, lua_pushfstring(L, "expected [*, %I, P, P], got %s", (lua_Integer)px->shape[1],
                                            loom_shape_str(w).s));
    if (px->shape[2] % P != 0 || px->shape[3] % P != 0)
        luaL_argerror(L, 1, lua_pushfstring(L, "height and width must be multiples of the patch size %I, got %s",
                                            (lua_Integer)P, loom_shape_str(px).s));
    loom_tensor *b = loom_opttensor(L, 3);
    if (b && (b->ndim != 1 || b->shape[0] != w->shape[0]))
        luaL_argerror(L, 3, lua_pushfstring(L, "expected [%I], got %s", (lua_Integer)w->shape[0], loom_shape_str(b).s));
    const loom_tensor *ins[3] = {px, w, b};
    loom_tensor *r = result_begin(L, 4, ins, 3);
    if (loom_patch_embed(r, px, w, b) != LOOM_OK)
        loom_core_error(L, "patch_embed");
    return result_end(L, 4);
}

static int l_ops_set_linear_path(lua_State *L) {
    static const char *const names[] = {"f32", "bf16", NULL};
    int i = luaL_checkoption(L, 1, NULL, names);
    loom_set_linear_path(i == 0 ? LOOM_PATH_F32 : LOOM_PATH_BF16);
    return 0;
}

static int l_ops_get_linear_path(lua_State *L) {
    lua_pushstring(L, loom_get_linear_path() == LOOM_PATH_BF16 ? "bf16" : "f32");
    return 1;
}

static int l_ops_linear_kernel(lua_State *L) {
    lua_pushstring(L, loom_linear_bf16_kernel_name());
    return 1;
}

/* ---------------------------------------------------------------------------
 * KV cache userdata */

typedef struct kv_box {
    loom_kv_cache cache;
    bool live; /* initialised and not yet released */
} kv_box;

static kv_box *check_kv(lua_State *L, int idx) {
    kv_box *box = luaL_checkudata(L, idx, LOOM_KVCACHE_MT);
    if (!box->live)
        luaL_error(L, "attempt to use a released KV cache");
    return box;
}

/* The dtype of opts.dtype (argument `arg`): "f32" (the default) or "bf16". */
static loom_dtype kv_dtype_option(lua_State *L, int opts, int arg) {
    loom_dtype dtype = LOOM_F32;
    if (opts && lua_getfield(L, opts, "dtype") != LUA_TNIL) {
        const char *s = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
        if (s && strcmp(s, "bf16") == 0)
            dtype = LOOM_BF16;
        else if (!s || strcmp(s, "f32") != 0)
            luaL_argerror(L, arg, lua_pushfstring(L, "field 'dtype' must be \"f32\" or \"bf16\", got %s",
                                                  s ? lua_pushfstring(L, "\"%s\"", s) : luaL_typename(L, -1)));
    }
    if (opts)
        lua_pop(L, 1);
    return dtype;
}

/* loom.kv_cache(batch, n_kv_heads, capacity, head_dim, value_dim?, opts?).
 * opts may also take value_dim's place, and opts.dtype is "f32" or "bf16". */
static int l_ops_kv_cache(lua_State *L) {
    lua_settop(L, 6);
    lua_Integer dims[5];
    for (int i = 0; i < 4; i++) {
        dims[i] = luaL_checkinteger(L, i + 1);
        luaL_argcheck(L, dims[i] > 0, i + 1, "size must be positive");
    }
    int opts_arg = 6;
    if (lua_istable(L, 5)) {
        luaL_argcheck(L, lua_isnil(L, 6), 6, "no argument expected after the options table");
        opts_arg = 5;
        dims[4] = dims[3];
    } else {
        dims[4] = luaL_optinteger(L, 5, dims[3]);
        luaL_argcheck(L, dims[4] > 0, 5, "size must be positive");
    }
    loom_dtype dtype = kv_dtype_option(L, opt_table(L, opts_arg), opts_arg);
    kv_box *box = lua_newuserdatauv(L, sizeof *box, 0);
    memset(box, 0, sizeof *box);
    luaL_setmetatable(L, LOOM_KVCACHE_MT);
    if (loom_kv_cache_init_dtype(&box->cache, dims[0], dims[1], dims[2], dims[3], dims[4], dtype) != LOOM_OK)
        loom_core_error(L, "kv_cache");
    box->live = true;
    loom_gc_pace(L);
    return 1;
}

static int l_kv___gc(lua_State *L) {
    kv_box *box = lua_touserdata(L, 1);
    if (box && box->live) {
        loom_kv_cache_free(&box->cache);
        box->live = false;
    }
    return 0;
}

static int l_kv_free(lua_State *L) {
    luaL_checkudata(L, 1, LOOM_KVCACHE_MT);
    return l_kv___gc(L);
}

/* cache:append(k_new, v_new) -> k_all, v_all: views of the filled part. */
static int l_kv_append(lua_State *L) {
    kv_box *box = check_kv(L, 1);
    loom_tensor *k = loom_checktensor(L, 2), *v = loom_checktensor(L, 3);
    const loom_tensor *ck = &box->cache.k, *cv = &box->cache.v;
    check_ndim(L, 2, k, 4, "(B, Hkv, T, D)");
    check_ndim(L, 3, v, 4, "(B, Hkv, T, Dv)");
    if (k->shape[0] != ck->shape[0] || k->shape[1] != ck->shape[1] || k->shape[3] != ck->shape[3])
        luaL_argerror(L, 2, lua_pushfstring(L, "expected [%I, %I, *, %I], got %s", (lua_Integer)ck->shape[0],
                                            (lua_Integer)ck->shape[1], (lua_Integer)ck->shape[3], loom_shape_str(k).s));
    if (v->shape[0] != cv->shape[0] || v->shape[1] != cv->shape[1] || v->shape[2] != k->shape[2] ||
        v->shape[3] != cv->shape[3])
        luaL_argerror(L, 3, lua_pushfstring(L, "expected [%I, %I, %I, %I], got %s", (lua_Integer)cv->shape[0],
                                            (lua_Integer)cv->shape[1], (lua_Integer)k->shape[2],
                                            (lua_Integer)cv->shape[3], loom_shape_str(v).s));
    if (k->shape[2] > box->cache.capacity - box->cache.length)
        luaL_argerror(L, 2, lua_pushfstring(L, "%I new positions do not fit: the cache holds %I of %I",
                                            (lua_Integer)k->shape[2], (lua_Integer)box->cache.length,
                                            (lua_Integer)box->cache.capacity));
    loom_tensor *k_all = loom_newtensor(L);
    loom_tensor *v_all = loom_newtensor(L);
    if (loom_kv_cache_append(&box->cache, k, v, k_all, v_all) != LOOM_OK)
        loom_core_error(L, "append");
    return 2;
}

static int l_kv_length(lua_State *L) {
    lua_pushinteger(L, check_kv(L, 1)->cache.length);
    return 1;
}

static int l_kv_capacity(lua_State *L) {
    lua_pushinteger(L, check_kv(L, 1)->cache.capacity);
    return 1;
}

static int l_kv_dtype(lua_State *L) {
    lua_pushstring(L, loom_dtype_name(check_kv(L, 1)->cache.k.dtype));
    return 1;
}

static int l_kv_reset(lua_State *L) {
    check_kv(L, 1)->cache.length = 0;
    return 0;
}

static int l_kv___tostring(lua_State *L) {
    kv_box *box = luaL_checkudata(L, 1, LOOM_KVCACHE_MT);
    if (!box->live)
        lua_pushliteral(L, "loom.KVCache (released)");
    else
        lua_pushfstring(L, "loom.KVCache(length=%I, capacity=%I, k=%s, v=%s)", (lua_Integer)box->cache.length,
                        (lua_Integer)box->cache.capacity, loom_shape_str(&box->cache.k).s,
                        loom_shape_str(&box->cache.v).s);
    return 1;
}

static const luaL_Reg kv_methods[] = {
    {"append", l_kv_append}, {"length", l_kv_length}, {"capacity", l_kv_capacity},
    {"dtype", l_kv_dtype},   {"reset", l_kv_reset},   {"free", l_kv_free},
    {NULL, NULL},
};

static const luaL_Reg kv_meta[] = {
    {"__gc", l_kv___gc}, {"__close", l_kv___gc}, {"__tostring", l_kv___tostring}, {NULL, NULL},
};

/* ---------------------------------------------------------------------------
 * registration */

/* Operators that are both module functions and tensor methods. */
static const luaL_Reg ops_funcs[] = {
    {"add", l_ops_add},
    {"sub", l_ops_sub},
    {"mul", l_ops_mul},
    {"div", l_ops_div},
    {"pow", l_ops_pow},
    {"maximum", l_ops_maximum},
    {"minimum", l_ops_minimum},
    {"eq", l_ops_eq},
    {"ne", l_ops_ne},
    {"lt", l_ops_lt},
    {"le", l_ops_le},
    {"gt", l_ops_gt},
    {"ge", l_ops_ge},
    {"neg", l_ops_neg},
    {"abs", l_ops_abs},
    {"exp", l_ops_exp},
    {"log", l_ops_log},
    {"sqrt", l_ops_sqrt},
    {"rsqrt", l_ops_rsqrt},
    {"sin", l_ops_sin},
    {"cos", l_ops_cos},
    {"tanh", l_ops_tanh},
    {"sigmoid", l_ops_sigmoid},
    {"relu", l_ops_relu},
    {"gelu", l_ops_gelu},
    {"gelu_tanh", l_ops_gelu_tanh},
    {"quick_gelu", l_ops_quick_gelu},
    {"silu", l_ops_silu},
    {"reciprocal", l_ops_reciprocal},
    {"square", l_ops_square},
    {"floor", l_ops_floor},
    {"ceil", l_ops_ceil},
    {"round", l_ops_round},
    {"where", l_ops_where},
    {"sum", l_ops_sum},
    {"mean", l_ops_mean},
    {"max", l_ops_max},
    {"min", l_ops_min},
    {"argmax", l_ops_argmax},
    {"softmax", l_ops_softmax},
    {"log_softmax", l_ops_log_softmax},
    {"layer_norm", l_ops_layer_norm},
    {"rms_norm", l_ops_rms_norm},
    {"linear", l_ops_linear},
    {"matmul", l_ops_matmul},
    {"embedding", l_ops_embedding},
    {"index_select", l_ops_index_select},
    {"gather", l_ops_gather},
    {"rope", l_ops_rope},
    {"attention", l_ops_attention},
    {"patch_embed", l_ops_patch_embed},
    {NULL, NULL},
};

/* Module functions only. */
static const luaL_Reg ops_module_funcs[] = {
    {"cat", l_ops_cat},
    {"alibi", l_ops_alibi},
    {"kv_cache", l_ops_kv_cache},
    {"set_linear_path", l_ops_set_linear_path},
    {"get_linear_path", l_ops_get_linear_path},
    {"linear_kernel", l_ops_linear_kernel},
    {NULL, NULL},
};

static const luaL_Reg ops_meta[] = {
    {"__add", l_ops___add}, {"__sub", l_ops___sub}, {"__mul", l_ops___mul}, {"__div", l_ops___div},
    {"__pow", l_ops___pow}, {"__unm", l_ops___unm}, {NULL, NULL},
};

void loom_open_ops(lua_State *L) {
    luaL_setfuncs(L, ops_funcs, 0);
    luaL_setfuncs(L, ops_module_funcs, 0);
    luaL_getmetatable(L, LOOM_TENSOR_MT);
    luaL_setfuncs(L, ops_funcs, 0);
    luaL_setfuncs(L, ops_meta, 0);
    lua_pop(L, 1);

    luaL_newmetatable(L, LOOM_KVCACHE_MT);
    luaL_setfuncs(L, kv_meta, 0);
    luaL_newlib(L, kv_methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
}
