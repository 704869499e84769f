/* An unmodified memory hog for the swap benchmarks and lab tests (docs/preswap-device.md).
 *
 * swap_hog MIB OPS SEED: maps MIB MiB of anonymous memory, writes every page, then OPS random page
 * operations (half read-and-verify, half rewrite with a new generation), then verifies every page.
 * A page's content is derived from (page, generation, seed): its first 1 KiB pseudo-random, the rest
 * one repeated word, so it compresses about 3:1 as anonymous memory often does. Prints one JSON line;
 * exit status 1 if any page did not verify. Nothing in it knows about tmem.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>

#define PAGE 4096
#define WORDS (PAGE / 8)
#define RANDOM_WORDS 128

static uint64_t mix(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static void fill(uint64_t *p, uint64_t page, uint32_t gen, uint64_t seed) {
    uint64_t s = mix(page ^ ((uint64_t)gen << 40) ^ seed);
    for (int i = 0; i < RANDOM_WORDS; i++) {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        p[i] = s;
    }
    for (int i = RANDOM_WORDS; i < WORDS; i++) p[i] = s;
}

static int check(const uint64_t *p, uint64_t page, uint32_t gen, uint64_t seed) {
    uint64_t want[WORDS];
    fill(want, page, gen, seed);
    for (int i = 0; i < WORDS; i++)
        if (p[i] != want[i]) return 0;
    return 1;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: swap_hog MIB OPS SEED\n");
        return 2;
    }
    uint64_t pages = strtoull(argv[1], NULL, 10) * 256;
    uint64_t ops = strtoull(argv[2], NULL, 10);
    uint64_t seed = strtoull(argv[3], NULL, 10);
    uint8_t *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint32_t *gen = calloc(pages, sizeof *gen);
    if (mem == MAP_FAILED || gen == NULL) {
        perror("swap_hog: allocation");
        return 2;
    }
    double t0 = now();
    for (uint64_t i = 0; i < pages; i++) fill((uint64_t *)(mem + i * PAGE), i, 0, seed);
    double t_fill = now() - t0;
    uint64_t bad = 0, r = mix(seed + 1);
    for (uint64_t k = 0; k < ops; k++) {
        r = mix(r);
        uint64_t i = r % pages;
        uint64_t *p = (uint64_t *)(mem + i * PAGE);
        if (r >> 63) {
            bad += !check(p, i, gen[i], seed);
        } else {
            gen[i]++;
            fill(p, i, gen[i], seed);
        }
    }
    for (uint64_t i = 0; i < pages; i++) bad += !check((uint64_t *)(mem + i * PAGE), i, gen[i], seed);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("{\"pages\": %llu, \"ops\": %llu, \"bad_pages\": %llu, \"fill_seconds\": %.3f, "
           "\"seconds\": %.3f, \"major_faults\": %ld, \"minor_faults\": %ld}\n",
           (unsigned long long)pages, (unsigned long long)ops, (unsigned long long)bad, t_fill,
           now() - t0, ru.ru_majflt, ru.ru_minflt);
    return bad ? 1 : 0;
}
