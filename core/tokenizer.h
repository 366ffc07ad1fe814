/* Loom core: tokenizers. SentencePiece-style BPE with byte fallback (LLaMA),
 * byte-level BPE (GPT-2, OPT, MPT) and WordPiece (BERT), loaded from Hugging
 * Face tokenizer.json files, SentencePiece .model files, GPT-2's encoder.json
 * + vocab.bpe pairs or BERT's vocab.txt, with added and special tokens.
 * Token ids are int32. A loaded tokenizer is read-only while encoding and
 * decoding, so several threads may share it; only the functions that take a
 * non-const loom_tokenizer modify it. */
#ifndef LOOM_TOKENIZER_H
#define LOOM_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base.h"

typedef struct loom_tokenizer loom_tokenizer;

typedef enum loom_tokenizer_kind {
    LOOM_TOKENIZER_SENTENCEPIECE_BPE = 0, /* pieces with U+2581 for spaces, byte fallback */
    LOOM_TOKENIZER_BYTE_LEVEL_BPE,        /* GPT-2's bytes-to-unicode alphabet */
    LOOM_TOKENIZER_WORDPIECE,             /* BERT: "##" continuation pieces */
} loom_tokenizer_kind;

/* Where a tokenizer came from; it decides the defaults of the encode options
 * (see loom_encode_opts). */
typedef enum loom_tokenizer_source {
    LOOM_TOKENIZER_FROM_SENTENCEPIECE = 0, /* .model file: behaves as sentencepiece's encode() */
    LOOM_TOKENIZER_FROM_HF_JSON,           /* tokenizer.json: behaves as the HF fast tokenizer */
    LOOM_TOKENIZER_FROM_BPE_FILES,         /* encoder.json + vocab.bpe: HF's GPT2Tokenizer */
    LOOM_TOKENIZER_FROM_VOCAB_TXT,         /* vocab.txt: HF's BertTokenizer */
} loom_tokenizer_source;

/* ---- loading */

/* Load a tokenizer, recognising the format by content: a SentencePiece
 * ModelProto, a tokenizer.json, a GPT-2 encoder.json/vocab.json (the merges
 * are then read from vocab.bpe or merges.txt in the same directory) or a
 * WordPiece vocab.txt (lower-casing on). Errors name the file and, for
 * protobuf, the byte offset. */
int loom_tokenizer_load(loom_tokenizer **out, const char *path);
/* Load from memory; `name` is used in error messages. A GPT-2 vocabulary
 * cannot be loaded this way because its merges live in a second file. */
int loom_tokenizer_load_buffer(loom_tokenizer **out, const void *data, size_t len,
                               const char *name);
/* Load GPT-2's byte-level BPE from its vocabulary (encoder.json or
 * vocab.json: {"piece": id, ...}) and merges (vocab.bpe or merges.txt).
 * <|endoftext|> (GPT-2) and <s> </s> <pad> <unk> (OPT) become special tokens
 * and set the BOS/EOS/PAD/UNK ids when present. */
int loom_tokenizer_load_bpe_files(loom_tokenizer **out, const char *vocab_path,
                                  const char *merges_path);
/* Load a WordPiece vocab.txt (one token per line, id = line number) with
 * BERT's basic tokenisation; `lowercase` also turns on accent stripping, as
 * BertTokenizer's do_lower_case does. */
int loom_tokenizer_load_wordpiece_vocab(loom_tokenizer **out, const char *vocab_path,
                                        bool lowercase);
void loom_tokenizer_free(loom_tokenizer *tok); /* accepts NULL */

/* ---- encoding */

/* Option value meaning "use the tokenizer's default". */
#define LOOM_TOKENIZER_DEFAULT (-1)

/* Encode options. Each field is 1 (on), 0 (off) or LOOM_TOKENIZER_DEFAULT.
 * Defaults by source:
 *   .model          add_bos 0, add_eos 0, parse_special 0, legacy 1
 *                   (sentencepiece's encode(): no BOS, special tokens are text)
 *   tokenizer.json  add_bos/add_eos from the post_processor template,
 *                   parse_special 1, legacy from the pre-tokenizer
 *   encoder.json    add_bos 0, add_eos 0, parse_special 1
 *   vocab.txt       add_bos 1 ([CLS]), add_eos 1 ([SEP]), parse_special 1
 * add_bos/add_eos prepend/append the tokenizer's bos/eos ids (OPT's tokenizer
 * prepends </s>: set the bos id to 2 and add_bos 1). parse_special splits the
 * text at added tokens (special or not) so each becomes its own id, as the
 * HF tokenizers do. legacy applies to SentencePiece-style tokenizers: 1 puts
 * the dummy-prefix space in front of every text segment between special
 * tokens (HF LlamaTokenizer legacy=True), 0 only in front of the text's
 * start (legacy=False). */
typedef struct loom_encode_opts {
    int add_bos;
    int add_eos;
    int parse_special;
    int legacy;
} loom_encode_opts;

