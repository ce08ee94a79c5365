/*
 * online_ngram_state.c: the online n-gram state behind the evaluation-time agreement pass
 * (docs/ngram.md), and the optional adaptive n-gram cache. online_ngram.py builds it with the system
 * compiler and calls it through ctypes; its NumPy/Python reference there defines the same results.
 *
 * Legend of dimensions
 *   N   tokens in the stream: the validation split, documents written as BOS + their tokens
 *   V   vocabulary size, 2..65536 (tokens are uint16, as in the shards)
 *   E   experts = 3: 0 token 16-gram, 1 within-word, 2 word-start
 *   K   cache context lengths 1..K (n-gram orders 2..K+1)
 *   P   buckets of the hint pass (BUCKETS = 1024): contexts split by the top bits of their fingerprint
 *   C   slots of one hash table: in the hint pass, slots_per_entry x the learning positions of a
 *       bucket; in the cache pass, a first size that doubles up to a maximum the caller derives from N
 *
 * Legality: the result for position t is read from the tables before tokens[t] is recorded, so it
 * depends on tokens[0..t-1] only (the hint pass runs each context's positions in stream order). The
 * loops hash positions ahead, but only to prefetch the slots they will touch: nothing is read from or
 * written to a table ahead of time.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define NGRAM_EXPERTS 3
#define TOKEN_CONTEXT 15   /* the token expert reads the previous 15 tokens: a 16-gram */
#define MAX_VOCAB 65536
#define CHUNK 4096         /* cache pass: positions hashed per batch before their slots are probed */
#define PREFETCH_AHEAD 16  /* probe one position while the slots of the 16th next one are fetched */

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

/* A context is identified by a 48-bit fingerprint whose bit 1 is set (so a key is never 0, the
 * empty-slot marker) and whose bit 0 is clear (free for the PROMOTED flag below); in a slot key it
 * sits above 16 bits that hold a token id. */
static inline uint64_t fingerprint(uint64_t h) { return ((mix64(h) >> 16) & ~1ULL) | 2; }

/* ---- open-addressing tables ------------------------------------------------------------------ */

typedef struct {
    uint64_t key; /* 0: empty; else fingerprint << 16 | token */
    uint32_t n;   /* a count (see the users below) */
    uint32_t m;   /* a second count */
} Slot;           /* 16 bytes: four per cache line */

typedef struct {
    unsigned char *slots; /* [alloc] slots of slot_bytes each; every slot starts with its uint64 key */
    size_t slot_bytes;    /* 8 (a key alone) or sizeof(Slot) */
    uint64_t alloc;       /* slots allocated */
    uint64_t cap;         /* C <= alloc: slots in use (a reused table may use fewer than it has) */
    uint64_t used;
    uint64_t max_cap;     /* the table doubles while it is over half full, up to this many slots */
    uint64_t mask;        /* the key bits that identify an entry (and choose its home slot) */
} Table;

#define EXACT_MASK (~0ULL)
#define CONTEXT_MASK (~0xFFFFULL) /* context slots match on the fingerprint, whatever token they hold */
#define PROMOTED (1ULL << 16)     /* in a singles key: the context has moved to the full tables */
#define SINGLES_MASK (~0x1FFFFULL)

static unsigned char *slots_alloc(uint64_t cap, size_t slot_bytes) {
    size_t bytes = (size_t)cap * slot_bytes;
    /* Anonymous pages arrive zeroed (every slot empty) and only when touched; huge pages spare the
     * TLB most of the misses of random probes. */
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
#ifdef MADV_HUGEPAGE
    madvise(p, bytes, MADV_HUGEPAGE);
#endif
    return (unsigned char *)p;
}

/* Ask for huge pages on [p, p + bytes) of an anonymous mapping not yet touched (a hint: harmless if
 * refused). */
static void advise_huge_pages(void *p, size_t bytes) {
#ifdef MADV_HUGEPAGE
    const uintptr_t huge = (uintptr_t)2 << 20;
    uintptr_t lo = ((uintptr_t)p + huge - 1) & ~(huge - 1), hi = ((uintptr_t)p + bytes) & ~(huge - 1);
    if (hi > lo) madvise((void *)lo, hi - lo, MADV_HUGEPAGE);
#else
    (void)p;
    (void)bytes;
#endif
}

