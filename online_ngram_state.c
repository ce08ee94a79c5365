/*
 * online_ngram_state.c: the online n-gram state behind the evaluation-time agreement pass (SPEC
 * section 6), and the optional adaptive n-gram cache. online_ngram.py builds it with the system
 * compiler and calls it through ctypes; its NumPy/Python reference there defines the same results.
 *
 * Legend of dimensions
 *   N   tokens in the stream: the validation split, documents written as BOS + their tokens
 *   V   vocabulary size, 2..65536 (tokens are uint16, as in the shards)
 *   E   experts = 3: 0 token 16-gram, 1 within-word, 2 word-start
 *   K   cache context lengths 1..K (n-gram orders 2..K+1)
 *   C   slots of one hash table (its capacity, chosen by the caller from N)
 *
 * Legality: the result for position t is read from the tables before tokens[t] is recorded, so it
 * depends on tokens[0..t-1] only. The loops below hash positions ahead of t, but only to prefetch
 * the table slots they will touch: nothing is read from or written to a table ahead of time.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define NGRAM_EXPERTS 3
#define TOKEN_CONTEXT 15   /* the token expert reads the previous 15 tokens: a 16-gram */
#define WORD_HISTORY 3     /* the word-start expert reads the previous 3 words (the last one may be in progress) */
#define MAX_VOCAB 65536
#define CHUNK 4096         /* positions hashed per batch before their slots are probed */
#define PREFETCH_AHEAD 16  /* probe position t while position t + 16's slots are being fetched */

/* Status codes returned to Python (online_ngram.py turns them into messages). */
#define NGRAM_OK 0
#define NGRAM_TABLE_FULL 1   /* *err_info = index of the full table */
#define NGRAM_NO_MEMORY 2    /* *err_info = index of the table that could not be allocated */
#define NGRAM_BAD_TOKEN 3    /* *err_info = position of a token >= V */
#define NGRAM_BAD_ARGUMENT 4 /* *err_info = 0 */

/* Piece kinds (per token id, from the sentencepiece tables) and position classes. */
#define PIECE_CONTINUATION 0 /* a normal piece without the leading space mark */
#define PIECE_WORD_START 1   /* a normal piece that begins with the space mark U+2581 */
#define PIECE_BOUNDARY 2     /* control / unknown / unused: ends the word and the document */

/* Hash constants: odd multipliers (invertible mod 2^64) and the splitmix64 finalizer. */
#define TOKEN_BASE 0xA0761D6478BD642FULL
#define WORD_BASE 0xE7037ED1A0B428DBULL
#define HISTORY_BASE 0x8EBC6AF09C88C6E3ULL
#define SLOT_MUL 0x9E3779B97F4A7C15ULL

