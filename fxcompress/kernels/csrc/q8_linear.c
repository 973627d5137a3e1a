/* Integer linear layers on 8-bit codes: uint8 activation codes in, int8 weight codes, int32 accumulator,
   the reference backend's requantization (quant/integer.py) out, bit for bit.

   acc[r, o] = sum_k (x[r, k] - x_zero) * w[o, k] + bias[o]        exact in int32: the lowering checks
                                                                   that sum |w| * max |x - x_zero| + |bias| < 2^31
   code      = clamp(((acc * M0[o] + 2^(shift[o] - 1)) >> shift[o]) + y_zero, low, high)   in int64,
                                                                   rounding half up as the reference does
   or, dequantizing, y = (float)((double)acc * scale[o]) (then max(y, 0) with relu), as the reference does.

   AVX2 without VNNI multiplies uint8 by int8 with vpmaddubsw, whose int16 pair sums saturate; here both
   operands are widened to int16 first (the input centered: x - x_zero lies in [-255, 255]) and multiplied
   with vpmaddwd, whose pair sums are int32: never saturates, so any 8-bit grid runs exactly. The weight
   stays int8 in memory (half the bytes of int16 at batch 1, where reading the weight is the cost) and is
   sign-extended in a register, once per tile of rows. Rows are widened once per call into a scratch
   buffer; each weight tile of 4 output channels is read once per call and applied to every row tile
   (4 rows, then 2, then 1), so at batch 32 the weight comes from memory once and the rows from cache.
   Weight rows are padded with zeros to a multiple of 16 columns (`stride`), the rows' scratch too.

   Written with gcc's generic vector types, with the AVX2 widening and multiply by name; without AVX2
   the same loops run on scalars. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#define STEP 16   /* columns per vector step */
#define COLS 4    /* output channels per weight tile */

/* Rows of uint8 codes minus the zero-point, as int16 [rows, stride], zero-padded past `in`. */
static void widen_rows(const uint8_t *x, int64_t rows, int64_t in, int64_t stride, int32_t zero, int16_t *out) {
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *src = x + r * in;
        int16_t *dst = out + r * stride;
        int64_t k = 0;
#ifdef __AVX2__
        const __m256i z = _mm256_set1_epi16((int16_t)zero);
        for (; k + STEP <= in; k += STEP) {
            __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(src + k)));
            _mm256_storeu_si256((__m256i *)(dst + k), _mm256_sub_epi16(v, z));
        }
#endif
        for (; k < in; k++) dst[k] = (int16_t)((int32_t)src[k] - zero);
        for (; k < stride; k++) dst[k] = 0;
    }
}

#ifdef __AVX2__
static inline int32_t hsum(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* acc[r * ldacc + c] = sum_k xs[r][k] * w[c][k] for R rows and C (<= COLS) channels. */
static inline __attribute__((always_inline)) void tile(const int R, const int C, const int16_t *xs, int64_t stride,
                                                       const int8_t *w, int32_t acc[4][COLS]) {
    __m256i sums[4][COLS];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) sums[r][c] = _mm256_setzero_si256();
    for (int64_t k = 0; k < stride; k += STEP) {
        __m256i wv[COLS];
        for (int c = 0; c < C; c++)
            wv[c] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + c * stride + k)));
        for (int r = 0; r < R; r++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xs + r * stride + k));
            for (int c = 0; c < C; c++) sums[r][c] = _mm256_add_epi32(sums[r][c], _mm256_madd_epi16(xv, wv[c]));
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = hsum(sums[r][c]);
}

/* As `tile` on raw uint8 codes and int8 weights, 32 columns a step with vpmaddubsw: its int16 pair sums are
   exact only where no two neighbouring products pass 32767, which the caller checked for the layer. */
