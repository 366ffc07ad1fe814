/* Tests of core/tokenizer*.c. The reference ids in tests/golden/tokenizers
 * (sentencepiece 0.1.97, transformers 4.44.2 slow tokenizers, the npm GPT-2
 * encoder) are read at run time and checked for GPT-2 byte-level BPE loaded
 * from encoder.json + vocab.bpe and from a tokenizer.json built here, and for
 * the SentencePiece BPE model loaded from its .model file (plain, HF legacy
 * and non-legacy) and from tokenizer.json files built from vocab.json the way
 * transformers' LlamaConverter builds them. Also covered: decoding, streaming
 * decoding, WordPiece and small tokenizer.json files with hand-derived ids,
 * malformed files and invalid UTF-8 input. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "check.h"
#include "tokenizer.h"

#define GOLDEN "tests/golden/tokenizers"

static char tmpdir[] = "/tmp/loom_test_tokenizer_XXXXXX";

static const char *tmp(const char *name) {
    static char paths[8][512];
    static int next;
    char *p = paths[next++ % 8];
    snprintf(p, sizeof paths[0], "%s/%s", tmpdir, name);
    return p;
}

static char *read_text(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *p = malloc((size_t)len + 1);
    if (fread(p, 1, (size_t)len, f) != (size_t)len) {
        free(p);
        fclose(f);
        return NULL;
    }
    p[len] = '\0';
    fclose(f);
    if (n)
        *n = (size_t)len;
    return p;
}

static void write_bytes(const char *path, const void *bytes, size_t n) {
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL, "cannot create %s", path);
    if (!f)
        return;
    CHECK(fwrite(bytes, 1, n, f) == n, "short write to %s", path);
    fclose(f);
}

static void write_json(const char *path, cJSON *root) {
    char *text = cJSON_PrintUnformatted(root);
    write_bytes(path, text, strlen(text));
    free(text);
}

static cJSON *read_json(const char *path) {
    char *text = read_text(path, NULL);
    CHECK(text != NULL, "cannot read %s", path);
    if (!text)
        return NULL;
    cJSON *root = cJSON_Parse(text);
    free(text);
    CHECK(root != NULL, "cannot parse %s", path);
    return root;
}

/* ---------------------------------------------------------------- comparisons */

static void print_ids(const char *label, const int32_t *ids, size_t n) {
    fprintf(stderr, "    %s (%zu): [", label, n);
    for (size_t i = 0; i < n; i++)
        fprintf(stderr, "%s%d", i ? ", " : "", ids[i]);
    fprintf(stderr, "]\n");
}

/* Read an array of ids from a JSON array into a malloc'd array. */
static int32_t *json_ids(const cJSON *array, size_t *n) {
    *n = (size_t)cJSON_GetArraySize(array);
    int32_t *ids = malloc((*n + 1) * sizeof *ids);
    size_t i = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, array) ids[i++] = (int32_t)v->valuedouble;
    return ids;
}

/* Compare encoded ids with the expected JSON array; print both on mismatch. */
static bool same_ids(const char *what, int index, const cJSON *expected, const int32_t *ids,
                     size_t n) {
    size_t m;
    int32_t *want = json_ids(expected, &m);
    bool same = m == n && (n == 0 || memcmp(want, ids, n * sizeof *ids) == 0);
    CHECK(same, "%s: string %d differs", what, index);
    if (!same) {
        print_ids("expected", want, m);
        print_ids("actual", ids, n);
    }
    free(want);
    return same;
}

static bool valid_utf8(const char *s, size_t n) {
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        unsigned char c = p[i];
        size_t k = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        if (k == 0 || i + k > n)
            return false;
        for (size_t j = 1; j < k; j++)
            if ((p[i + j] & 0xC0) != 0x80)
                return false;
        i += k;
    }
    return true;
}

/* Decode ids one at a time through a stream: every chunk must be whole UTF-8
 * characters, and all chunks together must equal `expected`. */
static void check_stream(const char *what, int index, const loom_tokenizer *tok,
                         const int32_t *ids, size_t n, const loom_decode_opts *opts,
                         const char *expected) {
    loom_decode_stream *s = NULL;
    CHECK_OK(loom_decode_stream_new(&s, tok, opts));
    if (!s)
        return;
    size_t cap = strlen(expected) + 64, len = 0;
    char *all = malloc(cap);
    bool chunks_valid = true;
    for (size_t i = 0; i <= n; i++) {
        const char *text = NULL;
        size_t tlen = 0;
        int rc = i < n ? loom_decode_stream_push(s, ids[i], &text, &tlen)
                       : loom_decode_stream_flush(s, &text, &tlen);
        CHECK(rc == 0, "%s: string %d: stream step %zu failed: %s", what, index, i,
              loom_last_error());
        if (rc)
            break;
        chunks_valid = chunks_valid && valid_utf8(text, tlen) && strlen(text) == tlen;
        if (len + tlen + 1 > cap) {
            cap = 2 * (len + tlen + 1);
            all = realloc(all, cap);
        }
        memcpy(all + len, text, tlen);
        len += tlen;
    }
    all[len] = '\0';
    CHECK(chunks_valid, "%s: string %d: a stream chunk split a UTF-8 character", what, index);
    CHECK(strcmp(all, expected) == 0, "%s: string %d: streamed \"%s\", expected \"%s\"", what,
          index, all, expected);
    free(all);
    loom_decode_stream_free(s);
}

static int32_t *encode(const loom_tokenizer *tok, const char *text, const loom_encode_opts *opts,
                       size_t *n) {
    int32_t *ids = NULL;
    *n = 0;
    int rc = loom_tokenizer_encode(tok, text, strlen(text), opts, &ids, n);
    CHECK(rc == 0, "encode \"%s\" failed: %s", text, loom_last_error());
    return ids;
}

static const cJSON *field(const cJSON *obj, const char *key) {
    return cJSON_GetObjectItemCaseSensitive(obj, key);
}

/* ---------------------------------------------------------------- GPT-2 */

/* Every golden string through a byte-level tokenizer: ids, pieces, decode
 * and streaming decode. */
static void check_gpt2_cases(const char *what, const loom_tokenizer *tok, const cJSON *cases) {
    const cJSON *c;
    cJSON_ArrayForEach(c, cases) {
        int index = field(c, "index")->valueint;
        const char *text = field(c, "text")->valuestring;
        size_t n;
        int32_t *ids = encode(tok, text, NULL, &n);
        same_ids(what, index, field(c, "ids_hf_gpt2tokenizer"), ids, n);
        same_ids(what, index, field(c, "ids_npm_gpt3_encoder"), ids, n);

        /* pieces */
        const cJSON *pieces = field(c, "pieces_hf_byte_level");
        bool pieces_ok = (size_t)cJSON_GetArraySize(pieces) == n;
        for (size_t i = 0; pieces_ok && i < n; i++) {
            size_t len;
            const char *p = loom_tokenizer_id_to_token(tok, ids[i], &len);
            const char *want = cJSON_GetArrayItem(pieces, (int)i)->valuestring;
            pieces_ok = p && len == strlen(want) && memcmp(p, want, len) == 0;
        }
        CHECK(pieces_ok, "%s: string %d: pieces differ from pieces_hf_byte_level", what, index);

        /* decode */
        const char *decoded_hf = field(c, "decoded_hf")->valuestring;
        char *out = NULL;
        size_t out_len;
        CHECK_OK(loom_tokenizer_decode(tok, ids, n, NULL, &out, &out_len));
        CHECK(out && strcmp(out, decoded_hf) == 0, "%s: string %d: decoded \"%s\", expected \"%s\"",
              what, index, out ? out : "(null)", decoded_hf);
        free(out);
        check_stream(what, index, tok, ids, n, NULL, decoded_hf);
        free(ids);
    }
}

/* GPT-2's tokenizer.json as the HF conversion writes it: the same vocabulary
 * and merges, ByteLevel pre-tokenizer and decoder, <|endoftext|> added. */