static inline uint64_t mix64(uint64_t z) {
    z ^= z >> 30;
    z *= 0xBF58476D1CE4E5B9ULL;
    z ^= z >> 27;
    z *= 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* A context is identified by a 48-bit fingerprint with its low bit set (so a key is never 0, the
 * empty-slot marker); the low 16 bits of a slot key then hold a token id. */
static inline uint64_t fingerprint(uint64_t h) { return (mix64(h) >> 16) | 1; }

/* ---- open-addressing tables ------------------------------------------------------------------ */

typedef struct {
    uint64_t key; /* 0: empty; else fingerprint << 16 | token */
    uint32_t n;   /* a count (see the users below) */
    uint32_t m;   /* a second count */
} Slot;           /* 16 bytes: four slots per cache line */

typedef struct {
    Slot *slots;      /* [C] */
    uint64_t cap;     /* C */
    uint64_t used;
    uint64_t max_cap; /* the table doubles while it is over half full, up to this many slots */
    uint64_t mask;    /* the key bits that identify an entry (and choose its home slot) */
} Table;

#define CONTEXT_MASK (~0xFFFFULL) /* context slots match on the fingerprint, whatever token they hold */
#define EXACT_MASK (~0ULL)

static Slot *slots_alloc(uint64_t cap) {
    size_t bytes = (size_t)cap * sizeof(Slot);
    /* Anonymous pages arrive zeroed (every slot empty) and only when touched; huge pages spare the
     * TLB a miss on almost every probe of a multi-GB table. */
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
#ifdef MADV_HUGEPAGE
    madvise(p, bytes, MADV_HUGEPAGE);
#endif
    return (Slot *)p;
}

static void slots_free(Slot *slots, uint64_t cap) {
    if (slots) munmap(slots, (size_t)cap * sizeof(Slot));
}

static int table_init(Table *t, uint64_t cap, uint64_t max_cap, uint64_t mask) {
    t->cap = cap;
    t->max_cap = max_cap;
    t->used = 0;
    t->mask = mask;
    t->slots = slots_alloc(cap);
    return t->slots ? NGRAM_OK : NGRAM_NO_MEMORY;
}

static void table_free(Table *t) {
    slots_free(t->slots, t->cap);
    t->slots = NULL;
}

static inline uint64_t home_slot(uint64_t key, uint64_t cap) {
    return (uint64_t)(((unsigned __int128)(key * SLOT_MUL) * cap) >> 64); /* uniform in [0, cap) */
}

static inline void prefetch_slot(const Table *t, uint64_t key) {
    __builtin_prefetch(&t->slots[home_slot(key, t->cap)], 1, 3);
}

/* The slot holding `key` (compared under the table's mask), or the empty slot where it would go. */
static inline Slot *probe(const Table *t, uint64_t key) {
    uint64_t i = home_slot(key & t->mask, t->cap);
    for (;;) {
        Slot *s = &t->slots[i];
        if (s->key == 0 || ((s->key ^ key) & t->mask) == 0) return s;
        i = i + 1 == t->cap ? 0 : i + 1;
    }
}

static int table_grow(Table *t) {
    uint64_t cap = 2 * t->cap < t->max_cap ? 2 * t->cap : t->max_cap;
    Slot *old = t->slots, *slots = slots_alloc(cap);
    if (!slots) return NGRAM_NO_MEMORY;
    uint64_t old_cap = t->cap;
    t->slots = slots;
    t->cap = cap;
    for (uint64_t i = 0; i < old_cap; i++)
        if (old[i].key) *probe(t, old[i].key) = old[i];
    slots_free(old, old_cap);
    return NGRAM_OK;
}

/* Make room for one more entry before probing: probes return slot pointers that growth would move. */
static inline int table_reserve(Table *t) {
    if (2 * (t->used + 1) <= t->cap || t->cap >= t->max_cap) return NGRAM_OK;
    return table_grow(t);
}

/* Fill an empty slot; one slot always stays empty so that every probe ends. */
static inline int claim(Table *t, Slot *s, uint64_t key) {
    if (t->used + 2 > t->cap) return NGRAM_TABLE_FULL;
    s->key = key;
    t->used++;
    return NGRAM_OK;
}

/* ---- one expert: the most frequent continuation of each context ------------------------------
 * Context slot: key = fp << 16 | best token, n = total count, m = the best token's count.
 * Pair slot:    key = fp << 16 | token, n = that continuation's count, valid for every token but
 *               the context's current best (whose count lives in the context slot).
 * Most contexts (almost all 16-grams) only ever see one continuation and never touch the pair table.
 * Ties keep the token that reached the count first. */

typedef struct {
    Table *ctx;
    Table *pairs;
} Expert;

/* Returns 0, or 1 + the index of the full table (0: contexts, 1: pairs). */
static int expert_learn(Expert *ex, Slot *ctx, uint64_t fp, uint32_t tok) {
    uint64_t key = fp << 16 | tok;
    if (ctx->key == 0) {
        if (claim(ex->ctx, ctx, key)) return 1;
        ctx->n = ctx->m = 1;
        return 0;
    }
    ctx->n++;
    if (ctx->key == key) {
        ctx->m++;
        return 0;
    }
    Slot *pair = probe(ex->pairs, key);
    if (pair->key == 0 && claim(ex->pairs, pair, key)) return 2;
    if (++pair->n <= ctx->m) return 0;
    /* tok overtakes the best: the old best's count moves to the pair table. */
    Slot *old = probe(ex->pairs, ctx->key);
    if (old->key == 0 && claim(ex->pairs, old, ctx->key)) return 2;
    old->n = ctx->m;
    ctx->key = key;
    ctx->m = pair->n;
    return 0;
}

/* ---- word state: words from the token stream --------------------------------------------------
 * A word starts at a piece with the space mark, or at any piece right after a boundary (and at the
 * start of the stream); a boundary ends the word and clears the word history (a new document). */

#define POS_START 0
#define POS_CONTINUATION 1
#define POS_BOUNDARY 2

typedef struct {
    uint64_t raw;      /* hash of the current word's token ids */
    uint64_t norm;     /* hash of the current word's normalized pieces; 0 while the word is empty */
    uint64_t prev[2];  /* normalized hashes of the two previous words, most recent first; 0: none */
    int64_t len;       /* tokens in the current word */
    int after_boundary;
} WordState;

static inline int position_class(const WordState *w, uint8_t kind) {
    if (kind == PIECE_BOUNDARY) return POS_BOUNDARY;
    return (w->after_boundary || kind == PIECE_WORD_START) ? POS_START : POS_CONTINUATION;
}

static inline void word_step(WordState *w, int cls, uint32_t tok, uint32_t norm) {
    if (cls == POS_BOUNDARY) {
        memset(w, 0, sizeof *w);
        w->after_boundary = 1;
        return;
    }
    if (cls == POS_START) {
        if (w->len > 0) {
            w->prev[1] = w->prev[0];
            w->prev[0] = w->norm;
        }
        w->raw = w->norm = 0;
        w->len = 0;
        w->after_boundary = 0;
    }
    w->raw = w->raw * WORD_BASE + tok + 1;
    w->norm = w->norm * WORD_BASE + norm + 1;
    w->len++;
}

/* The word-start context: the two previous words and the current one (empty after a boundary). */
static inline uint64_t history_hash(const WordState *w) {
    return (w->prev[1] * HISTORY_BASE + w->prev[0]) * HISTORY_BASE + w->norm;
}

/* ---- rolling window hash -----------------------------------------------------------------------
 * Before position t the window of length L holds sum_{i=1..L} (tokens[t-i] + 1) * B^i mod 2^64. */

typedef struct {
    uint64_t h;
    uint64_t drop; /* B^(L+1): the weight a token has when it leaves the window */
    int64_t len;
} Window;

static void window_init(Window *w, int64_t len) {
    w->h = 0;
    w->len = len;
    w->drop = 1;
    for (int64_t i = 0; i <= len; i++) w->drop *= TOKEN_BASE;
}

/* Consume tokens[t]. */
static inline void window_step(Window *w, const uint16_t *tokens, int64_t t) {
    w->h = (w->h + tokens[t] + 1) * TOKEN_BASE;
    if (t >= w->len) w->h -= ((uint64_t)tokens[t - w->len] + 1) * w->drop;
}

/* ---- the hint pass ---------------------------------------------------------------------------- */

typedef struct {
    uint64_t fp[NGRAM_EXPERTS]; /* context fingerprints; 0: the expert has no context here */
    int cls;                    /* class of tokens[t] given the prefix */
} Contexts;

typedef struct {
    Window window;
    WordState word;
} Scanner;

static void scan(Scanner *s, const uint16_t *tokens, int64_t t0, int64_t count, const uint8_t *kind,
                 const int32_t *norm_id, Contexts *out) {
    for (int64_t i = 0; i < count; i++) {
        int64_t t = t0 + i;
        uint32_t tok = tokens[t];
        Contexts *c = &out[i];
        c->fp[0] = t >= TOKEN_CONTEXT ? fingerprint(s->window.h) : 0;
        c->fp[1] = s->word.len > 0 ? fingerprint(s->word.raw) : 0;
        c->fp[2] = fingerprint(history_hash(&s->word));
        c->cls = position_class(&s->word, kind[tok]);
        window_step(&s->window, tokens, t);
        word_step(&s->word, c->cls, tok, (uint32_t)norm_id[tok]);
    }
}

/* Does expert e record tokens[t] (a position of class cls)? The within-word expert learns only
 * continuation pieces and the word-start expert only word starts, so each hints only its own kind. */
static inline int expert_learns(int e, int cls) {
    return e == 0 || (e == 1 && cls == POS_CONTINUATION) || (e == 2 && cls == POS_START);
}

static int check_tokens(const uint16_t *tokens, int64_t n, int32_t vocab, int64_t *err_info) {
    for (int64_t t = 0; t < n; t++) {
        if (tokens[t] >= vocab) {
            *err_info = t;
            return NGRAM_BAD_TOKEN;
        }
    }
    return NGRAM_OK;
}

/* Allocate tables[i] with capacity[i] slots, growing up to max_capacity[i]; mask: see Table. */
static int init_tables(Table *tables, int count, const int64_t *capacity, const int64_t *max_capacity,
                       const uint64_t *mask, int64_t *err_info) {
    for (int i = 0; i < count; i++) {
        *err_info = i;
        if (capacity[i] < 2 || max_capacity[i] < capacity[i]) return NGRAM_BAD_ARGUMENT;
        if (table_init(&tables[i], (uint64_t)capacity[i], (uint64_t)max_capacity[i], mask[i])) return NGRAM_NO_MEMORY;
    }
    *err_info = 0;
    return NGRAM_OK;
}

/* Room for one more entry in tables[i] and tables[i + 1] (a context table and its pair table). */
static inline int reserve_two(Table *tables, int i, int64_t *err_info) {
    for (int j = i; j < i + 2; j++) {
        if (table_reserve(&tables[j])) {
            *err_info = j;
            return NGRAM_NO_MEMORY;
        }
    }
    return NGRAM_OK;
}

static void free_tables(Table *tables, int count, int64_t *slots, int64_t *used) {
    for (int i = 0; i < count; i++) {
        slots[i] = (int64_t)tables[i].cap;
        used[i] = (int64_t)tables[i].used;
        table_free(&tables[i]);
    }
}

/*
 * For every position t in [0, N): each expert's hint (-1: none) and confidence (best count / total
 * count of its context), from tokens[0..t-1]; then tokens[t] is recorded.
 *   tokens        [N]     the stream
 *   kind          [V]     PIECE_* of every token id
 *   norm_id       [V]     class of the piece's normalized text (space mark removed, lower case)
 *   capacity      [2E]    initial slots of each table: contexts and pairs of each expert (ctx0, pairs0, ...)
 *   max_capacity  [2E]    slots each table may grow to
 *   hint          [E, N]  out
 *   conf          [E, N]  out
 *   slots, used   [2E]    out: final slots of each table, and how many are filled
 *   err_info      [1]     out: see the status codes
 */
int ngram_hints(const uint16_t *tokens, int64_t n, int32_t vocab, const uint8_t *kind,
                const int32_t *norm_id, const int64_t *capacity, const int64_t *max_capacity,
                int32_t *hint, float *conf, int64_t *slots, int64_t *used, int64_t *err_info) {
    *err_info = 0;
    if (n < 0 || vocab < 2 || vocab > MAX_VOCAB) return NGRAM_BAD_ARGUMENT;
    int status = check_tokens(tokens, n, vocab, err_info);
    if (status) return status;
    Table tables[2 * NGRAM_EXPERTS]; /* ctx0, pairs0, ctx1, pairs1, ctx2, pairs2 */
    uint64_t masks[2 * NGRAM_EXPERTS];
    Expert ex[NGRAM_EXPERTS];
    memset(tables, 0, sizeof tables);
    for (int e = 0; e < NGRAM_EXPERTS; e++) {
        masks[2 * e] = CONTEXT_MASK;
        masks[2 * e + 1] = EXACT_MASK;
        ex[e].ctx = &tables[2 * e];
        ex[e].pairs = &tables[2 * e + 1];
    }
    Contexts *ring = (Contexts *)malloc(CHUNK * sizeof(Contexts));
    status = ring ? init_tables(tables, 2 * NGRAM_EXPERTS, capacity, max_capacity, masks, err_info)
                  : NGRAM_NO_MEMORY;
    Scanner s;
    memset(&s, 0, sizeof s);
    window_init(&s.window, TOKEN_CONTEXT);
    s.word.after_boundary = 1;
    for (int64_t t0 = 0; t0 < n && status == NGRAM_OK; t0 += CHUNK) {
        int64_t count = n - t0 < CHUNK ? n - t0 : CHUNK;
        scan(&s, tokens, t0, count, kind, norm_id, ring);
        for (int64_t i = 0; i < count && status == NGRAM_OK; i++) {
            int64_t t = t0 + i;
            if (i + PREFETCH_AHEAD < count) {
                const Contexts *ahead = &ring[i + PREFETCH_AHEAD];
                uint64_t next = tokens[t + PREFETCH_AHEAD];
                for (int e = 0; e < NGRAM_EXPERTS; e++) {
                    if (!ahead->fp[e]) continue;
                    prefetch_slot(ex[e].ctx, ahead->fp[e] << 16);
                    /* The word experts' contexts see many continuations, so learning one usually
                     * touches its pair slot; a 16-gram almost never has a second continuation. */
                    if (e > 0 && expert_learns(e, ahead->cls)) prefetch_slot(ex[e].pairs, ahead->fp[e] << 16 | next);
                }
            }
            const Contexts *c = &ring[i];
            for (int e = 0; e < NGRAM_EXPERTS; e++) {
                hint[e * n + t] = -1;
                conf[e * n + t] = 0.0f;
                if (!c->fp[e]) continue;
                int learns = expert_learns(e, c->cls);
                if (learns && (status = reserve_two(tables, 2 * e, err_info))) break;
                Slot *ctx = probe(ex[e].ctx, c->fp[e] << 16);
                if (ctx->key) {
                    hint[e * n + t] = (int32_t)(ctx->key & 0xFFFF);
                    conf[e * n + t] = (float)((double)ctx->m / (double)ctx->n);
                }
                int full = learns ? expert_learn(&ex[e], ctx, c->fp[e], tokens[t]) : 0;
                if (full) {
                    status = NGRAM_TABLE_FULL;
                    *err_info = 2 * e + full - 1;
                    break;
                }
            }
        }
    }
    free(ring);
    free_tables(tables, 2 * NGRAM_EXPERTS, slots, used);
    return status;
}

/* ---- the adaptive cache -----------------------------------------------------------------------
 * For context lengths k = 1..K (orders 2..K+1) the tables count every continuation of every context.
 * The cache's distribution before position t interpolates them from order 2 up (Witten-Bell):
 *   P_0(a) = 1 / V,   P_k(a) = (c_k(a) + u_k P_{k-1}(a)) / (T_k + u_k)   (P_k = P_{k-1} if T_k = 0)
 * with T_k the context's total and u_k its number of distinct continuations. Each P_k sums to 1
 * over the vocabulary by construction (pairs are keyed exactly by context and token, so the counts
 * of a context add up to its total), and every weight comes from the prefix alone. Only P_K at the
 * token that occurs is written out: the caller mixes it with the model's distribution.
 * Context slot: key = fp << 16, n = T, m = u.   Pair slot: key = fp << 16 | token, n = count. */

#define MAX_CACHE_CONTEXT 16

/*
 *   tokens        [N]
 *   capacity      [2K]  initial slots of the context and pair tables of each length (ctx1, pairs1, ...)
 *   max_capacity  [2K]  slots each table may grow to
 *   prob          [N]   out: P_K(tokens[t]) before tokens[t] is recorded
 *   slots, used   [2K]  out
 */
int ngram_cache(const uint16_t *tokens, int64_t n, int32_t vocab, int32_t max_context,
                const int64_t *capacity, const int64_t *max_capacity, double *prob, int64_t *slots,
                int64_t *used, int64_t *err_info) {
    *err_info = 0;
    if (n < 0 || vocab < 2 || vocab > MAX_VOCAB || max_context < 1 || max_context > MAX_CACHE_CONTEXT)
        return NGRAM_BAD_ARGUMENT;
    int status = check_tokens(tokens, n, vocab, err_info);
    if (status) return status;
    int k_max = max_context;
    Table tables[2 * MAX_CACHE_CONTEXT];
    uint64_t masks[2 * MAX_CACHE_CONTEXT];
    Window windows[MAX_CACHE_CONTEXT];
    memset(tables, 0, sizeof tables);
    for (int i = 0; i < 2 * k_max; i++) masks[i] = EXACT_MASK;
    for (int k = 0; k < k_max; k++) window_init(&windows[k], k + 1);
    uint64_t *fps = (uint64_t *)malloc((size_t)CHUNK * k_max * sizeof(uint64_t)); /* [CHUNK, K] */
    status = fps ? init_tables(tables, 2 * k_max, capacity, max_capacity, masks, err_info) : NGRAM_NO_MEMORY;
    for (int64_t t0 = 0; t0 < n && status == NGRAM_OK; t0 += CHUNK) {
        int64_t count = n - t0 < CHUNK ? n - t0 : CHUNK;
        for (int64_t i = 0; i < count; i++) {
            for (int k = 0; k < k_max; k++) {
                fps[i * k_max + k] = t0 + i > k ? fingerprint(windows[k].h) : 0;
                window_step(&windows[k], tokens, t0 + i);
            }
        }
        for (int64_t i = 0; i < count && status == NGRAM_OK; i++) {
            int64_t t = t0 + i;
            uint64_t tok = tokens[t];
            if (i + PREFETCH_AHEAD < count) {
                for (int k = 0; k < k_max; k++) {
                    uint64_t fp = fps[(i + PREFETCH_AHEAD) * k_max + k];
                    if (!fp) continue;
                    prefetch_slot(&tables[2 * k], fp << 16);
                    prefetch_slot(&tables[2 * k + 1], fp << 16 | tokens[t + PREFETCH_AHEAD]);
                }
            }
            double p = 1.0 / vocab;
            for (int k = 0; k < k_max; k++) {
                uint64_t fp = fps[i * k_max + k];
                if (!fp) continue;
                if ((status = reserve_two(tables, 2 * k, err_info))) break;
                Table *ctx_table = &tables[2 * k], *pair_table = &tables[2 * k + 1];
                Slot *ctx = probe(ctx_table, fp << 16);
                Slot *pair = probe(pair_table, fp << 16 | tok);
                if (ctx->key) p = ((double)pair->n + (double)ctx->m * p) / ((double)ctx->n + (double)ctx->m);
                int full = ctx->key == 0 && claim(ctx_table, ctx, fp << 16) ? 1
                           : pair->key == 0 && claim(pair_table, pair, fp << 16 | tok) ? 2 : 0;
                if (full) {
                    status = NGRAM_TABLE_FULL;
                    *err_info = 2 * k + full - 1;
                    break;
                }
                ctx->m += pair->n == 0; /* a new distinct continuation */
                ctx->n++;
                pair->n++;
            }
            prob[t] = p;
        }
    }
    free(fps);
    free_tables(tables, 2 * k_max, slots, used);
    return status;
}
