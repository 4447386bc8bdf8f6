/* bloomduo's own CPU kernels for a shard worker: the matrix products of decode (and, where they win,
 * prefill) and one-query attention.
 *
 * Why: a decode step reads every weight once for one to sixteen rows, so its time is the weights' bytes over
 * the memory bandwidth, if the kernel keeps the memory bus busy. oneDNN's small-batch kernel streams its
 * packed bf16 weights at ~15 GB/s on one EPYC core, ATen's bf16 GEMV is fast for one row only, and neither
 * reads int8 weights. Here every path reads W once per call, front to back, and sums in float32 (or exactly, in
 * int32, where it multiplies integers):
 *
 *   LAYOUT_ONEDNN  oneDNN's packed bf16 weight itself (AVX512-BF16: VDPBF16PS, outputs in the lanes; AMX
 *                  tiles from 3 rows where oneDNN packed for AMX), or int8 ones in its order (AVX2: each row
 *                  of x rounded to 16-bit integers, VPMADDWD's exact products summed in int32 runs)
 *   LAYOUT_TILED   this file's tiles, bf16 or int8 weights, in AVX512-BF16, AVX512F, AVX2+FMA or scalar form
 *   LAYOUT_VNNI    int8 weights in row blocks of 4-column groups, against activations quantized to unsigned
 *                  bytes per row on the way in (--quantize int8-dynamic): VPDPBUSD, twice VDPBF16PS's
 *                  products a cycle, or on AVX2 its emulation by VPMADDUBSW + VPMADDWD on 7-bit bytes
 *
 * The output is rounded once (round-to-nearest-even to bf16, or kept float32) after the bias, scale and
 * optional tanh GELU: what nn.Linear (and oneDNN's GELU post-op) computes, in another order of summation.
 * Built by the project's install (setuptools, pyproject.toml) and optional: without a compiler the worker
 * keeps torch's kernels (native.py chooses the ISA and checks what it may use).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#if defined(__x86_64__) || defined(__i386__)
#define X86 1
#include <immintrin.h>
#endif
#include <limits.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <time.h>
/* AMX's intrinsics need GCC 11 or clang 12: an older compiler builds the rest, and 32-row blocks take VDPBF16PS */
#if defined(__x86_64__) && ((defined(__clang__) && __clang_major__ >= 12) || \
                            (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define HAS_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

/* DT_BF16_COMPACT: bf16 weights stored in 12 bits without loss (the compact row blocks below) */
enum { DT_F32 = 0, DT_BF16 = 1, DT_I8 = 2, DT_BF16_COMPACT = 3 };
/* ISA_AVX512_VNNI is no rung of the ladder below ISA_AVX512_BF16 (CPUs have either without the other): the
 * VNNI layout runs on it wherever an AVX512 level is asked for, and on AMX-INT8 (the CPU has it, the compiler
 * built it, Linux lets this process use it) where ISA_AVX512_BF16 is. */
enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_AVX512_BF16 = 3, ISA_AVX512_VNNI = 4, ISA_AMX_INT8 = 5 };
enum { LAYOUT_TILED = 0, LAYOUT_ONEDNN = 1, LAYOUT_VNNI = 2 };

static int isa_supported(int isa);

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even; NaN stays NaN. A select, not a branch, so that loops of it vectorize. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, quiet = (u >> 16) | 0x40u;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
}

/* The tiled layout every path reads: W's rows in tiles of TILE_ROWS, each tile stored chunk by chunk of
 * TILE_K columns, so w[n][k] sits at (n / TILE_ROWS) * TILE_ROWS * K + (k / TILE_K) * TILE_ROWS * TILE_K
 * + (n % TILE_ROWS) * TILE_K + k % TILE_K. A tile is then one contiguous run of memory read front to back:
 * four rows read side by side in the plain layout are four streams 2-8 KB apart, which measured 11-14 GB/s
 * on one EPYC core against 17-23 GB/s for one stream (native.py's to_tiles makes the layout). */
#define TILE_ROWS 4
#define TILE_K 32

static inline long tiled_index(long n, long k, long K) {
    return (n / TILE_ROWS) * TILE_ROWS * K + (k / TILE_K) * TILE_ROWS * TILE_K + (n % TILE_ROWS) * TILE_K +
           k % TILE_K;
}

/* The layout oneDNN packs a bf16 Linear weight into for AVX512-BF16 (its "AB16b64a2b"): blocks of 64 rows x
 * 32 columns, row blocks outermost; inside a block, 16 column pairs, each holding 64 rows' (k, k+1) pairs.
 * With AMX oneDNN packs the same order in blocks of 32 rows (AMX_BLOCK_ROWS: a pair's 16-row halves are the
 * rows of two AMX tiles). Reading it lets a worker keep oneDNN's layout for prefill GEMMs and still stream it
 * at full bandwidth for decode; native.py checks on every weight which blocking oneDNN really chose before
 * this path is used. */
#define BLOCK_ROWS 64
#define AMX_BLOCK_ROWS 32
#define BLOCK_K 32

static inline long onednn_index(long n, long k, long K, long rows) {
    long block = (n / rows) * (K / BLOCK_K) + k / BLOCK_K;
    return block * rows * BLOCK_K + ((k % BLOCK_K) / 2) * 2 * rows + (n % rows) * 2 + k % 2;
}

/* int8 weights for VPDPBUSD, which sums four byte products into each 32-bit lane: blocks of `rows` rows (64 for
 * VPDPBUSD, 32 for the AVX2 form), inside a block the K / 4 column groups in order, each holding the block's
 * rows' (k .. k+3). One group is 4 registers of 16 rows' lanes (4 of 8 on AVX2), read in the order they are
 * stored: a block is one run of memory read front to back (the AVX2 form reading half a 64-row block per pass
 * read 2 rows at 20.8 ms against 12.6 in 32-row blocks, a bloom-560m rank's Linears). */
#define QUAD 4
#define AVX2_BLOCK_ROWS 32

static inline long vnni_index(long n, long k, long K, long rows) {
    return (n / rows) * rows * K + (k / QUAD) * QUAD * rows + (n % rows) * QUAD + k % QUAD;
}

/* What every path shares: where the operands are and what they hold. */
typedef struct {
    const void *x;      /* [R, K] activations, x_dtype, row-major */
    const void *w;      /* [N, K] weights, w_dtype, tiled */
    const float *scale; /* [N] per-row scale of int8 weights, else NULL */
    /* LAYOUT_VNNI: [N] the sum of each weight row, which a row's zero point times takes back out of its sums */
    const int32_t *row_sums;
    const void *bias;   /* [N] in y_dtype, or NULL */
    void *y;            /* [R, N] output, y_dtype, row-major */
    long R, N, K;
    int x_dtype, w_dtype, y_dtype, layout;
    int gelu; /* apply BLOOM's tanh GELU to each output before its rounding (MLP's first matmul) */
    /* LAYOUT_VNNI: the top byte x is quantized to (255, at most 127 for the AVX2 form); LAYOUT_VNNI and
     * LAYOUT_ONEDNN: the rows of a block */
    int levels, block_rows;
} Problem;

/* ------------------------------------------------------------------ compact row blocks
 * bf16 weights in 12 bits, losslessly. A decode step reads every weight once, so its time is the weights' bytes
 * over the memory's bandwidth; a bf16 weight's top byte (sign and seven of the eight exponent bits) takes few
 * values in a trained matrix (entropy ~2.7 bits: |w| spans a few binades), so each 32- or 64-row block of the
 * ONEDNN layout keeps a table of its 16 most frequent top bytes and every weight a 4-bit code into it beside its
 * low byte. The few weights whose top byte is not in their block's table (~1e-4 of them: the tiniest, mostly)
 * are stored whole as patches, written over the decoded block before any product reads it: the kernels see the
 * very bf16 bytes of the plain layout, and sum them in the same order, so the outputs are the same to the bit.
 *
 * One weight's bytes, for blocks of `rows` rows (native.py's to_compact makes them):
 *   [N / rows][rows K / 128][192] each block's weights in the ONEDNN order, 128 at a time: the low bytes of the
 *                               first 64, of the next 64, then 32 bytes of codes for each 64 (COMPACT_SLOT:
 *                               where each weight sits in them, as the decoder's byte interleave wants it)
 *   [N / rows][16]              each block's table: the top byte of each code
 *   int32 [N / rows + 1]        where each block's patches start (the last: their count)
 *   int32 [patches]             a patch's place in its block, as its element's index in the ONEDNN order
 *   uint16 [patches]            its bf16 weight */
#define COMPACT_CODES 16
#define COMPACT_GROUP 128 /* weights, in */
#define COMPACT_GROUP_BYTES 192

typedef struct {
    const uint8_t *data, *tables;
    const int32_t *patch_start, *patch_place;
    const uint16_t *patch_value;
} Compact;

static Compact compact_parts(const Problem *p) {
    const long blocks = p->N / p->block_rows;
    Compact c;
    c.data = (const uint8_t *)p->w;
    c.tables = c.data + p->N * p->K / COMPACT_GROUP * COMPACT_GROUP_BYTES;
    c.patch_start = (const int32_t *)(c.tables + blocks * COMPACT_CODES);
    c.patch_place = c.patch_start + blocks + 1;
    c.patch_value = (const uint16_t *)(c.patch_place + c.patch_start[blocks]);
    return c;
}

/* Block b's groups of COMPACT_GROUP_BYTES. */
static inline const uint8_t *compact_block(const Compact *c, long b, long K, long rows) {
    return c->data + b * (rows * K / COMPACT_GROUP) * COMPACT_GROUP_BYTES;
}

/* The slot of weight w (of 64) among its 64 low bytes and codes: unpacking 128-bit lanes' low and high eight bytes
 * (VPUNPCKLBW, VPUNPCKHBW) puts slot 16 l + j (j < 8) at weight 8 l + j and slot 16 l + 8 + j at 32 + 8 l + j. A
 * slot's code is the low nibble of code byte s (s < 32), the high one of byte s - 32 (s >= 32). */
static inline long compact_slot(long w) { return w < 32 ? 16 * (w / 8) + w % 8 : 16 * ((w - 32) / 8) + 8 + w % 8; }

/* The bf16 weight w[n][k], one at a time (the scalar path's). */
static uint16_t compact_weight(const Compact *c, long n, long k, long K, long rows) {
    const long b = n / rows, place = (k / 2) * 2 * rows + (n % rows) * 2 + k % 2;
    for (long patch = c->patch_start[b]; patch < c->patch_start[b + 1]; patch++)
        if (c->patch_place[patch] == place) return c->patch_value[patch];
    const uint8_t *group = compact_block(c, b, K, rows) + place / COMPACT_GROUP * COMPACT_GROUP_BYTES;
    const long half = place % COMPACT_GROUP / 64, slot = compact_slot(place % 64);
    const uint8_t *codes = group + 128 + 32 * half;
    const int code = slot < 32 ? codes[slot] & 15 : codes[slot - 32] >> 4;
    return (uint16_t)(group[64 * half + slot] | c->tables[b * COMPACT_CODES + code] << 8);
}

/* The bf16 weight at `place` of the plain [N, K] weight's block b, in the ONEDNN order (onednn_index inverted):
 * what the encoder reads, a block's rows at a time (32 or 64 rows x K: in L2). */
static inline uint16_t row_block_weight(const uint16_t *w, long b, long place, long K, long rows) {
    const long pair = place / (2 * rows), within = place % (2 * rows);
    return w[(b * rows + within / 2) * K + 2 * pair + within % 2];
}

/* Pass one of encoding a plain bf16 [N, K] weight into compact blocks of `rows`: each block's table (its 16 most
 * frequent top bytes, the more frequent first, ties to the smaller byte) and where its patches start (`starts`,
 * blocks + 1 of them, from 0); returns how many patches there are in all. */
static long compact_tables(const uint16_t *w, long N, long K, long rows, uint8_t *tables, int32_t *starts) {
    long patches = 0;
    starts[0] = 0;
    for (long b = 0; b < N / rows; b++) {
        long count[256] = {0}, held = 0;
        for (long n = b * rows; n < (b + 1) * rows; n++)
            for (long k = 0; k < K; k++) count[w[n * K + k] >> 8]++;
        for (int code = 0; code < COMPACT_CODES; code++) {
            int top = 0;
            for (int value = 1; value < 256; value++)
                if (count[value] > count[top]) top = value;
            tables[b * COMPACT_CODES + code] = (uint8_t)top;
            held += count[top];
            count[top] = -1; /* taken */
        }
        patches += rows * K - held;
        starts[b + 1] = (int32_t)patches;
    }
    return patches;
}

/* Pass two: the blocks' groups and patches, into `out` laid out as compact_parts reads it (tables and patch starts
 * already in place). */
static void compact_fill(const uint16_t *w, long N, long K, long rows, uint8_t *out) {
    const Problem shape = {.w = out, .N = N, .K = K, .block_rows = (int)rows};
    const Compact c = compact_parts(&shape);
    uint8_t *data = out;
    int32_t *places = (int32_t *)c.patch_place;
    uint16_t *values = (uint16_t *)c.patch_value;
    memset(data, 0, (size_t)(N * K / COMPACT_GROUP * COMPACT_GROUP_BYTES));
    for (long b = 0; b < N / rows; b++) {
        int code_of[256];
        for (int value = 0; value < 256; value++) code_of[value] = -1;
        for (int code = COMPACT_CODES - 1; code >= 0; code--) code_of[c.tables[b * COMPACT_CODES + code]] = code;
        long patch = c.patch_start[b];
        uint8_t *block = data + (compact_block(&c, b, K, rows) - c.data);
        for (long place = 0; place < rows * K; place++) {
            const uint16_t value = row_block_weight(w, b, place, K, rows);
            int code = code_of[value >> 8], low = value & 0xFF;
            if (code < 0) { /* stored whole; the decoded stand-in is overwritten */
                places[patch] = (int32_t)place;
                values[patch++] = value;
                code = low = 0;
            }
            uint8_t *group = block + place / COMPACT_GROUP * COMPACT_GROUP_BYTES;
            const long half = place % COMPACT_GROUP / 64, slot = compact_slot(place % 64);
            group[64 * half + slot] = (uint8_t)low;
            uint8_t *codes = group + 128 + 32 * half;
            if (slot < 32)
                codes[slot] |= (uint8_t)code;
            else
                codes[slot - 32] |= (uint8_t)(code << 4);
        }
    }
}

static inline float load_as_f32(const void *p, long i, int dtype) {
    return dtype == DT_BF16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), written as x / (1 + exp(-2u)): one exp, and the right
 * limits where exp overflows or underflows. */
static inline float gelu_tanh(float x) {
    float u = 0.7978845608f * (x + 0.044715f * x * x * x);
    return x / (1.0f + expf(-2.0f * u));
}

/* y[r, n] from its float32 sum: times the row's scale, plus the bias, GELU if asked, rounded once to y's
 * dtype. */
static inline void store_scaled(const Problem *p, long r, long n, float sum) {
    if (p->bias) sum += load_as_f32(p->bias, n, p->y_dtype);
    if (p->gelu) sum = gelu_tanh(sum);
    if (p->y_dtype == DT_BF16)
        ((uint16_t *)p->y)[r * p->N + n] = f32_to_bf16(sum);
    else
        ((float *)p->y)[r * p->N + n] = sum;
}

static inline void store(const Problem *p, long r, long n, float sum) {
    store_scaled(p, r, n, p->scale ? sum * p->scale[n] : sum);
}

/* How a row of x becomes unsigned bytes (what VPDPBUSD multiplies): x ~= (q - zero) * step, the `levels`
 * steps (255, or 127 for the AVX2 form) spanning [min(x, 0), max(x, 0)] (asymmetric: a GELU's outputs, nearly
 * all >= 0, get every byte value rather than half of them), zero the byte that holds 0.0 exactly; rounded half
 * to even, as torch.round does. */
typedef struct {
    float inverse, step;
    int32_t zero;
} RowQuantizer;

static inline RowQuantizer row_quantizer(float lowest, float highest, int levels) {
    float span = fmaxf(highest, 0.0f) - fminf(lowest, 0.0f);
    RowQuantizer out = {0.0f, span / (float)levels, 0};
    if (span > 0.0f) {
        out.inverse = (float)levels / span;
        out.zero = (int32_t)nearbyintf(-fminf(lowest, 0.0f) * out.inverse);
    }
    return out;
}

static void quantize_row_scalar(const Problem *p, long r, uint8_t *q, RowQuantizer *quantizer) {
    float lowest = INFINITY, highest = -INFINITY;
    for (long k = 0; k < p->K; k++) {
        float v = load_as_f32(p->x, r * p->K + k, p->x_dtype);
        lowest = fminf(lowest, v);
        highest = fmaxf(highest, v);
    }
    *quantizer = row_quantizer(lowest, highest, p->levels);
    for (long k = 0; k < p->K; k++) {
        float v = nearbyintf(load_as_f32(p->x, r * p->K + k, p->x_dtype) * quantizer->inverse) + quantizer->zero;
        q[k] = (uint8_t)fminf(fmaxf(v, 0.0f), (float)p->levels);
    }
}

/* The integer sum of a quantized row against weight row n less zero x the row's sum, then its float: what every
 * path computes exactly (int32 cannot overflow: 255 x 127 x K stays below 2^31 for K up to 66000). */
static inline float vnni_output(const Problem *p, long n, const RowQuantizer *row, int32_t sum) {
    return (float)(sum - row->zero * p->row_sums[n]) * (row->step * p->scale[n]);
}

static const char *linear_vnni_scalar(const Problem *p) {
    uint8_t *q = malloc((size_t)p->K);
    if (!q) return "out of memory quantizing x";
    for (long r = 0; r < p->R; r++) {
        RowQuantizer row;
        quantize_row_scalar(p, r, q, &row);
        for (long n = 0; n < p->N; n++) {
            int32_t sum = 0;
            for (long k = 0; k < p->K; k++) sum += (int32_t)q[k] * ((const int8_t *)p->w)[vnni_index(n, k, p->K, p->block_rows)];
            store_scaled(p, r, n, vnni_output(p, n, &row, sum));
        }
    }
    free(q);
    return NULL;
}

static void linear_scalar(const Problem *p) {
    const Compact compact = p->w_dtype == DT_BF16_COMPACT ? compact_parts(p) : (Compact){0};
    for (long n = 0; n < p->N; n++)
        for (long r = 0; r < p->R; r++) {
            float sum = 0.0f;
            for (long k = 0; k < p->K; k++) {
                long i = p->layout == LAYOUT_ONEDNN ? onednn_index(n, k, p->K, p->block_rows) : tiled_index(n, k, p->K);
                float w = p->w_dtype == DT_I8            ? (float)((const int8_t *)p->w)[i]
                          : p->w_dtype == DT_BF16_COMPACT ? bf16_to_f32(compact_weight(&compact, n, k, p->K, p->block_rows))
                                                          : load_as_f32(p->w, i, p->w_dtype);
                sum += load_as_f32(p->x, r * p->K + k, p->x_dtype) * w;
            }
            store(p, r, n, sum);
        }
}

#ifdef X86

/* x widened to float32 once per call, into a buffer kept between calls (one per thread: the GIL is
 * released while a call runs). */
static _Thread_local float *widened_buffer;
static _Thread_local size_t widened_capacity;

static float *x_buffer(const Problem *p) {
    size_t needed = (size_t)p->R * (size_t)p->K;
    if (needed > widened_capacity) {
        free(widened_buffer);
        widened_buffer = aligned_alloc(64, ((needed * sizeof(float) + 63) / 64) * 64);
        widened_capacity = widened_buffer ? needed : 0;
    }
    return widened_buffer;
}

static const float *widened_x(const Problem *p) {
    if (p->x_dtype == DT_F32) return (const float *)p->x;
    float *out = x_buffer(p);
    if (!out) return NULL;
    for (size_t i = 0; i < (size_t)p->R * (size_t)p->K; i++) out[i] = bf16_to_f32(((const uint16_t *)p->x)[i]);
    return out;
}

/* x in float32 with each run of 16 columns split into its 8 even columns, then its 8 odd ones: the order
 * tile_avx2_pairs widens bf16 weights in (K is a multiple of 16). */
static const float *pair_split_x(const Problem *p) {
    float *out = x_buffer(p);
    if (!out) return NULL;
    for (long r = 0; r < p->R; r++)
        for (long k = 0; k < p->K; k += 16)
            for (int m = 0; m < 16; m++)
                out[r * p->K + k + (m & 1) * 8 + m / 2] = load_as_f32(p->x, r * p->K + k + m, p->x_dtype);
    return out;
}

/* Each path multiplies up to 6 rows of x by one tile (or row block) of W with ROWS x 4 accumulators in
 * registers; the tile comes from memory for the first rows and from L1 for the next. always_inline with a
 * constant row count gives each row count its own unrolled loop: FOR_ROW_GROUPS runs BLOCK(ROWS) over
 * every group of up to 6 rows, FOR_ROW_TILES that for every tile. */
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#define AVX2 __attribute__((target("avx2,fma")))
#define INLINE static inline __attribute__((always_inline))

/* exp(x) = 2^n e^r with x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (relative error
 * below 2e-7, under a float32 rounding of the bf16 outputs it feeds), written once for every vector width:
 * FMADD, FNMADD and SET1 are that width's intrinsics, n the rounded x / ln2 of x clamped to [-87, 88]. */
#define EXP_REMAINDER(FNMADD, SET1, x, n) FNMADD(n, SET1(1.428606765330187e-06f), FNMADD(n, SET1(0.693145751953125f), x))
#define TAYLOR_EXP(FMADD, SET1, r)                                                                                 \
    FMADD(FMADD(FMADD(FMADD(FMADD(FMADD(SET1(1.0f / 720), r, SET1(1.0f / 120)), r, SET1(1.0f / 24)), r, SET1(1.0f / 6)), \
                      r, SET1(0.5f)),                                                                               \
                r, SET1(1.0f)),                                                                                     \
          r, SET1(1.0f))

/* exp(x) for 8 lanes, as exp16, with 2^n built in the exponent bits (AVX2 has no VSCALEFPS): n stays within
 * [-126, 127] after the clamp, so 2^n is a normal float. */
AVX2 INLINE __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.4426950409f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256i two_to_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 r = EXP_REMAINDER(_mm256_fnmadd_ps, _mm256_set1_ps, x, n);
    return _mm256_mul_ps(TAYLOR_EXP(_mm256_fmadd_ps, _mm256_set1_ps, r), _mm256_castsi256_ps(two_to_n));
}

/* gelu_tanh for 8 lanes, as gelu16. */
AVX2 INLINE __m256 gelu8(__m256 x) {
    __m256 inner = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), x), _mm256_mul_ps(x, x), x);
    __m256 minus_2u = _mm256_mul_ps(inner, _mm256_set1_ps(-2.0f * 0.7978845608f));
    return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(minus_2u)));
}

typedef union {
    __m128 v;
    float f[4];
} Sums4;