static void slots_free(unsigned char *slots, uint64_t cap, size_t slot_bytes) {
    if (slots) munmap(slots, (size_t)cap * slot_bytes);
}

static int table_init(Table *t, uint64_t cap, uint64_t max_cap, size_t slot_bytes, uint64_t mask) {
    t->slot_bytes = slot_bytes;
    t->alloc = t->cap = cap;
    t->max_cap = max_cap;
    t->used = 0;
    t->mask = mask;
    t->slots = slots_alloc(cap, slot_bytes);
    return t->slots ? NGRAM_OK : NGRAM_NO_MEMORY;
}

static void table_free(Table *t) {
    slots_free(t->slots, t->alloc, t->slot_bytes);
    t->slots = NULL;
}

/* Empty the table for reuse with cap <= alloc slots, growing up to max_cap. */
static void table_clear(Table *t, uint64_t cap, uint64_t max_cap) {
    t->cap = cap;
    t->max_cap = max_cap > cap ? max_cap : cap;
    t->used = 0;
    memset(t->slots, 0, (size_t)cap * t->slot_bytes);
}

static inline uint64_t home_slot(uint64_t key, uint64_t cap) {
    return (uint64_t)(((unsigned __int128)(key * SLOT_MUL) * cap) >> 64); /* uniform in [0, cap) */
}

static inline uint64_t *slot_at(const Table *t, uint64_t i) { return (uint64_t *)(t->slots + i * t->slot_bytes); }

static inline void prefetch_slot(const Table *t, uint64_t key) {
    __builtin_prefetch(slot_at(t, home_slot(key & t->mask, t->cap)), 1, 3);
}

/* The slot holding `key` (compared under the table's mask), or the empty slot where it would go. */
static inline uint64_t *probe(const Table *t, uint64_t key) {
    uint64_t i = home_slot(key & t->mask, t->cap);
    for (;;) {
        uint64_t *s = slot_at(t, i);
        if (*s == 0 || ((*s ^ key) & t->mask) == 0) return s;
        i = i + 1 == t->cap ? 0 : i + 1;
    }
}

static int table_grow(Table *t) {
    uint64_t cap = 2 * t->cap < t->max_cap ? 2 * t->cap : t->max_cap;
    unsigned char *old = t->slots, *slots = slots_alloc(cap, t->slot_bytes);
    if (!slots) return NGRAM_NO_MEMORY;
    uint64_t old_cap = t->cap, old_alloc = t->alloc;
    t->slots = slots;
    t->alloc = t->cap = cap;
    for (uint64_t i = 0; i < old_cap; i++) {
        const uint64_t *s = (const uint64_t *)(old + i * t->slot_bytes);
        if (*s) memcpy(probe(t, *s), s, t->slot_bytes);
    }
    slots_free(old, old_alloc, t->slot_bytes);
    return NGRAM_OK;
}

/* Make room for one more entry before probing: probes return slot pointers that growth would move. */
static inline int table_reserve(Table *t) {
    if (2 * (t->used + 1) <= t->cap || t->cap >= t->max_cap) return NGRAM_OK;
    return table_grow(t);
}

/* Fill an empty slot; one slot always stays empty so that every probe ends. */
static inline int claim(Table *t, uint64_t *s, uint64_t key) {
    if (t->used + 2 > t->cap) return NGRAM_TABLE_FULL;
    *s = key;
    t->used++;
    return NGRAM_OK;
}

/* ---- one expert: the most frequent continuation of each context ------------------------------
 * Most contexts are seen once (99% of the 16-grams of real text, 70% of the word-start contexts), so
 * they live in an 8-byte "singles" table: key = fp << 16 | the token that followed. The second time a
 * context is seen it is flagged PROMOTED there and moves to two 16-byte tables:
 *   context slot: key = fp << 16 | best token, n = total count, m = the best token's count;
 *   pair slot:    key = fp << 16 | token, n = that continuation's count, valid for every token but
 *                 the context's current best (whose count lives in the context slot).
 * Ties keep the token that reached the count first. */

typedef struct {
    Table *singles;
    Table *ctx;
    Table *pairs;
} Expert;