static inline __attribute__((always_inline)) void tile_u8(const int R, const int C, const uint8_t *xs, int64_t stride,
                                                          const int8_t *w, int32_t acc[4][COLS]) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i sums[4][COLS];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) sums[r][c] = _mm256_setzero_si256();
    for (int64_t k = 0; k < stride; k += 2 * STEP) {
        __m256i wv[COLS];
        for (int c = 0; c < C; c++) wv[c] = _mm256_loadu_si256((const __m256i *)(w + c * stride + k));
        for (int r = 0; r < R; r++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xs + r * stride + k));
            for (int c = 0; c < C; c++)
                sums[r][c] = _mm256_add_epi32(sums[r][c], _mm256_madd_epi16(_mm256_maddubs_epi16(xv, wv[c]), ones));
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = hsum(sums[r][c]);
}
#else
static inline void tile_u8(const int R, const int C, const uint8_t *xs, int64_t stride, const int8_t *w,
                           int32_t acc[4][COLS]) {
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            int32_t s = 0;
            for (int64_t k = 0; k < stride; k++) s += (int32_t)xs[r * stride + k] * w[c * stride + k];
            acc[r][c] = s;
        }
}

static inline void tile(const int R, const int C, const int16_t *xs, int64_t stride, const int8_t *w,
                        int32_t acc[4][COLS]) {
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            int32_t s = 0;
            for (int64_t k = 0; k < stride; k++) s += (int32_t)xs[r * stride + k] * w[c * stride + k];
            acc[r][c] = s;
        }
}
#endif

/* One layer: its weight, the constants of its output, and its sizes (filled once by the caller). */
typedef struct {
    const int8_t *w;           /* [out, stride], zero past `in` */
    const int32_t *bias;       /* [out] at the accumulator's scale */
    const int64_t *mult;       /* [out] M0, requantizing; NULL: dequantize with `scale` */
    const int64_t *shift;      /* [out], 1 <= shift <= 62 */
    const double *scale;       /* [out] dequantizing */
    int64_t in, out, stride;   /* stride % 16 == 0 */
    int32_t x_zero;            /* the input's zero-point */
    int32_t y_zero, low, high; /* requantizing: output zero-point and code range */
    int32_t relu;              /* dequantizing: clamp at 0 */
    int32_t raw;               /* 1: raw uint8 codes times int8 in int16 pairs (vpmaddubsw; `bias` holds
                                  bias - x_zero * sum_k w, stride % 32 == 0); 0: centered int16 (vpmaddwd) */
} Layer;

static inline void emit(const Layer *o, int64_t ch, int32_t acc, uint8_t *codes, float *values, int64_t at) {
    const int64_t a = (int64_t)acc + o->bias[ch];
    if (o->mult) {
        const int64_t s = o->shift[ch];
        int64_t q = ((a * o->mult[ch] + ((int64_t)1 << (s - 1))) >> s) + o->y_zero;
        q = q < o->low ? o->low : q > o->high ? o->high : q;
        codes[at] = (uint8_t)q;
    } else {
        float v = (float)((double)a * o->scale[ch]);
        values[at] = o->relu && v < 0.0f ? 0.0f : v;
    }
}

/* R rows of the layer, every output channel: a weight tile of COLS channels at a time. */
static inline __attribute__((always_inline)) void rows_tile(const int R, const void *xs, const Layer *L,
                                                            uint8_t *codes, float *values) {
    int32_t acc[4][COLS];
    const int64_t stride = L->stride, out = L->out;
    int64_t ch = 0;
    for (; ch + COLS <= out; ch += COLS) {
        if (L->raw) tile_u8(R, COLS, (const uint8_t *)xs, stride, L->w + ch * stride, acc);
        else tile(R, COLS, (const int16_t *)xs, stride, L->w + ch * stride, acc);
        for (int r = 0; r < R; r++)
            for (int c = 0; c < COLS; c++) emit(L, ch + c, acc[r][c], codes, values, r * out + ch + c);
    }
    for (; ch < out; ch++) {
        if (L->raw) tile_u8(R, 1, (const uint8_t *)xs, stride, L->w + ch * stride, acc);
        else tile(R, 1, (const int16_t *)xs, stride, L->w + ch * stride, acc);
        for (int r = 0; r < R; r++) emit(L, ch, acc[r][0], codes, values, r * out + ch);
    }
}