/* The four sums of one row of x against one tile, y[r, n0 .. n0+3] (each accumulator reduced by one shuffle
 * tree for all four: sum4x16, sum4x8), scaled, biased and GELU'd in one vector, then rounded one by one: as
 * store computes them, with the vector GELU (a scalar expf per output cost as much as a 16-row product). */
AVX2 INLINE void store4(const Problem *p, long r, long n0, Sums4 sums) {
    __m128 v = sums.v;
    if (p->scale) v = _mm_mul_ps(v, _mm_loadu_ps(p->scale + n0));
    if (p->bias) {
        const void *bias = p->bias;
        v = _mm_add_ps(v, p->y_dtype == DT_BF16 ? _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64(
                                                       (const __m128i *)((const uint16_t *)bias + n0))), 16))
                                                 : _mm_loadu_ps((const float *)bias + n0));
    }
    if (p->gelu) v = _mm256_castps256_ps128(gelu8(_mm256_zextps128_ps256(v)));
    _mm_storeu_ps(sums.f, v);
    for (int j = 0; j < TILE_ROWS; j++) {
        if (p->y_dtype == DT_BF16)
            ((uint16_t *)p->y)[r * p->N + n0 + j] = f32_to_bf16(sums.f[j]);
        else
            ((float *)p->y)[r * p->N + n0 + j] = sums.f[j];
    }
}

#define FOR_ROW_GROUPS(BLOCK)                                                             \
    for (long r0 = 0; r0 < p->R; r0 += 6) switch (p->R - r0 < 6 ? p->R - r0 : 6) {      \
        case 1: BLOCK(1); break;                                                          \
        case 2: BLOCK(2); break;                                                          \
        case 3: BLOCK(3); break;                                                          \
        case 4: BLOCK(4); break;                                                          \
        case 5: BLOCK(5); break;                                                          \
        default: BLOCK(6); break;                                                         \
        }

#define FOR_ROW_TILES(TILE) \
    for (long n0 = 0; n0 < p->N; n0 += TILE_ROWS) FOR_ROW_GROUPS(TILE)

AVX512 INLINE __m512 widen16(const void *w, long i, int w_dtype) {
    if (w_dtype == DT_I8)
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)w + i))));
    __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}

/* The total of each of four vectors, in one shuffle tree: [sum(a), sum(b), sum(c), sum(d)]. */
AVX512 INLINE Sums4 sum4x16(const __m512 acc[TILE_ROWS]) {
    __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(acc[0], acc[1]), _mm512_unpackhi_ps(acc[0], acc[1]));
    __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(acc[2], acc[3]), _mm512_unpackhi_ps(acc[2], acc[3]));
    __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
    __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
    Sums4 out = {_mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1))};
    return out;
}

/* 6 x 4 accumulators + 4 weights + 1 x of 32 zmm registers. */
AVX512 INLINE void tile_avx512(const Problem *p, const float *x, long r0, const int rows, long n0) {
    __m512 acc[6][TILE_ROWS];
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < TILE_ROWS; j++) acc[i][j] = _mm512_setzero_ps();
    long tile = n0 * p->K;
    for (long k = 0; k < p->K; k += TILE_K)
        for (int half = 0; half < TILE_K; half += 16) {
            __m512 w[TILE_ROWS];
            for (int j = 0; j < TILE_ROWS; j++) w[j] = widen16(p->w, tile + k * TILE_ROWS + j * TILE_K + half, p->w_dtype);
            for (int i = 0; i < rows; i++) {
                __m512 a = _mm512_loadu_ps(x + (r0 + i) * p->K + k + half);
                for (int j = 0; j < TILE_ROWS; j++) acc[i][j] = _mm512_fmadd_ps(a, w[j], acc[i][j]);
            }
        }
    for (int i = 0; i < rows; i++) store4(p, r0 + i, n0, sum4x16(acc[i]));
}

AVX512 static void linear_avx512(const Problem *p, const float *x) {
#define TILE(ROWS) tile_avx512(p, x, r0, ROWS, n0)
    FOR_ROW_TILES(TILE)
#undef TILE
}

/* 32 weights of the tile's row as bf16 pairs: bf16 as stored, or int8 widened exactly (|w| <= 127 has
 * at most 7 significant bits; bf16 holds 8). */
AVX512_BF16 INLINE __m512bh weights_bf16(const void *w, long i, int w_dtype) {
    if (w_dtype == DT_BF16) return (__m512bh)_mm512_loadu_si512((const uint16_t *)w + i);
    const int8_t *b = (const int8_t *)w + i;
    __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)b)));
    __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 16))));
    return _mm512_cvtne2ps_pbh(high, low);
}

AVX512_BF16 INLINE void tile_bf16(const Problem *p, long r0, const int rows, long n0) {
    const uint16_t *x = (const uint16_t *)p->x;
    __m512 acc[6][TILE_ROWS];
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < TILE_ROWS; j++) acc[i][j] = _mm512_setzero_ps();
    long tile = n0 * p->K;
    for (long k = 0; k < p->K; k += TILE_K) {
        __m512bh b[TILE_ROWS];
        for (int j = 0; j < TILE_ROWS; j++) b[j] = weights_bf16(p->w, tile + k * TILE_ROWS + j * TILE_K, p->w_dtype);
        for (int i = 0; i < rows; i++) {
            __m512bh a = (__m512bh)_mm512_loadu_si512(x + (r0 + i) * p->K + k);
            for (int j = 0; j < TILE_ROWS; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, b[j]);
        }
    }
    for (int i = 0; i < rows; i++) store4(p, r0 + i, n0, sum4x16(acc[i]));
}

AVX512_BF16 static void linear_avx512_bf16(const Problem *p) {
#define TILE(ROWS) tile_bf16(p, r0, ROWS, n0)
    FOR_ROW_TILES(TILE)
#undef TILE
}

/* exp(x) for 16 lanes, times 2^n by VSCALEFPS. */
AVX512 INLINE __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.4426950409f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = EXP_REMAINDER(_mm512_fnmadd_ps, _mm512_set1_ps, x, n);
    return _mm512_scalef_ps(TAYLOR_EXP(_mm512_fmadd_ps, _mm512_set1_ps, r), n);
}

/* gelu_tanh for 16 lanes (oneDNN's post-op does the same inside its matmul: no bf16 pass over the outputs). */
AVX512 INLINE __m512 gelu16(__m512 x) {
    __m512 inner = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), x), _mm512_mul_ps(x, x), x);
    __m512 minus_2u = _mm512_mul_ps(inner, _mm512_set1_ps(-2.0f * 0.7978845608f));
    return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(minus_2u)));
}

/* 16 lanes of float32 rounded to bf16 (nearest even, NaN kept), with AVX512F alone: VNNI CPUs without
 * AVX512-BF16 exist. */
AVX512 INLINE __m256i bf16x16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i rounded = _mm512_add_epi32(
        u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_or_epi32(rounded, nan, u, _mm512_set1_epi32(0x400000));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

/* Bias, GELU and the one rounding of 16 outputs y[r, n .. n+15] from their float32 values. */
AVX512 INLINE void store16(const Problem *p, long r, long n, __m512 sum) {
    if (p->bias)
        sum = _mm512_add_ps(sum, p->y_dtype == DT_BF16 ? widen16(p->bias, n, DT_BF16) : _mm512_loadu_ps((const float *)p->bias + n));
    if (p->gelu) sum = gelu16(sum);
    if (p->y_dtype == DT_BF16)
        _mm256_storeu_si256((__m256i *)((uint16_t *)p->y + r * p->N + n), bf16x16(sum));
    else
        _mm512_storeu_ps((float *)p->y + r * p->N + n, sum);
}

/* 16 rows' (k, k+1) pairs of an int8 row block as bf16 pairs: 32 bytes widened to float32 in two halves and
 * packed into one register of bf16 (exact: |w| <= 127 has at most 7 significant bits; bf16 holds 8). */
AVX512_BF16 INLINE __m512bh int8_pairs(const int8_t *w) {
    __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)w)));
    __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + 16))));
    return _mm512_cvtne2ps_pbh(high, low);
}

static inline long min_long(long a, long b) { return a < b ? a : b; }
static inline long max_long(long a, long b) { return a > b ? a : b; }

/* How far ahead block_onednn asks for bf16 weights: the cores' own prefetchers stop at 4 KiB pages and keep
 * too few lines in flight for one core's share of the bus (a 302 MB rank of bloom-560m's blocks, one thread,
 * Xeon with AMX, oneDNN's 32-row blocks: 2 rows 37.9 -> 30.9 ms, 4 rows 46.1 -> 34.2, 16 rows 76.1 -> 69.6,
 * one row even; 4 and 16 KiB ahead no better). */
#define ROW_BLOCK_AHEAD 8192

/* Lines of the next block one pass over a block fetches into L2: `lines` a column pair from `at`, `bytes` in all. */
typedef struct {
    const char *at;
    long bytes;
    int lines;
} NextBlock;

/* One row block of the layout against up to 6 rows of x: 6 x `vectors` accumulators hold the block's 64 (or
 * 32) outputs per row in their lanes, so no horizontal sums; each column pair of x is broadcast to all lanes.
 * The weights are bf16 (oneDNN's own packed bytes) or int8 in the same order (`int8`, with a float32 scale
 * per row). `lead`: the pass reads the block from memory, ROW_BLOCK_AHEAD bytes asked of L2 ahead; `next`: the
 * lines of the next block it fetches as it goes. */
AVX512_BF16 INLINE void block_onednn(const Problem *p, const void *block, long r0, const int rows, long n0,
                                      const int int8, const int vectors, const int lead, NextBlock next) {
    const uint16_t *x = (const uint16_t *)p->x;
    const uint16_t *w = (const uint16_t *)block; /* the row block's K / 32 blocks, in order */
    const int8_t *w8 = (const int8_t *)block;
    const long pair_step = 2 * 16 * vectors;
    __m512 acc[6][4];
    for (int i = 0; i < rows; i++)
        for (int c = 0; c < vectors; c++) acc[i][c] = _mm512_setzero_ps();
    for (long k = 0; k < p->K; k += 2, w += pair_step, w8 += pair_step) {
        __m512bh b[4];
        /* ask L2 for the weights ROW_BLOCK_AHEAD bytes on (int8: 2 lines a pair of columns, bf16 4): without it a
         * bloom-560m rank's int8 Linears and LM head slice read at 1 row in 39-48 ms against 26, one thread */
        if (lead && int8)
            for (int c = 0; c < vectors; c += 2) _mm_prefetch((const char *)(w8 + c * 32) + ROW_BLOCK_AHEAD, _MM_HINT_T1);
        else if (lead)
            for (int c = 0; c < vectors; c++) _mm_prefetch((const char *)(w + c * 32) + ROW_BLOCK_AHEAD, _MM_HINT_T1);
        for (int line = 0; line < next.lines && next.bytes > 0; line++, next.at += 64, next.bytes -= 64)
            _mm_prefetch(next.at, _MM_HINT_T1);
        for (int c = 0; c < vectors; c++)
            b[c] = int8 ? int8_pairs(w8 + c * 32) : (__m512bh)_mm512_loadu_si512(w + c * 32);
        for (int i = 0; i < rows; i++) {
            int32_t pair;
            memcpy(&pair, x + (r0 + i) * p->K + k, 4);
            __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
            for (int c = 0; c < vectors; c++) acc[i][c] = _mm512_dpbf16_ps(acc[i][c], a, b[c]);
        }
    }
    for (int i = 0; i < rows; i++)
        for (int c = 0; c < vectors; c++) {
            __m512 sum = acc[i][c];
            long n = n0 + c * 16;
            if (p->scale) sum = _mm512_mul_ps(sum, _mm512_loadu_ps(p->scale + n));
            store16(p, r0 + i, n, sum);
        }
}

/* The calling thread's scratch for one widened row block, kept between calls: allocated per call (128-256 KB,
 * above glibc's mmap threshold) it was mapped, faulted in and unmapped by every Linear of a prefill. At most
 * 64 x K bf16 per thread (1 MiB at BLOOM-7B1's widest K of a rank, 8192). */
static uint16_t *widening_scratch(size_t elements) {
    static __thread uint16_t *scratch = NULL;
    static __thread size_t held = 0;
    if (elements > held) {
        uint16_t *grown = realloc(scratch, elements * sizeof(uint16_t));
        if (!grown) return NULL;
        scratch = grown;
        held = elements;
    }
    return scratch;
}

/* An int8 row block widened to the bf16 pairs block_onednn reads (exact, see int8_pairs), in the same order. */
AVX512_BF16 static void widen_block(const int8_t *block, uint16_t *out, long K) {
    for (long i = 0; i < BLOCK_ROWS * K; i += 64) {
        _mm_prefetch((const char *)block + i + ROW_BLOCK_AHEAD, _MM_HINT_T1);
        _mm512_storeu_si512(out + i, (__m512i)int8_pairs(block + i));
        _mm512_storeu_si512(out + i + 32, (__m512i)int8_pairs(block + i + 32));
    }
}

/* 64 weights of a compact group as two registers of bf16 (in order): their codes' nibbles (the low ones, then the
 * high ones) pick their top bytes from the block's table (in every 128-bit lane of `table`), which the lanes'
 * unpacks interleave with the low bytes. */
AVX512 INLINE void compact64(const uint8_t *low, const uint8_t *codes, __m512i table, __m512i *weights) {
    const __m256i packed = _mm256_loadu_si256((const __m256i *)codes);
    const __m512i index = _mm512_and_si512(
        _mm512_inserti64x4(_mm512_castsi256_si512(packed), _mm256_srli_epi16(packed, 4), 1), _mm512_set1_epi8(15));
    const __m512i top = _mm512_shuffle_epi8(table, index), bytes = _mm512_loadu_si512(low);
    weights[0] = _mm512_unpacklo_epi8(bytes, top);
    weights[1] = _mm512_unpackhi_epi8(bytes, top);
}

/* A compact group's 128 weights (from `place` in its block) into four registers, with its patches (from *next,
 * whose place *patch_place is, or LONG_MAX past the block's last) set in their lanes. */
AVX512 INLINE void compact_group(const Compact *c, long b, const uint8_t *group, long place, __m512i table,
                                 int32_t *next, long *patch_place, __m512i *weights) {
    compact64(group, group + 128, table, weights);
    compact64(group + 64, group + 160, table, weights + 2);
    const int32_t stop = c->patch_start[b + 1];
    /* weights[] is indexed by constants only: one indexed at run time is kept in memory, not in registers */
    while (__builtin_expect(*patch_place < place + COMPACT_GROUP, 0)) {
        const long lane = *patch_place - place;
        const short value = (short)c->patch_value[*next];
        for (int v = 0; v < 4; v++)
            weights[v] = _mm512_mask_set1_epi16(weights[v], lane / 32 == v ? (__mmask32)1 << (lane % 32) : 0, value);
        *patch_place = ++*next < stop ? c->patch_place[*next] : LONG_MAX;
    }
}

/* Where block b's patches start: the first's index, and its place (LONG_MAX when the block has none). */
static inline long first_patch(const Compact *c, long b, int32_t *next) {
    *next = c->patch_start[b];
    return *next < c->patch_start[b + 1] ? c->patch_place[*next] : LONG_MAX;
}

/* The weights of compact block b from place `first` to `end` (multiples of COMPACT_GROUP) decoded into `out` (in
 * the ONEDNN order, from `first`), its patches from *next (at *patch_place) set: for the paths that read the
 * weights more than once; ROW_BLOCK_AHEAD bytes of the block asked of L2 ahead. */
AVX512 static void decode_compact(const Compact *c, long b, long K, long rows, long first, long end, int32_t *next,
                                  long *patch_place, uint16_t *out) {
    const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(c->tables + b * COMPACT_CODES)));
    const uint8_t *group = compact_block(c, b, K, rows) + first / COMPACT_GROUP * COMPACT_GROUP_BYTES;
    for (long place = first; place < end; place += COMPACT_GROUP, group += COMPACT_GROUP_BYTES) {
        for (int line = 0; line < COMPACT_GROUP_BYTES; line += 64)
            _mm_prefetch((const char *)group + ROW_BLOCK_AHEAD + line, _MM_HINT_T1);
        __m512i weights[4];
        compact_group(c, b, group, place, table, next, patch_place, weights);
        for (int v = 0; v < 4; v++) _mm512_storeu_si512(out + place - first + 32 * v, weights[v]);
    }
}

/* Decoding one stretch of a compact block a few groups at a time, between other work (linear_onednn_amx's
 * passes over the stretch before it): its block, where it is and where it ends, the block's patch cursor. */
typedef struct {
    const Compact *c;
    long b, K, rows, first, place, end;
    int32_t next;
    long patch_place;
    uint16_t *out;
} DecodeJob;

/* Start `job` on places first .. end of block b (into `out`); the patch cursor carries on within a block. */
static void decode_job_start(DecodeJob *job, long b, long first, long end, uint16_t *out) {
    if (b != job->b) job->patch_place = first_patch(job->c, b, &job->next);
    job->b = b, job->first = job->place = first, job->end = end, job->out = out;
}

/* Up to `groups` more groups of the job's stretch. */
static void decode_job_run(DecodeJob *job, long groups) {
    const long left = (job->end - job->place) / COMPACT_GROUP, end = job->place + (groups < left ? groups : left) * COMPACT_GROUP;
    if (end <= job->place) return;
    decode_compact(job->c, job->b, job->K, job->rows, job->place, end, &job->next, &job->patch_place,
                   job->out + (job->place - job->first));
    job->place = end;
}

/* block_onednn's products on a compact block, one read of it for up to 6 rows of x: each group of 128 weights
 * decoded into registers (its patches, if any, set in their lanes) and summed as block_onednn sums the plain
 * block, the same products in the same order. Decoded into L1 and read back from there instead, a stretch at a
 * time, the weights streamed at 12.8 GB/s against 16.9 (a bloom-560m rank's LM head slice, one row, one thread,
 * Xeon with AMX): the stores and loads kept fewer of the block's reads in flight. With `decoded`, the decoded
 * block is also stored there (the ONEDNN order) for the passes of the rows after these. */
AVX512_BF16 INLINE void block_compact(const Problem *p, const Compact *c, long r0, const int rows, long n0,
                                      const int vectors, uint16_t *decoded) {
    const uint16_t *x = (const uint16_t *)p->x;
    const long block_rows = 16 * vectors, b = n0 / block_rows;
    const int pairs_per_group = COMPACT_GROUP / (2 * (int)block_rows);
    const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(c->tables + b * COMPACT_CODES)));
    const uint8_t *group = compact_block(c, b, p->K, block_rows);
    int32_t next;
    long patch_place = first_patch(c, b, &next);
    __m512 acc[6][4];
    for (int i = 0; i < rows; i++)
        for (int v = 0; v < vectors; v++) acc[i][v] = _mm512_setzero_ps();
    for (long k = 0, place = 0; k < p->K; k += 2 * pairs_per_group, place += COMPACT_GROUP, group += COMPACT_GROUP_BYTES) {
        for (int line = 0; line < COMPACT_GROUP_BYTES; line += 64)
            _mm_prefetch((const char *)group + ROW_BLOCK_AHEAD + line, _MM_HINT_T1);
        __m512i weights[4];
        compact_group(c, b, group, place, table, &next, &patch_place, weights);
        if (decoded)
            for (int v = 0; v < 4; v++) _mm512_storeu_si512(decoded + place + 32 * v, weights[v]);
        for (int pair = 0; pair < pairs_per_group; pair++)
            for (int i = 0; i < rows; i++) {
                int32_t xs;
                memcpy(&xs, x + (r0 + i) * p->K + k + 2 * pair, 4);
                const __m512bh a = (__m512bh)_mm512_set1_epi32(xs);
                for (int v = 0; v < vectors; v++)
                    acc[i][v] = _mm512_dpbf16_ps(acc[i][v], a, (__m512bh)weights[pair * vectors + v]);
            }
    }
    for (int i = 0; i < rows; i++)
        for (int v = 0; v < vectors; v++) store16(p, r0 + i, n0 + v * 16, acc[i][v]);
}

AVX512_BF16 static const char *linear_onednn_bf16(const Problem *p) {
    const int int8 = p->w_dtype == DT_I8;
    /* int8 weights and more than 60 rows, so 11 passes or more over each row block: the block is widened to
     * bf16 once, into a scratch that stays in L2, instead of in every pass, where widening costs about as much
     * as the dot products (a bloom-560m rank's int8 prefill, in-process, interleaved: 128 rows 268 -> 236 ms,
     * 64 rows 137 -> 130 ms). With fewer passes a widening pass of its own, which reads the block from memory
     * with no arithmetic to hide behind, costs more than it saves: 24 rows 57 -> 67 ms, 32 and 48 rows even. */
    const int compact = p->w_dtype == DT_BF16_COMPACT;
    const Compact parts = compact ? compact_parts(p) : (Compact){0};
    if (compact && p->R <= 6) { /* one read of each block, decoded into registers */
        const int vectors = p->block_rows / 16;
        for (long n0 = 0; n0 < p->N; n0 += p->block_rows) {
#define BLOCK(ROWS) (vectors == 2 ? block_compact(p, &parts, r0, ROWS, n0, 2, NULL) : block_compact(p, &parts, r0, ROWS, n0, 4, NULL))
            FOR_ROW_GROUPS(BLOCK)
#undef BLOCK
        }
        return NULL;
    }
    /* More rows: a compact block's first pass decodes it into registers as up to 6 rows go (block_compact) and
     * stores the decoded block in L2 for the passes after it, which read it as a plain one. Decoded whole in a
     * pass of its own first, the decoding (~10 ms a step of a bloom-560m rank) never overlapped the products: the
     * rank's step on a Zen 4 EPYC with AVX512-BF16, 2 ranks in-process, alternated, 16 rows 65.5 -> 57.9 ms, 8
     * rows 46.4 -> 38.4, a 32-token prompt 74.2 -> 65.9, 16 prompts of 32 823 -> 802 (plain blocks: 52.6 at 16). */
    uint16_t *widened = NULL;
    if (((int8 && p->R > 60) || compact) && !(widened = widening_scratch(BLOCK_ROWS * (size_t)p->K)))
        return compact ? "out of memory for a decoded row block" : "out of memory for a widened row block";
    /* Up to 6 rows: one pass a block, which reads it from memory ROW_BLOCK_AHEAD bytes asked of L2 ahead. More:
     * every pass after a compact block's first (every pass, for plain and int8 blocks) also fetches its share of
     * the next block as stored, so the bus streams through all of a block's passes, not the first alone. A
     * bloom-560m rank's whole step, 2 ranks in-process on a 2-core Zen 4 EPYC with AVX512-BF16, with and
     * without, alternated: plain blocks and LM head at 16 rows 56.5 -> 52.6 ms, 8 rows 41.5 -> 38.7; compact
     * ones (then decoded in a pass of their own) at 16 rows 85.4 -> 65.0, 8 rows 63.5 -> 45.0, a 32-token prompt
     * 86.2 -> 72.1; one row even. */
    const long groups = (p->R + 5) / 6, pairs = p->K / 2, decoding_passes = compact ? 1 : 0;
    const long stored_block_bytes =
        compact ? p->block_rows * p->K / COMPACT_GROUP * COMPACT_GROUP_BYTES : p->block_rows * p->K * (int8 ? 1 : 2);
    const long share = groups > decoding_passes ? (stored_block_bytes / (groups - decoding_passes) + 63) / 64 * 64 : 0;
    const int lines = (int)((share / 64 + pairs - 1) / pairs);
    /* int8 row blocks are bloomduo's own, always of BLOCK_ROWS; run() lets AMX_BLOCK_ROWS through for bf16 */
#define BLOCK(ROWS)                                                                                                  \
    do {                                                                                                             \
        const long pass = r0 / 6, from = min_long(max_long(pass - decoding_passes, 0) * share, next_bytes);         \
        const NextBlock next = {next_block + from, min_long(share, next_bytes - from), lines};                     \
        const int lead = groups == 1 || (n0 == 0 && r0 == 0);                                                        \
        if (compact && pass == 0)                                                                                    \
            (p->block_rows == BLOCK_ROWS ? block_compact(p, &parts, 0, ROWS, n0, BLOCK_ROWS / 16, widened)           \
                                         : block_compact(p, &parts, 0, ROWS, n0, AMX_BLOCK_ROWS / 16, widened));     \
        else if (block_int8)                                                                                         \
            block_onednn(p, block, r0, ROWS, n0, 1, BLOCK_ROWS / 16, lead, next);                                    \
        else if (p->block_rows == BLOCK_ROWS)                                                                        \
            block_onednn(p, block, r0, ROWS, n0, 0, BLOCK_ROWS / 16, lead, next);                                    \
        else                                                                                                         \
            block_onednn(p, block, r0, ROWS, n0, 0, AMX_BLOCK_ROWS / 16, lead, next);                                \
    } while (0)
    for (long n0 = 0; n0 < p->N; n0 += p->block_rows) {
        const void *block = (const char *)p->w + n0 * p->K * (int8 ? 1 : 2);
        const char *next_block = compact ? (const char *)compact_block(&parts, n0 / p->block_rows + 1, p->K, p->block_rows)
                                         : (const char *)block + stored_block_bytes;
        const long next_bytes = n0 + p->block_rows < p->N ? stored_block_bytes : 0;
        int block_int8 = int8;
        if (compact) {
            block = widened; /* written by the block's first pass */
        } else if (widened) {
            widen_block((const int8_t *)block, widened, p->K);
            block = widened;
            block_int8 = 0;
        }
        FOR_ROW_GROUPS(BLOCK)
    }
#undef BLOCK
    return NULL;
}

