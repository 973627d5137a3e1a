/* Weight-only quantized linear layers for a few input rows (decoding: one row per token).

   y[r, o] = sum_g scale[o, g] * (sum_{k in g} u[o, k] * x[r, k] - zero[o, g] * sum_{k in g} x[r, k]) + bias[o]

   which is sum_k (u - z) * s * x: the dequantized weight's product. u are unsigned integer codes, one
   per byte (bits = 8) or two per byte (bits = 4) in blocks of 32 columns: byte j of a block holds
   column j in its low nibble and column j + 16 in its high one. Groups are multiples of 32 columns.

   Batch 1 is memory-bound for float32 weights (each weight is read once per token), so 4-bit codes
   read an eighth of the bytes; the work left is unpacking, which must stay cheaper than the bytes
   saved. Eight bytes of a block are zero-extended into eight 32-bit lanes at once; each lane then
   holds a low nibble (column j) and a high one (column j + 16), separated with one mask and one shift,
   so 32 codes cost two widening loads, two mask / shift pairs and four conversions to float. The
   zero-point is not subtracted per code: each group's sum of x is computed once per call, and the
   groups' s * z * sum(x) are summed eight at a time at the end of the output channel. Each block is
   used for every row of a tile of up to 4 rows; each row keeps float32 lane accumulators per group
   (independent lanes, so nothing reassociates a reduction), scaled once per group into lane totals,
   summed across lanes at the end of the output channel. Written with gcc's generic vector types
   (clang's too), which -O3 -march=native maps onto the machine's vector unit, with the widening by
   name on AVX2: gcc 12 turned the generic byte-to-float conversion into one extract and one convert
   per byte. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 32

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint8_t v8b __attribute__((vector_size(8)));

#if defined(__FMA__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#ifdef __FMA__
/* the build uses ISO C, where gcc never fuses a * b + c by itself */
#define MADD(a, b, c) ((v8f)_mm256_fmadd_ps((__m256)(a), (__m256)(b), (__m256)(c)))
#else
#define MADD(a, b, c) ((a) * (b) + (c))
#endif

static inline v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Eight bytes zero-extended to eight int32 lanes. */
static inline v8i widen(const uint8_t *p) {
#ifdef __AVX2__
    return (v8i)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    v8b part;
    memcpy(&part, p, sizeof part);
    return __builtin_convertvector(part, v8i);
#endif
}

/* 32 codes of one block as four vectors of floats (columns 0-7, 8-15, 16-23, 24-31). */
static inline __attribute__((always_inline)) void unpack(const int bits, const uint8_t *restrict p, v8f w[4]) {
    if (bits == 4) {
        const v8i a = widen(p), b = widen(p + 8);
        w[0] = __builtin_convertvector(a & 15, v8f);
        w[1] = __builtin_convertvector(b & 15, v8f);
        w[2] = __builtin_convertvector(a >> 4, v8f);
        w[3] = __builtin_convertvector(b >> 4, v8f);
    } else {
        for (int i = 0; i < 4; i++) w[i] = __builtin_convertvector(widen(p + 8 * i), v8f);
    }
}

static inline float lanes_sum(v8f v) {
    float s = 0.0f;
    for (int j = 0; j < 8; j++) s += v[j];
    return s;
}

/* sum_g scale[g] * zero[g] * xsum[g] over one output channel's groups: what the zero-points take
   away, eight groups at a time (with groups of 32 columns, a scalar step per group cost as much as
   the group's codes). */
static inline float zero_shift(const float *restrict scale, const uint8_t *restrict zero,
                               const float *restrict xsum, int64_t groups) {
    v8f acc = {0};
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8)
        acc = MADD(load8(scale + g) * __builtin_convertvector(widen(zero + g), v8f), load8(xsum + g), acc);
    float shift = lanes_sum(acc);
    for (; g < groups; g++) shift += scale[g] * (float)zero[g] * xsum[g];
    return shift;
}

/* One row, groups of one block (32 columns): each group's four products go down one chain and are
   scaled by one FMA; two groups are unrolled side by side, so two chains are in flight. The general
   tile below keeps four chains per group and scales each (four FMAs per group of 32 codes, as many as
   the products): with groups of 32 it took 1.3-1.6x longer on the decoder's shapes (768 -> 50304,
   768 -> 3072, 3072 -> 768; one group per iteration, without the unrolling, gained only 1.07-1.09x). */
static inline float row_g32(const int bits, const float *restrict x, const float *restrict xsum, int64_t groups,
                            const uint8_t *restrict c, const float *restrict scale, const uint8_t *restrict zero) {
    const int64_t block_bytes = BLOCK * bits / 8;
    v8f t0 = {0}, t1 = {0};
    int64_t g = 0;
    for (; g + 2 <= groups; g += 2, c += 2 * block_bytes) {
        v8f w[4], u[4];
        unpack(bits, c, w);
        unpack(bits, c + block_bytes, u);
        const float *xa = x + g * BLOCK, *xb = xa + BLOCK;
        v8f a = w[0] * load8(xa), b = u[0] * load8(xb);
        for (int i = 1; i < 4; i++) {
            a = MADD(w[i], load8(xa + 8 * i), a);
            b = MADD(u[i], load8(xb + 8 * i), b);
        }
        t0 = MADD((v8f){0} + scale[g], a, t0);
        t1 = MADD((v8f){0} + scale[g + 1], b, t1);
    }
    for (; g < groups; g++, c += block_bytes) {
        v8f w[4];
        unpack(bits, c, w);
        const float *xa = x + g * BLOCK;
        v8f a = w[0] * load8(xa);
        for (int i = 1; i < 4; i++) a = MADD(w[i], load8(xa + 8 * i), a);
        t0 = MADD((v8f){0} + scale[g], a, t0);
    }
    return lanes_sum(t0 + t1) - zero_shift(scale, zero, xsum, groups);
}

