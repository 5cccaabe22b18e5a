/*
 * erf.c -- float64 erf of n values: the exact-erf GELU of the reference ops (actdiff.compare.refops), where
 * scipy's erf (a scalar loop, 15-37 ns a value) was 3-7 % of a statistics job with GELU nodes.
 *
 * The values come from glibc's vector math library (libmvec, glibc >= 2.35), found with dlopen at the first call:
 * its AVX-512 erf of 8 doubles on the avx512 path, its AVX2 erf of 4 on the avx2 path, and libm's scalar erf on
 * the scalar path or where libmvec (or its erf) is absent (ak_erf_f64_impl says which). glibc documents these
 * within a few ULP of the true value; the C and Python tests bound each path against libm's erf. Every value
 * goes through one function of its path, a last partial vector padded with zeros, so a value's result never
 * depends on where it sits in the array (a prompt's rows alone or stacked with others give the same bits).
 * Different paths may differ in the last bits, as their libraries do.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <string.h>

#include "actdiff_kernels.h"
#include "ak_internal.h"

static void *g_erf8, *g_erf4; /* libmvec's _ZGVeN8v_erf (AVX-512) and _ZGVdN4v_erf (AVX2), NULL where absent */
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void find_libmvec(void) {
    void *h = dlopen("libmvec.so.1", RTLD_NOW | RTLD_LOCAL);
    if (h == NULL) return;
    g_erf8 = dlsym(h, "_ZGVeN8v_erf");
    g_erf4 = dlsym(h, "_ZGVdN4v_erf"); /* the handle stays open: the pointers are used for the process's life */
}

/* y (n) = erf(x (n)) with F, a libmvec erf of W doubles in one vector (LOAD, STORE: its unaligned moves), the last
 * partial vector padded with zeros; y may be x. A macro: the two paths differ in vector type and intrinsics. */
#define VECTOR_ERF(W, LOAD, STORE, F)                                                                           \
    do {                                                                                                         \
        int64_t i = 0;                                                                                           \
        for (; i + (W) <= n; i += (W)) STORE(y + i, F(LOAD(x + i)));                                             \
        if (i < n) {                                                                                             \
            double buf[W] = {0};                                                                                 \
            memcpy(buf, x + i, (size_t)(n - i) * sizeof(double));                                                \
            STORE(buf, F(LOAD(buf)));                                                                            \
            memcpy(y + i, buf, (size_t)(n - i) * sizeof(double));                                                \
        }                                                                                                        \
    } while (0)

__attribute__((target("avx512f"))) static void erf_avx512(double *y, const double *x, int64_t n) {
    __m512d (*f)(__m512d) = (__m512d (*)(__m512d))g_erf8;
    VECTOR_ERF(8, _mm512_loadu_pd, _mm512_storeu_pd, f);
}

__attribute__((target("avx2,fma"))) static void erf_avx2(double *y, const double *x, int64_t n) {
    __m256d (*f)(__m256d) = (__m256d (*)(__m256d))g_erf4;
    VECTOR_ERF(4, _mm256_loadu_pd, _mm256_storeu_pd, f);
}

static int erf_impl(void) {
    pthread_once(&g_once, find_libmvec);
    int isa = ak_isa();
    if (isa == AK_ISA_AVX512 && g_erf8) return AK_ISA_AVX512;
    if (isa >= AK_ISA_AVX2 && g_erf4) return AK_ISA_AVX2;
    return AK_ISA_SCALAR;
}

int ak_erf_f64_impl(int *isa) {
    AK_CHECK_PTR(isa);
    *isa = erf_impl();
    return AK_OK;
}

int ak_erf_f64(double *y, const double *x, int64_t n) {
    AK_CHECK_PTR(y);
    AK_CHECK_PTR(x);
    if (n < 0) return AK_ERR_INVALID_SIZE;
    int impl = erf_impl();
    if (impl == AK_ISA_AVX512) erf_avx512(y, x, n);
    else if (impl == AK_ISA_AVX2) erf_avx2(y, x, n);
    else return ak_erf_f64_naive(y, x, n);
    return AK_OK;
}

int ak_erf_f64_naive(double *y, const double *x, int64_t n) {
    AK_CHECK_PTR(y);
    AK_CHECK_PTR(x);
    if (n < 0) return AK_ERR_INVALID_SIZE;
    for (int64_t i = 0; i < n; i++) y[i] = erf(x[i]);
    return AK_OK;
}