#ifdef HAS_AMX
/* ---- AMX: oneDNN's 32-row blocks are AMX's own operand layout. A block's 16 column pairs are 16 rows of 128
 * bytes, each two 16-output halves of (k, k+1) pairs: read with a stride of 128 bytes, each half is a B tile
 * of TDPBF16PS, which sums 16 rows of x against 16 outputs over 32 columns a call into float32 tiles. */
#define AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,amx-tile,amx-bf16")))
/* From this many rows of x the 32-row blocks go through AMX, below it through VDPBF16PS, which streams them
 * faster (a bloom-560m rank's blocks, one thread, ms VDPBF16PS / AMX: 1 row 26-28 / 31-34, 2 rows 26-29 /
 * 32-33); from 4 rows to 64 AMX beats oneDNN's own AMX kernel (16 rows 29-32 against 35 ms, 32 rows 29-34
 * against 40; larger batches see AMX_K_STEP). Compact blocks alike (their LM head slice, ms registers / AMX:
 * 3 rows 17.7 / 17.7, 4 rows 18.2-18.6 / 17.7, 6 rows 21.4-22.2 / 18.9). */
#define AMX_MIN_ROWS 3
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} TileConfig;

/* Whether Linux lets this process use AMX's tile state (asked once, for the whole process). */
static int amx_permitted(void) {
    static int permitted = -1;
    if (permitted < 0) {
#ifdef SYS_arch_prctl
        __builtin_cpu_init();
        permitted = __builtin_cpu_supports("amx-tile") &&
                    syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
        permitted = 0;
#endif
    }
    return permitted;
}

/* Whether this process may run AMX's bf16 (or int8) dot products. */
static int amx_ready(void) { return amx_permitted() && __builtin_cpu_supports("amx-bf16"); }
static int amx_int8_ready(void) { return amx_permitted() && __builtin_cpu_supports("amx-int8"); }

/* Every one of the 8 tiles 16 rows of 64 bytes, as every AMX path here uses them. */
__attribute__((target("amx-tile"))) static void amx_configure(void) {
    TileConfig config = {.palette = 1};
    for (int t = 0; t < 8; t++) config.bytes_per_row[t] = 64, config.rows[t] = 16;
    _tile_loadconfig(&config);
}

/* x's last rows from `first` (fewer than 16) as an A tile's source: copied into the thread's scratch and padded
 * with zero rows, whose sums are computed and dropped. */
static const uint16_t *amx_padded_rows(const Problem *p, long first, uint16_t *scratch) {
    memcpy(scratch, (const uint16_t *)p->x + first * p->K, (size_t)(p->R - first) * p->K * sizeof(uint16_t));
    memset(scratch + (p->R - first) * p->K, 0, (size_t)(16 - (p->R - first)) * p->K * sizeof(uint16_t));
    return scratch;
}

/* The float32 sums of `tiles` 16-row tiles x 32 outputs (in `sums`, 32 floats a row) to the outputs. */
AMX INLINE void amx_store(const Problem *p, const float *sums, long first, int tiles, long n0) {
    for (long r = 0; r < 16L * tiles && first + r < p->R; r++)
        for (int half = 0; half < 2; half++) store16(p, first + r, n0 + half * 16, _mm512_loadu_ps(sums + r * 32 + half * 16));
}

/* A compact stretch's next one is decoded during its first pass: 8 groups (32 columns of the block) a step. */
#define AMX_JOB_GROUPS 8

/* One pass over a row block's columns k0 .. k1: x's 16-row tile x0 (and x1 beside it, `two`) against the
 * block's 32 outputs, summed into `sums` (32 floats a row; zeroed at k0 = 0). The first pass over a stretch of
 * the block keeps the memory busy: a plain block asks L2 for its weights ROW_BLOCK_AHEAD on (`fetch`); a
 * compact one decodes AMX_JOB_GROUPS groups of the next stretch (`job`) every 32 columns. */
AMX INLINE void amx_pass(const Problem *p, const uint16_t *block, const uint16_t *x0, const uint16_t *x1, long k0,
                         long k1, float *sums, const int two, const int fetch, DecodeJob *job) {
    const long stride = p->K * (long)sizeof(uint16_t);
    if (k0 == 0) {
        _tile_zero(0);
        _tile_zero(1);
        if (two) {
            _tile_zero(2);
            _tile_zero(3);
        }
    } else {
        _tile_loadd(0, sums, 128);
        _tile_loadd(1, sums + 16, 128);
        if (two) {
            _tile_loadd(2, sums + 16 * 32, 128);
            _tile_loadd(3, sums + 16 * 32 + 16, 128);
        }
    }
    for (long k = k0; k < k1; k += 32) {
        const uint16_t *pairs = block + k * AMX_BLOCK_ROWS;
        if (fetch)
            for (int line = 0; line < 32; line++)
                _mm_prefetch((const char *)pairs + ROW_BLOCK_AHEAD + line * 64, _MM_HINT_T1);
        if (job) decode_job_run(job, AMX_JOB_GROUPS);
        _tile_loadd(4, x0 + k, stride);
        _tile_loadd(6, pairs, 128);
        _tile_loadd(7, pairs + 32, 128);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (two) {
            _tile_loadd(5, x1 + k, stride);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, sums, 128);
    _tile_stored(1, sums + 16, 128);
    if (two) {
        _tile_stored(2, sums + 16 * 32, 128);
        _tile_stored(3, sums + 16 * 32 + 16, 128);
    }
}

/* One tile of x (16 rows of 64 bytes a step) against a 64-row block whose groups of columns (bf16 pairs, int8
 * quads) are 4 bytes an output, so 256 bytes a group: its quarters, read with that stride, are B tiles of 16
 * outputs, a step's 16 groups one B tile each. Four int32 or float32 sum tiles side by side, 64 a row of `sums`;
 * the block is read front to back once, ROW_BLOCK_AHEAD bytes asked of L2 ahead (`fetch`). */
#define AMX_QUARTERS(NAME, TARGET, DOT)                                                                              \
    TARGET INLINE void NAME(const char *block, const char *x, long x_stride, long steps, void *sums, const int fetch) { \
        _tile_zero(0);                                                                                               \
        _tile_zero(1);                                                                                               \
        _tile_zero(2);                                                                                               \
        _tile_zero(3);                                                                                               \
        for (long step = 0; step < steps; step++) {                                                                  \
            const char *groups = block + step * 16 * 256;                                                            \
            if (fetch)                                                                                               \
                for (int line = 0; line < 64; line++) _mm_prefetch(groups + ROW_BLOCK_AHEAD + line * 64, _MM_HINT_T1); \
            _tile_loadd(4, x + step * 64, x_stride);                                                                 \
            _tile_loadd(5, groups, 256);                                                                             \
            _tile_loadd(6, groups + 64, 256);                                                                        \
            _tile_loadd(7, groups + 128, 256);                                                                       \
            DOT(0, 4, 5);                                                                                            \
            _tile_loadd(5, groups + 192, 256);                                                                       \
            DOT(1, 4, 6);                                                                                            \
            DOT(2, 4, 7);                                                                                            \
            DOT(3, 4, 5);                                                                                            \
        }                                                                                                            \
        _tile_stored(0, sums, 256);                                                                                  \
        _tile_stored(1, (char *)sums + 64, 256);                                                                     \
        _tile_stored(2, (char *)sums + 128, 256);                                                                    \
        _tile_stored(3, (char *)sums + 192, 256);                                                                    \
    }

AMX_QUARTERS(amx_bf16_quarters, AMX, _tile_dpbf16ps)

/* int8 row blocks (weight-only int8) from AMX_WIDENED_MIN_ROWS rows: each block widened to bf16 once a call
 * (exact, see int8_pairs), into a scratch that stays in L2, then every tile of x against it on AMX. Below it
 * VDPBF16PS, widening as it goes, is faster: up to 6 rows are one pass over each block (a bloom-560m rank's
 * int8 Linears and LM head slice, 280 MB, one thread, Xeon with AMX, ms VDPBF16PS / AMX: 4 rows 35.9 / 45.2,
 * 7 rows 58.4 / 47.4, 16 rows 114 / 43.1, 32 rows 225 / 58.4, 64 rows 340 / 74.6). */
#define AMX_WIDENED_MIN_ROWS 7
AMX static const char *linear_int8_blocks_amx(const Problem *p) {
    const long K = p->K, tiles = (p->R + 15) / 16, whole = p->R / 16;
    uint16_t *scratch = widening_scratch((size_t)(BLOCK_ROWS + 16) * K + (size_t)tiles * 16 * BLOCK_ROWS * 2);
    if (!scratch) return "out of memory for a widened row block, x's last rows and the sums";
    uint16_t *widened = scratch;
    const uint16_t *x = (const uint16_t *)p->x;
    const uint16_t *last = tiles > whole ? amx_padded_rows(p, whole * 16, scratch + BLOCK_ROWS * K) : NULL;
    float *sums = (float *)(scratch + (BLOCK_ROWS + 16) * K);
    amx_configure();
    for (long n0 = 0; n0 < p->N; n0 += BLOCK_ROWS) {
        widen_block((const int8_t *)p->w + n0 * K, widened, K);
        for (long m = 0; m < tiles; m++)
            amx_bf16_quarters((const char *)widened, (const char *)(m < whole ? x + m * 16 * K : last),
                              K * (long)sizeof(uint16_t), K / 32, sums + m * 16 * BLOCK_ROWS, 0);
        for (long r = 0; r < p->R; r++)
            for (int c = 0; c < BLOCK_ROWS; c += 16)
                store16(p, r, n0 + c, _mm512_mul_ps(_mm512_loadu_ps(sums + r * BLOCK_ROWS + c),
                                                    _mm512_loadu_ps(p->scale + n0 + c)));
    }
    _tile_release();
    return NULL;
}

/* Past two tiles of x, each pass over a block covers AMX_K_STEP columns (16 KiB of the block) for every tile of
 * x before the next stretch, so the block's stretch is read from L1 and only x from L2 (4 hot layers of a
 * bloom-560m rank, one thread: 256 rows 18.6 -> 17.3-17.5 ms, 320 rows 24.0 -> 20.7-21.2; oneDNN 16-22). */
#define AMX_K_STEP 256
/* Compact blocks go by stretches of this many columns at every row count: each stretch decoded into one of two
 * 8 KiB buffers (L1) while the passes read the other (a bloom-560m rank's block Linears, one thread, Xeon with
 * AMX, ms plain -> compact at 4 / 16 / 32 rows: 256-column stretches 25.5 -> 23.5, 25.8 -> 23.6, 27.6 -> 26.8 and
 * as much as 1.15x slower in other runs; 128: 26.3 -> 23.2, 27.3 -> 22.3, 29.4 -> 26.1, never slower in three). */
#define COMPACT_K_STEP 128

AMX static const char *linear_onednn_amx(const Problem *p) {
    const long K = p->K, tiles = (p->R + 15) / 16, whole = p->R / 16;
    const int compact = p->w_dtype == DT_BF16_COMPACT;
    /* compact blocks: a stretch at a time, decoded into one of two buffers in L1 while the passes read the other */
    const long k_step = compact ? COMPACT_K_STEP : tiles > 2 ? AMX_K_STEP : K;
    const Compact parts = compact ? compact_parts(p) : (Compact){0};
    /* x's last rows padded to a tile, the float32 sums of every tile of x against one block, then (compact) the
     * two decoded stretches */
    uint16_t *scratch =
        widening_scratch(16 * (size_t)K + (size_t)tiles * 16 * 32 * 2 + (compact ? 2 * 32 * COMPACT_K_STEP : 0));
    if (!scratch) return "out of memory for x's last rows, the sums and the decoded stretches";
    const uint16_t *x = (const uint16_t *)p->x, *last = tiles > whole ? amx_padded_rows(p, whole * 16, scratch) : NULL;
    float *sums = (float *)(scratch + 16 * K);
    uint16_t *decoded[2] = {scratch + 16 * K + tiles * 16 * 32 * 2, scratch + 16 * K + tiles * 16 * 32 * 2 + 32 * COMPACT_K_STEP};
    DecodeJob job = {&parts, -1, K, AMX_BLOCK_ROWS, 0, 0, 0, 0, 0, NULL};
    if (compact) {
        decode_job_start(&job, 0, 0, AMX_BLOCK_ROWS * (K < COMPACT_K_STEP ? K : COMPACT_K_STEP), decoded[0]);
        decode_job_run(&job, LONG_MAX);
    }
    amx_configure();
    /* tiles 0-3 sum, 4-5 hold x, 6-7 the block's two halves; two 16-row tiles of x a pass share each B tile */
    long stretch = 0;
    for (long n0 = 0; n0 < p->N; n0 += AMX_BLOCK_ROWS) {
        const uint16_t *block = (const uint16_t *)p->w + n0 * K;
        for (long k0 = 0; k0 < K; k0 += k_step, stretch++) {
            const long k1 = k0 + k_step < K ? k0 + k_step : K;
            DecodeJob *next = NULL;
            if (compact) { /* this stretch's columns where amx_pass reads them (block + k x 32); the next one's job */
                block = decoded[stretch % 2] - k0 * AMX_BLOCK_ROWS;
                const long next_n0 = k1 < K ? n0 : n0 + AMX_BLOCK_ROWS, next_k0 = k1 < K ? k1 : 0;
                const long next_k1 = next_k0 + COMPACT_K_STEP < K ? next_k0 + COMPACT_K_STEP : K;
                if (next_n0 < p->N) {
                    decode_job_start(&job, next_n0 / AMX_BLOCK_ROWS, next_k0 * AMX_BLOCK_ROWS, next_k1 * AMX_BLOCK_ROWS,
                                     decoded[(stretch + 1) % 2]);
                    next = &job;
                }
            }
            for (long m = 0; m < tiles; m += 2) {
                const uint16_t *x0 = m < whole ? x + m * 16 * K : last;
                DecodeJob *decoding = m == 0 ? next : NULL;
                if (m + 1 < tiles)
                    amx_pass(p, block, x0, m + 1 < whole ? x + (m + 1) * 16 * K : last, k0, k1, sums + m * 16 * 32, 1,
                             m == 0 && !compact, decoding);
                else
                    amx_pass(p, block, x0, NULL, k0, k1, sums + m * 16 * 32, 0, m == 0 && !compact, decoding);
            }
            if (next) decode_job_run(next, LONG_MAX); /* what the passes' steps left of it */
        }
        for (long m = 0; m < tiles; m += 2) amx_store(p, sums + m * 16 * 32, m * 16, tiles - m >= 2 ? 2 : 1, n0);
    }
    _tile_release();
    return NULL;
}
#endif /* HAS_AMX */

#define AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")))

AVX512 INLINE __m512 x16(const Problem *p, long i) {
    return p->x_dtype == DT_BF16 ? widen16(p->x, i, DT_BF16) : _mm512_loadu_ps((const float *)p->x + i);
}

/* quantize_row_scalar for every row, 16 columns at a time (K a multiple of 16): the same bytes and steps. */
AVX512 static void quantize_rows(const Problem *p, uint8_t *q, RowQuantizer *rows) {
    for (long r = 0; r < p->R; r++) {
        __m512 lowest = _mm512_set1_ps(INFINITY), highest = _mm512_set1_ps(-INFINITY);
        for (long k = 0; k < p->K; k += 16) {
            __m512 v = x16(p, r * p->K + k);
            lowest = _mm512_min_ps(lowest, v);
            highest = _mm512_max_ps(highest, v);
        }
        RowQuantizer row = row_quantizer(_mm512_reduce_min_ps(lowest), _mm512_reduce_max_ps(highest), p->levels);
        __m512 inverse = _mm512_set1_ps(row.inverse);
        __m512i zero = _mm512_set1_epi32(row.zero), top = _mm512_set1_epi32(p->levels);
        for (long k = 0; k < p->K; k += 16) {
            __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(x16(p, r * p->K + k), inverse)); /* nearest even */
            v = _mm512_min_epi32(_mm512_max_epi32(_mm512_add_epi32(v, zero), _mm512_setzero_si512()), top);
            _mm_storeu_si128((__m128i *)(q + r * p->K + k), _mm512_cvtusepi32_epi8(v));
        }
        rows[r] = row;
    }
}

/* acc + the four byte products of a's unsigned and b's signed bytes in each lane. In assembly: GCC 12 copies
 * every accumulator of _mm512_dpbusd_epi32 through the stack (five times slower); this keeps them in place. */
AVX512_VNNI INLINE __m512i dot_bytes(__m512i acc, __m512i a, __m512i b) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "vm"(b));
    return acc;
}

/* One row block against up to 6 quantized rows: 6 x 4 int32 accumulators hold 64 outputs per row in their
 * lanes; each 4-byte group of a row is broadcast to all lanes. */
AVX512_VNNI INLINE void block_vnni(const Problem *p, const int8_t *w, const uint8_t *q,
                                   const RowQuantizer *quantizers, long r0, const int rows, long n0) {
    __m512i acc[6][4];
    for (int i = 0; i < rows; i++)
        for (int c = 0; c < 4; c++) acc[i][c] = _mm512_setzero_si512();
    for (long k = 0; k < p->K; k += QUAD, w += QUAD * BLOCK_ROWS) {
        __m512i b[4];
        for (int c = 0; c < 4; c++) b[c] = _mm512_loadu_si512(w + c * 64);
        for (int i = 0; i < rows; i++) {
            int32_t group;
            memcpy(&group, q + (r0 + i) * p->K + k, 4);
            __m512i a = _mm512_set1_epi32(group);
            for (int c = 0; c < 4; c++) acc[i][c] = dot_bytes(acc[i][c], a, b[c]);
        }
    }
    for (int i = 0; i < rows; i++) {
        __m512 step = _mm512_set1_ps(quantizers[r0 + i].step);
        __m512i zero = _mm512_set1_epi32(quantizers[r0 + i].zero);
        for (int c = 0; c < 4; c++) {
            long n = n0 + c * 16;
            __m512i sum = _mm512_sub_epi32(acc[i][c], _mm512_mullo_epi32(zero, _mm512_loadu_si512(p->row_sums + n)));
            __m512 scale = _mm512_mul_ps(step, _mm512_loadu_ps(p->scale + n));
            store16(p, r0 + i, n, _mm512_mul_ps(_mm512_cvtepi32_ps(sum), scale));
        }
    }
}

/* The calling thread's quantized rows and their quantizers, kept between calls as widening_scratch is. */
static uint8_t *quantized_scratch(size_t bytes) {
    static __thread uint8_t *scratch = NULL;
    static __thread size_t held = 0;
    if (bytes > held) {
        uint8_t *grown = realloc(scratch, bytes);
        if (!grown) return NULL;
        scratch = grown;
        held = bytes;
    }
    return scratch;
}

#ifdef HAS_AMX
/* ---- AMX-INT8: the VNNI layout's 64-row blocks are TDPBUSD's B operand as they lie. A block's 4-byte group of
 * columns is 256 bytes, 64 outputs x 4 bytes: its quarters read with a stride of 256 bytes are B tiles of 16
 * outputs over 64 columns. The int32 sums are the same as VPDPBUSD's, so the outputs are too, bit for bit. */
#define AMX_INT8 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,amx-tile,amx-int8")))
/* From this many rows of x the VNNI layout goes through AMX, below it through VPDPBUSD (a bloom-560m rank's
 * Linears and LM head slice, 280 MB, one thread, Xeon with AMX, ms VPDPBUSD / AMX: 1 row 19.1 / 19.1, 2 rows
 * 19.8 / 20.3, 3 rows 20.7 / 19.6, 4 rows 23.0 / 19.6, 16 rows 33.9 / 20.3 (the bus's speed), 64 rows 67.9 /
 * 37.1, 512 rows 432 / 195). */
#define AMX_INT8_MIN_ROWS 3

AMX_QUARTERS(amx_int8_quarters, AMX_INT8, _tile_dpbusd)

