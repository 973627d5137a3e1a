/* Sparse fully-connected products over Deep Compression's storage (Han et al. 2016, section 2):
 * each row of the weight [out, in] is a run of entries; an entry holds the count of zeros skipped
 * before it (`gap`, uint8 or uint16: a short relative index) and its value, either a float32 or a
 * uint8 index into a float32 codebook shared by the layer. A gap longer than the index type holds is
 * bridged by filler entries of value zero, as in the paper. `rowptr[r] .. rowptr[r + 1]` are row r's
 * entries (fillers included).
 *
 *   y[m, r] = bias[r] + sum over row r's entries e of value(e) * x[m, column(e)]
 *
 * The weight is read once per call (batch 1) or once per tile of 8 inputs: with 1-2 bytes of index
 * and 1 byte of code per weight instead of 4 + 4 (CSR), the bytes streamed from memory shrink about
 * 3-4x, which is what bounds a product at batch 1. Single-threaded by design: the caller decides
 * the threads. Indices are trusted here: the Python side checks them before any call.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <math.h>

/* a += v * x: one fused multiply-add where the CPU has one (fmaf is then inlined; elsewhere it would be
 * a library call), as gcc does not contract a + v * x under -std=c11 */
#ifdef __FMA__
#define MAC(a, v, x) ((a) = fmaf((v), (x), (a)))
#else
#define MAC(a, v, x) ((a) += (v) * (x))
#endif

#define TILE 8 /* inputs per pass over the weight in the batched product: one 256-bit vector */

/* Batch 1, eight entries a step. The columns come from a running sum of the gaps, but only one add
 * per step (col += the step's total) is carried from step to step: the eight partial sums hang off it
 * and overlap with the next step's. Eight accumulators keep enough fused multiply-adds in flight to
 * cover their latency. (An add chain of one per entry, as the plain loop has, bounded it at about two
 * cycles an entry.) */
#define MATVEC(NAME, GAP_T, VALUE)                                                                    \
    void NAME(const int32_t *rowptr, const GAP_T *gap, const float *values, const uint8_t *codes,    \
              const float *codebook, const float *bias, const float *x, float *y, int64_t rows) {      \
        (void)values; (void)codes; (void)codebook;                                                     \
        for (int64_t r = 0; r < rows; r++) {                                                           \
            int64_t i = rowptr[r], end = rowptr[r + 1];                                                \
            int64_t col = -1;                                                                          \
            float a[8] = {0.f};                                                                        \
            for (; i + 8 <= end; i += 8) {                                                             \
                const GAP_T *g = gap + i;                                                              \
                int64_t s0 = (int64_t)g[0] + 1, s1 = s0 + g[1] + 1, s2 = s1 + g[2] + 1;               \
                int64_t s3 = s2 + g[3] + 1, s4 = s3 + g[4] + 1, s5 = s4 + g[5] + 1;                    \
                int64_t s6 = s5 + g[6] + 1, s7 = s6 + g[7] + 1;                                        \
                MAC(a[0], VALUE(i), x[col + s0]);                                                             \
                MAC(a[1], VALUE(i + 1), x[col + s1]);                                                         \
                MAC(a[2], VALUE(i + 2), x[col + s2]);                                                         \
                MAC(a[3], VALUE(i + 3), x[col + s3]);                                                         \
                MAC(a[4], VALUE(i + 4), x[col + s4]);                                                         \
                MAC(a[5], VALUE(i + 5), x[col + s5]);                                                         \
                MAC(a[6], VALUE(i + 6), x[col + s6]);                                                         \
                MAC(a[7], VALUE(i + 7), x[col + s7]);                                                         \
                col += s7;                                                                             \
            }                                                                                          \
            for (; i < end; i++) {                                                                     \
                col += 1 + gap[i];                                                                     \
                MAC(a[0], VALUE(i), x[col]);                                                             \
            }                                                                                          \
            float sum = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));              \
            y[r] = (bias ? bias[r] : 0.f) + sum;                                                       \
        }                                                                                              \
    }

/* Batch M: `xt` is the input transposed and padded to [in, stride] (stride a multiple of TILE), so
 * the TILE inputs an entry multiplies are one contiguous vector: no gather, and gcc vectorises the
 * fixed-length inner loops into one fused multiply-add. y is [M, rows]. */
#define MATMUL(NAME, GAP_T, VALUE)                                                                     \
    void NAME(const int32_t *rowptr, const GAP_T *gap, const float *values, const uint8_t *codes,    \
              const float *codebook, const float *bias, const float *xt, float *y, int64_t rows,       \
              int64_t batch, int64_t stride) {                                                         \
        (void)values; (void)codes; (void)codebook;                                                     \
        for (int64_t t = 0; t < batch; t += TILE) {                                                    \
            int64_t width = batch - t < TILE ? batch - t : TILE;                                       \
            for (int64_t r = 0; r < rows; r++) {                                                       \
                float acc[TILE] = {0.f};                                                               \
                int64_t col = -1;                                                                      \
                for (int64_t i = rowptr[r]; i < rowptr[r + 1]; i++) {                                  \
                    col += 1 + gap[i];                                                                 \
                    const float v = VALUE(i), *xr = xt + col * stride + t;                             \
                    for (int m = 0; m < TILE; m++) MAC(acc[m], v, xr[m]);                                \
                }                                                                                      \
                const float b = bias ? bias[r] : 0.f;                                                  \
                for (int64_t m = 0; m < width; m++) y[(t + m) * rows + r] = b + acc[m];                \
            }                                                                                          \
        }                                                                                              \
    }