static void write_gpt2_tokenizer_json(const char *path, bool add_prefix_space) {
    cJSON *vocab = read_json(GOLDEN "/gpt2_bpe/encoder.json");
    char *merges_text = read_text(GOLDEN "/gpt2_bpe/vocab.bpe", NULL);
    if (!vocab || !merges_text)
        return;
    cJSON *merges = cJSON_CreateArray();
    char *save = NULL;
    for (char *line = strtok_r(merges_text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (strncmp(line, "#version", 8) == 0 || !*line)
            continue;
        cJSON_AddItemToArray(merges, cJSON_CreateString(line));
    }
    free(merges_text);

    cJSON *root = cJSON_CreateObject();
    cJSON *added = cJSON_AddArrayToObject(root, "added_tokens");
    cJSON *eot = cJSON_CreateObject();
    cJSON_AddNumberToObject(eot, "id", 50256);
    cJSON_AddStringToObject(eot, "content", "<|endoftext|>");
    cJSON_AddBoolToObject(eot, "single_word", 0);
    cJSON_AddBoolToObject(eot, "lstrip", 0);
    cJSON_AddBoolToObject(eot, "rstrip", 0);
    cJSON_AddBoolToObject(eot, "normalized", 1);
    cJSON_AddBoolToObject(eot, "special", 1);
    cJSON_AddItemToArray(added, eot);
    cJSON_AddNullToObject(root, "normalizer");
    cJSON *pre = cJSON_AddObjectToObject(root, "pre_tokenizer");
    cJSON_AddStringToObject(pre, "type", "ByteLevel");
    cJSON_AddBoolToObject(pre, "add_prefix_space", add_prefix_space);
    cJSON_AddBoolToObject(pre, "trim_offsets", 1);
    cJSON_AddBoolToObject(pre, "use_regex", 1);
    cJSON *post = cJSON_AddObjectToObject(root, "post_processor");
    cJSON_AddStringToObject(post, "type", "ByteLevel");
    cJSON *dec = cJSON_AddObjectToObject(root, "decoder");
    cJSON_AddStringToObject(dec, "type", "ByteLevel");
    cJSON *model = cJSON_AddObjectToObject(root, "model");
    cJSON_AddStringToObject(model, "type", "BPE");
    cJSON_AddNullToObject(model, "dropout");
    cJSON_AddNullToObject(model, "unk_token");
    cJSON_AddBoolToObject(model, "fuse_unk", 0);
    cJSON_AddBoolToObject(model, "byte_fallback", 0);
    cJSON_AddItemToObject(model, "vocab", vocab);
    cJSON_AddItemToObject(model, "merges", merges);
    write_json(path, root);
    cJSON_Delete(root);
}

static void test_gpt2(void) {
    cJSON *expected = read_json(GOLDEN "/gpt2_bpe/expected.json");
    if (!expected)
        return;
    const cJSON *cases = field(expected, "cases");
    CHECK(cJSON_GetArraySize(cases) == 47, "gpt2 cases: %d", cJSON_GetArraySize(cases));

    loom_tokenizer *files = NULL, *detected = NULL, *json = NULL;
    CHECK_OK(loom_tokenizer_load_bpe_files(&files, GOLDEN "/gpt2_bpe/encoder.json",
                                           GOLDEN "/gpt2_bpe/vocab.bpe"));
    CHECK_OK(loom_tokenizer_load(&detected, GOLDEN "/gpt2_bpe/encoder.json"));
    write_gpt2_tokenizer_json(tmp("gpt2_tokenizer.json"), false);
    CHECK_OK(loom_tokenizer_load(&json, tmp("gpt2_tokenizer.json")));

    if (files) {
        CHECK(loom_tokenizer_vocab_size(files) == field(expected, "vocab_size")->valueint,
              "vocab size %d", loom_tokenizer_vocab_size(files));
        CHECK(loom_tokenizer_get_kind(files) == LOOM_TOKENIZER_BYTE_LEVEL_BPE, "kind");
        check_gpt2_cases("gpt2 files", files, cases);
    }
    if (detected)
        check_gpt2_cases("gpt2 detected", detected, cases);
    if (json) {
        CHECK(loom_tokenizer_get_source(json) == LOOM_TOKENIZER_FROM_HF_JSON, "source");
        check_gpt2_cases("gpt2 tokenizer.json", json, cases);
    }

    /* ByteLevel add_prefix_space: "Hello world" encodes as " Hello world" */
    loom_tokenizer *prefixed = NULL;
    write_gpt2_tokenizer_json(tmp("gpt2_prefix.json"), true);
    CHECK_OK(loom_tokenizer_load(&prefixed, tmp("gpt2_prefix.json")));
    if (prefixed) {
        const cJSON *c = cJSON_GetArrayItem(cases, 1);
        CHECK(strcmp(field(c, "text")->valuestring, " Hello world") == 0, "case 1 text");
        size_t n;
        int32_t *ids = encode(prefixed, "Hello world", NULL, &n);
        same_ids("gpt2 add_prefix_space", 1, field(c, "ids_hf_gpt2tokenizer"), ids, n);
        free(ids);
        loom_tokenizer_free(prefixed);
    }

    if (files) {
        /* OPT prepends </s> (id 2 in OPT's own vocabulary; here any id works) */
        const cJSON *c = cJSON_GetArrayItem(cases, 0);
        size_t n, m;
        int32_t *plain = encode(files, field(c, "text")->valuestring, NULL, &n);
        CHECK_OK(loom_tokenizer_set_special_id(files, LOOM_TOKEN_BOS, 2));
        loom_encode_opts opts = LOOM_ENCODE_OPTS_DEFAULT;
        opts.add_bos = 1;
        int32_t *with_bos = encode(files, field(c, "text")->valuestring, &opts, &m);
        CHECK(m == n + 1, "add_bos: %zu ids, expected %zu", m, n + 1);
        CHECK(m > 0 && with_bos[0] == 2, "add_bos: first id %d", m ? with_bos[0] : -1);
        CHECK(m == n + 1 && memcmp(with_bos + 1, plain, n * 4) == 0, "add_bos: ids after BOS");
        free(plain);
        free(with_bos);

        /* <|endoftext|> is special: one id when parsed, text when not */
        const char *text = "a<|endoftext|>b";
        int32_t *ids = encode(files, text, NULL, &n);
        CHECK(n == 3, "<|endoftext|> parsed: %zu ids", n);
        CHECK(n > 1 && ids[1] == 50256, "<|endoftext|> id %d", n > 1 ? ids[1] : -1);
        free(ids);
        opts = LOOM_ENCODE_OPTS_DEFAULT;
        opts.parse_special = 0;
        ids = encode(files, text, &opts, &n);
        CHECK(n > 3, "<|endoftext|> as text: %zu ids", n);
        free(ids);
    }
    loom_tokenizer_free(files);
    loom_tokenizer_free(detected);
    loom_tokenizer_free(json);
    cJSON_Delete(expected);
}

/* ---------------------------------------------------------------- SentencePiece */

static const char *sp_type_name(const loom_tokenizer *tok, int32_t id) {
    if (loom_tokenizer_special_id(tok, LOOM_TOKEN_UNK) == id)
        return "unk";
    size_t len;
    const char *p = loom_tokenizer_id_to_token(tok, id, &len);
    if (loom_tokenizer_is_special(tok, id))
        return "control";
    if (p && len == 6 && strncmp(p, "<0x", 3) == 0 && p[5] == '>')
        return "byte";
    return "normal";
}

/* The pieces of the .model equal vocab.json (id, piece and type). */
static void test_sp_vocab(const loom_tokenizer *tok) {
    cJSON *vocab = read_json(GOLDEN "/sentencepiece_bpe/vocab.json");
    if (!vocab)
        return;
    CHECK(loom_tokenizer_vocab_size(tok) == cJSON_GetArraySize(vocab), "vocab size %d vs %d",
          loom_tokenizer_vocab_size(tok), cJSON_GetArraySize(vocab));
    int mismatches = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, vocab) {
        int32_t id = field(e, "id")->valueint;
        const char *piece = field(e, "piece")->valuestring;
        const char *type = field(e, "type")->valuestring;
        size_t len;
        const char *got = loom_tokenizer_id_to_token(tok, id, &len);
        bool ok = got && len == strlen(piece) && memcmp(got, piece, len) == 0 &&
                  loom_tokenizer_token_to_id(tok, piece, strlen(piece)) == id &&
                  strcmp(sp_type_name(tok, id), type) == 0;
        if (!ok && mismatches++ < 5)
            CHECK(ok, "piece %d: expected '%s' (%s), got '%.*s' (%s)", id, piece, type,
                  got ? (int)len : 0, got ? got : "", sp_type_name(tok, id));
    }
    CHECK(mismatches == 0, "%d pieces differ from vocab.json", mismatches);
    CHECK(loom_tokenizer_special_id(tok, LOOM_TOKEN_BOS) == 1, "bos");
    CHECK(loom_tokenizer_special_id(tok, LOOM_TOKEN_EOS) == 2, "eos");
    CHECK(loom_tokenizer_special_id(tok, LOOM_TOKEN_UNK) == 0, "unk");
    CHECK(loom_tokenizer_special_id(tok, LOOM_TOKEN_PAD) == -1, "pad");
    cJSON_Delete(vocab);
}