/* block_vnni's outputs from every row's int32 sums against a row block's outputs (64 a row, from n0). */
AMX_INT8 INLINE void amx_int8_store(const Problem *p, const int32_t *sums, const RowQuantizer *quantizers, long n0) {
    for (long r = 0; r < p->R; r++) {
        __m512 step = _mm512_set1_ps(quantizers[r].step);
        __m512i zero = _mm512_set1_epi32(quantizers[r].zero);
        for (int c = 0; c < BLOCK_ROWS; c += 16) {
            long n = n0 + c;
            __m512i sum = _mm512_loadu_si512(sums + r * BLOCK_ROWS + c);
            sum = _mm512_sub_epi32(sum, _mm512_mullo_epi32(zero, _mm512_loadu_si512(p->row_sums + n)));
            __m512 scale = _mm512_mul_ps(step, _mm512_loadu_ps(p->scale + n));
            store16(p, r, n, _mm512_mul_ps(_mm512_cvtepi32_ps(sum), scale));
        }
    }
}

AMX_INT8 static const char *linear_vnni_amx(const Problem *p) {
    const long K = p->K, tiles = (p->R + 15) / 16;
    /* the quantizers, x quantized with its last tile padded by rows of zeros (whose sums are dropped), then the
     * int32 sums of every tile of x against one block */
    size_t quantizer_bytes = (size_t)p->R * sizeof(RowQuantizer), rows_bytes = (size_t)tiles * 16 * K;
    uint8_t *scratch = quantized_scratch(quantizer_bytes + rows_bytes + (size_t)tiles * 16 * BLOCK_ROWS * 4);
    if (!scratch) return "out of memory quantizing x";
    RowQuantizer *quantizers = (RowQuantizer *)scratch;
    uint8_t *q = scratch + quantizer_bytes;
    int32_t *sums = (int32_t *)(q + rows_bytes); /* K is a multiple of 64: 4-byte aligned */
    quantize_rows(p, q, quantizers);
    memset(q + p->R * K, 0, rows_bytes - (size_t)p->R * K);
    amx_configure();
    /* Row block outermost: every tile of x after the first reads the block from L2. Sharing each B tile between
     * two tiles of x (a pass per half block, 2 x 2 sums) was no faster (a bloom-560m rank's Linears and LM head
     * slice, one thread: 32 rows 33.3 against 28.1 ms, 64 rows 44.1 / 37.1, 128 rows 65.6 / 56.4, 512 even). */
    for (long n0 = 0; n0 < p->N; n0 += BLOCK_ROWS) {
        for (long m = 0; m < tiles; m++)
            amx_int8_quarters((const char *)p->w + n0 * K, (const char *)(q + m * 16 * K), K, K / 64,
                              sums + m * 16 * BLOCK_ROWS, m == 0);
        amx_int8_store(p, sums, quantizers, n0);
    }
    _tile_release();
    return NULL;
}
#endif /* HAS_AMX */

/* Row block outermost, as linear_onednn_bf16: a block (64 x K bytes) stays in L2 for every group of rows. */
AVX512_VNNI static const char *linear_vnni(const Problem *p) {
    size_t quantizer_bytes = (size_t)p->R * sizeof(RowQuantizer);
    uint8_t *scratch = quantized_scratch(quantizer_bytes + (size_t)p->R * (size_t)p->K);
    if (!scratch) return "out of memory quantizing x";
    RowQuantizer *quantizers = (RowQuantizer *)scratch; /* realloc's alignment */
    uint8_t *q = scratch + quantizer_bytes;
    quantize_rows(p, q, quantizers);
#define BLOCK(ROWS) block_vnni(p, block, q, quantizers, r0, ROWS, n0)
    for (long n0 = 0; n0 < p->N; n0 += BLOCK_ROWS) {
        const int8_t *block = (const int8_t *)p->w + n0 * p->K;
        FOR_ROW_GROUPS(BLOCK)
    }
#undef BLOCK
    return NULL;
}

AVX2 INLINE __m256 widen8(const void *w, long i, int w_dtype) {
    if (w_dtype == DT_I8)
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)w + i))));
    __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}

/* Values i .. i+7 of bf16 or float32 data, as float32. */
AVX2 INLINE __m256 load8(const void *data, long i, int dtype) {
    return dtype == DT_F32 ? _mm256_loadu_ps((const float *)data + i) : widen8(data, i, DT_BF16);
}

/* The total of 8 lanes. */
AVX2 INLINE float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* 8 lanes folded by `op` (fminf, fmaxf) from lane 0 up. */
AVX2 INLINE float fold8(__m256 v, float (*op)(float, float)) {
    float lanes[8];
    _mm256_storeu_ps(lanes, v);
    for (int i = 1; i < 8; i++) lanes[0] = op(lanes[0], lanes[i]);
    return lanes[0];
}

AVX2 INLINE Sums4 sum4x8(const __m256 acc[TILE_ROWS]) {
    __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    Sums4 out = {_mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1))};
    return out;
}

/* 16 ymm registers: 2 x 4 accumulators, 4 widened weights, one row of x. */
AVX2 INLINE void tile_avx2(const Problem *p, const float *x, long r0, const int rows, long n0) {
    __m256 acc[2][TILE_ROWS];
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < TILE_ROWS; j++) acc[i][j] = _mm256_setzero_ps();
    long tile = n0 * p->K;
    for (long k = 0; k < p->K; k += TILE_K)
        for (int part = 0; part < TILE_K; part += 8) {
            __m256 w[TILE_ROWS];
            for (int j = 0; j < TILE_ROWS; j++) w[j] = widen8(p->w, tile + k * TILE_ROWS + j * TILE_K + part, p->w_dtype);
            for (int i = 0; i < rows; i++) {
                __m256 a = _mm256_loadu_ps(x + (r0 + i) * p->K + k + part);
                for (int j = 0; j < TILE_ROWS; j++) acc[i][j] = _mm256_fmadd_ps(a, w[j], acc[i][j]);
            }
        }
    for (int i = 0; i < rows; i++) store4(p, r0 + i, n0, sum4x8(acc[i]));
}

/* bf16 weights widened without a shuffle: 16 of them (8 dwords) hold the even columns in each dword's low half
 * and the odd ones in its high half, so a shift and a mask make two float32 vectors, and x comes split the same
 * way (pair_split_x). VPMOVZXWD's shuffle per 8 weights shared the FMAs' ports: ~75 % of the FMA rate at 2+
 * rows, where this runs at the FMA rate. 16 ymm registers: 2 x 4 accumulators, 2 x 2 halves of x, 2 weights. */
AVX2 INLINE void tile_avx2_pairs(const Problem *p, const float *x, long r0, const int rows, long n0) {
    __m256 acc[2][TILE_ROWS];
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < TILE_ROWS; j++) acc[i][j] = _mm256_setzero_ps();
    const uint16_t *tile = (const uint16_t *)p->w + n0 * p->K;
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    for (long k = 0; k < p->K; k += TILE_K)
        for (int half = 0; half < TILE_K; half += 16) {
            __m256 even[2], odd[2];
            for (int i = 0; i < rows; i++) {
                even[i] = _mm256_loadu_ps(x + (r0 + i) * p->K + k + half);
                odd[i] = _mm256_loadu_ps(x + (r0 + i) * p->K + k + half + 8);
            }
            for (int j = 0; j < TILE_ROWS; j++) {
                __m256i w = _mm256_loadu_si256((const __m256i *)(tile + k * TILE_ROWS + j * TILE_K + half));
                __m256 w_even = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
                __m256 w_odd = _mm256_castsi256_ps(_mm256_and_si256(w, high));
                for (int i = 0; i < rows; i++)
                    acc[i][j] = _mm256_fmadd_ps(odd[i], w_odd, _mm256_fmadd_ps(even[i], w_even, acc[i][j]));
            }
        }
    for (int i = 0; i < rows; i++) store4(p, r0 + i, n0, sum4x8(acc[i]));
}

AVX2 static void linear_avx2(const Problem *p, const float *x) {
    for (long n0 = 0; n0 < p->N; n0 += TILE_ROWS)
        for (long r0 = 0; r0 < p->R; r0 += 2) {
            const int rows = p->R - r0 == 1 ? 1 : 2;
            if (p->w_dtype == DT_BF16 && rows == 1)
                tile_avx2_pairs(p, x, r0, 1, n0);
            else if (p->w_dtype == DT_BF16)
                tile_avx2_pairs(p, x, r0, 2, n0);
            else if (rows == 1)
                tile_avx2(p, x, r0, 1, n0);
            else
                tile_avx2(p, x, r0, 2, n0);
        }
}

/* 8 lanes rounded to bf16 as f32_to_bf16 rounds each (nearest even, NaN kept quiet), in the low 128 bits. */
AVX2 INLINE __m128i bf16x8(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
    __m256i halves = _mm256_packus_epi32(_mm256_srli_epi32(rounded, 16), _mm256_setzero_si256());
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(halves, 0x08)); /* lanes 0-3, then 4-7 */
}

/* Bias, GELU and the one rounding of 8 outputs y[r, n .. n+7] from their float32 values (store16's form). */
AVX2 INLINE void store8(const Problem *p, long r, long n, __m256 sum) {
    if (p->bias) sum = _mm256_add_ps(sum, load8(p->bias, n, p->y_dtype));
    if (p->gelu) sum = gelu8(sum);
    if (p->y_dtype == DT_BF16)
        _mm_storeu_si128((__m128i *)((uint16_t *)p->y + r * p->N + n), bf16x8(sum));
    else
        _mm256_storeu_ps((float *)p->y + r * p->N + n, sum);
}

/* quantize_row_scalar for every row, 8 columns at a time: the same bytes and steps (quantize_rows' form). */
AVX2 static void quantize_rows_avx2(const Problem *p, uint8_t *q, RowQuantizer *rows) {
    for (long r = 0; r < p->R; r++) {
        __m256 lowest = _mm256_set1_ps(INFINITY), highest = _mm256_set1_ps(-INFINITY);
        for (long k = 0; k < p->K; k += 8) {
            __m256 v = load8(p->x, r * p->K + k, p->x_dtype);
            lowest = _mm256_min_ps(lowest, v);
            highest = _mm256_max_ps(highest, v);
        }
        RowQuantizer row = row_quantizer(fold8(lowest, fminf), fold8(highest, fmaxf), p->levels);
        __m256 inverse = _mm256_set1_ps(row.inverse);
        __m256i zero = _mm256_set1_epi32(row.zero), top = _mm256_set1_epi32(p->levels);
        for (long k = 0; k < p->K; k += 8) {
            __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(load8(p->x, r * p->K + k, p->x_dtype), inverse));
            v = _mm256_min_epi32(_mm256_max_epi32(_mm256_add_epi32(v, zero), _mm256_setzero_si256()), top);
            __m256i words = _mm256_packus_epi32(v, v); /* per 128-bit lane: 4 words, twice */
            __m128i eight = _mm_unpacklo_epi64(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
            _mm_storel_epi64((__m128i *)(q + r * p->K + k), _mm_packus_epi16(eight, eight));
        }
        rows[r] = row;
    }
}

/* acc + each lane's four byte products (a unsigned, b signed) without VPDPBUSD: VPMADDUBSW sums them in pairs
 * in int16, exact while a's bytes stay below 128 (127 x 127 x 2 < 2^15: hence 7-bit rows here), and VPMADDWD
 * by ones sums the pairs into the int32 lanes. */
AVX2 INLINE __m256i dot_bytes_avx2(__m256i acc, __m256i a, __m256i b, __m256i ones) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones));
}

/* One 32-row block against one or two quantized rows from r0: 4 int32 accumulators a row hold the block's
 * outputs in their lanes, each weight vector loaded once for both rows. */
AVX2 INLINE void block_vnni_avx2(const Problem *p, const int8_t *w, const uint8_t *q, const RowQuantizer *quantizers,
                                 long r0, const int rows, long n0, const char *next, long next_bytes) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[2][4];
    for (int i = 0; i < rows; i++)
        for (int c = 0; c < 4; c++) acc[i][c] = _mm256_setzero_si256();
    for (long k = 0; k < p->K; k += QUAD, w += QUAD * AVX2_BLOCK_ROWS) {
        if (next_bytes > 0) {
            _mm_prefetch(next, _MM_HINT_T1);
            next += 64, next_bytes -= 64;
        }
        for (int i = 0; i < rows; i++) {
            int32_t group;
            memcpy(&group, q + (r0 + i) * p->K + k, 4);
            __m256i a = _mm256_set1_epi32(group);
            for (int c = 0; c < 4; c++)
                acc[i][c] = dot_bytes_avx2(acc[i][c], a, _mm256_loadu_si256((const __m256i *)(w + c * 32)), ones);
        }
    }
    for (int i = 0; i < rows; i++) {
        __m256 step = _mm256_set1_ps(quantizers[r0 + i].step);
        __m256i zero = _mm256_set1_epi32(quantizers[r0 + i].zero);
        for (int c = 0; c < 4; c++) {
            long n = n0 + c * 8;
            __m256i offset = _mm256_mullo_epi32(zero, _mm256_loadu_si256((const __m256i *)(p->row_sums + n)));
            __m256 scale = _mm256_mul_ps(step, _mm256_loadu_ps(p->scale + n));
            store8(p, r0 + i, n, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[i][c], offset)), scale));
        }
    }
}

/* linear_vnni's order, two rows a pass: a block (32 x K bytes) stays in L1 or L2 for the passes after the first.
 * Three rows a pass (12 accumulators) measured no faster; 16-row blocks with 4-6 rows a pass were faster at 4
 * rows (16.8-18.2 against 19.4 ms) and slower at 16 (62-72 against 51). Each pass also fetches its share of
 * the next block into L2, a line a quad (the row strips' `next`): the LM head slice (125440 x 1024, past the L3)
 * at 16 rows 126-142 -> 163-166 GOP/s on a Zen 3 EPYC core, blocks in cache unchanged. As the kernel is
 * integer-bound from there (its 16 multiplies a quad of two rows at 2 a cycle: ~183 GOP/s), its loop in
 * assembly (43 -> 30 instructions a quad) measured no faster. */
AVX2 static const char *linear_vnni_avx2(const Problem *p) {
    size_t quantizer_bytes = (size_t)p->R * sizeof(RowQuantizer);
    uint8_t *scratch = quantized_scratch(quantizer_bytes + (size_t)p->R * (size_t)p->K);
    if (!scratch) return "out of memory quantizing x";
    RowQuantizer *quantizers = (RowQuantizer *)scratch;
    uint8_t *q = scratch + quantizer_bytes;
    quantize_rows_avx2(p, q, quantizers);
    const long block_bytes = AVX2_BLOCK_ROWS * p->K, passes = (p->R + 1) / 2;
    const long share = (block_bytes / passes + 63) / 64 * 64;
    for (long n0 = 0; n0 < p->N; n0 += AVX2_BLOCK_ROWS) {
        const int8_t *block = (const int8_t *)p->w + n0 * p->K;
        const char *next = (const char *)(block + block_bytes);
        const long next_bytes = n0 + AVX2_BLOCK_ROWS < p->N ? block_bytes : 0;
        for (long r0 = 0, pass = 0; r0 < p->R; r0 += 2, pass++) {
            const long from = min_long(pass * share, next_bytes), bytes = min_long(share, next_bytes - from);
            if (p->R - r0 == 1)
                block_vnni_avx2(p, block, q, quantizers, r0, 1, n0, next + from, bytes);
            else
                block_vnni_avx2(p, block, q, quantizers, r0, 2, n0, next + from, bytes);
        }
    }
    return NULL;
}

/* The row-block layout with FMAs alone, where bf16 products are emulated: outer products, so no horizontal
 * sums and each output's float32 sum runs over k in order. Inside a 64-row block the (k, k+1) pairs of its
 * rows lie at (k / 2) * 128 + row * 2 (onednn_index with its 32-column blocks laid end to end): a dword holds
 * one row's pair, widened to float32 by a shift (k) and a mask (k + 1), as tile_avx2_pairs does.
 * A row on its own: the whole block, 8 accumulators, read front to back. More rows: a strip of 16 of its rows
 * against up to 6 rows of x, 12 accumulators, each widened weight used by every row and each x value
 * broadcast for both vectors: 24 FMAs a pair against 2 weight loads and 6 shifts, where tile_avx2_pairs (sums
 * along k) spends 8 widenings on 16 FMAs and ran at ~74 % of this CPU's FMA rate. */
AVX2 INLINE void row_block_avx2(const Problem *p, const float *x, const uint16_t *block, long r, long n0,
                                const char *next, long next_bytes) {
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 acc[8];
    for (int c = 0; c < 8; c++) acc[c] = _mm256_setzero_ps();
    const float *xr = x + r * p->K;
    const long K = p->K;
    for (long k = 0; k < K; k += 2, block += 2 * BLOCK_ROWS) {
        __m256 even = _mm256_broadcast_ss(xr + k), odd = _mm256_broadcast_ss(xr + k + 1);
        if (next_bytes > 0) { /* two lines an iteration: all of the next block over 2 rows' passes */
            _mm_prefetch(next, _MM_HINT_T1);
            _mm_prefetch(next + 64, _MM_HINT_T1);
            next += 128, next_bytes -= 128;
        }
        for (int c = 0; c < 8; c++) {
            __m256i w = _mm256_loadu_si256((const __m256i *)(block + c * 16));
            acc[c] = _mm256_fmadd_ps(even, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)), acc[c]);
            acc[c] = _mm256_fmadd_ps(odd, _mm256_castsi256_ps(_mm256_and_si256(w, high)), acc[c]);
        }
    }
    for (int c = 0; c < 8; c++) store8(p, r, n0 + c * 8, acc[c]);
}

/* A strip's k loop is written in assembly: from the same intrinsics GCC emitted ~62 instructions for a k pair's 24
 * FMAs (a pointer step per row, reloaded weights, register copies, the prefetch tests), past what the core issues
 * in the FMAs' 12 cycles, and ran 75 GFLOP/s hot on a Zen 3 EPYC core, whose FMAs peak at 102; the loop below
 * takes 45 (an index shared by the rows, the odd halves masked straight from L1) and runs 90, with the same
 * products summed in the same order. Registers: row i's accumulators ymm(2i) and ymm(2i+1), the pair's even and
 * odd weights ymm12-13, the broadcast ymm14, the high-halves mask ymm15. */
_Static_assert(BLOCK_ROWS == 64, "a strip's k pairs are 256 bytes apart");
/* x's value(s) at byte `column` past x[k] broadcast by `load` (vbroadcastss: one, vbroadcastsd: a pair) */
#define ASM_ROW_FMAS(load, i, a, b, column)                                                                         \
    #load " " #column "(%[x" #i "],%[k],4), %%ymm14\n\t"                                                            \
    "vfmadd231ps %%ymm12, %%ymm14, %%ymm" #a "\n\t"                                                                 \
    "vfmadd231ps %%ymm13, %%ymm14, %%ymm" #b "\n\t"
#define ASM_ROWS_3(load, column)                                                                                    \
    ASM_ROW_FMAS(load, 0, 0, 1, column) ASM_ROW_FMAS(load, 1, 2, 3, column) ASM_ROW_FMAS(load, 2, 4, 5, column)
#define ASM_ROWS_4(load, column) ASM_ROWS_3(load, column) ASM_ROW_FMAS(load, 3, 6, 7, column)
#define ASM_ROWS_5(load, column) ASM_ROWS_4(load, column) ASM_ROW_FMAS(load, 4, 8, 9, column)
#define ASM_ROWS_6(load, column) ASM_ROWS_5(load, column) ASM_ROW_FMAS(load, 5, 10, 11, column)
/* One k pair at byte `at` of the strip, x's columns k (byte `even` past x[k]) and k + 1 (`odd`). */
#define ASM_STRIP_PAIR(ROWS, at, even, odd)                                                                         \
    "vmovdqu " #at "(%[w]), %%ymm12\n\t"                                                                            \
    "vmovdqu " #at "+32(%[w]), %%ymm13\n\t"                                                                         \
    "vpslld $16, %%ymm12, %%ymm12\n\t"                                                                              \
    "vpslld $16, %%ymm13, %%ymm13\n\t" ASM_ROWS_##ROWS(vbroadcastss, even)                                             \
    "vandps " #at "(%[w]), %%ymm15, %%ymm12\n\t"                                                                    \
    "vandps " #at "+32(%[w]), %%ymm15, %%ymm13\n\t" ASM_ROWS_##ROWS(vbroadcastss, odd)
#define ASM_ZERO(i) "vxorps %%ymm" #i ", %%ymm" #i ", %%ymm" #i "\n\t"
#define ASM_SUMS(i) "vmovups %%ymm" #i ", " #i "*32(%[sums])\n\t"

/* A strip reads one cache line of every 256 bytes of its block: from memory, four strips' passes at that
 * stride streamed far slower than one pass front to back (4 rows against weights past the L3: 12.2 ms against
 * the tiles' 9.6). So the first block's first pass (`lead`, strip 0) also fetches the four lines of the pairs
 * LEAD_BYTES ahead, and reads the block from memory in order; the later passes find it in L2. Every pass also
 * fetches its share of the next block into L2 (`next`, one line a pair, T1: into L1 too cost a third of the gain;
 * the lead pass a line every pair), so no block after the first waits for memory in its first pass (16 rows
 * against weights past the L3: 67-70 -> 72-78 GFLOP/s with the C loop; 32 rows: 73-75 -> 75-80). Then two pairs
 * an iteration (K is a multiple of 32, the fetching pairs of 2). Each row count is its own function, whose
 * assembly names its rows' registers. */
#define LEAD_BYTES 4096
#define STRINGIFY(value) QUOTE(value) /* a macro's value, not its name */
#define QUOTE(text) #text
#define ASM_LEAD_FETCH(line) "prefetcht0 " STRINGIFY(LEAD_BYTES) "+" #line "*64(%[w])\n\t"

/* One pair (`pair`, `pair_bytes` long in the strip) that also fetches a line of the next block into L2 */
#define ASM_FETCHING_PAIR(pair, pair_bytes)                                                                         \
    "prefetcht1 (%[next])\n\t"                                                                                     \
    "add $64, %[next]\n\t" pair                                                                                     \
    "add $" #pair_bytes ", %[w]\n\t"                                                                               \
    "add $2, %[k]\n\t"

/* A strip's k loop as one assembly statement, for both weight formats: `ahead` first, then the pairs that each
 * fetch a line of the next block (`fetching` columns: whole lines of next_bytes, an even count of pairs), then
 * two pairs an iteration (`first`, then `second`, `pair_bytes` on in the strip; K is a multiple of 32), the
 * accumulators left in `sums`. The operands name x's rows x0 .. x5 (the rows past a strip's count unused). */
