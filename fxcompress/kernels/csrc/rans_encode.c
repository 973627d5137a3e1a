/* The interleaved rANS encoder of fxcompress/encoded/rans.py, one lane-step at a time in C.
 *
 * numpy advances every lane of a step in about ten array operations, so a stream of few lanes (most
 * layers: 16 to 60 lanes of up to 8,192 steps) spends its time in Python. This loop writes the words
 * and final states the numpy loop writes: symbol i goes to lane i % lanes, the tail of the last step is
 * padded with `pad`, steps run backwards, and a lane whose state reaches f * 2^(32 - scale) first emits
 * its low 16 bits. The words go out in decoding order (steps ascending, lanes ascending within a step),
 * so they are written back to front, lanes descending, from the end of `words`.
 *
 * The caller checks that the frequencies sum to 2^scale with scale <= 16: then every state stays in
 * [2^16, 2^32) and each step emits at most one word per lane, so `words` needs steps * lanes entries.
 * Every symbol is checked here: one outside the table or of frequency 0 stops the coder.
 */
#include <stdint.h>
#include <stdlib.h>

#define LOW (1u << 16)

/* symbol i of an array of the caller's integer type (kind: 0 int64, 1 int32, 2 uint16, 3 uint8), so a
 * stream is never copied into a wider type first */
static inline int64_t symbol_at(const void *symbols, int kind, int64_t i) {
    switch (kind) {
        case 0: return ((const int64_t *)symbols)[i];
        case 1: return ((const int32_t *)symbols)[i];
        case 2: return ((const uint16_t *)symbols)[i];
        default: return ((const uint8_t *)symbols)[i];
    }
}

/* 0 on success, `*used` words at the end of `words`; 1 where symbol `*used` cannot be coded; 2 where
 * memory ran out */
int rans_encode(const void *symbols, int kind, int64_t count, const uint32_t *freq, int64_t alphabet, int scale,
                int64_t pad, int64_t lanes, uint16_t *words, int64_t capacity, uint32_t *states, int64_t *used) {
    uint32_t *cum = malloc((size_t)(alphabet > 0 ? alphabet : 1) * sizeof(uint32_t));
    if (cum == NULL) return 2;
    uint32_t total = 0;
    for (int64_t s = 0; s < alphabet; s++) {
        cum[s] = total;
        total += freq[s];
    }
    const int64_t steps = (count + lanes - 1) / lanes;
    uint16_t *w = words + capacity;
    for (int64_t lane = 0; lane < lanes; lane++) states[lane] = LOW;
    for (int64_t step = steps - 1; step >= 0; step--) {
        for (int64_t lane = lanes - 1; lane >= 0; lane--) {
            const int64_t i = step * lanes + lane;
            const int64_t s = i < count ? symbol_at(symbols, kind, i) : pad;
            if (s < 0 || s >= alphabet || freq[s] == 0) {
                free(cum);
                *used = i;
                return 1;
            }
            const uint32_t f = freq[s];
            uint32_t x = states[lane];
            if ((uint64_t)x >= ((uint64_t)f << (32 - scale))) {
                *--w = (uint16_t)(x & 0xFFFFu);
                x >>= 16;
            }
            states[lane] = ((x / f) << scale) + (x % f) + cum[s];
        }
    }
    free(cum);
    *used = (words + capacity) - w;
    return 0;
}