/* Rows of raw uint8 codes copied to [rows, stride], zero-padded past `in` (zero codes times zero weights). */
static void pad_rows(const uint8_t *x, int64_t rows, int64_t in, int64_t stride, uint8_t *out) {
    for (int64_t r = 0; r < rows; r++) {
        memcpy(out + r * stride, x + r * in, (size_t)in);
        memset(out + r * stride + in, 0, (size_t)(stride - in));
    }
}

static int run(const uint8_t *x, int64_t rows, const Layer *L, uint8_t *codes, float *values) {
    const int64_t stride = L->stride, out = L->out, width = L->raw ? 1 : 2;  /* bytes per scratch element */
    char *xs = malloc((size_t)(width * rows * stride) + 32);
    if (!xs) return -1;
    if (L->raw) pad_rows(x, rows, L->in, stride, (uint8_t *)xs);
    else widen_rows(x, rows, L->in, stride, L->x_zero, (int16_t *)xs);
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4)
        rows_tile(4, xs + width * r * stride, L, codes ? codes + r * out : 0, values ? values + r * out : 0);
    for (; r + 2 <= rows; r += 2)
        rows_tile(2, xs + width * r * stride, L, codes ? codes + r * out : 0, values ? values + r * out : 0);
    for (; r < rows; r++)
        rows_tile(1, xs + width * r * stride, L, codes ? codes + r * out : 0, values ? values + r * out : 0);
    free(xs);
    return 0;
}

/* x: uint8 [rows, L->in]; y: uint8 codes [rows, L->out] where L->mult is set, else float32 values.
   Returns 0, or -1 where the rows' scratch cannot be allocated (nothing is written). */
int q8_linear(const uint8_t *x, int64_t rows, void *y, const Layer *L) {
    return L->mult ? run(x, rows, L, (uint8_t *)y, NULL) : run(x, rows, L, NULL, (float *)y);
}

/* The float -> codes boundary: y = clamp(round_half_even(x / scale) + zero, 0, qmax) as uint8, x float32 [n].
   x / scale in float32 (torch divides a float32 tensor by a Python float in float32), as QuantizeToCodes. */
static inline uint8_t code(float x, float scale, int32_t zero, int32_t qmax) {
    float q = nearbyintf(x / scale) + (float)zero;
    q = q > 0.0f ? q : 0.0f; /* NaN lands on 0 rather than on an undefined conversion */
    q = q > (float)qmax ? (float)qmax : q;
    return (uint8_t)q;
}

void q8_quantize(const float *x, int64_t n, float scale, int32_t zero, int32_t qmax, uint8_t *y) {
    for (int64_t i = 0; i < n; i++) y[i] = code(x[i], scale, zero, qmax);
}

/* q8_quantize of an NCHW float32 tensor [batch, channels, pixels] writing its codes channels-last
   [batch, pixels, channels], which oneDNN's convolution reads without reordering its input first. */
void q8_quantize_nhwc(const float *x, int64_t batch, int64_t channels, int64_t pixels, float scale, int32_t zero,
                      int32_t qmax, uint8_t *y) {
    for (int64_t n = 0; n < batch; n++) {
        for (int64_t c = 0; c < channels; c++) {
            const float *src = x + (n * channels + c) * pixels;
            uint8_t *dst = y + n * channels * pixels + c;
            for (int64_t i = 0; i < pixels; i++) dst[i * channels] = code(src[i], scale, zero, qmax);
        }
    }
}

/* The layer on float32 values x [rows, L->in]: their codes on the input grid (`scale`, L->x_zero, `qmax`,
   as q8_quantize) first, then q8_linear: a model's float input and its first layer in one call. */