#define ASM_STRIP(ahead, first, second, pair_bytes)                                                                 \
    __asm__ volatile(ASM_ZERO(0) ASM_ZERO(1) ASM_ZERO(2) ASM_ZERO(3) ASM_ZERO(4) ASM_ZERO(5) ASM_ZERO(6)            \
                         ASM_ZERO(7) ASM_ZERO(8) ASM_ZERO(9) ASM_ZERO(10) ASM_ZERO(11) ahead                       \
                     "2:\n\t"                                                                                      \
                     "cmp %[fetching], %[k]\n\t"                                                                   \
                     "jge 4f\n\t" ASM_FETCHING_PAIR(first, pair_bytes)                                             \
                     "jmp 2b\n"                                                                                    \
                     "3:\n\t" first second                                                                         \
                     "add $2*" #pair_bytes ", %[w]\n\t"                                                            \
                     "add $4, %[k]\n"                                                                              \
                     "4:\n\t"                                                                                      \
                     "cmp %[K], %[k]\n\t"                                                                          \
                     "jl 3b\n"                                                                                     \
                     "5:\n\t" ASM_SUMS(0) ASM_SUMS(1) ASM_SUMS(2) ASM_SUMS(3) ASM_SUMS(4) ASM_SUMS(5) ASM_SUMS(6)  \
                         ASM_SUMS(7) ASM_SUMS(8) ASM_SUMS(9) ASM_SUMS(10) ASM_SUMS(11)                             \
                     : [k] "+r"(k), [w] "+r"(w), [next] "+r"(next)                                                 \
                     : [x0] "r"(x0), [x1] "r"(x1), [x2] "r"(x2), [x3] "r"(x3), [x4] "r"(x4), [x5] "r"(x5),         \
                       [K] "r"(K), [fetching] "r"(fetching), [sums] "r"(sums), [lead] "m"(lead)                    \
                     : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",     \
                       "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory")
#define ASM_STRIP_START(rows)                                                                                      \
    const long K = p->K, fetching = min_long(K, (next_bytes + 127) / 128 * 4);                                     \
    const float *x0 = x + r0 * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + (rows > 3) * K, *x4 = x3 + (rows > 4) * K, \
                *x5 = x4 + (rows > 5) * K;                                                                         \
    long k = 0;                                                                                                    \
    float sums[6][16];

/* bf16: the high-halves mask, then (the lead pass) every pair with the lines LEAD_BYTES ahead fetched, to 5 */
#define ASM_LEAD(ROWS)                                                                                              \
    "vpcmpeqd %%ymm15, %%ymm15, %%ymm15\n\t"                                                                       \
    "vpslld $16, %%ymm15, %%ymm15\n\t"                                                                             \
    "cmpl $0, %[lead]\n\t"                                                                                         \
    "je 2f\n"                                                                                                      \
    "1:\n\t" ASM_LEAD_FETCH(0) ASM_LEAD_FETCH(1) ASM_LEAD_FETCH(2) ASM_LEAD_FETCH(3)                               \
        ASM_FETCHING_PAIR(ASM_STRIP_PAIR(ROWS, 0, 0, 4), 256)                                                      \
    "cmp %[K], %[k]\n\t"                                                                                           \
    "jl 1b\n\t"                                                                                                    \
    "jmp 5f\n"
#define ROW_STRIP(ROWS)                                                                                             \
    AVX2 __attribute__((noinline)) static void row_strip_##ROWS(const Problem *p, const float *x,                   \
                                                                  const uint16_t *block, int s, long r0, long n0,   \
                                                                  int lead, const char *next, long next_bytes) {     \
        ASM_STRIP_START(ROWS)                                                                                      \
        const uint16_t *w = block + s * 32; /* line s of each pair's 4 */                                          \
        ASM_STRIP(ASM_LEAD(ROWS), ASM_STRIP_PAIR(ROWS, 0, 0, 4), ASM_STRIP_PAIR(ROWS, 256, 8, 12), 256);           \
        for (int i = 0; i < ROWS; i++) {                                                                           \
            store8(p, r0 + i, n0, _mm256_loadu_ps(sums[i]));                                                       \
            store8(p, r0 + i, n0 + 8, _mm256_loadu_ps(sums[i] + 8));                                               \
        }                                                                                                          \
    }
ROW_STRIP(3)
ROW_STRIP(4)
ROW_STRIP(5)
ROW_STRIP(6)

/* Block outermost, then strip: a strip (16 x K bf16, 32-128 KB at bloom-560m) stays in L1 or L2 for every group
 * of rows after the first. Rows go in groups of 4 to 6, as even as they divide (16 rows: 6, 5, 5; not 6, 6, 4:
 * fewer rows, fewer accumulators to hide the FMAs' latency behind). Up to 3 rows read whole blocks one row at a
 * time, the first from memory in order and the others from L2 (2 rows against weights past the L3: 5.1 ms, where
 * half blocks of 2 rows took 8.4 and the tiles 5.4), fetching the next block as they go (75 MB, same run: 2
 * rows 4.5 -> 3.9-4.1 ms, 3 rows 5.9 -> 4.6-4.8; all of it in the second row's pass alone was slower). */
AVX2 static void row_block_avx2_all_rows(const Problem *p, const float *x, const uint16_t *block, long n0,
                                          const char *next, long next_bytes) {
    const long groups = (p->R + 5) / 6;
    /* the passes over a block that fetch the next one, and each one's share of it (whole cache lines) */
    const long fetching = p->R <= 3 ? p->R - 1 : BLOCK_ROWS / 16 * groups;
    const long share = fetching ? (next_bytes / fetching + 63) / 64 * 64 : 0;
    if (p->R <= 3) {
        for (long r = 0; r < p->R; r++) { /* the first row's pass reads this block from memory */
            const long from = r ? min_long((r - 1) * share, next_bytes) : next_bytes;
            row_block_avx2(p, x, block, r, n0, next + from, min_long(share, next_bytes - from));
        }
        return;
    }
    for (int s = 0, pass = 0; s < BLOCK_ROWS / 16; s++)
        for (long g = 0, r0 = 0; g < groups; g++, pass++) {
            const long rows = p->R / groups + (g < p->R % groups);
            const int lead = n0 == 0 && s == 0 && g == 0;
            const long from = min_long(pass * share, next_bytes), bytes = min_long(share, next_bytes - from);
            switch (rows) {
            case 3: row_strip_3(p, x, block, s, r0, n0 + s * 16, lead, next + from, bytes); break; /* 7: 4, 3 */
            case 4: row_strip_4(p, x, block, s, r0, n0 + s * 16, lead, next + from, bytes); break;
            case 5: row_strip_5(p, x, block, s, r0, n0 + s * 16, lead, next + from, bytes); break;
            default: row_strip_6(p, x, block, s, r0, n0 + s * 16, lead, next + from, bytes); break;
            }
            r0 += rows;
        }
}

AVX2 static void linear_row_blocks_avx2(const Problem *p, const float *x) {
    const long block_bytes = BLOCK_ROWS * p->K * (long)sizeof(uint16_t);
    for (long n0 = 0; n0 < p->N; n0 += BLOCK_ROWS) {
        const uint16_t *block = (const uint16_t *)p->w + n0 * p->K;
        row_block_avx2_all_rows(p, x, block, n0, (const char *)(block + BLOCK_ROWS * p->K),
                                n0 + BLOCK_ROWS < p->N ? block_bytes : 0);
    }
}

/* Block b's table of top bytes in both 128-bit lanes, as VPSHUFB looks up in each lane. */
AVX2 INLINE __m256i compact_table_avx2(const Compact *c, long b) {
    return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(c->tables + b * COMPACT_CODES)));
}

/* compact64 in AVX2's two 128-bit lanes: 64 weights of a compact group as four registers of 16 bf16, in order
 * (the low bytes' first 32 slots unpack to weights 0-15 and 32-47, the next 32 to 16-31 and 48-63). */
AVX2 INLINE void compact64_avx2(const uint8_t *low, const uint8_t *codes, __m256i table, __m256i *weights) {
    const __m256i packed = _mm256_loadu_si256((const __m256i *)codes), nibble = _mm256_set1_epi8(15);
    const __m256i top0 = _mm256_shuffle_epi8(table, _mm256_and_si256(packed, nibble));
    const __m256i top1 = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble));
    const __m256i low0 = _mm256_loadu_si256((const __m256i *)low);
    const __m256i low1 = _mm256_loadu_si256((const __m256i *)(low + 32));
    weights[0] = _mm256_unpacklo_epi8(low0, top0);
    weights[1] = _mm256_unpacklo_epi8(low1, top1);
    weights[2] = _mm256_unpackhi_epi8(low0, top0);
    weights[3] = _mm256_unpackhi_epi8(low1, top1);
}

/* Half `half` of a compact group (its 64 weights from `place` in the block) into four registers, with its
 * patches set in their lanes by blends (AVX2 has no masked set: a compare a register; patches are rare). */
AVX2 INLINE void compact_half_avx2(const Compact *c, long b, const uint8_t *group, int half, long place,
                                   __m256i table, int32_t *next, long *patch_place, __m256i *weights) {
    compact64_avx2(group + 64 * half, group + 128 + 32 * half, table, weights);
    const int32_t stop = c->patch_start[b + 1];
    while (__builtin_expect(*patch_place < place + 64, 0)) {
        const __m256i lanes = _mm256_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m256i value = _mm256_set1_epi16((short)c->patch_value[*next]);
        const long lane = *patch_place - place;
        for (int v = 0; v < 4; v++) /* constant indices: weights[] stays in registers */
            weights[v] = _mm256_blendv_epi8(weights[v], value,
                                            _mm256_cmpeq_epi16(lanes, _mm256_set1_epi16((short)(lane - 16 * v))));
        *patch_place = ++*next < stop ? c->patch_place[*next] : LONG_MAX;
    }
}

/* row_block_avx2's products for one row of x on compact block n0 / BLOCK_ROWS, the block read once and decoded
 * into registers a half group (32 rows' k pair) at a time: the same products summed in the same order. */
AVX2 static void compact_row_avx2(const Problem *p, const Compact *c, const float *x, long r, long n0) {
    const long b = n0 / BLOCK_ROWS;
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    const __m256i table = compact_table_avx2(c, b);
    const uint8_t *group = compact_block(c, b, p->K, BLOCK_ROWS);
    int32_t next;
    long patch_place = first_patch(c, b, &next);
    __m256 acc[8];
    for (int v = 0; v < 8; v++) acc[v] = _mm256_setzero_ps();
    const float *xr = x + r * p->K;
    for (long k = 0, place = 0; k < p->K; k += 2, place += COMPACT_GROUP, group += COMPACT_GROUP_BYTES) {
        for (int line = 0; line < COMPACT_GROUP_BYTES; line += 64)
            _mm_prefetch((const char *)group + ROW_BLOCK_AHEAD + line, _MM_HINT_T1);
        const __m256 even = _mm256_broadcast_ss(xr + k), odd = _mm256_broadcast_ss(xr + k + 1);
        /* unrolled: acc[] indexed by constants stays in registers */
#pragma GCC unroll 2
        for (int half = 0; half < 2; half++) {
            __m256i w[4];
            compact_half_avx2(c, b, group, half, place + 64 * half, table, &next, &patch_place, w);
#pragma GCC unroll 4
            for (int v = 0; v < 4; v++) {
                acc[4 * half + v] =
                    _mm256_fmadd_ps(even, _mm256_castsi256_ps(_mm256_slli_epi32(w[v], 16)), acc[4 * half + v]);
                acc[4 * half + v] =
                    _mm256_fmadd_ps(odd, _mm256_castsi256_ps(_mm256_and_si256(w[v], high)), acc[4 * half + v]);
            }
        }
    }
    for (int v = 0; v < 8; v++) store8(p, r, n0 + v * 8, acc[v]);
}

/* Places [first, end) of compact block b decoded into `out` (in the ONEDNN order), its patches set. */
AVX2 static void decode_compact_avx2(const Compact *c, long b, long K, long first, long end, int32_t *next,
                                     long *patch_place, uint16_t *out) {
    const __m256i table = compact_table_avx2(c, b);
    const uint8_t *group = compact_block(c, b, K, BLOCK_ROWS) + first / COMPACT_GROUP * COMPACT_GROUP_BYTES;
    for (long place = first; place < end; place += COMPACT_GROUP, group += COMPACT_GROUP_BYTES) {
#pragma GCC unroll 2
        for (int half = 0; half < 2; half++) {
            __m256i w[4];
            compact_half_avx2(c, b, group, half, place + 64 * half, table, next, patch_place, w);
            for (int v = 0; v < 4; v++) _mm256_storeu_si256((__m256i *)(out + place - first + 64 * half + 16 * v), w[v]);
        }
    }
}

/* Compact blocks with AVX2 FMAs: one row decoded into registers; more, each block decoded whole into L2 once,
 * then read as a plain one, its passes fetching the next compact block. A bloom-560m rank's LM head slice, one
 * thread, AVX2-only EPYC (Zen 4 with AVX512 hidden), ms plain -> compact: 1 row 9.2 -> 8.0 alone, 12.8 -> 11.7
 * with the other core streaming too; 4 rows 13.7 -> 20.3, 16 rows 49 -> 57: decoding costs ~20 cycles a group
 * of 128 weights (shuffles and stores), which the plain passes' FMAs do not hide. Decoding a chunk of 128
 * columns into L1 at a time instead was no faster (4 rows 20.7, 16 rows 60), nor were strips decoded into
 * registers for 2-4 rows (their decode repeated by every strip: 4 rows 21.3). So where a core's bandwidth is
 * this high the chooser keeps the plain blocks; compact saves their 25 % of memory when asked for. */
AVX2 static const char *linear_compact_avx2(const Problem *p, const float *x) {
    const Compact c = compact_parts(p);
    if (p->R == 1) {
        for (long n0 = 0; n0 < p->N; n0 += BLOCK_ROWS) compact_row_avx2(p, &c, x, 0, n0);
        return NULL;
    }
    uint16_t *decoded = widening_scratch(BLOCK_ROWS * (size_t)p->K);
    if (!decoded) return "out of memory for a decoded row block";
    const long block_bytes = BLOCK_ROWS * p->K / COMPACT_GROUP * COMPACT_GROUP_BYTES;
    for (long n0 = 0; n0 < p->N; n0 += BLOCK_ROWS) {
        const long b = n0 / BLOCK_ROWS;
        int32_t next;
        long patch_place = first_patch(&c, b, &next);
        decode_compact_avx2(&c, b, p->K, 0, BLOCK_ROWS * p->K, &next, &patch_place, decoded);
        row_block_avx2_all_rows(p, x, decoded, n0, (const char *)compact_block(&c, b + 1, p->K, BLOCK_ROWS),
                                n0 + BLOCK_ROWS < p->N ? block_bytes : 0);
    }
    return NULL;
}

/* The row-block layout's int8 weights on AVX2 (weight-only int8 where bf16 is emulated), with integer products:
 * each row of x is rounded once to 16-bit integers (x ~= q * step, the step its largest |x| / 32767), and
 * VPMADDWD multiplies a block's (k, k+1) byte pairs, widened to words, by the row's (k, k+1) pair of words,
 * summing each pair into the int32 lane of its weight row: 16 products an instruction, twice an FMA's 8, and no
 * float widening of the weights. The int32 sums are exact; they are turned to float32 and added up every
 * WORD_RUN_PAIRS pairs (2 x 127 x 32767 a pair: 256 pairs stay below 2^31), in that order whatever the row
 * count, and scaled once (the row's step, then the weight row's scale), so a row's output has the same bits
 * alone or in any batch. The rounding of x adds at most step / 2 a value, 2^-16 of the row's largest: below a
 * bf16 rounding for every value within 2^-7 of it (bf16 keeps 8 bits), far below the int8 weights' own error.
 * One core (Zen 4, AVX2 only, a bloom-560m rank's 96 block Linears and its LM head slice, 125440 x 1024, ms
 * float FMAs -> words): 1 row 9.5 -> 8.0 and 6.7 -> 5.3 (the slice read at 24 GB/s), 2 rows 16.9 -> 9.3, 16
 * rows 62.6 -> 41.7 (77 -> 116 GOP/s), 64 rows 80 -> 123 GOP/s: VPMADDWD's one a cycle on that core. */
#define WORD_LEVELS 32767
#define WORD_RUN_PAIRS 256

/* Each row of x as words q and its step; a row holding a NaN or an infinity gets a NaN step, so its outputs are
 * NaN as a float sum's would be. */
AVX2 static void words_of_rows_avx2(const Problem *p, int16_t *q, float *steps) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (long r = 0; r < p->R; r++) {
        __m256 largest = _mm256_setzero_ps(), unordered = _mm256_setzero_ps();
        for (long k = 0; k < p->K; k += 8) {
            __m256 v = load8(p->x, r * p->K + k, p->x_dtype);
            largest = _mm256_max_ps(largest, _mm256_and_ps(v, magnitude));
            unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        const float top = fold8(largest, fmaxf);
        const int finite = !_mm256_movemask_ps(unordered) && isfinite(top);
        steps[r] = finite ? top / WORD_LEVELS : NAN;
        const __m256 inverse = _mm256_set1_ps(finite && top > 0.0f ? WORD_LEVELS / top : 0.0f);
        for (long k = 0; k < p->K; k += 16) { /* rounded half to even, packed with saturation */
            __m256i low = _mm256_cvtps_epi32(_mm256_mul_ps(load8(p->x, r * p->K + k, p->x_dtype), inverse));
            __m256i high = _mm256_cvtps_epi32(_mm256_mul_ps(load8(p->x, r * p->K + k + 8, p->x_dtype), inverse));
            __m256i words = _mm256_permute4x64_epi64(_mm256_packs_epi32(low, high), 0xD8);
            _mm256_storeu_si256((__m256i *)(q + r * p->K + k), words);
        }
    }
}

/* x's words k and k + 1 of a row, in every lane */
AVX2 INLINE __m256i word_pair(const int16_t *row, long k) {
    int32_t pair;
    memcpy(&pair, row + k, 4);
    return _mm256_set1_epi32(pair);
}

/* Outputs n .. n+7 of row r from their float32 sum. */
AVX2 INLINE void words_store8(const Problem *p, long r, long n, __m256 sum, float step) {
    store8(p, r, n, _mm256_mul_ps(_mm256_mul_ps(sum, _mm256_set1_ps(step)), _mm256_loadu_ps(p->scale + n)));
}

/* ROWS rows of x from r0 against strip s of a block (its weight rows 16 s .. 16 s + 15: 32 bytes of each k pair's
 * 128), 12 accumulators. GCC's loop from these intrinsics is 2 widening loads, 6 broadcasts, 12 VPMADDWD and 12
 * VPADDD a pair with nothing spilled: it runs at the multiplies' rate, so no assembly here. Like the bf16 strips,
 * each pass fetches its share of the next block into L2. */
AVX2 INLINE void word_strip(const Problem *p, const int16_t *q, const float *steps, const int8_t *block, int s, long r0,
                            const int ROWS, long n0, const char *next, long next_bytes) {
    const long K = p->K;
    __m256 sums[6][2];
    for (int i = 0; i < ROWS; i++) sums[i][0] = sums[i][1] = _mm256_setzero_ps();
    const int8_t *w = block + s * 32;
    for (long k0 = 0; k0 < K; k0 += 2 * WORD_RUN_PAIRS) {
        const long k1 = min_long(K, k0 + 2 * WORD_RUN_PAIRS);
        __m256i acc[6][2];
        for (int i = 0; i < ROWS; i++) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
        for (long k = k0; k < k1; k += 2, w += 2 * BLOCK_ROWS) {
            if (next_bytes > 0) {
                _mm_prefetch(next, _MM_HINT_T1);
                next += 64, next_bytes -= 64;
            }
            __m256i low = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w));
            __m256i high = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 16)));
            for (int i = 0; i < ROWS; i++) {
                __m256i pair = word_pair(q + (r0 + i) * K, k);
                acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(low, pair));
                acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(high, pair));
            }
        }
        for (int i = 0; i < ROWS; i++)
            for (int c = 0; c < 2; c++) sums[i][c] = _mm256_add_ps(sums[i][c], _mm256_cvtepi32_ps(acc[i][c]));
    }
    for (int i = 0; i < ROWS; i++)
        for (int c = 0; c < 2; c++) words_store8(p, r0 + i, n0 + s * 16 + c * 8, sums[i][c], steps[r0 + i]);
}
#define WORD_STRIP(ROWS)                                                                                           \
    AVX2 __attribute__((noinline)) static void word_strip_##ROWS(const Problem *p, const int16_t *q,                \
                                                                  const float *steps, const int8_t *block, int s,   \
                                                                  long r0, long n0, const char *next,               \
                                                                  long next_bytes) {                                \
        word_strip(p, q, steps, block, s, r0, ROWS, n0, next, next_bytes);                                         \
    }
WORD_STRIP(3)
WORD_STRIP(4)
WORD_STRIP(5)
WORD_STRIP(6)

/* One row of x against a whole block, read front to back (each k pair's 128 bytes in order), 8 accumulators. */
AVX2 static void word_row_block_avx2(const Problem *p, const int16_t *q, const float *steps, const int8_t *block,
                                     long r, long n0, const char *next, long next_bytes) {
    __m256 sums[8];
    for (int c = 0; c < 8; c++) sums[c] = _mm256_setzero_ps();
    const int16_t *row = q + r * p->K;
    const int8_t *w = block;
    for (long k0 = 0; k0 < p->K; k0 += 2 * WORD_RUN_PAIRS) {
        const long k1 = min_long(p->K, k0 + 2 * WORD_RUN_PAIRS);
        __m256i acc[8];
        for (int c = 0; c < 8; c++) acc[c] = _mm256_setzero_si256();
        for (long k = k0; k < k1; k += 2, w += 2 * BLOCK_ROWS) {
            if (next_bytes > 0) {
                _mm_prefetch(next, _MM_HINT_T1);
                next += 64, next_bytes -= 64;
            }
            __m256i pair = word_pair(row, k);
            for (int c = 0; c < 8; c++) {
                __m256i weights = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + c * 16)));
                acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(weights, pair));
            }
        }
        for (int c = 0; c < 8; c++) sums[c] = _mm256_add_ps(sums[c], _mm256_cvtepi32_ps(acc[c]));
    }
    for (int c = 0; c < 8; c++) words_store8(p, r, n0 + c * 8, sums[c], steps[r]);
}

/* Block outermost; up to two rows a row at a time against the whole block (the first from memory, fetching the
 * next block as the later passes do), more by strips in groups of 3 to 6 rows, as the bf16 row blocks go. */
