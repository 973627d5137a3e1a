/* The interleaved rANS decoder of fxcompress/encoded/rans.py, one lane-step at a time in C.
 *
 * numpy runs a step across all lanes in about ten array operations, so a stream of few lanes spends
 * its time in Python (LeNet-5's weights: thousands of steps of 50 lanes). This loop computes exactly
 * what the numpy loop computes, in the same uint32 arithmetic (wrapping where a hostile stream makes
 * it wrap) and reading renormalisation words in the same order: each step decodes every lane, then
 * refills the lanes that fell below LOW, lowest lane first. The caller checks that the slot tables
 * hold 2^scale entries; the words are bounds-checked here: the decoder stops at the first word the
 * stream lacks.
 */
#include <stdint.h>

#define LOW (1u << 16)

/* 0 on success; 1 where the stream ends early (`x` and `out` then hold partial results) */
int rans_decode(const uint32_t *words, int64_t n_words, uint32_t *x, int64_t lanes, int64_t steps, int scale,
                const int32_t *sym_of_slot, const uint32_t *freq_of_slot, const uint32_t *bias_of_slot,
                int32_t *out) {
    const uint32_t mask = (1u << scale) - 1u;
    int64_t read = 0;
    for (int64_t step = 0; step < steps; step++) {
        int32_t *row = out + step * lanes;
        for (int64_t lane = 0; lane < lanes; lane++) {
            uint32_t state = x[lane], slot = state & mask;
            row[lane] = sym_of_slot[slot];
            x[lane] = freq_of_slot[slot] * (state >> scale) + bias_of_slot[slot];
        }
        for (int64_t lane = 0; lane < lanes; lane++) {
            if (x[lane] < LOW) {
                if (read >= n_words) return 1;
                x[lane] = (x[lane] << 16) | words[read++];
            }
        }
    }
    return 0;
}
