/* z for zeroth-order steps on CPU: Philox4x32-10 (Salmon et al., SC'11) on block counters, then Box-Muller.
 * Entry e of stream `key` depends on (key, e) alone. Group g of 64 entries comes from blocks 16g..16g+15:
 * words (2w, 2w+1) of block 16g+j give entries 64g+32w+j and 64g+32w+16+j (radius times cos and sin), so
 * 16 blocks fill four contiguous runs of 16 entries: one vector register each.
 * Built by dpft/philox.py with -ffast-math for the compile step only (the link step without it, so the
 * process's float mode is left alone); -fopenmp-simd lets the loop call the vector log and cos. */
#include <math.h>
#include <stdint.h>

#define LO32 0xFFFFFFFFull

/* Ten rounds on one block. The 32-bit words live in 64-bit lanes, so the multiplies need no widening. */
static inline __attribute__((always_inline)) void philox4x32_10(uint64_t *c0, uint64_t *c1, uint64_t *c2,
                                                                 uint64_t *c3, uint64_t k0, uint64_t k1) {
    for (int r = 0; r < 10; r++) {
        uint64_t p0 = 0xD2511F53ull * *c0, p1 = 0xCD9E8D57ull * *c2;
        uint64_t n0 = (p1 >> 32) ^ *c1 ^ k0, n2 = (p0 >> 32) ^ *c3 ^ k1;
        *c1 = p1 & LO32;
        *c3 = p0 & LO32;
        *c0 = n0;
        *c2 = n2;
        k0 = (k0 + 0x9E3779B9ull) & LO32;
        k1 = (k1 + 0xBB67AE85ull) & LO32;
    }
}

/* Groups g0..g0+groups-1, written to out (accumulate = 0) or added as out += alpha z. Not inlined: every
 * entry, inside a range or at its ends, comes from this one piece of vector code, so a value never depends
 * on where a chunk starts or stops. */
static __attribute__((noinline)) void groups_of(float *restrict out, uint64_t key, uint64_t g0, uint64_t groups,
                                                float alpha, int accumulate) {
    const uint64_t k0 = key & LO32, k1 = key >> 32;
    const float two_pi = 6.28318530717958647692f, half_pi = 1.57079632679489661923f;
    for (uint64_t g = g0; g < g0 + groups; g++, out += 64) {
#pragma omp simd
        for (int j = 0; j < 16; j++) {
            uint64_t block = 16 * g + (uint64_t)j;
            uint64_t c0 = block & LO32, c1 = block >> 32, c2 = 0, c3 = 0;
            philox4x32_10(&c0, &c1, &c2, &c3, k0, k1);
            /* u in (0, 1] (log's argument), v in [0, 1), 24 bits each as in float */
            float u0 = (float)(((uint32_t)c0 >> 8) + 1) * 0x1p-24f, v0 = (float)((uint32_t)c1 >> 8) * 0x1p-24f;
            float u1 = (float)(((uint32_t)c2 >> 8) + 1) * 0x1p-24f, v1 = (float)((uint32_t)c3 >> 8) * 0x1p-24f;
            float r0 = sqrtf(-2.0f * logf(u0)), r1 = sqrtf(-2.0f * logf(u1));
            /* sin t as cos(t - pi/2): sin and cos of one angle would become sincosf, which does not vectorize */
            float z0 = r0 * cosf(two_pi * v0), z1 = r0 * cosf(two_pi * v0 - half_pi);
            float z2 = r1 * cosf(two_pi * v1), z3 = r1 * cosf(two_pi * v1 - half_pi);
            if (accumulate) {
                out[j] += alpha * z0;
                out[16 + j] += alpha * z1;
                out[32 + j] += alpha * z2;
                out[48 + j] += alpha * z3;
            } else {
                out[j] = z0;
                out[16 + j] = z1;
                out[32 + j] = z2;
                out[48 + j] = z3;
            }
        }
    }
}

/* Entries [lo, hi) of group g, 0 <= lo <= hi <= 64, through a copy of the whole group. */
static void part_of(float *out, uint64_t key, uint64_t g, uint64_t lo, uint64_t hi, float alpha, int accumulate) {
    float z[64];
    if (lo == hi) return;
    groups_of(z, key, g, 1, 0.0f, 0);
    for (uint64_t i = lo; i < hi; i++) out[i - lo] = accumulate ? out[i - lo] + alpha * z[i] : z[i];
}

/* Entries [offset, offset + n) of stream `key`: written to out (accumulate = 0) or added as out += alpha z. */
void dpft_normal(float *restrict out, int64_t n, uint64_t key, uint64_t offset, float alpha, int accumulate) {
    uint64_t stop = offset + (uint64_t)n, first = (offset + 63) / 64, last = stop / 64;  /* whole: [first, last) */
    if (first > last) { /* inside one group */
        part_of(out, key, last, offset - 64 * last, stop - 64 * last, alpha, accumulate);
        return;
    }
    part_of(out, key, first - (offset % 64 != 0), offset % 64, offset % 64 ? 64 : 0, alpha, accumulate);
    groups_of(out + (64 * first - offset), key, first, last - first, alpha, accumulate);
    part_of(out + (64 * last - offset), key, last, 0, stop % 64, alpha, accumulate);
}

/* One block of the generator as published (four counter words, two key words), for known-answer tests. */
void dpft_philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]) {
    uint64_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
    philox4x32_10(&c0, &c1, &c2, &c3, key[0], key[1]);
    out[0] = (uint32_t)c0;
    out[1] = (uint32_t)c1;
    out[2] = (uint32_t)c2;
    out[3] = (uint32_t)c3;
}