/* R rows (1, 2 or 4: compile-time constants after inlining) of the product, every output channel;
   xsum[r * groups + g] is the sum of row r's inputs in group g. Each row has 4 / R vector
   accumulators, so every tile keeps four independent chains in flight. */
static inline __attribute__((always_inline)) void tile(
    const int R, const int bits, const float *restrict x, const float *restrict xsum, int64_t in, int64_t out,
    const uint8_t *restrict codes, const float *restrict scale, const uint8_t *restrict zero, int64_t group,
    const float *restrict bias, float *restrict y) {
    const int CHAINS = 4 / R;
    const int64_t row_bytes = in * bits / 8, groups = in / group, block_bytes = BLOCK * bits / 8;
    for (int64_t o = 0; o < out; o++) {
        const uint8_t *c = codes + o * row_bytes;
        if (R == 1 && group == BLOCK) {
            y[o] = row_g32(bits, x, xsum, groups, c, scale + o * groups, zero + o * groups) + (bias ? bias[o] : 0.0f);
            continue;
        }
        v8f total[4][4] = {{{0}}};
        for (int64_t g = 0; g < groups; g++) {
            v8f acc[4][4] = {{{0}}};
            for (int64_t k = g * group; k < (g + 1) * group; k += BLOCK, c += block_bytes) {
                v8f w[4];
                unpack(bits, c, w);
                for (int r = 0; r < R; r++)
                    for (int i = 0; i < 4; i++)
                        acc[r][i % CHAINS] = MADD(w[i], load8(x + r * in + k + 8 * i), acc[r][i % CHAINS]);
            }
            const v8f vs = (v8f){0} + scale[o * groups + g];
            for (int r = 0; r < R; r++)
                for (int i = 0; i < CHAINS; i++) total[r][i] = MADD(vs, acc[r][i], total[r][i]);
        }
        for (int r = 0; r < R; r++) {
            v8f sum = total[r][0];
            for (int i = 1; i < CHAINS; i++) sum += total[r][i];
            const float shift = zero_shift(scale + o * groups, zero + o * groups, xsum + r * groups, groups);
            y[r * out + o] = lanes_sum(sum) - shift + (bias ? bias[o] : 0.0f);
        }
    }
}

/* Each group's sum of each row's inputs: [rows, groups]. */
static void group_sums(const float *x, int64_t rows, int64_t in, int64_t group, float *xsum) {
    const int64_t groups = in / group;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t g = 0; g < groups; g++) {
            v8f acc = {0};
            for (int64_t k = g * group; k < (g + 1) * group; k += 8) acc += load8(x + r * in + k);
            xsum[r * groups + g] = lanes_sum(acc);
        }
}

/* Returns 0, or -1 where the scratch for the group sums cannot be allocated (nothing is written). */
static int run(const int bits, const float *x, int64_t rows, int64_t in, int64_t out, const uint8_t *codes,
               const float *scale, const uint8_t *zero, int64_t group, const float *bias, float *y) {
    const int64_t groups = in / group;
    float *xsum = malloc(sizeof(float) * (size_t)(rows * groups));
    if (!xsum) return -1;
    group_sums(x, rows, in, group, xsum);
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4)
        tile(4, bits, x + r * in, xsum + r * groups, in, out, codes, scale, zero, group, bias, y + r * out);
    for (; r + 2 <= rows; r += 2)
        tile(2, bits, x + r * in, xsum + r * groups, in, out, codes, scale, zero, group, bias, y + r * out);
    for (; r < rows; r++)
        tile(1, bits, x + r * in, xsum + r * groups, in, out, codes, scale, zero, group, bias, y + r * out);
    free(xsum);
    return 0;
}

/* x: float32 [rows, in]; codes: uint8 [out, in / 2] in blocks of 32 columns; scale: float32 [out, in / group];
   zero: uint8 [out, in / group]; bias: float32 [out] or NULL; y: float32 [rows, out]. group % 32 == 0. */
int wo_int4(const float *x, int64_t rows, int64_t in, int64_t out, const uint8_t *codes, const float *scale,
            const uint8_t *zero, int64_t group, const float *bias, float *y) {
    return run(4, x, rows, in, out, codes, scale, zero, group, bias, y);
}

/* As wo_int4 with codes uint8 [out, in], one per byte. */
int wo_int8(const float *x, int64_t rows, int64_t in, int64_t out, const uint8_t *codes, const float *scale,
            const uint8_t *zero, int64_t group, const float *bias, float *y) {
    return run(8, x, rows, in, out, codes, scale, zero, group, bias, y);
}