AVX2 static const char *linear_row_blocks_int8_avx2(const Problem *p) {
    const size_t step_bytes = ((size_t)p->R * sizeof(float) + 63) / 64 * 64;
    uint8_t *scratch = quantized_scratch(step_bytes + (size_t)p->R * (size_t)p->K * sizeof(int16_t));
    if (!scratch) return "out of memory rounding x to words";
    float *steps = (float *)scratch;
    int16_t *q = (int16_t *)(scratch + step_bytes);
    words_of_rows_avx2(p, q, steps);
    const long groups = (p->R + 5) / 6;
    const long block_bytes = BLOCK_ROWS * p->K;
    const long passes = p->R <= 2 ? p->R : BLOCK_ROWS / 16 * groups;
    const long share = (block_bytes / passes + 63) / 64 * 64;
    for (long n0 = 0; n0 < p->N; n0 += BLOCK_ROWS) {
        const int8_t *block = (const int8_t *)p->w + n0 * p->K;
        const char *next = (const char *)(block + block_bytes);
        const long next_bytes = n0 + BLOCK_ROWS < p->N ? block_bytes : 0;
        long pass = 0;
        if (p->R <= 2) {
            for (long r = 0; r < p->R; r++, pass++) {
                const long from = min_long(pass * share, next_bytes);
                word_row_block_avx2(p, q, steps, block, r, n0, next + from, min_long(share, next_bytes - from));
            }
            continue;
        }
        for (int s = 0; s < BLOCK_ROWS / 16; s++)
            for (long g = 0, r0 = 0; g < groups; g++, pass++) {
                const long rows = p->R / groups + (g < p->R % groups);
                const long from = min_long(pass * share, next_bytes), bytes = min_long(share, next_bytes - from);
                switch (rows) { /* 7 rows go as 4 + 3 */
                case 3: word_strip_3(p, q, steps, block, s, r0, n0, next + from, bytes); break;
                case 4: word_strip_4(p, q, steps, block, s, r0, n0, next + from, bytes); break;
                case 5: word_strip_5(p, q, steps, block, s, r0, n0, next + from, bytes); break;
                default: word_strip_6(p, q, steps, block, s, r0, n0, next + from, bytes); break;
                }
                r0 += rows;
            }
    }
    return NULL;
}
#endif

/* ------------------------------------------------------------------ one-query attention (decode)
 * softmax(q.k / sqrt(d) + bias) . v for one new token per sequence against its cached keys and values, in
 * bfloat16 with the roundings BLOOM's bfloat16 reference makes (what model.py's torch version computes):
 * each score rounded to bf16, scaled and biased in float32, a float32 softmax, the probabilities rounded to
 * bf16, the weighted values summed in float32 and rounded once; or all in float32 (no roundings) for a
 * float32 cache. torch's batched matmul copies the strided cache views whole on every call (a fifth of a
 * 16-sequence decode step); this reads them in place. */
typedef struct {
    const void *q;                  /* [S, H, D] at strides (q_row, q_head, 1) */
    void *keys, *values;            /* the layer's cache, [slots, H, capacity, D] at strides (slot, head, D, 1) */
    const void *bias;               /* [bias_slots, H, 1, L], contiguous */
    const int64_t *slots;           /* [S] cache slot of each query, or NULL: query i in slot i */
    void *out;                      /* [S, H, D], contiguous */
    long S, H, L, D, q_row, q_head, kv_slot, kv_head;
    float scale;
    /* Each query's own key and value, [S, H, D] at q's strides, stored into the cache at position
     * positions[i] of its slot before it attends; or NULL (the cache holds them already). */
    const void *new_keys, *new_values;
    const int64_t *positions;
    /* 0: one query per sequence, as above. n: whole prompts of n tokens, query i row i % n of prompt i / n
     * (slots[i / n], or slot i / n), attending to its keys 0 .. i % n with bias [H, n, n] (causal ALiBi) row
     * i % n; new keys and values (if given) go to position i % n, positions unused. */
    long prompt_length;
    int dtype; /* of every tensor above but slots and positions: DT_BF16 or DT_F32 */
} Attention;

#ifdef X86
AVX512 static float dot_avx512(const float *q, const uint16_t *k, long D) {
    __m512 sum = _mm512_setzero_ps();
    for (long d = 0; d < D; d += 16) sum = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), widen16(k, d, DT_BF16), sum);
    return _mm512_reduce_add_ps(sum);
}

/* NEXT_HEAD_AHEAD: with one query per sequence, each head's keys and values are a few KiB of their own (48
 * positions: 6 KiB each), too short a run for the cores' prefetchers to catch before it ends, so every head
 * began by waiting on memory. The kernels below ask L1 for the next head's rows as they read their own, a
 * key row for a key row and a value row for a value row (all at once before each head stalled the core as
 * long as the fetch took: no faster). A bloom-560m rank's 16-row decode step, two ranks in-process, Xeon with
 * AMX, three alternations: attention 5.98-6.40 -> 4.42-4.82 ms a step, the step 59.1-62.2 -> 54.3-56.0 ms. */

/* A head's query widened into q, then its scores q.k for L bf16 keys: four keys at a time with one shuffle tree
 * for their sums (SUM4), the rest one by one (DOT, of j): written once for both vector widths (VEC, LANES). */
#define SCORE_KEYS(VEC, LANES, SETZERO, LOADU, STOREU, FMADD, WIDEN, SUM4, DOT)                                     \
    do {                                                                                                              \
        for (long d = 0; d < D; d += LANES) STOREU(q + d, WIDEN(qh, d, DT_BF16));                                   \
        for (j = 0; j + TILE_ROWS <= L; j += TILE_ROWS) {                                                             \
            if (next_keys) /* the next head's keys of these rows: see NEXT_HEAD_AHEAD */                             \
                for (long at = j * D * 2; at < (j + TILE_ROWS) * D * 2; at += 64) _mm_prefetch(next_keys + at, _MM_HINT_T0); \
            VEC acc[TILE_ROWS];                                                                                       \
            for (int t = 0; t < TILE_ROWS; t++) acc[t] = SETZERO();                                                  \
            for (long d = 0; d < D; d += LANES) {                                                                     \
                VEC qv = LOADU(q + d);                                                                                \
                for (int t = 0; t < TILE_ROWS; t++) acc[t] = FMADD(qv, WIDEN(keys + (j + t) * D, d, DT_BF16), acc[t]); \
            }                                                                                                         \
            _mm_storeu_ps(scores + j, SUM4(acc).v);                                                                   \
        }                                                                                                             \
        for (; j < L; j++) scores[j] = DOT;                                                                           \
    } while (0)

/* The probabilities in scores times the head's L value rows, summed in registers 64 columns at a time, each
 * sum stored (STORE, of acc[c] at column d0 + c * LANES) rounded once. */
#define WEIGHTED_VALUES(VEC, LANES, SETZERO, SET1, FMADD, WIDEN, STORE)                                               \
    for (long d0 = 0; d0 < D; d0 += 64) {                                                                             \
        const int vectors = D - d0 >= 64 ? 64 / LANES : (int)((D - d0) / LANES);                                      \
        VEC acc[64 / LANES];                                                                                          \
        for (int c = 0; c < 64 / LANES; c++) acc[c] = SETZERO();                                                      \
        for (j = 0; j < L; j++) {                                                                                     \
            if (next_values && d0 == 0) /* the next head's value row j: see NEXT_HEAD_AHEAD */                      \
                for (long at = j * D * 2; at < (j + 1) * D * 2; at += 64) _mm_prefetch(next_values + at, _MM_HINT_T0); \
            if (scores[j] == 0.0f) continue; /* a masked position: its row may hold anything */                       \
            VEC weight = SET1(scores[j]);                                                                             \
            for (int c = 0; c < vectors; c++) acc[c] = FMADD(weight, WIDEN(values + j * D, d0 + c * LANES, DT_BF16), acc[c]); \
        }                                                                                                             \
        for (int c = 0; c < vectors; c++) STORE;                                                                      \
    }

/* One query head against its L keys, AVX512 throughout: four keys' dot products at a time with one shuffle
 * tree for their sums, the roundings, scale, bias, exp and division 16 scores at a time, and the weighted
 * values summed in registers 64 columns at a time (the generic path below calls out per key and per
 * column vector: 2 us per head at 40 keys, a fifth of a 16-sequence decode step). The same roundings. */
AVX512 static void attend_head_avx512(const Attention *a, long L, const uint16_t *qh, const uint16_t *keys,
                                      const uint16_t *values, const uint16_t *bias, float *scores, uint16_t *out,
                                      const char *next_keys, const char *next_values) {
    const long D = a->D;
    float q[512];
    long j;
    SCORE_KEYS(__m512, 16, _mm512_setzero_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_fmadd_ps, widen16, sum4x16,
               dot_avx512(q, keys + j * D, D));
    __m512 top = _mm512_set1_ps(-INFINITY), scale = _mm512_set1_ps(a->scale);
    for (j = 0; j < L; j += 16) {
        __mmask16 m = L - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (L - j)) - 1);
        __m512 score = _mm512_maskz_loadu_ps(m, scores + j);
        score = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16x16(score)), 16));
        __m512 b = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, bias + j)), 16));
        score = _mm512_add_ps(_mm512_mul_ps(score, scale), b);
        _mm512_mask_storeu_ps(scores + j, m, score);
        top = _mm512_mask_max_ps(top, m, top, score);
    }
    __m512 best = _mm512_set1_ps(_mm512_reduce_max_ps(top)), total = _mm512_setzero_ps();
    for (j = 0; j < L; j += 16) {
        __mmask16 m = L - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (L - j)) - 1);
        __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + j), best);
        /* below -87 exp16 clamps: those weights are 0 (or float32 denormals) in the reference too */
        __m512 e = _mm512_maskz_mov_ps(m & _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ), exp16(x));
        _mm512_mask_storeu_ps(scores + j, m, e);
        total = _mm512_add_ps(total, e);
    }
    __m512 sum = _mm512_set1_ps(_mm512_reduce_add_ps(total));
    for (j = 0; j < L; j += 16) {
        __mmask16 m = L - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (L - j)) - 1);
        __m512 p = _mm512_div_ps(_mm512_maskz_loadu_ps(m, scores + j), sum);
        p = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16x16(p)), 16));
        _mm512_mask_storeu_ps(scores + j, m, p);
    }
    WEIGHTED_VALUES(__m512, 16, _mm512_setzero_ps, _mm512_set1_ps, _mm512_fmadd_ps, widen16,
                    _mm256_storeu_si256((__m256i *)(out + d0 + c * 16), bf16x16(acc[c])));
}

AVX2 INLINE float dot_avx2(const float *q, const void *k, long D, int dtype) {
    __m256 sum = _mm256_setzero_ps();
    for (long d = 0; d < D; d += 8) sum = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k, d, dtype), sum);
    return sum8(sum);
}

AVX2 INLINE void weighted_sum_avx2(float *acc, float p, const void *v, long D, int dtype) {
    __m256 weight = _mm256_set1_ps(p);
    for (long d = 0; d < D; d += 8)
        _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(weight, load8(v, d, dtype), _mm256_loadu_ps(acc + d)));
}

/* L raw scores q.k in place into the probabilities softmax(bf16(score) * scale + bias), each rounded to bf16,
 * padded with zeros to a multiple of 8 (the padding's -inf scores give weight 0). */
AVX2 static void probabilities_avx2(float scale_factor, long L, const uint16_t *bias, float *scores) {
    const long padded = (L + 7) / 8 * 8;
    long j;
    for (j = L; j < padded; j++) scores[j] = -INFINITY;
    __m256 top = _mm256_set1_ps(-INFINITY), scale = _mm256_set1_ps(scale_factor);
    for (j = 0; j < padded; j += 8) {
        uint16_t tail[8] = {0};
        const uint16_t *b = bias + j;
        if (j + 8 > L) {
            memcpy(tail, b, (size_t)(L - j) * sizeof(uint16_t));
            b = tail;
        }
        __m256 score = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bf16x8(_mm256_loadu_ps(scores + j))), 16));
        score = _mm256_add_ps(_mm256_mul_ps(score, scale), widen8(b, 0, DT_BF16));
        _mm256_storeu_ps(scores + j, score);
        top = _mm256_max_ps(top, score);
    }
    __m256 best = _mm256_set1_ps(fold8(top, fmaxf)), total = _mm256_setzero_ps();
    for (j = 0; j < padded; j += 8) {
        __m256 x = _mm256_sub_ps(_mm256_loadu_ps(scores + j), best);
        /* below -87 exp8 clamps: those weights are 0 (or float32 denormals) in the reference too */
        __m256 e = _mm256_and_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ), exp8(x));
        _mm256_storeu_ps(scores + j, e);
        total = _mm256_add_ps(total, e);
    }
    __m256 sum = _mm256_set1_ps(sum8(total));
    for (j = 0; j < padded; j += 8) {
        __m256 p = _mm256_div_ps(_mm256_loadu_ps(scores + j), sum);
        _mm256_storeu_ps(scores + j, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bf16x8(p)), 16)));
    }
}

/* One query head against its L bfloat16 keys, attend_head_avx512's body in 8 lanes: four keys' dot products
 * with one shuffle tree for their sums, the roundings, scale, bias and exp 8 scores at a time (the scores
 * padded to a multiple of 8 with -inf, whose weights come out 0), the weighted values summed in registers 64
 * columns at a time. The same roundings. 16 sequences x 8 heads x 48 keys, AVX2: 903 -> 502 ns a head with
 * the caches in L2, 1905-2062 -> 1699-1711 from DRAM; a one-rank 16-row step's attention 6.3-7.8 -> 5.6-6.2
 * ms (the per-key calls kept the value sums in memory). */
AVX2 static void attend_head_avx2(const Attention *a, long L, const uint16_t *qh, const uint16_t *keys,
                                  const uint16_t *values, const uint16_t *bias, float *scores, uint16_t *out,
                                  const char *next_keys, const char *next_values) {
    const long D = a->D;
    float q[512];
    long j;
    SCORE_KEYS(__m256, 8, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_fmadd_ps, widen8, sum4x8,
               dot_avx2(q, keys + j * D, D, DT_BF16));
    probabilities_avx2(a->scale, L, bias, scores);
    WEIGHTED_VALUES(__m256, 8, _mm256_setzero_ps, _mm256_set1_ps, _mm256_fmadd_ps, widen8,
                    _mm_storeu_si128((__m128i *)(out + d0 + c * 8), bf16x8(acc[c])));
}

/* PROMPT_ROWS consecutive rows of one prompt (rows - 1 .. first ones at a prompt's end), one head: what
 * attend_head_avx2 computes for each row, bit for bit, with every key and value row widened once for all of them
 * rather than once a row. Row r attends to its first L[r] = L[0] + r keys. A score is the same FMA chain over
 * head_dim as there, reduced by the same tree (sum4x8 for a whole tile of four keys inside the row's L, sum8 for
 * the keys past its last whole tile, as dot_avx2), and each output column sums the same nonzero weights in the
 * same order. Row by row, every query re-widened the L keys and values from L2 (3 instructions for each FMA): a
 * bloom-560m rank's 512-token prompt spent 9.0 ms a layer in attention on a Zen 3 EPYC core. */
#define PROMPT_ROWS 4

AVX2 INLINE void attend_rows_avx2(const Attention *a, const int rows, const long *L, const uint16_t *const *qh,
                                  const uint16_t *keys, const uint16_t *values, const uint16_t *const *bias,
                                  float *const *scores, uint16_t *const *out) {
    const long D = a->D, last = L[rows - 1];
    float q[PROMPT_ROWS][512];
    for (int r = 0; r < rows; r++)
        for (long d = 0; d < D; d += 8) _mm256_storeu_ps(q[r] + d, widen8(qh[r], d, DT_BF16));
    for (long j = 0; j < last; j += TILE_ROWS) {
        /* every row's four accumulators, two keys at a time: 8 accumulators, 2 keys and a query in registers */
        __m256 acc[PROMPT_ROWS][TILE_ROWS];
        for (int t = 0; t < TILE_ROWS; t += 2) {
            __m256 sums[PROMPT_ROWS][2];
            for (int r = 0; r < rows; r++) sums[r][0] = sums[r][1] = _mm256_setzero_ps();
            const int pair = j + t + 1 < last ? 2 : j + t < last ? 1 : 0;
            for (long d = 0; d < D && pair; d += 8) {
                __m256 k0 = widen8(keys + (j + t) * D, d, DT_BF16);
                __m256 k1 = pair == 2 ? widen8(keys + (j + t + 1) * D, d, DT_BF16) : _mm256_setzero_ps();
                for (int r = 0; r < rows; r++) {
                    __m256 qv = _mm256_loadu_ps(q[r] + d);
                    sums[r][0] = _mm256_fmadd_ps(qv, k0, sums[r][0]);
                    sums[r][1] = _mm256_fmadd_ps(qv, k1, sums[r][1]);
                }
            }
            for (int r = 0; r < rows; r++) acc[r][t] = sums[r][0], acc[r][t + 1] = sums[r][1];
        }
        for (int r = 0; r < rows; r++) {
            if (j + TILE_ROWS <= L[r]) {
                _mm_storeu_ps(scores[r] + j, sum4x8(acc[r]).v);
            } else {
                for (long t = 0; j + t < L[r]; t++) scores[r][j + t] = sum8(acc[r][t]);
            }
        }
    }
    for (int r = 0; r < rows; r++) probabilities_avx2(a->scale, L[r], bias[r], scores[r]);
    /* 16 columns at a time: every row's 2 accumulators, 2 widened value vectors */
    for (long d0 = 0; d0 < D; d0 += 16) {
        __m256 acc[PROMPT_ROWS][2];
        for (int r = 0; r < rows; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        for (long j = 0; j < last; j++) {
            __m256 v0 = widen8(values + j * D, d0, DT_BF16), v1 = widen8(values + j * D, d0 + 8, DT_BF16);
            for (int r = 0; r < rows; r++) {
                if (j >= L[r] || scores[r][j] == 0.0f) continue; /* as attend_head_avx2: zero weights add nothing */
                __m256 weight = _mm256_set1_ps(scores[r][j]);
                acc[r][0] = _mm256_fmadd_ps(weight, v0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(weight, v1, acc[r][1]);
            }
        }
        for (int r = 0; r < rows; r++) {
            _mm_storeu_si128((__m128i *)(out[r] + d0), bf16x8(acc[r][0]));
            _mm_storeu_si128((__m128i *)(out[r] + d0 + 8), bf16x8(acc[r][1]));
        }
    }
}

/* One function per cache dtype, so the per-key calls below branch on nothing. */
AVX2 static float dot_bf16_avx2(const float *q, const void *k, long D) { return dot_avx2(q, k, D, DT_BF16); }
AVX2 static float dot_f32_avx2(const float *q, const void *k, long D) { return dot_avx2(q, k, D, DT_F32); }
AVX2 static void weighted_sum_bf16_avx2(float *acc, float p, const void *v, long D) {
    weighted_sum_avx2(acc, p, v, D, DT_BF16);
}
AVX2 static void weighted_sum_f32_avx2(float *acc, float p, const void *v, long D) {
    weighted_sum_avx2(acc, p, v, D, DT_F32);
}
#endif

static float dot_bf16_scalar(const float *q, const void *k, long D) {
    float sum = 0.0f;
    for (long d = 0; d < D; d++) sum += q[d] * bf16_to_f32(((const uint16_t *)k)[d]);
    return sum;
}

static float dot_f32_scalar(const float *q, const void *k, long D) {
    float sum = 0.0f;
    for (long d = 0; d < D; d++) sum += q[d] * ((const float *)k)[d];
    return sum;
}

static void weighted_sum_bf16_scalar(float *acc, float p, const void *v, long D) {
    for (long d = 0; d < D; d++) acc[d] += p * bf16_to_f32(((const uint16_t *)v)[d]);
}

static void weighted_sum_f32_scalar(float *acc, float p, const void *v, long D) {
    for (long d = 0; d < D; d++) acc[d] += p * ((const float *)v)[d];
}

/* bfloat16 attention rounds scores and probabilities to bf16 as the reference does; float32 keeps them. */
static inline float attention_rounding(float x, int dtype) {
    return dtype == DT_BF16 ? bf16_to_f32(f32_to_bf16(x)) : x;
}

#ifdef X86
/* Where the head after (i, h) of one-query rows keeps its keys and values (the next sequence's first head after
 * a last one; left NULL after the last of all), for the per-head kernels to fetch while they work on this one. */
static void next_head(const Attention *a, long i, long h, size_t element, const char **keys, const char **values) {
    if (++h == a->H) {
        h = 0;
        if (++i == a->S) return;
    }
    long slot = a->slots ? (long)a->slots[i] : i, at = slot * a->kv_slot + h * a->kv_head;
    *keys = (const char *)a->keys + at * element;
    *values = (const char *)a->values + at * element;
}
#endif

#ifdef X86
/* attend() for whole bfloat16 prompts on AVX2: PROMPT_ROWS rows of a prompt at a time, per head. */
AVX2 static const char *attend_prompts_avx2(const Attention *a) {
    const long n = a->prompt_length, row = (long)sizeof(uint16_t) * a->D;
    float *scratch = malloc(sizeof(float) * (size_t)(PROMPT_ROWS * (n + 8))); /* probabilities_avx2 pads to 8 */
    if (!scratch) return "out of memory for the attention scores";
    float *scores[PROMPT_ROWS];
    for (int r = 0; r < PROMPT_ROWS; r++) scores[r] = scratch + r * (n + 8);
    for (long i0 = 0; i0 < a->S;) {
        const long sequence = i0 / n, slot = a->slots ? (long)a->slots[sequence] : sequence;
        const int rows = (int)(PROMPT_ROWS < (sequence + 1) * n - i0 ? PROMPT_ROWS : (sequence + 1) * n - i0);
        for (long h = 0; h < a->H; h++) {
            const long kv_at = slot * a->kv_slot + h * a->kv_head;
            char *keys = (char *)a->keys + kv_at * (long)sizeof(uint16_t);
            char *values = (char *)a->values + kv_at * (long)sizeof(uint16_t);
            long L[PROMPT_ROWS];
            const uint16_t *qh[PROMPT_ROWS], *bias[PROMPT_ROWS];
            uint16_t *out[PROMPT_ROWS];
            for (int r = 0; r < rows; r++) {
                const long i = i0 + r, q_at = i * a->q_row + h * a->q_head, position = i % n;
                if (a->new_keys) {
                    memcpy(keys + position * row, (const uint16_t *)a->new_keys + q_at, (size_t)row);
                    memcpy(values + position * row, (const uint16_t *)a->new_values + q_at, (size_t)row);
                }
                L[r] = position + 1;
                qh[r] = (const uint16_t *)a->q + q_at;
                bias[r] = (const uint16_t *)a->bias + (h * n + position) * n;
                out[r] = (uint16_t *)a->out + (i * a->H + h) * a->D;
            }
            /* a constant row count lets the compiler keep every row's accumulators in registers */
            if (rows == PROMPT_ROWS)
                attend_rows_avx2(a, PROMPT_ROWS, L, qh, (const uint16_t *)keys, (const uint16_t *)values, bias, scores,
                                 out);
            else
                attend_rows_avx2(a, rows, L, qh, (const uint16_t *)keys, (const uint16_t *)values, bias, scores, out);
        }
        i0 += rows;
    }
    free(scratch);
    return NULL;
}
#endif

static const char *attend(const Attention *a, int isa) {
    if (!isa_supported(isa)) return "this CPU lacks the instructions of the requested ISA";
    if (a->D % 16 || a->D > 512) return "head_dim must be a multiple of 16, at most 512";
    if (a->dtype != DT_BF16 && a->dtype != DT_F32) return "attention takes bfloat16 or float32 tensors";
    const int f32 = a->dtype == DT_F32;
#ifdef X86
    if (a->prompt_length && isa == ISA_AVX2 && !f32) return attend_prompts_avx2(a);
#endif
    const size_t element = f32 ? sizeof(float) : sizeof(uint16_t);
    float (*dot)(const float *, const void *, long) = f32 ? dot_f32_scalar : dot_bf16_scalar;
    void (*weighted_sum)(float *, float, const void *, long) = f32 ? weighted_sum_f32_scalar : weighted_sum_bf16_scalar;
#ifdef X86
    /* float32 has no AVX512 body below: its AVX2 functions run on AVX512 CPUs too */
    if (isa == ISA_AVX2 || (isa > ISA_AVX2 && f32)) {
        dot = f32 ? dot_f32_avx2 : dot_bf16_avx2;
        weighted_sum = f32 ? weighted_sum_f32_avx2 : weighted_sum_bf16_avx2;
    }
#endif
    float *scores = malloc(sizeof(float) * (size_t)(a->L + 8)); /* attend_head_avx2 pads to 8 */
    if (!scores) return "out of memory for the attention scores";
    float q[512], acc[512];
    for (long i = 0; i < a->S; i++)
        if (a->new_keys && !a->prompt_length && (a->positions[i] < 0 || a->positions[i] >= a->L)) {
            free(scores);
            return "a new key's position is outside the keys the queries read";
        }
    const long n = a->prompt_length;
    for (long i = 0; i < a->S; i++) {
        long sequence = n ? i / n : i;
        long slot = a->slots ? (long)a->slots[sequence] : sequence;
        long L = n ? i % n + 1 : a->L;
        for (long h = 0; h < a->H; h++) {
            long q_at = i * a->q_row + h * a->q_head, kv_at = slot * a->kv_slot + h * a->kv_head;
            const char *qh = (const char *)a->q + q_at * element;
            char *keys = (char *)a->keys + kv_at * element, *values = (char *)a->values + kv_at * element;
            const size_t row = element * (size_t)a->D; /* one key's bytes */
            if (a->new_keys) {
                long at = n ? i % n : a->positions[i];
                memcpy(keys + at * row, (const char *)a->new_keys + q_at * element, row);
                memcpy(values + at * row, (const char *)a->new_values + q_at * element, row);
            }
            long bias_at = n ? (h * n + i % n) * n : (slot * a->H + h) * a->L;
            const char *bias = (const char *)a->bias + bias_at * element;
            char *out = (char *)a->out + (i * a->H + h) * row;
#ifdef X86
            const char *next_keys = NULL, *next_values = NULL;
            if (!n) next_head(a, i, h, element, &next_keys, &next_values);
            if (isa >= ISA_AVX512 && !f32) {
                attend_head_avx512(a, L, (const uint16_t *)qh, (const uint16_t *)keys, (const uint16_t *)values,
                                   (const uint16_t *)bias, scores, (uint16_t *)out, next_keys, next_values);
                continue;
            }
            if (isa == ISA_AVX2 && !f32) {
                attend_head_avx2(a, L, (const uint16_t *)qh, (const uint16_t *)keys, (const uint16_t *)values,
                                 (const uint16_t *)bias, scores, (uint16_t *)out, next_keys, next_values);
                continue;
            }
#endif
            for (long d = 0; d < a->D; d++) q[d] = load_as_f32(qh, d, a->dtype);
            float top = -INFINITY;
            for (long j = 0; j < L; j++) {
                float score = attention_rounding(dot(q, keys + j * row, a->D), a->dtype);
                float scaled = score * a->scale;
                scores[j] = scaled + load_as_f32(bias, j, a->dtype);
                if (scores[j] > top) top = scores[j];
            }
            float total = 0.0f;
            for (long j = 0; j < L; j++) total += scores[j] = expf(scores[j] - top);
            for (long d = 0; d < a->D; d++) acc[d] = 0.0f;
            for (long j = 0; j < L; j++) {
                float p = attention_rounding(scores[j] / total, a->dtype);
                if (p != 0.0f) weighted_sum(acc, p, values + j * row, a->D);
            }
            for (long d = 0; d < a->D; d++) {
                if (f32)
                    ((float *)out)[d] = acc[d];
                else
                    ((uint16_t *)out)[d] = f32_to_bf16(acc[d]);
            }
        }
    }
    free(scores);
    return NULL;
}

/* Row summaries: the best logit of each row, its column (the lowest on ties, as argmax) and the row's
 * log-sum-exp, from bf16 or float32 logits (rows `stride` elements apart), as bloomduo.core.logprobs'
 * summarize computes them, without its float32 copy of the rows: one pass for the max, one for the sum of
 * exp(x - max), in float32 over blocks of SUM_BLOCK columns that are added up in double. A row holding a
 * NaN gives that NaN and its first column, and a row without a finite best a NaN log-sum-exp, as torch's. */
typedef struct {
    const void *x;
    long R, C, stride;
    int dtype;
    float *best, *lse;
    int64_t *index;
} Summary;

#define SUM_BLOCK 4096

static void summarize_row_scalar(const Summary *s, long r) {
    const char *row = (const char *)s->x + r * s->stride * (s->dtype == DT_BF16 ? 2 : 4);
    float best = -INFINITY;
    long at = 0;
    for (long j = 0; j < s->C; j++) {
        float v = load_as_f32(row, j, s->dtype);
        if (isnan(v)) {
            best = v, at = j;
            break;
        }
        if (v > best || j == 0) best = v, at = j;
    }
    double total = 0.0;
    if (isfinite(best))
        for (long j0 = 0; j0 < s->C; j0 += SUM_BLOCK) {
            float block = 0.0f;
            for (long j = j0; j < j0 + SUM_BLOCK && j < s->C; j++) block += expf(load_as_f32(row, j, s->dtype) - best);
            total += block;
        }
    s->best[r] = best;
    s->index[r] = at;
    s->lse[r] = isfinite(best) ? (float)log(total) + best : NAN;
}

#ifdef X86
AVX512 INLINE __m512 load16(const char *row, long j, int dtype, __mmask16 lanes, float fill) {
    __m512 filler = _mm512_set1_ps(fill);
    if (dtype == DT_F32) return _mm512_mask_loadu_ps(filler, lanes, (const float *)row + j);
    __m512i h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, (const uint16_t *)row + j));
    return _mm512_mask_mov_ps(filler, lanes, _mm512_castsi512_ps(_mm512_slli_epi32(h, 16)));
}