#define FLOAT_VALUE(i) values[i]
#define CODE_VALUE(i) codebook[codes[i]]

MATVEC(matvec_u8_f32, uint8_t, FLOAT_VALUE)
MATVEC(matvec_u8_code, uint8_t, CODE_VALUE)
MATVEC(matvec_u16_f32, uint16_t, FLOAT_VALUE)
MATVEC(matvec_u16_code, uint16_t, CODE_VALUE)
MATMUL(matmul_u8_f32, uint8_t, FLOAT_VALUE)
MATMUL(matmul_u8_code, uint8_t, CODE_VALUE)
MATMUL(matmul_u16_f32, uint16_t, FLOAT_VALUE)
MATMUL(matmul_u16_code, uint16_t, CODE_VALUE)

/* The transposed storage (c_relative_csc): `rowptr` delimits each *input's* entries and the gaps
 * count skipped outputs, so the product streams the input once and scatters into the output, which
 * stays in the first-level cache where a long input (VGG-16's 25088) does not. An input of zero
 * skips its whole run: the zeros a ReLU leaves cost nothing (the weights are finite: checked when
 * the form is built, so 0 * w adds nothing). y is zeroed (or set to the bias) first. */
#define SCATTER(NAME, GAP_T, VALUE)                                                                    \
    void NAME(const int32_t *rowptr, const GAP_T *gap, const float *values, const uint8_t *codes,    \
              const float *codebook, const float *bias, const float *x, float *y, int64_t inputs,      \
              int64_t outputs) {                                                                       \
        (void)values; (void)codes; (void)codebook;                                                     \
        for (int64_t r = 0; r < outputs; r++) y[r] = bias ? bias[r] : 0.f;                             \
        for (int64_t j = 0; j < inputs; j++) {                                                         \
            const float xj = x[j];                                                                     \
            if (xj == 0.f) continue;                                                                   \
            int64_t row = -1;                                                                          \
            for (int64_t i = rowptr[j]; i < rowptr[j + 1]; i++) {                                      \
                row += 1 + gap[i];                                                                     \
                MAC(y[row], VALUE(i), xj);                                                             \
            }                                                                                          \
        }                                                                                              \
    }

/* Batch M, transposed storage: xt is [inputs, stride] as for MATMUL; yt is [outputs, stride] and
 * holds the result transposed (the caller copies it out). */
#define SCATTER_BATCH(NAME, GAP_T, VALUE)                                                              \
    void NAME(const int32_t *rowptr, const GAP_T *gap, const float *values, const uint8_t *codes,    \
              const float *codebook, const float *bias, const float *xt, float *yt, int64_t inputs,    \
              int64_t outputs, int64_t stride) {                                                       \
        (void)values; (void)codes; (void)codebook;                                                     \
        for (int64_t r = 0; r < outputs; r++)                                                          \
            for (int64_t m = 0; m < stride; m++) yt[r * stride + m] = bias ? bias[r] : 0.f;            \
        for (int64_t t = 0; t < stride; t += TILE) {                                                   \
            for (int64_t j = 0; j < inputs; j++) {                                                     \
                const float *xr = xt + j * stride + t;                                                 \
                int nonzero = 0;                                                                       \
                for (int m = 0; m < TILE; m++) nonzero |= xr[m] != 0.f;                                \
                if (!nonzero) continue;                                                                \
                int64_t row = -1;                                                                      \
                for (int64_t i = rowptr[j]; i < rowptr[j + 1]; i++) {                                  \
                    row += 1 + gap[i];                                                                 \
                    const float v = VALUE(i);                                                          \
                    float *yr = yt + row * stride + t;                                                 \
                    for (int m = 0; m < TILE; m++) MAC(yr[m], v, xr[m]);                               \
                }                                                                                      \
            }                                                                                          \
        }                                                                                              \
    }

SCATTER(scatter_u8_f32, uint8_t, FLOAT_VALUE)
SCATTER(scatter_u8_code, uint8_t, CODE_VALUE)
SCATTER(scatter_u16_f32, uint16_t, FLOAT_VALUE)
SCATTER(scatter_u16_code, uint16_t, CODE_VALUE)
SCATTER_BATCH(scatterb_u8_f32, uint8_t, FLOAT_VALUE)
SCATTER_BATCH(scatterb_u8_code, uint8_t, CODE_VALUE)
SCATTER_BATCH(scatterb_u16_f32, uint16_t, FLOAT_VALUE)
SCATTER_BATCH(scatterb_u16_code, uint16_t, CODE_VALUE)