static void check_sp_cases(const char *what, const loom_tokenizer *tok, const cJSON *cases,
                           const char *ids_key, const loom_encode_opts *opts, bool check_decode) {
    const cJSON *c;
    cJSON_ArrayForEach(c, cases) {
        int index = field(c, "index")->valueint;
        const char *text = field(c, "text")->valuestring;
        size_t n;
        int32_t *ids = encode(tok, text, opts, &n);
        same_ids(what, index, field(c, ids_key), ids, n);
        if (check_decode) {
            const char *want = field(c, "decoded_sentencepiece")->valuestring;
            loom_decode_opts dopts = {.skip_special = true};
            char *out = NULL;
            CHECK_OK(loom_tokenizer_decode(tok, ids, n, &dopts, &out, NULL));
            CHECK(out && strcmp(out, want) == 0, "%s: string %d: decoded \"%s\", expected \"%s\"",
                  what, index, out ? out : "(null)", want);
            free(out);
            check_stream(what, index, tok, ids, n, &dopts, want);
        }
        free(ids);
    }
}

static void check_sp_pieces(const loom_tokenizer *tok, const cJSON *cases) {
    const cJSON *c;
    cJSON_ArrayForEach(c, cases) {
        int index = field(c, "index")->valueint;
        const cJSON *pieces = field(c, "pieces_sentencepiece");
        size_t m;
        int32_t *ids = json_ids(field(c, "ids_sentencepiece"), &m);
        bool ok = (size_t)cJSON_GetArraySize(pieces) == m;
        for (size_t i = 0; ok && i < m; i++) {
            size_t len;
            const char *p = loom_tokenizer_id_to_token(tok, ids[i], &len);
            const char *want = cJSON_GetArrayItem(pieces, (int)i)->valuestring;
            ok = p && len == strlen(want) && memcmp(p, want, len) == 0;
        }
        CHECK(ok, "sentencepiece pieces: string %d differs", index);
        free(ids);
    }
}

/* HF's SentencePieceExtractor: every split of a piece into two pieces of the
 * vocabulary is a merge; merges are ordered by the score of the merged piece
 * (highest first, stable), and within one piece by the ids of its halves. */
typedef struct merge_entry {
    int32_t left, right;
    double score;
    int32_t piece;
} merge_entry;

static int compare_local(const void *a, const void *b) {
    const merge_entry *x = a, *y = b;
    if (x->left != y->left)
        return x->left < y->left ? -1 : 1;
    return (x->right > y->right) - (x->right < y->right);
}

static int compare_score_desc(const void *a, const void *b) {
    const merge_entry *x = a, *y = b;
    if (x->score != y->score)
        return x->score > y->score ? -1 : 1;
    /* stable: keep the order of the pieces, then of the local sort */
    if (x->piece != y->piece)
        return x->piece < y->piece ? -1 : 1;
    return compare_local(a, b);
}

/* Build the tokenizer.json transformers' LlamaConverter writes for this
 * model: legacy (Prepend + Replace normalizer) or non-legacy (Metaspace
 * pre-tokenizer with prepend_scheme "first"). */
static void write_llama_tokenizer_json(const char *path, const loom_tokenizer *sp, bool legacy) {
    cJSON *vocab_list = read_json(GOLDEN "/sentencepiece_bpe/vocab.json");
    if (!vocab_list)
        return;
    int n = cJSON_GetArraySize(vocab_list);
    const char **piece = calloc((size_t)n, sizeof *piece);
    double *score = calloc((size_t)n, sizeof *score);
    const cJSON *e;
    cJSON_ArrayForEach(e, vocab_list) {
        int id = field(e, "id")->valueint;
        piece[id] = field(e, "piece")->valuestring;
        /* LlamaConverter.vocab(): <unk>, <s>, </s> get score 0 */
        score[id] = id < 3 ? 0.0 : field(e, "score")->valuedouble;
    }

    size_t cap = 1024, count = 0;
    merge_entry *merges = malloc(cap * sizeof *merges);
    for (int id = 0; id < n; id++) {
        const char *p = piece[id];
        size_t len = strlen(p), local_start = count;
        for (size_t cut = 1; cut < len; cut++) {
            if (((unsigned char)p[cut] & 0xC0) == 0x80)
                continue; /* split between characters only */
            int32_t l = loom_tokenizer_token_to_id(sp, p, cut);
            int32_t r = loom_tokenizer_token_to_id(sp, p + cut, len - cut);
            if (l < 0 || r < 0)
                continue;
            if (count == cap)
                merges = realloc(merges, (cap *= 2) * sizeof *merges);
            merges[count++] = (merge_entry){l, r, score[id], id};
        }
        qsort(merges + local_start, count - local_start, sizeof *merges, compare_local);
    }
    qsort(merges, count, sizeof *merges, compare_score_desc);

    cJSON *root = cJSON_CreateObject();
    cJSON *added = cJSON_AddArrayToObject(root, "added_tokens");
    for (int id = 0; id < 3; id++) {
        cJSON *t = cJSON_CreateObject();
        cJSON_AddNumberToObject(t, "id", id);
        cJSON_AddStringToObject(t, "content", piece[id]);
        cJSON_AddBoolToObject(t, "single_word", 0);
        cJSON_AddBoolToObject(t, "lstrip", 0);
        cJSON_AddBoolToObject(t, "rstrip", 0);
        cJSON_AddBoolToObject(t, "normalized", 0);
        cJSON_AddBoolToObject(t, "special", 1);
        cJSON_AddItemToArray(added, t);
    }
    if (legacy) {
        cJSON *norm = cJSON_AddObjectToObject(root, "normalizer");
        cJSON_AddStringToObject(norm, "type", "Sequence");
        cJSON *list = cJSON_AddArrayToObject(norm, "normalizers");
        cJSON *prepend = cJSON_CreateObject();
        cJSON_AddStringToObject(prepend, "type", "Prepend");
        cJSON_AddStringToObject(prepend, "prepend", "\xE2\x96\x81");
        cJSON_AddItemToArray(list, prepend);
        cJSON *replace = cJSON_CreateObject();
        cJSON_AddStringToObject(replace, "type", "Replace");
        cJSON_AddStringToObject(cJSON_AddObjectToObject(replace, "pattern"), "String", " ");
        cJSON_AddStringToObject(replace, "content", "\xE2\x96\x81");
        cJSON_AddItemToArray(list, replace);
        cJSON_AddNullToObject(root, "pre_tokenizer");
    } else {
        cJSON_AddNullToObject(root, "normalizer");
        cJSON *pre = cJSON_AddObjectToObject(root, "pre_tokenizer");
        cJSON_AddStringToObject(pre, "type", "Metaspace");
        cJSON_AddStringToObject(pre, "replacement", "\xE2\x96\x81");
        cJSON_AddStringToObject(pre, "prepend_scheme", "first");
        cJSON_AddBoolToObject(pre, "split", 0);
    }

    cJSON *post = cJSON_AddObjectToObject(root, "post_processor");
    cJSON_AddStringToObject(post, "type", "TemplateProcessing");
    cJSON *single = cJSON_AddArrayToObject(post, "single");
    cJSON *bos = cJSON_CreateObject();
    cJSON *bos_inner = cJSON_AddObjectToObject(bos, "SpecialToken");
    cJSON_AddStringToObject(bos_inner, "id", "<s>");
    cJSON_AddNumberToObject(bos_inner, "type_id", 0);
    cJSON_AddItemToArray(single, bos);
    cJSON *seq = cJSON_CreateObject();
    cJSON *seq_inner = cJSON_AddObjectToObject(seq, "Sequence");
    cJSON_AddStringToObject(seq_inner, "id", "A");
    cJSON_AddNumberToObject(seq_inner, "type_id", 0);
    cJSON_AddItemToArray(single, seq);
    cJSON *specials = cJSON_AddObjectToObject(post, "special_tokens");
    cJSON *s_entry = cJSON_AddObjectToObject(specials, "<s>");
    cJSON_AddStringToObject(s_entry, "id", "<s>");
    cJSON_AddItemToObject(s_entry, "ids", cJSON_CreateIntArray((const int[]){1}, 1));
    cJSON_AddItemToObject(s_entry, "tokens", cJSON_CreateStringArray((const char *[]){"<s>"}, 1));

    cJSON *dec = cJSON_AddObjectToObject(root, "decoder");
    cJSON_AddStringToObject(dec, "type", "Sequence");
    cJSON *decs = cJSON_AddArrayToObject(dec, "decoders");
    cJSON *rep = cJSON_CreateObject();
    cJSON_AddStringToObject(rep, "type", "Replace");
    cJSON_AddStringToObject(cJSON_AddObjectToObject(rep, "pattern"), "String", "\xE2\x96\x81");
    cJSON_AddStringToObject(rep, "content", " ");
    cJSON_AddItemToArray(decs, rep);
    cJSON *bf = cJSON_CreateObject();
    cJSON_AddStringToObject(bf, "type", "ByteFallback");
    cJSON_AddItemToArray(decs, bf);
    cJSON *fuse = cJSON_CreateObject();
    cJSON_AddStringToObject(fuse, "type", "Fuse");
    cJSON_AddItemToArray(decs, fuse);
    cJSON *strip = cJSON_CreateObject();
    cJSON_AddStringToObject(strip, "type", "Strip");
    cJSON_AddStringToObject(strip, "content", " ");
    cJSON_AddNumberToObject(strip, "start", 1);
    cJSON_AddNumberToObject(strip, "stop", 0);
    cJSON_AddItemToArray(decs, strip);

    cJSON *model = cJSON_AddObjectToObject(root, "model");
    cJSON_AddStringToObject(model, "type", "BPE");
    cJSON_AddNullToObject(model, "dropout");
    cJSON_AddStringToObject(model, "unk_token", "<unk>");
    cJSON_AddNullToObject(model, "continuing_subword_prefix");
    cJSON_AddNullToObject(model, "end_of_word_suffix");
    cJSON_AddBoolToObject(model, "fuse_unk", 1);
    cJSON_AddBoolToObject(model, "byte_fallback", 1);
    cJSON *vocab = cJSON_AddObjectToObject(model, "vocab");
    for (int id = 0; id < n; id++)
        cJSON_AddNumberToObject(vocab, piece[id], id);
    cJSON *merge_list = cJSON_AddArrayToObject(model, "merges");
    for (size_t i = 0; i < count; i++) {
        char line[256];
        snprintf(line, sizeof line, "%s %s", piece[merges[i].left], piece[merges[i].right]);
        cJSON_AddItemToArray(merge_list, cJSON_CreateString(line));
    }
    write_json(path, root);
    cJSON_Delete(root);
    free(merges);
    free(piece);
    free(score);
    cJSON_Delete(vocab_list);
}