AVX512 static void summarize_row_avx512(const Summary *s, long r) {
    const char *row = (const char *)s->x + r * s->stride * (s->dtype == DT_BF16 ? 2 : 4);
    __m512 top = _mm512_set1_ps(-INFINITY);
    __m512i top_at = _mm512_setzero_si512(), columns = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __mmask16 nans = 0;
    for (long j = 0; j < s->C; j += 16) {
        __mmask16 lanes = s->C - j >= 16 ? 0xFFFF : (__mmask16)((1u << (s->C - j)) - 1);
        __m512 v = load16(row, j, s->dtype, lanes, -INFINITY);
        nans |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        __mmask16 higher = _mm512_cmp_ps_mask(v, top, _CMP_GT_OQ); /* strict: a lane keeps its first column */
        top = _mm512_mask_mov_ps(top, higher, v);
        top_at = _mm512_mask_mov_epi32(top_at, higher, columns);
        columns = _mm512_add_epi32(columns, _mm512_set1_epi32(16));
    }
    float best = _mm512_reduce_max_ps(top);
    if (nans || !isfinite(best)) { /* rare: the scalar pass gives torch's NaN and -inf answers */
        summarize_row_scalar(s, r);
        return;
    }
    __mmask16 tied = _mm512_cmp_ps_mask(top, _mm512_set1_ps(best), _CMP_EQ_OQ);
    long at = _mm512_mask_reduce_min_epi32(tied, top_at);
    __m512 shift = _mm512_set1_ps(best);
    double total = 0.0;
    for (long j0 = 0; j0 < s->C; j0 += SUM_BLOCK) {
        __m512 sums[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
        for (long j = j0; j < j0 + SUM_BLOCK && j < s->C; j += 16) {
            __mmask16 lanes = s->C - j >= 16 ? 0xFFFF : (__mmask16)((1u << (s->C - j)) - 1);
            __m512 e = exp16(_mm512_sub_ps(load16(row, j, s->dtype, lanes, 0.0f), shift));
            sums[(j >> 4) & 1] = _mm512_mask_add_ps(sums[(j >> 4) & 1], lanes, sums[(j >> 4) & 1], e);
        }
        total += _mm512_reduce_add_ps(_mm512_add_ps(sums[0], sums[1]));
    }
    s->best[r] = best;
    s->index[r] = at;
    s->lse[r] = (float)log(total) + best;
}

/* summarize_row_avx512 in 8 lanes: whole runs of 8 columns in vectors, the last C % 8 in scalar code. */
AVX2 static void summarize_row_avx2(const Summary *s, long r) {
    const char *row = (const char *)s->x + r * s->stride * (s->dtype == DT_BF16 ? 2 : 4);
    const long whole = s->C / 8 * 8;
    __m256 top = _mm256_set1_ps(-INFINITY), nans = _mm256_setzero_ps();
    __m256i top_at = _mm256_setzero_si256(), columns = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (long j = 0; j < whole; j += 8) {
        __m256 v = load8(row, j, s->dtype);
        nans = _mm256_or_ps(nans, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        __m256 higher = _mm256_cmp_ps(v, top, _CMP_GT_OQ); /* strict: a lane keeps its first column */
        top = _mm256_blendv_ps(top, v, higher);
        top_at = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(top_at), _mm256_castsi256_ps(columns), higher));
        columns = _mm256_add_epi32(columns, _mm256_set1_epi32(8));
    }
    float lane_best[8];
    int32_t lane_at[8];
    _mm256_storeu_ps(lane_best, top);
    _mm256_storeu_si256((__m256i *)lane_at, top_at);
    float best = -INFINITY;
    long at = 0;
    for (int l = 0; l < 8; l++)
        if (lane_best[l] > best || (lane_best[l] == best && lane_at[l] < at)) best = lane_best[l], at = lane_at[l];
    int nan_seen = _mm256_movemask_ps(nans) != 0;
    for (long j = whole; j < s->C; j++) {
        float v = load_as_f32(row, j, s->dtype);
        nan_seen |= isnan(v);
        if (v > best) best = v, at = j;
    }
    if (nan_seen || !isfinite(best)) { /* rare: the scalar pass gives torch's NaN and -inf answers */
        summarize_row_scalar(s, r);
        return;
    }
    __m256 shift = _mm256_set1_ps(best);
    double total = 0.0;
    for (long j0 = 0; j0 < s->C; j0 += SUM_BLOCK) {
        const long end = j0 + SUM_BLOCK < s->C ? j0 + SUM_BLOCK : s->C, vector_end = end < whole ? end : whole;
        __m256 sums[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        long j = j0;
        for (; j < vector_end; j += 8)
            sums[(j >> 3) & 1] = _mm256_add_ps(sums[(j >> 3) & 1], exp8(_mm256_sub_ps(load8(row, j, s->dtype), shift)));
        float block = sum8(_mm256_add_ps(sums[0], sums[1]));
        for (; j < end; j++) block += expf(load_as_f32(row, j, s->dtype) - best);
        total += block;
    }
    s->best[r] = best;
    s->index[r] = at;
    s->lse[r] = (float)log(total) + best;
}
#endif

static const char *summarize(const Summary *s, int isa) {
    if (!isa_supported(isa)) return "this CPU lacks the instructions of the requested ISA";
    if (s->dtype != DT_BF16 && s->dtype != DT_F32) return "rows must be bfloat16 or float32";
    if (s->C < 1 || s->C > INT32_MAX) return "rows must have between 1 and 2^31 - 1 columns";
    for (long r = 0; r < s->R; r++) {
#ifdef X86
        if (isa >= ISA_AVX512) {
            summarize_row_avx512(s, r);
            continue;
        }
        if (isa == ISA_AVX2) {
            summarize_row_avx2(s, r);
            continue;
        }
#endif
        summarize_row_scalar(s, r);
    }
    return NULL;
}

static int isa_supported(int isa) {
#ifndef X86
    return isa == ISA_SCALAR;
#else
    __builtin_cpu_init();
    switch (isa) {
    case ISA_AVX512_VNNI: return isa_supported(ISA_AVX512) && __builtin_cpu_supports("avx512vnni");
#ifdef HAS_AMX
    case ISA_AMX_INT8: return isa_supported(ISA_AVX512_VNNI) && amx_int8_ready();
#endif
    case ISA_AVX512_BF16:
        return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case ISA_AVX512:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case ISA_AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case ISA_SCALAR: return 1;
    default: return 0;
    }
#endif
}

static const char *run_vnni(Problem *p, int isa) {
    if (p->block_rows != BLOCK_ROWS && p->block_rows != AVX2_BLOCK_ROWS) return "the VNNI layout's blocks hold 64 or 32 rows";
    if (p->N % BLOCK_ROWS || p->K % 16) return "the VNNI layout takes N a multiple of 64 and K of 16";
    if (p->w_dtype != DT_I8 || !p->scale || !p->row_sums || p->x_dtype == DT_I8 || p->y_dtype != p->x_dtype)
        return "the VNNI layout holds int8 weights with scales and row sums, for float x and outputs alike";
    if (p->levels < 1 || p->levels > 255) return "the VNNI layout quantizes x to 1 .. 255 levels";
    if (isa == ISA_SCALAR) return linear_vnni_scalar(p);
#ifdef X86
    if (isa >= ISA_AVX512 && isa_supported(ISA_AVX512_VNNI)) {
        if (p->block_rows != BLOCK_ROWS) return "the VPDPBUSD form reads blocks of 64 rows";
#ifdef HAS_AMX
        /* AMX where the best level is asked for (a CPU with AMX has AVX512-BF16), so ISA_AVX512 keeps VPDPBUSD */
        if (isa == ISA_AVX512_BF16 && p->R >= AMX_INT8_MIN_ROWS && p->K % 64 == 0 && amx_int8_ready())
            return linear_vnni_amx(p);
#endif
        return linear_vnni(p);
    }
    if (p->levels > 127 || p->block_rows != AVX2_BLOCK_ROWS)
        return "the VNNI layout's AVX2 form (any ISA below AVX512-VNNI) takes x in at most 127 levels (7 bits) and "
               "blocks of 32 rows";
    return linear_vnni_avx2(p);
#else
    return "the VNNI layout is read by the scalar path on this CPU";
#endif
}

static const char *run(Problem *p, int isa) {
    if (!isa_supported(isa)) return "this CPU lacks the instructions of the requested ISA";
    if (p->layout == LAYOUT_VNNI) return run_vnni(p, isa);
    if (p->K % TILE_K || p->N % TILE_ROWS) return "K must be a multiple of 32 and N of 4 (the tiled layout)";
    /* VDPBF16PS multiplies bfloat16 pairs: float32 x takes the float32 FMA path */
    if (isa == ISA_AVX512_BF16 && p->x_dtype != DT_BF16) isa = ISA_AVX512;
    if (p->layout == LAYOUT_ONEDNN) {
        if (p->block_rows != BLOCK_ROWS && p->block_rows != AMX_BLOCK_ROWS)
            return "the row-block layout's blocks hold 64 rows, or 32 (oneDNN's AMX packing)";
        if (p->N % p->block_rows || p->x_dtype != DT_BF16 || p->y_dtype != DT_BF16)
            return "the row-block layout is read for bfloat16 x and outputs, N a multiple of the block's rows";
        if ((p->w_dtype == DT_I8) != (p->scale != NULL) || p->w_dtype == DT_F32)
            return "the row-block layout holds bfloat16 weights, or int8 ones with a scale per row";
        if (p->block_rows == AMX_BLOCK_ROWS && (p->w_dtype == DT_I8 || (isa != ISA_AVX512_BF16 && isa != ISA_SCALAR)))
            return "32-row blocks (oneDNN's AMX packing) are read for bfloat16 weights by the AVX512-BF16 and scalar "
                   "paths";
    } else if (p->w_dtype == DT_BF16_COMPACT) {
        return "compact weights are row blocks: the ONEDNN layout";
    }
    if (isa == ISA_SCALAR) {
        linear_scalar(p);
        return NULL;
    }
#ifdef X86
    if (isa == ISA_AVX512_BF16) {
        if (p->layout == LAYOUT_ONEDNN) {
#ifdef HAS_AMX
            if (p->block_rows == AMX_BLOCK_ROWS && p->R >= AMX_MIN_ROWS && amx_ready()) return linear_onednn_amx(p);
            if (p->w_dtype == DT_I8 && p->R >= AMX_WIDENED_MIN_ROWS && amx_ready())
                return linear_int8_blocks_amx(p);
#endif
            return linear_onednn_bf16(p);
        }
        linear_avx512_bf16(p);
        return NULL;
    }
    if (p->layout == LAYOUT_ONEDNN) { /* AVX2 and AVX512 without BF16 alike: the AVX2 forms */
        if (p->w_dtype == DT_I8) return linear_row_blocks_int8_avx2(p);
        const float *x = widened_x(p);
        if (!x) return "out of memory widening x";
        if (p->w_dtype == DT_BF16_COMPACT) return linear_compact_avx2(p, x);
        linear_row_blocks_avx2(p, x);
        return NULL;
    }
    const float *x = isa == ISA_AVX2 && p->w_dtype == DT_BF16 ? pair_split_x(p) : widened_x(p);
    if (!x) return "out of memory widening x";
    if (isa == ISA_AVX512)
        linear_avx512(p, x);
    else
        linear_avx2(p, x);
#endif
    return NULL;
}

/* ------------------------------------------------------------------ elementwise sums
 * out = a + b, rounded once to the dtype (torch's add): the fused blocks' residual adds and the shared-memory
 * all-reduce's sums. One loop that vectorizes, compiled for each vector width and picked at run time (the
 * results are the same at every width): scalar, a [16, 1024] bf16 sum took 47 us, a sixth of a bloom-560m
 * layer's two all-reduces at 16 rows. */
#define ADD_ELEMENTWISE(SUFFIX, TARGET)                                                                              \
    TARGET static void add_bf16_##SUFFIX(uint16_t *out, const uint16_t *a, const uint16_t *b, long n) {             \
        for (long i = 0; i < n; i++) out[i] = f32_to_bf16(bf16_to_f32(a[i]) + bf16_to_f32(b[i]));                   \
    }                                                                                                                \
    TARGET static void add_f32_##SUFFIX(float *out, const float *a, const float *b, long n) {                       \
        for (long i = 0; i < n; i++) out[i] = a[i] + b[i];                                                           \
    }

ADD_ELEMENTWISE(generic, )
#ifdef X86
ADD_ELEMENTWISE(avx2, AVX2)
ADD_ELEMENTWISE(avx512, AVX512)
#endif

/* The widest of a loop's compiled forms (NAME_avx512, NAME_avx2, NAME_generic) this CPU runs. */
#ifdef X86
#define WIDEST(NAME) \
    (isa_supported(ISA_AVX512) ? NAME##_avx512 : isa_supported(ISA_AVX2) ? NAME##_avx2 : NAME##_generic)
#else
#define WIDEST(NAME) NAME##_generic
#endif

static void add_elementwise(void *out, const void *a, const void *b, long n, int dtype) {
    if (dtype == DT_BF16)
        WIDEST(add_bf16)(out, a, b, n);
    else
        WIDEST(add_f32)(out, a, b, n);
}

/* ------------------------------------------------------------------ the shared-memory all-reduce's fast path
 * shm_allreduce.py's protocol (read its docstring first), for calls whose peers arrive within YIELD_S: the
 * Python version costs ~20 us of interpreter a call, 48 calls a bloom-560m decode step. Each phase reads and
 * writes the same counters the Python version does, so either can finish a call the other began: a wait past
 * YIELD_S, or peers that disagree on the size, hand the call back to Python (its sleeps, liveness checks,
 * timeouts and errors), which sees from this rank's counters how far it got. bfloat16 and float32 only. */
enum { SHM_ARRIVED = 0, SHM_DONE = 1, SHM_SIZE = 2 };
enum { SHM_WAITING = 0, SHM_PUBLISHED = 1, SHM_REDUCED = 2 };
#define SHM_LINE_WORDS 8 /* one 64-byte line of int64 counters per rank, after rank 0's token line */
#define SHM_SPIN_S 5e-6
#define SHM_YIELD_S 2e-3

typedef struct {
    char *base; /* the segment */
    long rank, world, data_offset, slot_bytes;
} ShmGroup;

static inline int64_t *shm_counter(const ShmGroup *g, long rank, int field) {
    return (int64_t *)g->base + (rank + 1) * SHM_LINE_WORDS + field;
}

static inline double seconds_since(const struct timespec *start) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - start->tv_sec) + 1e-9 * (double)(now.tv_nsec - start->tv_nsec);
}

/* 1 once every peer's `field` reached seq, 0 if one has not within SHM_YIELD_S (spinning, then yielding the
 * core, as the Python version does before it starts to sleep). */
static int shm_wait(const ShmGroup *g, int field, int64_t seq) {
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        int pending = 0;
        for (long r = 0; r < g->world && !pending; r++)
            pending = r != g->rank && __atomic_load_n(shm_counter(g, r, field), __ATOMIC_ACQUIRE) < seq;
        if (!pending) return 1;
        double waited = seconds_since(&start);
        if (waited > SHM_YIELD_S) return 0;
        if (waited > SHM_SPIN_S) sched_yield();
    }
}

/* The next call on `tensor` (n elements of dtype, contiguous), from wherever this rank's counters say the
 * last attempt stopped: SHM_REDUCED when done, else how far it got (the caller finishes in Python). */
static int shm_all_reduce(const ShmGroup *g, void *tensor, long n, int dtype) {
    const size_t element = dtype == DT_BF16 ? sizeof(uint16_t) : sizeof(float), bytes = (size_t)n * element;
    const int64_t seq = __atomic_load_n(shm_counter(g, g->rank, SHM_DONE), __ATOMIC_RELAXED) + 1;
    if (__atomic_load_n(shm_counter(g, g->rank, SHM_ARRIVED), __ATOMIC_RELAXED) < seq) {
        if (!shm_wait(g, SHM_DONE, seq - 1)) return SHM_WAITING;
        memcpy(g->base + g->data_offset + g->rank * g->slot_bytes, tensor, bytes);
        __atomic_store_n(shm_counter(g, g->rank, SHM_SIZE), (int64_t)bytes, __ATOMIC_RELAXED);
        __atomic_store_n(shm_counter(g, g->rank, SHM_ARRIVED), seq, __ATOMIC_RELEASE); /* after the data */
    }
    if (!shm_wait(g, SHM_ARRIVED, seq)) return SHM_PUBLISHED;
    for (long r = 0; r < g->world; r++)
        if (__atomic_load_n(shm_counter(g, r, SHM_SIZE), __ATOMIC_RELAXED) != (int64_t)bytes) return SHM_PUBLISHED;
    /* slot 0 + slot 1 + ... in rank order, rounded after each addition: what every rank computes alike */
    const char *slots = g->base + g->data_offset;
    add_elementwise(tensor, slots, slots + g->slot_bytes, n, dtype);
    for (long r = 2; r < g->world; r++) add_elementwise(tensor, tensor, slots + r * g->slot_bytes, n, dtype);
    __atomic_store_n(shm_counter(g, g->rank, SHM_DONE), seq, __ATOMIC_RELEASE);
    return SHM_REDUCED;
}