#define LOOM_ENCODE_OPTS_DEFAULT                                                              \
    ((loom_encode_opts){LOOM_TOKENIZER_DEFAULT, LOOM_TOKENIZER_DEFAULT, LOOM_TOKENIZER_DEFAULT, \
                        LOOM_TOKENIZER_DEFAULT})

/* Encode `len` bytes of UTF-8 text (`opts` may be NULL for the defaults).
 * Invalid UTF-8 never fails: SentencePiece-style tokenizers turn each invalid
 * byte into U+FFFD as sentencepiece's normalizer does, byte-level BPE encodes
 * the bytes as they are. On success *ids is a malloc'd array of *n_ids ids
 * (NULL when empty) that the caller frees with free(). */
int loom_tokenizer_encode(const loom_tokenizer *tok, const char *text, size_t len,
                          const loom_encode_opts *opts, int32_t **ids, size_t *n_ids);

/* ---- decoding */

typedef struct loom_decode_opts {
    /* Leave out special tokens (control pieces, added tokens flagged special,
     * unknown). When false they are written as their text, except that
     * tokenizers loaded from a .model hide control pieces as sentencepiece
     * does. */
    bool skip_special;
} loom_decode_opts;

/* Decode ids to UTF-8 text: a malloc'd, NUL-terminated string the caller
 * frees with free(). Byte pieces are reassembled into characters, bytes that
 * do not form valid UTF-8 become U+FFFD, and SentencePiece-style tokenizers
 * drop the space of the dummy prefix at the start. An id out of range is an
 * error. */
int loom_tokenizer_decode(const loom_tokenizer *tok, const int32_t *ids, size_t n_ids,
                          const loom_decode_opts *opts, char **text, size_t *len);

/* Incremental decoding for streaming generation: push ids one at a time and
 * get back only complete UTF-8 characters. Bytes of a character that is not
 * complete yet are held until it is. The concatenation of all chunks and the
 * final flush equals loom_tokenizer_decode of the same ids, except for
 * WordPiece, whose clean-up of spaces before punctuation only
 * loom_tokenizer_decode applies. */
typedef struct loom_decode_stream loom_decode_stream;

/* Create a stream over `tok`, which must outlive it (`opts` may be NULL). */
int loom_decode_stream_new(loom_decode_stream **out, const loom_tokenizer *tok,
                           const loom_decode_opts *opts);
/* Decode one more id. *text (NUL-terminated, *len bytes, possibly empty)
 * stays valid until the next call on this stream. */
int loom_decode_stream_push(loom_decode_stream *s, int32_t id, const char **text, size_t *len);
/* End the stream: held bytes that never completed a character come out as
 * U+FFFD. The stream is then ready for a new sequence. */
int loom_decode_stream_flush(loom_decode_stream *s, const char **text, size_t *len);
/* Forget held bytes and start a new sequence. */
void loom_decode_stream_reset(loom_decode_stream *s);
void loom_decode_stream_free(loom_decode_stream *s); /* accepts NULL */

/* ---- vocabulary */

typedef enum loom_special_token {
    LOOM_TOKEN_BOS = 0,
    LOOM_TOKEN_EOS,
    LOOM_TOKEN_PAD,
    LOOM_TOKEN_UNK,
} loom_special_token;

loom_tokenizer_kind loom_tokenizer_get_kind(const loom_tokenizer *tok);
loom_tokenizer_source loom_tokenizer_get_source(const loom_tokenizer *tok);
/* Number of ids (one more than the largest id, added tokens included). */
int32_t loom_tokenizer_vocab_size(const loom_tokenizer *tok);
/* Id of a token's text (len bytes), or -1 when it is not in the vocabulary. */
int32_t loom_tokenizer_token_to_id(const loom_tokenizer *tok, const char *token, size_t len);
/* Text of a token (not NUL-terminated; *len receives its size), or NULL for
 * an id out of range or a hole in the id space. */
const char *loom_tokenizer_id_to_token(const loom_tokenizer *tok, int32_t id, size_t *len);
/* Whether decoding with skip_special leaves this id out. */
bool loom_tokenizer_is_special(const loom_tokenizer *tok, int32_t id);
/* The id of a special token, or -1 when the tokenizer has none. */
int32_t loom_tokenizer_special_id(const loom_tokenizer *tok, loom_special_token which);
/* Set a special token id (-1 to unset). */
int loom_tokenizer_set_special_id(loom_tokenizer *tok, loom_special_token which, int32_t id);
/* Replace the defaults of the encode options: fields other than
 * LOOM_TOKENIZER_DEFAULT become the new defaults. */
void loom_tokenizer_set_defaults(loom_tokenizer *tok, const loom_encode_opts *opts);

/* Add a token at run time, as HF's add_tokens does (LLaVA's "<image>",
 * OpenFlamingo's "<image>" and "<|endofchunk|>"): the text is matched whole
 * in input text when parse_special is on. A token already in the vocabulary
 * keeps its id; a new one gets the next free id. *id_out (may be NULL)
 * receives the id. */
int loom_tokenizer_add_token(loom_tokenizer *tok, const char *text, bool special,
                             int32_t *id_out);

#endif