#define EXPERT_TABLES 3 /* singles, contexts, pairs */

typedef struct {
    int32_t hint; /* -1: none */
    float conf;
    Slot *ctx;    /* the context's full slot once promoted */
} Lookup;

static inline Lookup expert_lookup(const Expert *ex, uint64_t *single, uint64_t fp) {
    Lookup r = {-1, 0.0f, NULL};
    if (*single & PROMOTED) {
        r.ctx = (Slot *)probe(ex->ctx, fp << 16);
        r.hint = (int32_t)(r.ctx->key & 0xFFFF);
        r.conf = (float)((double)r.ctx->m / (double)r.ctx->n);
    } else if (*single) {
        r.hint = (int32_t)(*single & 0xFFFF);
        r.conf = 1.0f;
    }
    return r;
}

/* Count tok as a continuation of a context that has a full slot. Returns 0, or 1 + the index of the
 * full table as expert_learn numbers them. */
static int expert_count(Expert *ex, Slot *ctx, uint64_t fp, uint32_t tok) {
    uint64_t key = fp << 16 | tok;
    ctx->n++;
    if (ctx->key == key) {
        ctx->m++;
        return 0;
    }
    Slot *pair = (Slot *)probe(ex->pairs, key);
    if (pair->key == 0 && claim(ex->pairs, &pair->key, key)) return 3;
    if (++pair->n <= ctx->m) return 0;
    /* tok overtakes the best: the old best's count moves to the pair table. */
    Slot *old = (Slot *)probe(ex->pairs, ctx->key);
    if (old->key == 0 && claim(ex->pairs, &old->key, ctx->key)) return 3;
    old->n = ctx->m;
    ctx->key = key;
    ctx->m = pair->n;
    return 0;
}

/* Record that the context fp (whose singles slot is `single`) was followed by tok. Returns 0, or
 * 1 + the index of the full table (0: singles, 1: contexts, 2: pairs). */