int q8_linear_float(const float *x, int64_t rows, void *y, const Layer *L, float scale, int32_t qmax) {
    uint8_t *codes = malloc((size_t)(rows * L->in) + 32);
    if (!codes) return -1;
    q8_quantize(x, rows * L->in, scale, L->x_zero, qmax, codes);
    const int status = q8_linear(codes, rows, y, L);
    free(codes);
    return status;
}

/* A residual add of two uint8 code tensors onto an output grid, in one pass (NativeAdd's torch ops made six):
   y = clamp(round(a * ka + b * kb + offset), low, high), in float32 with the products and sums in torch's
   order and no contraction (-std=c11), rounding half to even as torch.round. */
void q8_add(const uint8_t *a, const uint8_t *b, int64_t n, float ka, float kb, float offset, int32_t low,
            int32_t high, uint8_t *y) {
    const float lo = (float)low, hi = (float)high;
    int64_t i = 0;
#ifdef __AVX512F__
    /* Sixteen at a time, the same arithmetic as the AVX2 loop below; vpmovusdb narrows with unsigned saturation
       in one instruction (the values are clamped to [low, high] already). */
    const __m512 ka16 = _mm512_set1_ps(ka), kb16 = _mm512_set1_ps(kb), offset16 = _mm512_set1_ps(offset);
    const __m512 lo16 = _mm512_set1_ps(lo), hi16 = _mm512_set1_ps(hi);
    for (; i + 16 <= n; i += 16) {
        const __m512 fa = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(a + i))));
        const __m512 fb = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b + i))));
        __m512 v = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(fa, ka16), _mm512_mul_ps(fb, kb16)), offset16);
        v = _mm512_min_ps(_mm512_max_ps(v, lo16), hi16); /* a NaN lands on `low`, as below */
        _mm_storeu_si128((__m128i *)(y + i), _mm512_cvtusepi32_epi8(_mm512_cvtps_epi32(v)));
    }
#endif
#ifdef __AVX2__
    /* Eight at a time, clamped before rounding (the bounds are integers, so the same codes) and rounded by the
       conversion (half to even in the default rounding mode): fewer instructions per code than gcc's own
       vectorization of the loop below, which rounds, clamps and narrows in separate steps. */
    const __m256 vka = _mm256_set1_ps(ka), vkb = _mm256_set1_ps(kb), voffset = _mm256_set1_ps(offset);
    const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
    for (; i + 8 <= n; i += 8) {
        const __m256 fa = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(a + i))));
        const __m256 fb = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b + i))));
        __m256 v = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(fa, vka), _mm256_mul_ps(fb, vkb)), voffset);
        v = _mm256_min_ps(_mm256_max_ps(v, vlo), vhi); /* a NaN lands on `low`, as below */
        const __m256i q = _mm256_cvtps_epi32(v);
        const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
        _mm_storel_epi64((__m128i *)(y + i), _mm_packus_epi16(words, words));
    }
#endif
    for (; i < n; i++) {
        float v = nearbyintf(((float)a[i] * ka + (float)b[i] * kb) + offset);
        v = v > lo ? v : lo;
        v = v < hi ? v : hi;
        y[i] = (uint8_t)v;
    }
}

/* The same add dequantizing, in one pass: y = (a * ka + b * kb) + offset as float32 values, at least 0 with
   `relu` (NativeAdd's torch ops made four passes over the tensor: resnet18's last add 21.5 against 9.3 us). */
void q8_add_values(const uint8_t *a, const uint8_t *b, int64_t n, float ka, float kb, float offset, int32_t relu,
                   float *y) {
    for (int64_t i = 0; i < n; i++) {
        const float v = ((float)a[i] * ka + (float)b[i] * kb) + offset;
        y[i] = relu && !(v > 0.0f) ? 0.0f : v;
    }
}