static bool starts_with_space(const char *text) { return text[0] == ' '; }

static void test_sentencepiece(void) {
    cJSON *expected = read_json(GOLDEN "/sentencepiece_bpe/expected.json");
    if (!expected)
        return;
    const cJSON *cases = field(expected, "cases");
    CHECK(cJSON_GetArraySize(cases) == 47, "sentencepiece cases: %d", cJSON_GetArraySize(cases));

    loom_tokenizer *sp = NULL;
    CHECK_OK(loom_tokenizer_load(&sp, GOLDEN "/sentencepiece_bpe/sp_bpe.model"));
    if (!sp) {
        cJSON_Delete(expected);
        return;
    }
    CHECK(loom_tokenizer_get_source(sp) == LOOM_TOKENIZER_FROM_SENTENCEPIECE, "source");
    test_sp_vocab(sp);
    check_sp_pieces(sp, cases);

    /* sentencepiece's encode(): no BOS, special tokens are plain text */
    check_sp_cases("sentencepiece", sp, cases, "ids_sentencepiece", NULL, true);

    /* transformers' slow LlamaTokenizer, add_bos_token=True */
    loom_encode_opts hf = {.add_bos = 1, .add_eos = 0, .parse_special = 1, .legacy = 1};
    check_sp_cases("hf legacy=True", sp, cases, "ids_hf_llama_legacy_true", &hf, false);
    hf.legacy = 0;
    check_sp_cases("hf legacy=False", sp, cases, "ids_hf_llama_legacy_false", &hf, false);

    /* the same model through tokenizer.json files built as transformers does */
    loom_tokenizer *json = NULL;
    write_llama_tokenizer_json(tmp("llama_legacy.json"), sp, true);
    CHECK_OK(loom_tokenizer_load(&json, tmp("llama_legacy.json")));
    if (json) {
        CHECK(loom_tokenizer_get_kind(json) == LOOM_TOKENIZER_SENTENCEPIECE_BPE, "kind");
        check_sp_cases("tokenizer.json legacy", json, cases, "ids_hf_llama_legacy_true", NULL,
                       false);
        /* decoding the ids without BOS gives sentencepiece's text */
        const cJSON *c;
        cJSON_ArrayForEach(c, cases) {
            int index = field(c, "index")->valueint;
            size_t n;
            int32_t *ids = json_ids(field(c, "ids_sentencepiece"), &n);
            const char *want = field(c, "decoded_sentencepiece")->valuestring;
            loom_decode_opts dopts = {.skip_special = true};
            char *out = NULL;
            CHECK_OK(loom_tokenizer_decode(json, ids, n, &dopts, &out, NULL));
            CHECK(out && strcmp(out, want) == 0,
                  "tokenizer.json decode: string %d: \"%s\", expected \"%s\"", index,
                  out ? out : "(null)", want);
            free(out);
            check_stream("tokenizer.json stream", index, json, ids, n, &dopts, want);
            free(ids);
        }
        loom_tokenizer_free(json);
    }

    /* Non-legacy: the Metaspace pre-tokenizer ("first") matches the slow
     * tokenizer except on text that starts with a space, where the fast
     * tokenizer's Metaspace does not add a second U+2581 and the slow one
     * does; those strings are left out. */
    json = NULL;
    write_llama_tokenizer_json(tmp("llama_metaspace.json"), sp, false);
    CHECK_OK(loom_tokenizer_load(&json, tmp("llama_metaspace.json")));
    if (json) {
        const cJSON *c;
        int compared = 0;
        cJSON_ArrayForEach(c, cases) {
            const char *text = field(c, "text")->valuestring;
            if (starts_with_space(text))
                continue;
            size_t n;
            int32_t *ids = encode(json, text, NULL, &n);
            same_ids("tokenizer.json metaspace", field(c, "index")->valueint,
                     field(c, "ids_hf_llama_legacy_false"), ids, n);
            free(ids);
            compared++;
        }
        CHECK(compared == 42, "metaspace compared %d strings", compared);

        /* a leading space is kept as one U+2581, not doubled */
        size_t n, m;
        int32_t *a = encode(json, " Hello", NULL, &n);
        loom_encode_opts no_bos = LOOM_ENCODE_OPTS_DEFAULT;
        no_bos.add_bos = 0;
        int32_t *b = encode(json, "Hello", &no_bos, &m);
        CHECK(n == m + 1, "metaspace leading space: %zu vs %zu ids", n, m);
        CHECK(n > 0 && a[0] == 1, "metaspace leading space: BOS first");
        CHECK(n == m + 1 && memcmp(a + 1, b, m * 4) == 0, "metaspace leading space: same ids");
        free(a);
        free(b);
        loom_tokenizer_free(json);
    }

    loom_tokenizer_free(sp);
    cJSON_Delete(expected);
}

/* ---------------------------------------------------------------- streaming */

static void test_stream_holds_bytes(void) {
    loom_tokenizer *sp = NULL;
    CHECK_OK(loom_tokenizer_load(&sp, GOLDEN "/sentencepiece_bpe/sp_bpe.model"));
    if (!sp)
        return;
    /* U+1F600 is not in the vocabulary: four byte pieces F0 9F 98 80 */
    const char *text = "a\xF0\x9F\x98\x80";
    size_t n;
    int32_t *ids = encode(sp, text, NULL, &n);
    int32_t byte_f0 = loom_tokenizer_token_to_id(sp, "<0xF0>", 6);
    size_t first_byte = 0;
    while (first_byte < n && ids[first_byte] != byte_f0)
        first_byte++;
    CHECK(first_byte + 4 == n, "emoji as 4 byte pieces at the end: %zu of %zu", first_byte, n);

    loom_decode_stream *s = NULL;
    CHECK_OK(loom_decode_stream_new(&s, sp, NULL));
    const char *out;
    size_t len;
    for (size_t i = 0; s && i < n; i++) {
        CHECK_OK(loom_decode_stream_push(s, ids[i], &out, &len));
        if (i == 0)
            CHECK(strcmp(out, "a") == 0, "first chunk \"%s\"", out);
        else if (i + 1 < n)
            CHECK(len == 0, "chunk %zu should be held back, got %zu bytes", i, len);
        else
            CHECK(strcmp(out, "\xF0\x9F\x98\x80") == 0, "last chunk completes the emoji");
    }

    /* an incomplete character at the end comes out as U+FFFD on flush */
    loom_decode_stream_reset(s);
    CHECK_OK(loom_decode_stream_push(s, byte_f0, &out, &len));
    CHECK(len == 0, "held byte");
    CHECK_OK(loom_decode_stream_flush(s, &out, &len));
    CHECK(strcmp(out, "\xEF\xBF\xBD") == 0, "flush gives U+FFFD, got \"%s\"", out);

    /* an invalid id is an error */
    CHECK_ERROR(loom_decode_stream_push(s, 5000, &out, &len), "out of range");
    loom_decode_stream_free(s);
    free(ids);
    loom_tokenizer_free(sp);
}

