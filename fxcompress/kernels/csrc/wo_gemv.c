/* Weight-only quantized linear layers for a few input rows (decoding: one row per token).

   y[r, o] = sum_g scale[o, g] * sum_{k in group g} (u[o, k] - zero[o, g]) * x[r, k] + bias[o]

   u are unsigned integer codes, either one per byte (bits = 8) or two per byte (bits = 4) in blocks of
   32 columns: byte j of a block holds column j in its low nibble and column j + 16 in its high one, so
   one 16-byte load unpacks with a mask and a shift into 32 consecutive columns (no interleaving).
   Groups are multiples of 32 columns.

   Batch 1 is memory-bound: the codes are read once per call, so 4-bit codes read an eighth of the
   bytes of float32 weights. Each block of 32 codes is unpacked once to float (u - z is exact) and
   used for every row of a tile of up to 4 rows; each row keeps float32 lane accumulators per group
   (independent lanes, so the loops vectorise without reassociating a reduction), scaled once per
   group into lane totals, summed across lanes at the end of the output channel. Written with gcc's
   generic vector types (also clang's), which -O3 -march=native maps onto the machine's vector unit:
   gcc 12 left the nibble unpacking scalar when written as plain byte loops. */
#include <stdint.h>
#include <string.h>

#define BLOCK 32

typedef float v8f __attribute__((vector_size(32)));
typedef uint8_t v16b __attribute__((vector_size(16)));
typedef uint8_t v8b __attribute__((vector_size(8)));
typedef int32_t v8i __attribute__((vector_size(32)));

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

/* 32 codes as four vectors of floats minus the zero-point: exact (small integers). gcc 12 turns the
   generic byte -> float conversion into one extract and one convert per byte, so AVX2 machines get
   the zero extension (vpmovzxbd) and conversion instructions by name. */
static inline __attribute__((always_inline)) void unpack(const int bits, const uint8_t *restrict p, float z,
                                                          v8f w[4]) {
#ifdef __AVX2__
    __m128i part[4];
    if (bits == 4) {
        const __m128i b = _mm_loadu_si128((const __m128i *)p), low = _mm_set1_epi8(15);
        const __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
        part[0] = lo, part[1] = _mm_srli_si128(lo, 8), part[2] = hi, part[3] = _mm_srli_si128(hi, 8);
    } else {
        for (int i = 0; i < 4; i++) part[i] = _mm_loadl_epi64((const __m128i *)(p + 8 * i));
    }
    for (int i = 0; i < 4; i++) w[i] = (v8f)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part[i])) - z;
#else
    uint8_t u[BLOCK];
    if (bits == 4) {
        v16b b;
        memcpy(&b, p, sizeof b);
        const v16b lo = b & 15, hi = b >> 4;
        memcpy(u, &lo, sizeof lo);
        memcpy(u + 16, &hi, sizeof hi);
    } else {
        memcpy(u, p, BLOCK);
    }
    for (int i = 0; i < 4; i++) {
        v8b part;
        memcpy(&part, u + 8 * i, sizeof part);
        w[i] = __builtin_convertvector(__builtin_convertvector(part, v8i), v8f) - z;
    }
#endif
}

static inline float lanes_sum(v8f v) {
    float s = 0.0f;
    for (int j = 0; j < 8; j++) s += v[j];
    return s;
}

/* R rows (1, 2 or 4: compile-time constants after inlining) of the product, every output channel.
   Each row has 4 / R vector accumulators, so every tile keeps four independent chains in flight. */
static inline __attribute__((always_inline)) void tile(
    const int R, const int bits, const float *restrict x, int64_t in, int64_t out, const uint8_t *restrict codes,
    const float *restrict scale, const uint8_t *restrict zero, int64_t group, const float *restrict bias,
    float *restrict y) {
    const int CHAINS = 4 / R;
    const int64_t row_bytes = in * bits / 8, groups = in / group, block_bytes = BLOCK * bits / 8;
    for (int64_t o = 0; o < out; o++) {
        const uint8_t *c = codes + o * row_bytes;
        v8f total[4][4] = {{{0}}};
        for (int64_t g = 0; g < groups; g++) {
            v8f acc[4][4] = {{{0}}};
            const float z = (float)zero[o * groups + g];
            for (int64_t k = g * group; k < (g + 1) * group; k += BLOCK, c += block_bytes) {
                v8f w[4];
                unpack(bits, c, z, w);
                for (int r = 0; r < R; r++)
                    for (int i = 0; i < 4; i++)
                        acc[r][i % CHAINS] = MADD(w[i], load8(x + r * in + k + 8 * i), acc[r][i % CHAINS]);
            }
            const v8f s = (v8f){0} + scale[o * groups + g];
            for (int r = 0; r < R; r++)
                for (int i = 0; i < CHAINS; i++) total[r][i] = MADD(s, acc[r][i], total[r][i]);
        }
        for (int r = 0; r < R; r++) {
            v8f sum = total[r][0];
            for (int i = 1; i < CHAINS; i++) sum += total[r][i];
            y[r * out + o] = lanes_sum(sum) + (bias ? bias[o] : 0.0f);
        }
    }
}

static void run(const int bits, const float *x, int64_t rows, int64_t in, int64_t out, const uint8_t *codes,
                const float *scale, const uint8_t *zero, int64_t group, const float *bias, float *y) {
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) tile(4, bits, x + r * in, in, out, codes, scale, zero, group, bias, y + r * out);
    for (; r + 2 <= rows; r += 2) tile(2, bits, x + r * in, in, out, codes, scale, zero, group, bias, y + r * out);
    for (; r < rows; r++) tile(1, bits, x + r * in, in, out, codes, scale, zero, group, bias, y + r * out);
}

/* x: float32 [rows, in]; codes: uint8 [out, in / 2] in blocks of 32 columns; scale: float32 [out, in / group];
   zero: uint8 [out, in / group]; bias: float32 [out] or NULL; y: float32 [rows, out]. group % 32 == 0. */
void wo_int4(const float *x, int64_t rows, int64_t in, int64_t out, const uint8_t *codes, const float *scale,
             const uint8_t *zero, int64_t group, const float *bias, float *y) {
    run(4, x, rows, in, out, codes, scale, zero, group, bias, y);
}

/* As wo_int4 with codes uint8 [out, in], one per byte. */
void wo_int8(const float *x, int64_t rows, int64_t in, int64_t out, const uint8_t *codes, const float *scale,
             const uint8_t *zero, int64_t group, const float *bias, float *y) {
    run(8, x, rows, in, out, codes, scale, zero, group, bias, y);
}