/* ------------------------------------------------------------------ a step's blocks in one call
 * Every block of a step whose rows are one new token per sequence, or whole prompts of one length, in one call,
 * for workers whose Linears and attention all run on this file's kernels: LayerNorm, the fused QKV projection,
 * attention (storing the new keys and values), the output projection, the all-reduce, the residual, and the
 * MLP. The same calls model.py makes, minus ~100 us of Python a layer (module calls, wrappers, views) that kept
 * the memory bus idle for ~2.5 ms of a bloom-560m rank's ~14 ms int8 decode step. The all-reduce goes through
 * shared memory in C while the peers keep pace, else through the caller's (a Python callable that sums the
 * output buffer across the ranks in place), so its failures and timeouts stay where they are. */

/* One Linear's operands, as LinearKernel passes them; int64 each, in this order (fused_blocks.py packs them). */
typedef struct {
    int64_t w, scale, bias, row_sums, N, K, w_dtype, layout, gelu, levels, block_rows;
} LinearRecord;

typedef struct {
    int64_t ln1_weight, ln1_bias, ln2_weight, ln2_bias;
    LinearRecord qkv, dense, h_to_4h, four_h_to_h;
} LayerRecord;

typedef struct {
    const LayerRecord *layers;
    long n_layers, R, hidden;
    void *x;                                     /* [R, hidden], the residual stream, updated in place */
    void *normed, *qkv, *context, *reduced, *mlp; /* scratch: [R, hidden], [R, 3 H D], [R, H D], [R, hidden], [R, 4h] */
    char *keys, *values;                         /* every layer's cache, layer after layer */
    long layer_stride, kv_slot, kv_head, L, H, D; /* strides in elements */
    const void *bias;                            /* [slots, H, 1, L], or prompts' [H, n, n] */
    const int64_t *slots, *positions;
    long prompt_length; /* 0: one new token per sequence; n: whole prompts of n tokens (Attention's) */
    float scale, eps;
    int dtype, isa, residual_from_normed;
    ShmGroup shm;         /* the ranks' shared-memory segment (base NULL: none), tried before all_reduce */
    PyObject *all_reduce; /* called with no arguments: sums `reduced` over the ranks in place; None: one rank */
} BlockStep;

#define NORM_LANES 16

/* torch's LayerNorm of each row, in float32 from x's dtype, rounded once: y = (x rstd - mean rstd) w + b. The
 * moments are summed in NORM_LANES fixed lanes (torch's Welford sums in another order: the bf16 outputs may
 * differ from torch's in the last bit). C is a multiple of NORM_LANES, so each lane is a vector lane: one loop
 * per dtype, compiled for each vector width (the same sums and roundings at every width, as add_elementwise's);
 * the scalar form, a load and a dtype test per element, took ~2 % of a 2-core AVX2 EPYC's prefill steps. */
#define LAYER_NORM_ROWS(SUFFIX, TARGET, T, LOAD, STORE)                                                             \
    TARGET static void layer_norm_##SUFFIX(const T *x, T *y, const T *weight, const T *bias, long R, long C,      \
                                          float eps) {                                                            \
        for (long r = 0; r < R; r++, x += C, y += C) {                                                           \
            float lanes[NORM_LANES] = {0}, deviations[NORM_LANES] = {0}, sum = 0.0f, squares = 0.0f;             \
            for (long c = 0; c < C; c += NORM_LANES)                                                             \
                for (int i = 0; i < NORM_LANES; i++) lanes[i] += LOAD(x[c + i]);                                 \
            for (int i = 0; i < NORM_LANES; i++) sum += lanes[i];                                                \
            const float mean = sum / (float)C;                                                                   \
            for (long c = 0; c < C; c += NORM_LANES)                                                             \
                for (int i = 0; i < NORM_LANES; i++) {                                                           \
                    const float d = LOAD(x[c + i]) - mean;                                                       \
                    deviations[i] += d * d;                                                                      \
                }                                                                                                \
            for (int i = 0; i < NORM_LANES; i++) squares += deviations[i];                                       \
            const float rstd = 1.0f / sqrtf(squares / (float)C + eps), shift = -mean * rstd;                     \
            for (long c = 0; c < C; c++) y[c] = STORE((LOAD(x[c]) * rstd + shift) * LOAD(weight[c]) + LOAD(bias[c])); \
        }                                                                                                        \
    }
#define LOAD_F32(v) (v)
#define LAYER_NORM(SUFFIX, TARGET)                                                                                 \
    LAYER_NORM_ROWS(bf16_##SUFFIX, TARGET, uint16_t, bf16_to_f32, f32_to_bf16)                                    \
    LAYER_NORM_ROWS(f32_##SUFFIX, TARGET, float, LOAD_F32, LOAD_F32)

LAYER_NORM(generic, )
#ifdef X86
LAYER_NORM(avx2, AVX2)
LAYER_NORM(avx512, AVX512)
#endif

/* The rows' LayerNorm, C a multiple of NORM_LANES (blocks() checks). */
static void layer_norm(const void *x, void *y, const void *weight, const void *bias, long R, long C, float eps,
                       int dtype) {
    if (dtype == DT_BF16)
        WIDEST(layer_norm_bf16)(x, y, weight, bias, R, C, eps);
    else
        WIDEST(layer_norm_f32)(x, y, weight, bias, R, C, eps);
}

static const char *block_linear(const BlockStep *s, const LinearRecord *l, const void *x, void *y) {
    Problem p = {x,          (const void *)l->w,      (const float *)l->scale, (const int32_t *)l->row_sums,
                 (const void *)l->bias, y,             s->R,
                 l->N,       l->K,                    s->dtype,
                 (int)l->w_dtype,       s->dtype,      (int)l->layout,
                 (int)l->gelu,          (int)l->levels, (int)l->block_rows};
    return run(&p, s->isa);
}

/* The all-reduce of `reduced`: through shared memory in C while the peers keep pace, else (or to finish what that
 * began) the caller's, with the GIL taken back for it; NULL, or "" with a Python error set. */
static const char *block_all_reduce(const BlockStep *s, PyThreadState **thread) {
    if (s->shm.base && shm_all_reduce(&s->shm, s->reduced, s->R * s->hidden, s->dtype) == SHM_REDUCED) return NULL;
    if (s->all_reduce == Py_None) return NULL;
    PyEval_RestoreThread(*thread);
    PyObject *result = PyObject_CallNoArgs(s->all_reduce);
    Py_XDECREF(result);
    *thread = PyEval_SaveThread();
    return result ? NULL : "";
}

static const char *run_blocks(const BlockStep *s, PyThreadState **thread) {
    const size_t element = s->dtype == DT_BF16 ? sizeof(uint16_t) : sizeof(float);
    const long HD = s->H * s->D, rows = s->R * s->hidden;
    const char *error = NULL;
    for (long layer = 0; layer < s->n_layers && !error; layer++) {
        const LayerRecord *l = &s->layers[layer];
        layer_norm(s->x, s->normed, (const void *)l->ln1_weight, (const void *)l->ln1_bias, s->R, s->hidden, s->eps,
                   s->dtype);
        if ((error = block_linear(s, &l->qkv, s->normed, s->qkv))) break;
        /* the fused projection's rows are [H, 3 (q, k, v), D]: the keys and values sit D and 2 D after q */
        const char *qkv = s->qkv;
        Attention a = {qkv,
                       s->keys + layer * s->layer_stride * element,
                       s->values + layer * s->layer_stride * element,
                       s->bias,
                       s->slots,
                       s->context,
                       s->R,
                       s->H,
                       s->L,
                       s->D,
                       3 * HD,
                       3 * s->D,
                       s->kv_slot,
                       s->kv_head,
                       s->scale,
                       qkv + s->D * element,
                       qkv + 2 * s->D * element,
                       s->positions,
                       s->prompt_length,
                       s->dtype};
        if ((error = attend(&a, s->isa))) break;
        if ((error = block_linear(s, &l->dense, s->context, s->reduced))) break;
        if ((error = block_all_reduce(s, thread))) break;
        add_elementwise(s->x, s->residual_from_normed ? s->normed : s->x, s->reduced, rows, s->dtype);
        layer_norm(s->x, s->normed, (const void *)l->ln2_weight, (const void *)l->ln2_bias, s->R, s->hidden, s->eps,
                   s->dtype);
        if ((error = block_linear(s, &l->h_to_4h, s->normed, s->mlp))) break;
        if ((error = block_linear(s, &l->four_h_to_h, s->mlp, s->reduced))) break;
        if ((error = block_all_reduce(s, thread))) break;
        add_elementwise(s->x, s->residual_from_normed ? s->normed : s->x, s->reduced, rows, s->dtype);
    }
    return error;
}

/* 1 when `name` got `want` arguments, else 0 with the TypeError set. */
static int takes_arguments(const char *name, Py_ssize_t nargs, Py_ssize_t want) {
    if (nargs == want) return 1;
    PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments", name, want);
    return 0;
}

/* None after a kernel ran, or the ValueError that names why it could not. */
static PyObject *none_or_raise(const char *error) {
    if (error) {
        PyErr_SetString(PyExc_ValueError, error);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* linear(x, w, scale, bias, y, row_sums, R, N, K, x_dtype, w_dtype, y_dtype, isa, layout, gelu, levels,
 * block_rows): addresses as ints (0 for no scale, bias or row sums), the caller holding the tensors alive and
 * contiguous. Releases the GIL while it runs. */
static PyObject *py_linear(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!takes_arguments("linear", nargs, 17)) return NULL;
    void *address[6];
    long value[11];
    for (int i = 0; i < 6; i++) address[i] = PyLong_AsVoidPtr(args[i]);
    for (int i = 0; i < 11; i++) value[i] = PyLong_AsLong(args[6 + i]);
    if (PyErr_Occurred()) return NULL;
    Problem p = {address[0],    address[1],    (const float *)address[2], (const int32_t *)address[5],
                 address[3],    address[4],    value[0],
                 value[1],      value[2],      (int)value[3],
                 (int)value[4], (int)value[5], (int)value[7],
                 (int)value[8], (int)value[9], (int)value[10]};
    const char *error;
    Py_BEGIN_ALLOW_THREADS
    error = run(&p, (int)value[6]);
    Py_END_ALLOW_THREADS
    return none_or_raise(error);
}

/* untile(w, n0, n1, K, out): rows n0 .. n1-1 (multiples of TILE_ROWS) of a tiled bfloat16 weight as plain
 * float32 [n1 - n0, K] at out: the slices a float32 GEMM reads where bfloat16 arithmetic is emulated. */
static PyObject *py_untile(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!takes_arguments("untile", nargs, 5)) return NULL;
    const uint16_t *w = PyLong_AsVoidPtr(args[0]);
    long n0 = PyLong_AsLong(args[1]), n1 = PyLong_AsLong(args[2]), K = PyLong_AsLong(args[3]);
    float *out = PyLong_AsVoidPtr(args[4]);
    if (PyErr_Occurred()) return NULL;
    if (n0 % TILE_ROWS || n1 % TILE_ROWS || K % TILE_K) {
        PyErr_SetString(PyExc_ValueError, "untile() takes whole tiles: rows in 4s, K in 32s");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    const uint16_t *chunk = w + n0 * K; /* tiles in order, each TILE_K columns of TILE_ROWS rows at a time */
    for (long n = n0; n < n1; n += TILE_ROWS)
        for (long k = 0; k < K; k += TILE_K)
            for (long r = 0; r < TILE_ROWS; r++, chunk += TILE_K)
                for (long c = 0; c < TILE_K; c++) out[(n - n0 + r) * K + k + c] = bf16_to_f32(chunk[c]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* attend(q, keys, values, bias, slots, out, S, H, L, D, q_row, q_head, kv_slot, kv_head, scale, isa, new_keys,
 * new_values, positions, prompt_length, dtype): addresses as ints (slots 0: query i in slot i; new_keys 0: the
 * cache holds them), strides in elements, prompt_length 0 for one query per sequence, dtype that of every
 * float tensor. Releases the GIL while it runs. */
static PyObject *py_attend(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!takes_arguments("attend", nargs, 21)) return NULL;
    void *address[6], *written[3];
    long value[8];
    for (int i = 0; i < 6; i++) address[i] = PyLong_AsVoidPtr(args[i]);
    for (int i = 0; i < 8; i++) value[i] = PyLong_AsLong(args[6 + i]);
    double scale = PyFloat_AsDouble(args[14]);
    long isa = PyLong_AsLong(args[15]);
    for (int i = 0; i < 3; i++) written[i] = PyLong_AsVoidPtr(args[16 + i]);
    long prompt_length = PyLong_AsLong(args[19]);
    long dtype = PyLong_AsLong(args[20]);
    if (PyErr_Occurred()) return NULL;
    if (prompt_length < 0 || (prompt_length && (value[0] % prompt_length || value[2] != prompt_length))) {
        PyErr_SetString(PyExc_ValueError, "whole prompts: the queries are prompts of prompt_length, the keys too");
        return NULL;
    }
    Attention a = {address[0], address[1], address[2], address[3], address[4], address[5],
                   value[0],   value[1],   value[2],   value[3],   value[4],   value[5],
                   value[6],   value[7],   (float)scale, written[0], written[1], written[2], prompt_length,
                   (int)dtype};
    const char *error;
    Py_BEGIN_ALLOW_THREADS
    error = attend(&a, (int)isa);
    Py_END_ALLOW_THREADS
    return none_or_raise(error);
}

/* summarize(rows, R, C, stride, dtype, best, index, logsumexp, isa): addresses as ints, the row stride in
 * elements. Releases the GIL while it runs. */
static PyObject *py_summarize(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!takes_arguments("summarize", nargs, 9)) return NULL;
    Summary s = {PyLong_AsVoidPtr(args[0]), PyLong_AsLong(args[1]), PyLong_AsLong(args[2]),
                 PyLong_AsLong(args[3]),    (int)PyLong_AsLong(args[4]), PyLong_AsVoidPtr(args[5]),
                 PyLong_AsVoidPtr(args[7]), PyLong_AsVoidPtr(args[6])};
    long isa = PyLong_AsLong(args[8]);
    if (PyErr_Occurred()) return NULL;
    const char *error;
    Py_BEGIN_ALLOW_THREADS
    error = summarize(&s, (int)isa);
    Py_END_ALLOW_THREADS
    return none_or_raise(error);
}

/* The ShmGroup of args[0 .. 4]: segment, rank, world size, data offset, slot bytes. */
static ShmGroup shm_group(PyObject *const *args) {
    ShmGroup g = {PyLong_AsVoidPtr(args[0]), PyLong_AsLong(args[1]), PyLong_AsLong(args[2]), PyLong_AsLong(args[3]),
                  PyLong_AsLong(args[4])};
    return g;
}

/* blocks(layers, n_layers, R, hidden, x, normed, qkv, context, reduced, mlp, keys, values, layer_stride, kv_slot,
 * kv_head, L, H, D, bias, slots, positions, prompt_length, scale, eps, dtype, isa, residual_from_normed, segment,
 * rank, world, data_offset, slot_bytes, all_reduce): addresses as ints (slots 0: query i in slot i; positions 0
 * for prompts; segment 0: no shared memory), strides in elements, `layers` n_layers LayerRecords, `all_reduce` a
 * callable or None. Releases the GIL but for the calls of all_reduce. */
static PyObject *py_blocks(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!takes_arguments("blocks", nargs, 33)) return NULL;
    long value[22];
    for (int i = 0; i < 22; i++) value[i] = PyLong_AsLong(args[i]);
    double scale = PyFloat_AsDouble(args[22]), eps = PyFloat_AsDouble(args[23]);
    long dtype = PyLong_AsLong(args[24]), isa = PyLong_AsLong(args[25]), residual_from_normed = PyLong_AsLong(args[26]);
    ShmGroup shm = shm_group(args + 27);
    if (PyErr_Occurred()) return NULL;
    const long prompt_length = value[21];
    if (prompt_length < 0 || (prompt_length && (value[2] % prompt_length || value[15] != prompt_length))) {
        PyErr_SetString(PyExc_ValueError, "blocks(): whole prompts are rows in prompts of prompt_length, the keys too");
        return NULL;
    }
    if (shm.base && (args[32] == Py_None || shm.rank < 0 || shm.rank >= shm.world)) {
        PyErr_SetString(PyExc_ValueError, "blocks() takes a shared-memory segment with a rank in it and an all_reduce");
        return NULL;
    }
    if (args[32] != Py_None && !PyCallable_Check(args[32])) {
        PyErr_SetString(PyExc_TypeError, "blocks()'s all_reduce must be a callable or None");
        return NULL;
    }
    if (dtype != DT_BF16 && dtype != DT_F32) {
        PyErr_SetString(PyExc_ValueError, "blocks() takes bfloat16 or float32 activations");
        return NULL;
    }
    if (value[3] % NORM_LANES) {
        PyErr_Format(PyExc_ValueError, "blocks() takes a hidden size that is a multiple of %d, got %ld", NORM_LANES,
                     value[3]);
        return NULL;
    }
    BlockStep s = {(const LayerRecord *)value[0],
                    value[1],
                    value[2],
                    value[3],
                    (void *)value[4],
                    (void *)value[5],
                    (void *)value[6],
                    (void *)value[7],
                    (void *)value[8],
                    (void *)value[9],
                    (char *)value[10],
                    (char *)value[11],
                    value[12],
                    value[13],
                    value[14],
                    value[15],
                    value[16],
                    value[17],
                    (const void *)value[18],
                    (const int64_t *)value[19],
                    (const int64_t *)value[20],
                    prompt_length,
                    (float)scale,
                    (float)eps,
                    (int)dtype,
                    (int)isa,
                    (int)residual_from_normed,
                    shm,
                    args[32]};
    PyThreadState *thread = PyEval_SaveThread();
    const char *error = run_blocks(&s, &thread);
    PyEval_RestoreThread(thread);
    if (error && !*error) return NULL; /* the all-reduce raised */
    return none_or_raise(error);
}

/* shm_all_reduce(segment, rank, world, data_offset, slot_bytes, tensor, n, dtype): the next call of the
 * shared-memory all-reduce on n contiguous elements at `tensor`, as far as it goes without a long wait; returns
 * 2 (reduced), 1 (this rank's part published) or 0 (waiting for the last call's readers). Releases the GIL. */
static PyObject *py_shm_all_reduce(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!takes_arguments("shm_all_reduce", nargs, 8)) return NULL;
    ShmGroup g = shm_group(args);
    void *tensor = PyLong_AsVoidPtr(args[5]);
    long n = PyLong_AsLong(args[6]), dtype = PyLong_AsLong(args[7]);
    if (PyErr_Occurred()) return NULL;
    if (!g.base || g.rank < 0 || g.rank >= g.world || (dtype != DT_BF16 && dtype != DT_F32) || n < 0) {
        PyErr_SetString(PyExc_ValueError, "shm_all_reduce() takes a segment, a rank in it and bfloat16 or float32");
        return NULL;
    }
    int reached;
    Py_BEGIN_ALLOW_THREADS
    reached = shm_all_reduce(&g, tensor, n, (int)dtype);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(reached);
}

static PyObject *py_supported(PyObject *self, PyObject *arg) {
    (void)self;
    long isa = PyLong_AsLong(arg);
    if (PyErr_Occurred()) return NULL;
    return PyBool_FromLong(isa_supported((int)isa));
}

/* compact_tables(w, N, K, rows, tables, starts) -> patches; compact_fill(w, N, K, rows, out): a plain bf16 [N, K]
 * weight (N a multiple of rows: 32 or 64; K of 32) into compact blocks (native.py's to_compact). */
static PyObject *py_compact_tables(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!takes_arguments("compact_tables", nargs, 6)) return NULL;
    const uint16_t *w = PyLong_AsVoidPtr(args[0]);
    const long N = PyLong_AsLong(args[1]), K = PyLong_AsLong(args[2]), rows = PyLong_AsLong(args[3]);
    uint8_t *tables = PyLong_AsVoidPtr(args[4]);
    int32_t *starts = PyLong_AsVoidPtr(args[5]);
    if (PyErr_Occurred()) return NULL;
    if ((rows != BLOCK_ROWS && rows != AMX_BLOCK_ROWS) || N % rows || K % TILE_K) {
        PyErr_SetString(PyExc_ValueError, "compact blocks hold 32 or 64 rows: N a multiple of them, K of 32");
        return NULL;
    }
    long patches;
    Py_BEGIN_ALLOW_THREADS
    patches = compact_tables(w, N, K, rows, tables, starts);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(patches);
}

static PyObject *py_compact_fill(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!takes_arguments("compact_fill", nargs, 5)) return NULL;
    const uint16_t *w = PyLong_AsVoidPtr(args[0]);
    const long N = PyLong_AsLong(args[1]), K = PyLong_AsLong(args[2]), rows = PyLong_AsLong(args[3]);
    uint8_t *out = PyLong_AsVoidPtr(args[4]);
    if (PyErr_Occurred()) return NULL;
    Py_BEGIN_ALLOW_THREADS
    compact_fill(w, N, K, rows, out);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"linear", (PyCFunction)(void (*)(void))py_linear, METH_FASTCALL, "y = x W^T (* scale) (+ bias)"},
    {"attend", (PyCFunction)(void (*)(void))py_attend, METH_FASTCALL, "one-query attention, bfloat16 or float32"},
    {"untile", (PyCFunction)(void (*)(void))py_untile, METH_FASTCALL, "tiled bfloat16 rows to float32"},
    {"compact_tables", (PyCFunction)(void (*)(void))py_compact_tables, METH_FASTCALL, "compact blocks' tables"},
    {"compact_fill", (PyCFunction)(void (*)(void))py_compact_fill, METH_FASTCALL, "compact blocks' bytes"},
    {"summarize", (PyCFunction)(void (*)(void))py_summarize, METH_FASTCALL, "best, column, log-sum-exp per row"},
    {"blocks", (PyCFunction)(void (*)(void))py_blocks, METH_FASTCALL, "a step's blocks: one-token rows or prompts"},
    {"shm_all_reduce", (PyCFunction)(void (*)(void))py_shm_all_reduce, METH_FASTCALL, "shared-memory all-reduce, fast path"},
    {"supported", py_supported, METH_O, "whether this CPU runs the given ISA level"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