/* ---------------------------------------------------------------- invalid UTF-8 */

static void test_invalid_utf8(void) {
    loom_tokenizer *sp = NULL, *gpt2 = NULL;
    CHECK_OK(loom_tokenizer_load(&sp, GOLDEN "/sentencepiece_bpe/sp_bpe.model"));
    CHECK_OK(loom_tokenizer_load_bpe_files(&gpt2, GOLDEN "/gpt2_bpe/encoder.json",
                                           GOLDEN "/gpt2_bpe/vocab.bpe"));
    if (sp) {
        /* sentencepiece's normalizer turns each invalid byte into U+FFFD */
        size_t n, m;
        int32_t *bad = encode(sp, "a\xFF" "b\xE4\xB8", NULL, &n);
        int32_t *good = encode(sp, "a\xEF\xBF\xBD" "b\xEF\xBF\xBD\xEF\xBF\xBD", NULL, &m);
        CHECK(n == m, "invalid bytes as U+FFFD: %zu vs %zu ids", n, m);
        CHECK(n == m && memcmp(bad, good, n * 4) == 0, "invalid bytes as U+FFFD: ids differ");
        free(bad);
        free(good);
    }
    if (gpt2) {
        /* byte-level BPE encodes the byte itself; decoding repairs it */
        size_t n;
        int32_t *ids = encode(gpt2, "\xFF", NULL, &n);
        int32_t y = loom_tokenizer_token_to_id(gpt2, "\xC3\xBF", 2); /* "ÿ" stands for 0xFF */
        CHECK(n == 1, "byte 0xFF: %zu ids", n);
        CHECK(n > 0 && ids[0] == y, "byte 0xFF: id %d, expected %d", n ? ids[0] : -1, y);
        char *out = NULL;
        CHECK_OK(loom_tokenizer_decode(gpt2, ids, n, NULL, &out, NULL));
        CHECK(out && strcmp(out, "\xEF\xBF\xBD") == 0, "decoded 0xFF as U+FFFD");
        free(out);
        free(ids);

        /* a truncated 3-byte sequence is one maximal subpart: one U+FFFD */
        ids = encode(gpt2, "x\xE4\xB8", NULL, &n);
        CHECK_OK(loom_tokenizer_decode(gpt2, ids, n, NULL, &out, NULL));
        CHECK(out && strcmp(out, "x\xEF\xBF\xBD") == 0, "truncated sequence decoded \"%s\"",
              out ? out : "");
        free(out);
        free(ids);
    }
    loom_tokenizer_free(sp);
    loom_tokenizer_free(gpt2);
}

/* Random text, fixed seed: valid UTF-8 round-trips exactly through the
 * SentencePiece and byte-level tokenizers, and random bytes never fail and
 * decode to valid UTF-8. */
static uint32_t lcg_next(uint32_t *state) {
    *state = *state * 1664525u + 1013904223u;
    return *state >> 8;
}