static int expert_learn(Expert *ex, uint64_t *single, Slot *ctx, uint64_t fp, uint32_t tok) {
    if (*single == 0) return claim(ex->singles, single, fp << 16 | tok) ? 1 : 0;
    if (*single & PROMOTED) return expert_count(ex, ctx, fp, tok);
    /* The second occurrence: the context gets its full slot, its first continuation the best. */
    uint64_t first = *single & 0xFFFF;
    ctx = (Slot *)probe(ex->ctx, fp << 16);
    if (claim(ex->ctx, &ctx->key, fp << 16 | first)) return 2;
    ctx->n = ctx->m = 1;
    *single |= PROMOTED;
    return expert_count(ex, ctx, fp, tok);
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

static int check_tokens(const uint16_t *tokens, int64_t n, int32_t vocab, int64_t *err_info) {
    for (int64_t t = 0; t < n; t++) {
        if (tokens[t] >= vocab) {
            *err_info = t;
            return NGRAM_BAD_TOKEN;
        }
    }
    return NGRAM_OK;
}

/* ---- the hint pass ------------------------------------------------------------------------------
 * Expert by expert, positions are bucketed by the top BUCKET_BITS of their context's fingerprint
 * and each bucket is run in stream order against tables that hold only its contexts. A context lives
 * in one bucket, so it still sees its positions in order (look up, then learn), exactly as in one pass
 * over the stream; but the tables probed at any moment are a few MB instead of a few GB. Random probes
 * into GB-sized tables miss the TLB (two-level page walks on a VM): one pass over 51 M tokens ran at
 * 3 M tokens/s, the bucketed passes at 5 M. A bucket's tables are sized from its number of learning
 * positions and reused, bucket after bucket; the singles table never grows. */

#define BUCKET_BITS 10
#define BUCKETS (1 << BUCKET_BITS)
#define MIN_SLOTS 64 /* first size of the contexts and pairs tables, which grow as needed */

/* Does expert e record tokens[t] (a position of class cls)? The within-word expert learns only
 * continuation pieces and the word-start expert only word starts, so each hints only its own kind. */
static inline int expert_learns(int e, int cls) {
    return e == 0 || (e == 1 && cls == POS_CONTINUATION) || (e == 2 && cls == POS_START);
}

typedef struct {
    Window window; /* the token expert's 15 previous tokens */
    WordState word;
} Scanner;

static void scanner_init(Scanner *s) {
    memset(s, 0, sizeof *s);
    window_init(&s->window, TOKEN_CONTEXT);
    s->word.after_boundary = 1;
}

/* Expert e's context fingerprint before position t (0: none), then consume tokens[t]. */
static inline uint64_t scan_step(Scanner *s, int e, const uint16_t *tokens, int64_t t, const uint8_t *kind,
                                 const int32_t *norm_id, int *learns) {
    uint32_t tok = tokens[t];
    if (e == 0) {
        uint64_t fp = t >= TOKEN_CONTEXT ? fingerprint(s->window.h) : 0;
        window_step(&s->window, tokens, t);
        *learns = 1;
        return fp;
    }
    uint64_t fp = e == 2 ? fingerprint(history_hash(&s->word)) : s->word.len > 0 ? fingerprint(s->word.raw) : 0;
    int cls = position_class(&s->word, kind[tok]);
    word_step(&s->word, cls, tok, (uint32_t)norm_id[tok]);
    *learns = expert_learns(e, cls);
    return fp;
}

typedef struct {
    uint64_t fp;    /* the context's fingerprint */
    uint32_t pos;   /* the position in the stream */
    uint16_t tok;   /* the token there */
    uint8_t learns;
} Record;           /* 16 bytes */

typedef struct {
    int64_t start[BUCKETS + 1]; /* bucket p holds records[start[p] .. start[p + 1]) */
    int64_t learners[BUCKETS];  /* positions that learn in bucket p */
} Buckets;

static inline int bucket_of(uint64_t fp) { return (int)(fp >> (48 - BUCKET_BITS)); }

/* Expert e's positions with a context, as records bucketed by context (a stable counting sort: two
 * scans of the stream). Positions without one get no hint right away. */
static void bucket_positions(int e, const uint16_t *tokens, int64_t n, const uint8_t *kind, const int32_t *norm_id,
                             Record *records, Buckets *b, int32_t *hint, float *conf) {
    Scanner s;
    int learns;
    memset(b, 0, sizeof *b);
    scanner_init(&s);
    for (int64_t t = 0; t < n; t++) {
        uint64_t fp = scan_step(&s, e, tokens, t, kind, norm_id, &learns);
        if (fp) {
            b->start[bucket_of(fp) + 1]++;
            b->learners[bucket_of(fp)] += learns;
        } else {
            hint[e * n + t] = -1;
            conf[e * n + t] = 0.0f;
        }
    }
    for (int p = 0; p < BUCKETS; p++) b->start[p + 1] += b->start[p];
    int64_t next[BUCKETS];
    memcpy(next, b->start, sizeof next);
    scanner_init(&s);
    for (int64_t t = 0; t < n; t++) {
        uint64_t fp = scan_step(&s, e, tokens, t, kind, norm_id, &learns);
        if (fp) records[next[bucket_of(fp)]++] = (Record){fp, (uint32_t)t, tokens[t], (uint8_t)learns};
    }
}

/* One bucket of expert e, in stream order: each position's hint and confidence, then learning. */
static int run_bucket(Expert *ex, int e, const Record *recs, int64_t count, int64_t n, int32_t *hint, float *conf,
                      int64_t *err_info) {
    for (int64_t k = 0; k < count; k++) {
        if (k + PREFETCH_AHEAD < count) {
            const Record *ahead = &recs[k + PREFETCH_AHEAD];
            prefetch_slot(ex->singles, ahead->fp << 16);
            /* Within-word contexts recur and see many continuations: their full slots are usually
             * touched too. 16-grams and 3-word histories mostly stay singles. */
            if (e == 1) {
                prefetch_slot(ex->ctx, ahead->fp << 16);
                if (ahead->learns) prefetch_slot(ex->pairs, ahead->fp << 16 | ahead->tok);
            }
        }
        const Record *r = &recs[k];
        /* The singles table is sized for the whole bucket; the full tables grow (before the probes,
         * which return slot pointers that growth would move). */
        if (r->learns && (table_reserve(ex->ctx) || table_reserve(ex->pairs))) {
            *err_info = EXPERT_TABLES * e + (table_reserve(ex->ctx) ? 1 : 2);
            return NGRAM_NO_MEMORY;
        }
        uint64_t *single = probe(ex->singles, r->fp << 16);
        Lookup found = expert_lookup(ex, single, r->fp);
        hint[e * n + r->pos] = found.hint;
        conf[e * n + r->pos] = found.conf;
        int full = r->learns ? expert_learn(ex, single, found.ctx, r->fp, r->tok) : 0;
        if (full) {
            *err_info = EXPERT_TABLES * e + full - 1;
            return NGRAM_TABLE_FULL;
        }
    }
    return NGRAM_OK;
}

/* All buckets of expert e, with tables [3] (singles, contexts, pairs) sized for the largest bucket and
 * reused; used [3] counts the entries made in each. */
static int run_expert(int e, const Record *records, const Buckets *b, double slots_per_entry, int64_t n,
                      int32_t *hint, float *conf, Table *tables, int64_t *used, int64_t *err_info) {
    static const size_t slot_bytes[EXPERT_TABLES] = {sizeof(uint64_t), sizeof(Slot), sizeof(Slot)};
    static const uint64_t masks[EXPERT_TABLES] = {SINGLES_MASK, CONTEXT_MASK, EXACT_MASK};
    int64_t most = 0;
    for (int p = 0; p < BUCKETS; p++) most = b->learners[p] > most ? b->learners[p] : most;
    uint64_t singles = (uint64_t)(slots_per_entry * (double)most) + 2;
    for (int j = 0; j < EXPERT_TABLES; j++) {
        used[j] = 0;
        uint64_t cap = j == 0 ? singles : MIN_SLOTS;
        if (table_init(&tables[j], cap, cap, slot_bytes[j], masks[j])) {
            *err_info = EXPERT_TABLES * e + j;
            return NGRAM_NO_MEMORY;
        }
    }
    Expert ex = {&tables[0], &tables[1], &tables[2]};
    for (int p = 0; p < BUCKETS; p++) {
        int64_t count = b->start[p + 1] - b->start[p];
        if (count == 0) continue;
        uint64_t cap = (uint64_t)(slots_per_entry * (double)b->learners[p]) + 2; /* the most this bucket needs */
        for (int j = 0; j < EXPERT_TABLES; j++) table_clear(&tables[j], j == 0 ? cap : tables[j].cap, cap);
        int status = run_bucket(&ex, e, records + b->start[p], count, n, hint, conf, err_info);
        for (int j = 0; j < EXPERT_TABLES; j++) used[j] += (int64_t)tables[j].used;
        if (status) return status;
    }
    return NGRAM_OK;
}

/*
 * For every position t in [0, N): each expert's hint (-1: none) and confidence (best count / total
 * count of its context), from tokens[0..t-1]; tokens[t] is recorded only after that.
 *   tokens           [N]     the stream
 *   kind             [V]     PIECE_* of every token id
 *   norm_id          [V]     class of the piece's normalized text (space mark removed, lower case)
 *   slots_per_entry          table slots per learning position of a bucket (2: at most half full)
 *   hint             [E, N]  out
 *   conf             [E, N]  out
 *   slots            [3E]    out: the largest size of each expert's singles, contexts and pairs tables
 *   used             [3E]    out: entries made in each over the whole stream
 *   memory           [1]     out: peak bytes of the records and tables
 *   err_info         [1]     out: see the status codes
 */
int ngram_hints(const uint16_t *tokens, int64_t n, int32_t vocab, const uint8_t *kind, const int32_t *norm_id,
                double slots_per_entry, int32_t *hint, float *conf, int64_t *slots, int64_t *used, int64_t *memory,
                int64_t *err_info) {
    *err_info = 0;
    *memory = 0;
    if (n < 0 || n > (int64_t)UINT32_MAX || vocab < 2 || vocab > MAX_VOCAB || !(slots_per_entry > 0.0))
        return NGRAM_BAD_ARGUMENT;
    int status = check_tokens(tokens, n, vocab, err_info);
    if (status) return status;
    Record *records = (Record *)malloc((size_t)(n > 0 ? n : 1) * sizeof(Record));
    Buckets *b = (Buckets *)malloc(sizeof(Buckets));
    /* A bucket writes its results at scattered positions all over hint and conf: with 4 KB pages
     * nearly every write would miss the TLB. */
    advise_huge_pages(hint, (size_t)n * NGRAM_EXPERTS * sizeof(int32_t));
    advise_huge_pages(conf, (size_t)n * NGRAM_EXPERTS * sizeof(float));
    status = records && b ? NGRAM_OK : NGRAM_NO_MEMORY;
    for (int e = 0; e < NGRAM_EXPERTS && status == NGRAM_OK; e++) {
        Table tables[EXPERT_TABLES];
        memset(tables, 0, sizeof tables);
        bucket_positions(e, tokens, n, kind, norm_id, records, b, hint, conf);
        status = run_expert(e, records, b, slots_per_entry, n, hint, conf, tables, used + EXPERT_TABLES * e,
                            err_info);
        int64_t bytes = n * (int64_t)sizeof(Record);
        for (int j = 0; j < EXPERT_TABLES; j++) {
            slots[EXPERT_TABLES * e + j] = (int64_t)tables[j].alloc;
            bytes += (int64_t)(tables[j].alloc * tables[j].slot_bytes);
            table_free(&tables[j]);
        }
        *memory = bytes > *memory ? bytes : *memory;
    }
    free(records);
    free(b);
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

/* Allocate tables[i] with capacity[i] slots of slot_bytes[i], growing up to max_capacity[i]. */
static int init_tables(Table *tables, int count, const int64_t *capacity, const int64_t *max_capacity,
                       const size_t *slot_bytes, const uint64_t *mask, int64_t *err_info) {
    for (int i = 0; i < count; i++) {
        *err_info = i;
        if (capacity[i] < 2 || max_capacity[i] < capacity[i]) return NGRAM_BAD_ARGUMENT;
        if (table_init(&tables[i], (uint64_t)capacity[i], (uint64_t)max_capacity[i], slot_bytes[i], mask[i]))
            return NGRAM_NO_MEMORY;
    }
    *err_info = 0;
    return NGRAM_OK;
}

/* Room for one more entry in each of tables[first .. first + count - 1]. */
static inline int reserve(Table *tables, int first, int count, int64_t *err_info) {
    for (int j = first; j < first + count; j++) {
        if (table_reserve(&tables[j])) {
            *err_info = j;
            return NGRAM_NO_MEMORY;
        }
    }
    return NGRAM_OK;
}

static void free_tables(Table *tables, int count, int64_t *slots, int64_t *used) {
    for (int i = 0; i < count; i++) {
        slots[i] = (int64_t)tables[i].alloc;
        used[i] = (int64_t)tables[i].used;
        table_free(&tables[i]);
    }
}

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
    size_t slot_bytes[2 * MAX_CACHE_CONTEXT];
    uint64_t masks[2 * MAX_CACHE_CONTEXT];
    Window windows[MAX_CACHE_CONTEXT];
    memset(tables, 0, sizeof tables);
    for (int i = 0; i < 2 * k_max; i++) {
        slot_bytes[i] = sizeof(Slot);
        masks[i] = EXACT_MASK;
    }
    for (int k = 0; k < k_max; k++) window_init(&windows[k], k + 1);
    uint64_t *fps = (uint64_t *)malloc((size_t)CHUNK * k_max * sizeof(uint64_t)); /* [CHUNK, K] */
    status = fps ? init_tables(tables, 2 * k_max, capacity, max_capacity, slot_bytes, masks, err_info)
                 : NGRAM_NO_MEMORY;
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
                if ((status = reserve(tables, 2 * k, 2, err_info))) break;
                Table *ctx_table = &tables[2 * k], *pair_table = &tables[2 * k + 1];
                Slot *ctx = (Slot *)probe(ctx_table, fp << 16);
                Slot *pair = (Slot *)probe(pair_table, fp << 16 | tok);
                if (ctx->key) p = ((double)pair->n + (double)ctx->m * p) / ((double)ctx->n + (double)ctx->m);
                int full = ctx->key == 0 && claim(ctx_table, &ctx->key, fp << 16) ? 1
                           : pair->key == 0 && claim(pair_table, &pair->key, fp << 16 | tok) ? 2 : 0;
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