static size_t put_utf8(char *out, uint32_t cp) {
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

static void test_random_text(void) {
    loom_tokenizer *sp = NULL, *gpt2 = NULL;
    CHECK_OK(loom_tokenizer_load(&sp, GOLDEN "/sentencepiece_bpe/sp_bpe.model"));
    CHECK_OK(loom_tokenizer_load_bpe_files(&gpt2, GOLDEN "/gpt2_bpe/encoder.json",
                                           GOLDEN "/gpt2_bpe/vocab.bpe"));
    if (!sp || !gpt2) {
        loom_tokenizer_free(sp);
        loom_tokenizer_free(gpt2);
        return;
    }
    const loom_tokenizer *toks[2] = {sp, gpt2};
    static const uint32_t ranges[][2] = {{0x20, 0x7E},     {0x09, 0x0D},    {0xA0, 0x24F},
                                         {0x370, 0x52F},   {0x3040, 0x30FF}, {0x4E00, 0x9FFF},
                                         {0xAC00, 0xD7A3}, {0x1F300, 0x1F64F}};
    uint32_t state = 12345;
    int round_trip_failures = 0, random_byte_failures = 0;
    for (int iter = 0; iter < 300; iter++) {
        char text[512];
        size_t len = 0, count = lcg_next(&state) % 40;
        for (size_t i = 0; i < count; i++) {
            const uint32_t *r = ranges[lcg_next(&state) % 8];
            uint32_t cp = r[0] + lcg_next(&state) % (r[1] - r[0] + 1);
            if (cp == 0x2581)
                cp = 'x'; /* sentencepiece decodes its meta symbol as a space */
            len += put_utf8(text + len, cp);
        }
        text[len] = '\0';

        char bytes[64];
        size_t nbytes = lcg_next(&state) % sizeof bytes;
        for (size_t i = 0; i < nbytes; i++)
            bytes[i] = (char)(lcg_next(&state) & 0xFF);

        for (int k = 0; k < 2; k++) {
            int32_t *ids = NULL;
            size_t n = 0;
            char *out = NULL;
            loom_decode_opts skip = {.skip_special = true};
            int rc = loom_tokenizer_encode(toks[k], text, len, NULL, &ids, &n);
            if (rc == 0)
                rc = loom_tokenizer_decode(toks[k], ids, n, &skip, &out, NULL);
            if (rc != 0 || strcmp(out, text) != 0) {
                if (round_trip_failures++ < 3)
                    CHECK(0, "tokenizer %d: random text %d does not round-trip: \"%s\" -> \"%s\"",
                          k, iter, text, out ? out : loom_last_error());
            }
            free(ids);
            free(out);

            ids = NULL;
            out = NULL;
            size_t out_len = 0;
            rc = loom_tokenizer_encode(toks[k], bytes, nbytes, NULL, &ids, &n);
            if (rc == 0)
                rc = loom_tokenizer_decode(toks[k], ids, n, &skip, &out, &out_len);
            if (rc != 0 || !valid_utf8(out, out_len))
                random_byte_failures++;
            free(ids);
            free(out);
        }
    }
    CHECK(round_trip_failures == 0, "%d random texts did not round-trip", round_trip_failures);
    CHECK(random_byte_failures == 0, "%d random byte strings failed", random_byte_failures);
    loom_tokenizer_free(sp);
    loom_tokenizer_free(gpt2);
}

/* ---------------------------------------------------------------- added tokens */

static void test_added_tokens(void) {
    loom_tokenizer *sp = NULL, *gpt2 = NULL;
    CHECK_OK(loom_tokenizer_load(&sp, GOLDEN "/sentencepiece_bpe/sp_bpe.model"));
    CHECK_OK(loom_tokenizer_load_bpe_files(&gpt2, GOLDEN "/gpt2_bpe/encoder.json",
                                           GOLDEN "/gpt2_bpe/vocab.bpe"));
    if (sp) {
        /* LLaVA adds <image> */
        int32_t image = -1;
        CHECK_OK(loom_tokenizer_add_token(sp, "<image>", true, &image));
        CHECK(image == 1000, "<image> id %d", image);
        CHECK(loom_tokenizer_vocab_size(sp) == 1001, "vocab size %d", loom_tokenizer_vocab_size(sp));
        loom_encode_opts hf = {.add_bos = 1, .add_eos = 0, .parse_special = 1, .legacy = 1};
        size_t n, a_n, b_n;
        int32_t *ids = encode(sp, "Hi<image>there", &hf, &n);
        loom_encode_opts plain = {0, 0, 0, 1};
        int32_t *a = encode(sp, "Hi", &plain, &a_n);
        int32_t *b = encode(sp, "there", &plain, &b_n);
        bool ok = n == 1 + a_n + 1 + b_n && ids[0] == 1 && memcmp(ids + 1, a, a_n * 4) == 0 &&
                  ids[1 + a_n] == image && memcmp(ids + 2 + a_n, b, b_n * 4) == 0;
        CHECK(ok, "Hi<image>there: %zu ids", n);
        char *out = NULL;
        loom_decode_opts keep = {.skip_special = false}, skip = {.skip_special = true};
        CHECK_OK(loom_tokenizer_decode(sp, ids, n, &keep, &out, NULL));
        CHECK(out && strcmp(out, "Hi<image> there") == 0, "decode with <image>: \"%s\"",
              out ? out : "");
        free(out);
        CHECK_OK(loom_tokenizer_decode(sp, ids, n, &skip, &out, NULL));
        CHECK(out && strcmp(out, "Hi there") == 0, "decode skipping <image>: \"%s\"",
              out ? out : "");
        free(out);
        free(ids);
        free(a);
        free(b);

        /* adding an existing piece keeps its id */
        int32_t again = -1;
        CHECK_OK(loom_tokenizer_add_token(sp, "<image>", true, &again));
        CHECK(again == image, "re-adding keeps id %d", again);
        CHECK_ERROR(loom_tokenizer_add_token(sp, "", false, NULL), "empty token");
    }
    if (gpt2) {
        /* OpenFlamingo adds <image> and <|endofchunk|> */
        int32_t image = -1, chunk = -1;
        CHECK_OK(loom_tokenizer_add_token(gpt2, "<image>", false, &image));
        CHECK_OK(loom_tokenizer_add_token(gpt2, "<|endofchunk|>", true, &chunk));
        CHECK(image == 50257, "<image> id %d", image);
        CHECK(chunk == 50258, "<|endofchunk|> id %d", chunk);
        size_t n;
        int32_t *ids = encode(gpt2, "<image>A cat.<|endofchunk|>", NULL, &n);
        CHECK(n >= 3, "added tokens in text: %zu ids", n);
        CHECK(n > 0 && ids[0] == image, "first id %d", n ? ids[0] : -1);
        CHECK(n > 0 && ids[n - 1] == chunk, "last id %d", n ? ids[n - 1] : -1);
        char *out = NULL;
        CHECK_OK(loom_tokenizer_decode(gpt2, ids, n, NULL, &out, NULL));
        CHECK(out && strcmp(out, "<image>A cat.<|endofchunk|>") == 0, "decode \"%s\"",
              out ? out : "");
        free(out);
        loom_decode_opts skip = {.skip_special = true};
        CHECK_OK(loom_tokenizer_decode(gpt2, ids, n, &skip, &out, NULL));
        CHECK(out && strcmp(out, "<image>A cat.") == 0, "decode skipping specials \"%s\"",
              out ? out : "");
        free(out);
        free(ids);
    }
    loom_tokenizer_free(sp);
    loom_tokenizer_free(gpt2);
}

/* ---------------------------------------------------------------- WordPiece */

/* A small BERT vocabulary; expected ids are worked out by hand from BERT's
 * rules (lower case, accents stripped, punctuation and CJK split, greedy
 * longest-match WordPiece with "##"). */
static const char *const wp_vocab[] = {
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", /* 0-4 */
    "the", "cat", "sat", "on", "mat",             /* 5-9 */
    "un", "##aff", "##able", ",", ".",            /* 10-14 */
    "cafe", "naive", "!", "中", "文",             /* 15-19 */
    "##s", "play", "##ing", "a", "b",             /* 20-24 */
};

/* Expected ids, by hand: [CLS]=2 ... [SEP]=3, "dog" is not in the
 * vocabulary so it is [UNK]=1, and [MASK] is matched as a special token. */
static const struct {
    const char *text;
    int32_t ids[16];
    size_t n;
} wp_cases[] = {
    {"The cat sat on the mat.", {2, 5, 6, 7, 8, 5, 9, 14, 3}, 9},
    {"UNAFFABLE cats, playing!", {2, 10, 11, 12, 6, 20, 13, 21, 22, 17, 3}, 11},
    {"Caf\xC3\xA9 na\xC3\xAFve", {2, 15, 16, 3}, 4},
    {"\xE4\xB8\xAD\xE6\x96\x87" "cat", {2, 18, 19, 6, 3}, 5},
    {"dog [MASK] a\tb", {2, 1, 4, 23, 24, 3}, 6},
    {"", {2, 3}, 2},
};

static void test_wordpiece(void) {
    char text[1024] = "";
    for (size_t i = 0; i < sizeof wp_vocab / sizeof wp_vocab[0]; i++) {
        strcat(text, wp_vocab[i]);
        strcat(text, "\n");
    }
    write_bytes(tmp("vocab.txt"), text, strlen(text));
    loom_tokenizer *wp = NULL;
    CHECK_OK(loom_tokenizer_load(&wp, tmp("vocab.txt")));
    if (!wp)
        return;
    CHECK(loom_tokenizer_get_kind(wp) == LOOM_TOKENIZER_WORDPIECE, "kind");

    for (size_t k = 0; k < sizeof wp_cases / sizeof wp_cases[0]; k++) {
        size_t n;
        int32_t *ids = encode(wp, wp_cases[k].text, NULL, &n);
        bool same = n == wp_cases[k].n && memcmp(ids, wp_cases[k].ids, n * 4) == 0;
        CHECK(same, "wordpiece case %zu (\"%s\") differs", k, wp_cases[k].text);
        if (!same) {
            print_ids("expected", wp_cases[k].ids, wp_cases[k].n);
            print_ids("actual", ids, n);
        }
        free(ids);
    }

    /* decode glues ## pieces and cleans up spaces before punctuation */
    int32_t ids[] = {2, 10, 11, 12, 6, 20, 13, 21, 22, 17, 3};
    char *out = NULL;
    loom_decode_opts skip = {.skip_special = true};
    CHECK_OK(loom_tokenizer_decode(wp, ids, 11, &skip, &out, NULL));
    CHECK(out && strcmp(out, "unaffable cats, playing!") == 0, "wordpiece decode \"%s\"",
          out ? out : "");
    free(out);
    loom_tokenizer_free(wp);

    CHECK_ERROR(loom_tokenizer_load(&wp, "/nonexistent/vocab.txt"), "cannot open");
    write_bytes(tmp("vocab_no_unk.txt"), "a\nb\n", 4);
    CHECK_ERROR(loom_tokenizer_load_wordpiece_vocab(&wp, tmp("vocab_no_unk.txt"), true), "[UNK]");
}

/* OPT's files: GPT-2 merges with fairseq's special tokens at ids 0-3. */
static void test_opt_specials(void) {
    const char *vocab = "{\"<s>\": 0, \"<pad>\": 1, \"</s>\": 2, \"<unk>\": 3, \"a\": 4, "
                        "\"b\": 5, \"ab\": 6, \"\xC4\xA0\": 7, \"\xC4\xA0" "ab\": 8}";
    const char *merges = "#version: 0.2\na b\n\xC4\xA0 ab\n";
    write_bytes(tmp("opt_vocab.json"), vocab, strlen(vocab));
    write_bytes(tmp("opt_merges.txt"), merges, strlen(merges));
    loom_tokenizer *tok = NULL;
    CHECK_OK(loom_tokenizer_load_bpe_files(&tok, tmp("opt_vocab.json"), tmp("opt_merges.txt")));
    if (!tok)
        return;
    CHECK(loom_tokenizer_special_id(tok, LOOM_TOKEN_BOS) == 0, "bos");
    CHECK(loom_tokenizer_special_id(tok, LOOM_TOKEN_EOS) == 2, "eos");
    CHECK(loom_tokenizer_special_id(tok, LOOM_TOKEN_PAD) == 1, "pad");
    CHECK(loom_tokenizer_special_id(tok, LOOM_TOKEN_UNK) == 3, "unk");

    /* OPT's tokenizer prepends </s> */
    CHECK_OK(loom_tokenizer_set_special_id(tok, LOOM_TOKEN_BOS, 2));
    loom_encode_opts opts = LOOM_ENCODE_OPTS_DEFAULT;
    opts.add_bos = 1;
    size_t n;
    int32_t *ids = encode(tok, "ab ab</s>", &opts, &n);
    int32_t want[] = {2, 6, 8, 2};
    bool same = n == 4 && memcmp(ids, want, sizeof want) == 0;
    CHECK(same, "OPT encode differs");
    if (!same)
        print_ids("actual", ids, n);
    free(ids);
    CHECK_ERROR(loom_tokenizer_set_special_id(tok, LOOM_TOKEN_BOS, 99), "out of range");
    loom_tokenizer_free(tok);
}

/* ---------------------------------------------------------------- hand-written tokenizer.json */

/* A small SentencePiece-style BPE with a splitting Metaspace pre-tokenizer,
 * added tokens with lstrip and single_word, and a BOS/EOS template. Merges:
 * rank 0 "▁ a", 1 "a b", 2 "▁a b", 3 "▁ b". */
static const char metaspace_json[] =
    "{\"added_tokens\": ["
    " {\"id\": 0, \"content\": \"<unk>\", \"special\": true},"
    " {\"id\": 1, \"content\": \"<s>\", \"special\": true},"
    " {\"id\": 2, \"content\": \"</s>\", \"special\": true},"
    " {\"id\": 10, \"content\": \"<mask>\", \"special\": true, \"lstrip\": true},"
    " {\"id\": 11, \"content\": \"[X]\", \"special\": false, \"single_word\": true}],"
    " \"normalizer\": null,"
    " \"pre_tokenizer\": {\"type\": \"Metaspace\", \"replacement\": \"\xE2\x96\x81\","
    "  \"prepend_scheme\": \"always\", \"split\": true},"
    " \"post_processor\": {\"type\": \"TemplateProcessing\", \"single\": ["
    "  {\"SpecialToken\": {\"id\": \"<s>\", \"type_id\": 0}},"
    "  {\"Sequence\": {\"id\": \"A\", \"type_id\": 0}},"
    "  {\"SpecialToken\": {\"id\": \"</s>\", \"type_id\": 0}}],"
    "  \"special_tokens\": {\"<s>\": {\"id\": \"<s>\", \"ids\": [1], \"tokens\": [\"<s>\"]},"
    "   \"</s>\": {\"id\": \"</s>\", \"ids\": [2], \"tokens\": [\"</s>\"]}}},"
    " \"decoder\": {\"type\": \"Metaspace\", \"replacement\": \"\xE2\x96\x81\","
    "  \"prepend_scheme\": \"always\", \"split\": true},"
    " \"model\": {\"type\": \"BPE\", \"unk_token\": \"<unk>\", \"fuse_unk\": true,"
    "  \"vocab\": {\"<unk>\": 0, \"<s>\": 1, \"</s>\": 2, \"\xE2\x96\x81\": 3, \"a\": 4, \"b\": 5,"
    "   \"\xE2\x96\x81" "a\": 6, \"\xE2\x96\x81" "b\": 7, \"ab\": 8, \"\xE2\x96\x81" "ab\": 9,"
    "   \"<mask>\": 10, \"[X]\": 11},"
    "  \"merges\": [[\"\xE2\x96\x81\", \"a\"], [\"a\", \"b\"], [\"\xE2\x96\x81" "a\", \"b\"],"
    "   [\"\xE2\x96\x81\", \"b\"]]}}";

static void test_hand_json_metaspace(void) {
    write_bytes(tmp("metaspace.json"), metaspace_json, strlen(metaspace_json));
    loom_tokenizer *tok = NULL;
    CHECK_OK(loom_tokenizer_load(&tok, tmp("metaspace.json")));
    if (!tok)
        return;
    struct {
        const char *text;
        int32_t ids[8];
        size_t n;
    } cases[] = {
        /* "▁ab▁b" splits into "▁ab" (▁+a, then ▁a+b) and "▁b" */
        {"ab b", {1, 9, 7, 2}, 4},
        /* <mask> strips the space on its left; "b" gets its own ▁ */
        {"a <mask>b", {1, 6, 10, 7, 2}, 5},
        /* [X] inside a word is text: '[', 'X', ']' fuse into one <unk> */
        {"a[X] b", {1, 6, 0, 7, 2}, 5},
        /* [X] as a word matches; "a " leaves a lone ▁ */
        {"a [X] b", {1, 6, 3, 11, 7, 2}, 6},
        {"", {1, 2}, 2},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        size_t n;
        int32_t *ids = encode(tok, cases[k].text, NULL, &n);
        bool same = n == cases[k].n && memcmp(ids, cases[k].ids, n * 4) == 0;
        CHECK(same, "metaspace case %zu (\"%s\") differs", k, cases[k].text);
        if (!same) {
            print_ids("expected", cases[k].ids, cases[k].n);
            print_ids("actual", ids, n);
        }
        free(ids);
    }

    int32_t ids[] = {1, 9, 7, 2};
    char *out = NULL;
    loom_decode_opts keep = {.skip_special = false}, skip = {.skip_special = true};
    CHECK_OK(loom_tokenizer_decode(tok, ids, 4, &keep, &out, NULL));
    CHECK(out && strcmp(out, "<s> ab b</s>") == 0, "decode keeping specials: \"%s\"",
          out ? out : "");
    free(out);
    CHECK_OK(loom_tokenizer_decode(tok, ids, 4, &skip, &out, NULL));
    CHECK(out && strcmp(out, "ab b") == 0, "decode skipping specials: \"%s\"", out ? out : "");
    free(out);
    loom_tokenizer_free(tok);
}

/* BERT's tokenizer.json for the vocabulary of test_wordpiece. */
static void test_hand_json_bert(void) {
    cJSON *root = cJSON_CreateObject();
    cJSON *added = cJSON_AddArrayToObject(root, "added_tokens");
    for (int id = 0; id < 5; id++) {
        cJSON *t = cJSON_CreateObject();
        cJSON_AddNumberToObject(t, "id", id);
        cJSON_AddStringToObject(t, "content", wp_vocab[id]);
        cJSON_AddBoolToObject(t, "special", 1);
        cJSON_AddItemToArray(added, t);
    }
    cJSON *norm = cJSON_AddObjectToObject(root, "normalizer");
    cJSON_AddStringToObject(norm, "type", "BertNormalizer");
    cJSON_AddBoolToObject(norm, "clean_text", 1);
    cJSON_AddBoolToObject(norm, "handle_chinese_chars", 1);
    cJSON_AddNullToObject(norm, "strip_accents");
    cJSON_AddBoolToObject(norm, "lowercase", 1);
    cJSON_AddStringToObject(cJSON_AddObjectToObject(root, "pre_tokenizer"), "type",
                            "BertPreTokenizer");
    cJSON *post = cJSON_AddObjectToObject(root, "post_processor");
    cJSON_AddStringToObject(post, "type", "BertProcessing");
    cJSON *sep = cJSON_AddArrayToObject(post, "sep");
    cJSON_AddItemToArray(sep, cJSON_CreateString("[SEP]"));
    cJSON_AddItemToArray(sep, cJSON_CreateNumber(3));
    cJSON *cls = cJSON_AddArrayToObject(post, "cls");
    cJSON_AddItemToArray(cls, cJSON_CreateString("[CLS]"));
    cJSON_AddItemToArray(cls, cJSON_CreateNumber(2));
    cJSON *dec = cJSON_AddObjectToObject(root, "decoder");
    cJSON_AddStringToObject(dec, "type", "WordPiece");
    cJSON_AddStringToObject(dec, "prefix", "##");
    cJSON_AddBoolToObject(dec, "cleanup", 1);
    cJSON *model = cJSON_AddObjectToObject(root, "model");
    cJSON_AddStringToObject(model, "type", "WordPiece");
    cJSON_AddStringToObject(model, "unk_token", "[UNK]");
    cJSON_AddStringToObject(model, "continuing_subword_prefix", "##");
    cJSON_AddNumberToObject(model, "max_input_chars_per_word", 100);
    cJSON *vocab = cJSON_AddObjectToObject(model, "vocab");
    for (size_t i = 0; i < sizeof wp_vocab / sizeof wp_vocab[0]; i++)
        cJSON_AddNumberToObject(vocab, wp_vocab[i], (double)i);
    write_json(tmp("bert.json"), root);
    cJSON_Delete(root);

    loom_tokenizer *tok = NULL;
    CHECK_OK(loom_tokenizer_load(&tok, tmp("bert.json")));
    if (!tok)
        return;
    CHECK(loom_tokenizer_get_kind(tok) == LOOM_TOKENIZER_WORDPIECE, "bert.json kind");
    for (size_t k = 0; k < sizeof wp_cases / sizeof wp_cases[0]; k++) {
        size_t n;
        int32_t *ids = encode(tok, wp_cases[k].text, NULL, &n);
        bool same = n == wp_cases[k].n && memcmp(ids, wp_cases[k].ids, n * 4) == 0;
        CHECK(same, "bert.json case %zu (\"%s\") differs", k, wp_cases[k].text);
        free(ids);
    }
    loom_tokenizer_free(tok);
}

/* ---------------------------------------------------------------- malformed files */

static void test_malformed(void) {
    loom_tokenizer *tok = (loom_tokenizer *)0x1;

    /* empty file */
    write_bytes(tmp("empty.model"), "", 0);
    CHECK_ERROR(loom_tokenizer_load(&tok, tmp("empty.model")), "empty file");
    CHECK(tok == NULL, "output cleared on error");
    CHECK_ERROR(loom_tokenizer_load(&tok, tmp("empty.model")), "empty.model");

    /* truncated protobuf: the error names the file and a byte offset */
    size_t len;
    char *model = read_text(GOLDEN "/sentencepiece_bpe/sp_bpe.model", &len);
    CHECK(model != NULL, "read model");
    if (model) {
        write_bytes(tmp("truncated.model"), model, 1001);
        CHECK_ERROR(loom_tokenizer_load(&tok, tmp("truncated.model")), "truncated.model");
        CHECK_ERROR(loom_tokenizer_load(&tok, tmp("truncated.model")), "byte offset");
        CHECK_ERROR(loom_tokenizer_load(&tok, tmp("truncated.model")), "runs past the end");

        /* cut at every length: an error or a model, never a crash */
        int errors = 0, loaded = 0;
        for (size_t cut = 1; cut < len; cut += 37) {
            loom_tokenizer *t = NULL;
            if (loom_tokenizer_load_buffer(&t, model, cut, "cut.model") != 0) {
                errors++;
                CHECK(strstr(loom_last_error(), "cut.model") != NULL, "error names the buffer: %s",
                      loom_last_error());
            } else {
                loaded++;
                loom_tokenizer_free(t);
            }
        }
        CHECK(errors > 0, "truncations rejected: %d errors, %d loaded", errors, loaded);

        /* a model that is not BPE: trainer_spec.model_type = UNIGRAM (1) */
        unsigned char unigram[] = {0x0A, 0x0E, 0x0A, 0x05, '<', 'u', 'n', 'k', '>', 0x15, 0, 0, 0, 0,
                                   0x18, 0x02, 0x12, 0x02, 0x18, 0x01};
        CHECK_ERROR(loom_tokenizer_load_buffer(&tok, unigram, sizeof unigram, "unigram.model"),
                    "UNIGRAM");
        /* the same with model_type BPE (2) loads */
        unigram[sizeof unigram - 1] = 0x02;
        loom_tokenizer *t = NULL;
        CHECK_OK(loom_tokenizer_load_buffer(&t, unigram, sizeof unigram, "bpe.model"));
        loom_tokenizer_free(t);
        /* a bad wire type */
        unsigned char bad_wire[] = {0x0A, 0x02, 0x0B, 0x00};
        CHECK_ERROR(loom_tokenizer_load_buffer(&tok, bad_wire, sizeof bad_wire, "wire.model"),
                    "wire type");
        free(model);
    }

    /* invalid JSON: the error gives the offset */
    const char *truncated_json = "{\"model\": {\"type\": \"BPE\", ";
    write_bytes(tmp("bad.json"), truncated_json, strlen(truncated_json));
    CHECK_ERROR(loom_tokenizer_load(&tok, tmp("bad.json")), "invalid JSON");
    CHECK_ERROR(loom_tokenizer_load(&tok, tmp("bad.json")), "bad.json");

    /* merges naming unknown pieces */
    const char *unknown_merge =
        "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2}, "
        "\"merges\": [\"a b\", \"a c\"]}}";
    write_bytes(tmp("unknown_merge.json"), unknown_merge, strlen(unknown_merge));
    CHECK_ERROR(loom_tokenizer_load(&tok, tmp("unknown_merge.json")),
                "token 'c' is not in the vocabulary");
    const char *unmerged =
        "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1}, \"merges\": [\"a b\"]}}";
    write_bytes(tmp("unmerged.json"), unmerged, strlen(unmerged));
    CHECK_ERROR(loom_tokenizer_load(&tok, tmp("unmerged.json")),
                "merged token 'ab' is not in the vocabulary");

    /* missing vocab */
    const char *no_vocab = "{\"model\": {\"type\": \"BPE\", \"merges\": []}}";
    write_bytes(tmp("no_vocab.json"), no_vocab, strlen(no_vocab));
    CHECK_ERROR(loom_tokenizer_load(&tok, tmp("no_vocab.json")), "model.vocab is missing");

    /* unsupported model and components are named */
    const char *unigram_json = "{\"model\": {\"type\": \"Unigram\", \"vocab\": []}}";
    write_bytes(tmp("unigram.json"), unigram_json, strlen(unigram_json));
    CHECK_ERROR(loom_tokenizer_load(&tok, tmp("unigram.json")), "'Unigram' is not supported");
    const char *split_pre =
        "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}, "
        "\"pre_tokenizer\": {\"type\": \"Split\"}}";
    write_bytes(tmp("split.json"), split_pre, strlen(split_pre));
    CHECK_ERROR(loom_tokenizer_load(&tok, tmp("split.json")), "pre_tokenizer type 'Split'");
    const char *gap = "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 2}, \"merges\": []}}";
    write_bytes(tmp("gap.json"), gap, strlen(gap));
    CHECK_ERROR(loom_tokenizer_load(&tok, tmp("gap.json")), "no token with id 1");

    /* GPT-2 files: a merges line that is not two tokens, a missing merges file */
    const char *vocab = "{\"a\": 0, \"b\": 1, \"ab\": 2}";
    write_bytes(tmp("vocab.json"), vocab, strlen(vocab));
    write_bytes(tmp("bad_merges.txt"), "#version: 0.2\na b\nab\n", 21);
    CHECK_ERROR(loom_tokenizer_load_bpe_files(&tok, tmp("vocab.json"), tmp("bad_merges.txt")),
                "line 3");
    write_bytes(tmp("unknown_merges.txt"), "#version: 0.2\na x\n", 18);
    CHECK_ERROR(loom_tokenizer_load_bpe_files(&tok, tmp("vocab.json"), tmp("unknown_merges.txt")),
                "token 'x' is not in the vocabulary");
    CHECK_ERROR(loom_tokenizer_load(&tok, tmp("vocab.json")), "no merges file");
    CHECK_ERROR(loom_tokenizer_load_buffer(&tok, vocab, strlen(vocab), "vocab buffer"),
                "needs its merges file");

    /* binary garbage */
    const unsigned char garbage[] = {0x00, 0xFF, 0x13, 0x37};
    CHECK_ERROR(loom_tokenizer_load_buffer(&tok, garbage, sizeof garbage, "garbage.bin"),
                "not a tokenizer file");

    /* a missing file */
    CHECK_ERROR(loom_tokenizer_load(&tok, tmp("does_not_exist.model")), "cannot open");
}

/* ---------------------------------------------------------------- speed */

static double seconds_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void test_speed(void) {
    loom_tokenizer *sp = NULL, *gpt2 = NULL;
    CHECK_OK(loom_tokenizer_load(&sp, GOLDEN "/sentencepiece_bpe/sp_bpe.model"));
    CHECK_OK(loom_tokenizer_load_bpe_files(&gpt2, GOLDEN "/gpt2_bpe/encoder.json",
                                           GOLDEN "/gpt2_bpe/vocab.bpe"));

    /* about 10,000 characters (not bytes) of mixed text */
    char *text = malloc(40000);
    text[0] = '\0';
    const char *parts[] = {"The quick brown fox jumps over the lazy dog. ",
                           "numbers 1234567890 and caf\xC3\xA9 ",
                           "\xE4\xB8\xAD\xE6\x96\x87\xE5\x88\x86\xE8\xAF\x8D ",
                           "emoji \xF0\x9F\x98\x80 ok\n"};
    size_t chars = 0;
    for (int i = 0; chars < 10000; i++) {
        strcat(text, parts[i % 4]);
        for (const char *c = parts[i % 4]; *c; c++)
            chars += ((unsigned char)*c & 0xC0) != 0x80;
    }

    loom_tokenizer *toks[2] = {sp, gpt2};
    const char *names[2] = {"sentencepiece", "gpt2"};
    for (int k = 0; k < 2; k++) {
        if (!toks[k])
            continue;
        double t0 = seconds_now();
        size_t n = 0;
        int32_t *ids = encode(toks[k], text, NULL, &n);
        double ms = 1e3 * (seconds_now() - t0);
        printf("encode %zu bytes with %s: %zu ids in %.2f ms\n", strlen(text), names[k], n, ms);
        /* generous bound so that a loaded machine does not fail the test */
        CHECK(ms < 250.0, "%s encode of 10k characters took %.1f ms", names[k], ms);

        char *out = NULL;
        CHECK_OK(loom_tokenizer_decode(toks[k], ids, n, NULL, &out, NULL));
        CHECK(out && strcmp(out, text) == 0, "%s round trip of the long text", names[k]);
        free(out);
        free(ids);
    }
    free(text);
    loom_tokenizer_free(sp);
    loom_tokenizer_free(gpt2);
}

int main(void) {
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    test_gpt2();
    test_sentencepiece();
    test_stream_holds_bytes();
    test_invalid_utf8();
    test_random_text();
    test_added_tokens();
    test_wordpiece();
    test_opt_specials();
    test_hand_json_metaspace();
    test_hand_json_bert();
    test_malformed();
    test_speed();

    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", tmpdir);
    return check_summary();
}
