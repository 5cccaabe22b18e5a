/* core.c -- version, status strings, thread pool, ISA dispatch, call counters. */
#define _GNU_SOURCE
#include "ak_internal.h"
#include <pthread.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

const char *ak_version(void) { return AK_VERSION; }

const char *ak_status_string(int status) {
    switch (status) {
    case AK_OK: return "ok";
    case AK_ERR_NULL_POINTER: return "null pointer argument";
    case AK_ERR_INVALID_SIZE: return "invalid size";
    case AK_ERR_INVALID_ARGUMENT: return "invalid argument";
    case AK_ERR_INDEX_OUT_OF_RANGE: return "index out of range";
    case AK_ERR_OUT_OF_MEMORY: return "out of memory";
    case AK_ERR_UNSUPPORTED: return "unsupported on this CPU";
    case AK_ERR_THREAD: return "thread creation failed";
    default: return "unknown status";
    }
}

/* ---------------- call counters ---------------- */
static uint64_t g_counts[AK_NUM_OPS];
static const char *g_op_names[AK_NUM_OPS] = {
    "matmul", "matmul_naive", "layernorm", "gelu", "softmax", "add", "embedding", "rotary",
    "attention", "attention_naive", "moe", "mean_pool", "l2_normalize", "topk", "expert_up", "expert_down",
    "moe_combine", "matmul_f64", "matmul_f64_naive",
};
void ak_count_call(int op) { __atomic_fetch_add(&g_counts[op], 1, __ATOMIC_RELAXED); }
int ak_num_ops(void) { return AK_NUM_OPS; }
const char *ak_op_name(int op) { return (op >= 0 && op < AK_NUM_OPS) ? g_op_names[op] : NULL; }
int ak_get_call_counts(uint64_t *out, int n) {
    AK_CHECK_PTR(out);
    if (n < AK_NUM_OPS) return AK_ERR_INVALID_SIZE;
    for (int i = 0; i < AK_NUM_OPS; i++) out[i] = __atomic_load_n(&g_counts[i], __ATOMIC_RELAXED);
    for (int i = AK_NUM_OPS; i < n; i++) out[i] = 0;
    return AK_OK;
}
void ak_reset_call_counts(void) {
    for (int i = 0; i < AK_NUM_OPS; i++) __atomic_store_n(&g_counts[i], 0, __ATOMIC_RELAXED);
}

/* ---------------- memory ---------------- */
void *ak_aligned_alloc(size_t bytes) {
    void *p = NULL;
    if (bytes == 0) bytes = 64;
    if (posix_memalign(&p, 64, bytes) != 0) return NULL;
    return p;
}
void ak_aligned_free(void *p) { free(p); }

/* Per-thread scratch: one block kept between calls, so the temporaries of a large op are not mapped and
 * zeroed by the kernel again on every call (glibc returns a freed block of many MB to the system): ak_moe
 * at 512 tokens (28 MB of temporaries) took 957 page faults and 1.2-1.4 ms of system time a call. At most
 * AK_SCRATCH_KEEP bytes are kept per thread; a larger request, or one made while the block is in use, gets
 * a plain allocation. Freed when the thread exits. */
#define AK_SCRATCH_KEEP ((size_t)256 << 20)
typedef struct {
    void *p;
    size_t cap;
    int busy;
} scratch_block;
static pthread_key_t g_scratch_key;
static pthread_once_t g_scratch_once = PTHREAD_ONCE_INIT;
static int g_scratch_ok;

static void scratch_release_thread(void *s) {
    ak_aligned_free(((scratch_block *)s)->p);
    free(s);
}
static void scratch_init(void) { g_scratch_ok = pthread_key_create(&g_scratch_key, scratch_release_thread) == 0; }

static scratch_block *scratch_of_thread(void) {
    pthread_once(&g_scratch_once, scratch_init);
    if (!g_scratch_ok) return NULL;
    scratch_block *s = (scratch_block *)pthread_getspecific(g_scratch_key);
    if (!s && (s = (scratch_block *)calloc(1, sizeof *s)) && pthread_setspecific(g_scratch_key, s) != 0) {
        free(s);
        s = NULL;
    }
    return s;
}

void *ak_scratch_get(size_t bytes) {
    scratch_block *s = scratch_of_thread();
    if (!s || s->busy || bytes > AK_SCRATCH_KEEP) return ak_aligned_alloc(bytes);
    if (s->cap < bytes) {
        ak_aligned_free(s->p);
        s->cap = (bytes + ((size_t)1 << 20) - 1) & ~(((size_t)1 << 20) - 1); /* whole MiB: fewer regrowths */
        if (s->cap > AK_SCRATCH_KEEP) s->cap = AK_SCRATCH_KEEP;
        if (!(s->p = ak_aligned_alloc(s->cap))) {
            s->cap = 0;
            return NULL;
        }
    }
    s->busy = 1;
    return s->p;
}

void ak_scratch_put(void *p) {
    if (!p) return;
    scratch_block *s = g_scratch_ok ? (scratch_block *)pthread_getspecific(g_scratch_key) : NULL;
    if (s && s->busy && p == s->p) s->busy = 0;
    else ak_aligned_free(p);
}

/* ---------------- ISA dispatch ---------------- */
static int g_isa = -2; /* -2: not initialised */

int ak_cpu_supports_isa(int isa) {
    __builtin_cpu_init();
    switch (isa) {
    case AK_ISA_SCALAR: return 1;
    case AK_ISA_AVX2:
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
    case AK_ISA_AVX512:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
                       __builtin_cpu_supports("fma") ? 1 : 0;
    default: return 0;
    }
}
static int best_isa(void) {
    if (ak_cpu_supports_isa(AK_ISA_AVX512)) return AK_ISA_AVX512;
    if (ak_cpu_supports_isa(AK_ISA_AVX2)) return AK_ISA_AVX2;
    return AK_ISA_SCALAR;
}
/* AK_ISA_AUTO: the path ACTDIFF_KERNELS_ISA names when the CPU supports it, else the best one. The Python
 * wrapper refuses an unknown or unsupported value at import (the C library cannot report it from here), so
 * a forced run never silently falls back to another path. */
static int auto_isa(void) {
    const char *env = getenv("ACTDIFF_KERNELS_ISA");
    int want = -1;
    if (env && *env) {
        if (!strcmp(env, "scalar")) want = AK_ISA_SCALAR;
        else if (!strcmp(env, "avx2")) want = AK_ISA_AVX2;
        else if (!strcmp(env, "avx512")) want = AK_ISA_AVX512;
    }
    return want >= 0 && ak_cpu_supports_isa(want) ? want : best_isa();
}
int ak_isa(void) {
    int v = __atomic_load_n(&g_isa, __ATOMIC_RELAXED);
    if (v == -2) {
        v = auto_isa();
        __atomic_store_n(&g_isa, v, __ATOMIC_RELAXED);
    }
    return v;
}
int ak_set_isa(int isa) {
    if (isa == AK_ISA_AUTO) { __atomic_store_n(&g_isa, auto_isa(), __ATOMIC_RELAXED); return AK_OK; }
    if (isa < AK_ISA_SCALAR || isa > AK_ISA_AVX512) return AK_ERR_INVALID_ARGUMENT;
    if (!ak_cpu_supports_isa(isa)) return AK_ERR_UNSUPPORTED;
    __atomic_store_n(&g_isa, isa, __ATOMIC_RELAXED);
    return AK_OK;
}
int ak_get_isa(void) { return ak_isa(); }
const char *ak_isa_name(int isa) {
    switch (isa) {
    case AK_ISA_AUTO: return "auto";
    case AK_ISA_SCALAR: return "scalar";
    case AK_ISA_AVX2: return "avx2";
    case AK_ISA_AVX512: return "avx512";
    default: return "unknown";
    }
}

/* ---------------- thread pool ----------------
 * Persistent workers, spinning briefly then sleeping (see AK_SPIN_NS).  One job at a time
 * (g_dispatch serialises concurrent callers).  The caller runs tid 0. */
static int g_num_threads = 0; /* 0: not initialised */

int ak_set_num_threads(int n) {
    if (n < 1 || n > AK_MAX_THREADS) return AK_ERR_INVALID_ARGUMENT;
    __atomic_store_n(&g_num_threads, n, __ATOMIC_RELAXED);
    return AK_OK;
}
int ak_get_num_threads(void) {
    int n = __atomic_load_n(&g_num_threads, __ATOMIC_RELAXED);
    if (n == 0) {
        const char *env = getenv("ACTDIFF_NUM_THREADS");
        long v = env ? strtol(env, NULL, 10) : 0;
        if (v < 1) v = sysconf(_SC_NPROCESSORS_ONLN);
        if (v < 1) v = 1;
        if (v > AK_MAX_THREADS) v = AK_MAX_THREADS;
        n = (int)v;
        __atomic_store_n(&g_num_threads, n, __ATOMIC_RELAXED);
    }
    return n;
}

int ak_threads_for(int64_t units, double flops) {
    int n = ak_get_num_threads();
    if (units < n) n = (int)(units < 1 ? 1 : units);
    if (flops < 2.0e5) n = 1; /* too small to amortise a wake-up */
    return n;
}

/* Hand-over: the dispatcher publishes the job and bumps g_gen; a worker that finished its last task
 * spins on g_gen for up to AK_SPIN_NS before it sleeps on g_cv_start, and the dispatcher spins on g_pending
 * as long before it sleeps on g_cv_done.  Why: on a 2-vCPU VM a condition-variable wake-up of an idle CPU
 * measured ~100 us (2 threads slower than 1 on a 12x768x768 matmul), while the engine issues ops back to
 * back with only Python in between; a worker still spinning starts at once.  The bound keeps an idle
 * process from burning a core another job could use.  Sleepers are counted under g_mu so a broadcast is
 * only paid when someone sleeps; every flag is seq_cst so "check, then sleep" cannot miss a post. */
#define AK_SPIN_NS 200000 /* 0.2 ms: longer than the gap between two ops of a forward, short for an idle job */

static pthread_mutex_t g_dispatch = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv_start = PTHREAD_COND_INITIALIZER;
static pthread_cond_t g_cv_done = PTHREAD_COND_INITIALIZER;
static int g_nworkers = 0;
/* generation << 16 | thread count of the job: one atomic word, so a worker that does not take part in a job
 * (tid >= count) knows it without reading g_fn/g_ctx, which the next job may already be overwriting */
static uint64_t g_gen = 0;
static int g_pending = 0;      /* workers still running the current job: atomic */
static int g_sleepers = 0;     /* workers asleep on g_cv_start: under g_mu */
static int g_main_waiting = 0; /* dispatcher asleep on g_cv_done: under g_mu */
static ak_task_fn g_fn = NULL;
static void *g_ctx = NULL;
static int g_atfork_registered = 0;
static uint64_t g_start_gen[AK_MAX_THREADS + 1];

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* spin until *v != not (if ne) or *v == not (if !ne), at most AK_SPIN_NS; 1 if it happened */
static int spin_until(const void *v, int is64, uint64_t not, int ne) {
    int64_t deadline = 0;
    for (unsigned i = 1;; i++) {
        uint64_t x = is64 ? __atomic_load_n((const uint64_t *)v, __ATOMIC_SEQ_CST)
                          : (uint64_t)__atomic_load_n((const int *)v, __ATOMIC_SEQ_CST);
        if ((x != not) == ne) return 1;
        if ((i & 255) == 0) { /* the clock read costs ~20 ns: check it every 256 pauses */
            int64_t t = now_ns();
            if (!deadline) deadline = t + AK_SPIN_NS;
            else if (t > deadline) return 0;
        }
        cpu_relax();
    }
}

static uint64_t wait_for_job(uint64_t seen) {
    if (!spin_until(&g_gen, 1, seen, 1)) {
        pthread_mutex_lock(&g_mu);
        g_sleepers++;
        while (__atomic_load_n(&g_gen, __ATOMIC_SEQ_CST) == seen) pthread_cond_wait(&g_cv_start, &g_mu);
        g_sleepers--;
        pthread_mutex_unlock(&g_mu);
    }
    return __atomic_load_n(&g_gen, __ATOMIC_SEQ_CST);
}

static void *worker_main(void *arg) {
    int tid = (int)(intptr_t)arg;
    uint64_t seen = __atomic_load_n(&g_start_gen[tid], __ATOMIC_SEQ_CST); /* a job posted later is not missed */
    for (;;) {
        seen = wait_for_job(seen);
        int nth = (int)(seen & 0xffff);
        if (tid >= nth) continue;
        /* written before g_gen was bumped and not rewritten before this worker counts down g_pending */
        g_fn(g_ctx, tid, nth);
        if (__atomic_sub_fetch(&g_pending, 1, __ATOMIC_SEQ_CST) == 0) {
            pthread_mutex_lock(&g_mu);
            if (g_main_waiting) pthread_cond_signal(&g_cv_done);
            pthread_mutex_unlock(&g_mu);
        }
    }
    return NULL;
}

static void atfork_child(void) {
    /* threads do not survive fork: forget them and reinitialise the locks */
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t c = PTHREAD_COND_INITIALIZER;
    g_dispatch = m; g_mu = m; g_cv_start = c; g_cv_done = c;
    g_nworkers = 0; g_pending = 0; g_sleepers = 0; g_main_waiting = 0;
}

static void ensure_workers(int want) { /* called with g_dispatch held */
    if (!g_atfork_registered) {
        pthread_atfork(NULL, NULL, atfork_child);
        g_atfork_registered = 1;
    }
    while (g_nworkers < want) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        __atomic_store_n(&g_start_gen[g_nworkers + 1], __atomic_load_n(&g_gen, __ATOMIC_SEQ_CST), __ATOMIC_SEQ_CST);
        int rc = pthread_create(&th, &attr, worker_main, (void *)(intptr_t)(g_nworkers + 1));
        pthread_attr_destroy(&attr);
        if (rc != 0) break; /* run with fewer threads: results do not depend on it */
        g_nworkers++;
    }
}

void ak_parallel(int nth, ak_task_fn fn, void *ctx) {
    if (nth <= 1) { fn(ctx, 0, 1); return; }
    pthread_mutex_lock(&g_dispatch);
    ensure_workers(nth - 1);
    if (nth > g_nworkers + 1) nth = g_nworkers + 1;
    if (nth <= 1) { pthread_mutex_unlock(&g_dispatch); fn(ctx, 0, 1); return; }
    g_fn = fn; g_ctx = ctx;
    __atomic_store_n(&g_pending, nth - 1, __ATOMIC_SEQ_CST);
    uint64_t word = ((__atomic_load_n(&g_gen, __ATOMIC_SEQ_CST) >> 16) + 1) << 16 | (uint64_t)nth;
    __atomic_store_n(&g_gen, word, __ATOMIC_SEQ_CST); /* spinning workers start here */
    pthread_mutex_lock(&g_mu);
    if (g_sleepers) pthread_cond_broadcast(&g_cv_start);
    pthread_mutex_unlock(&g_mu);
    fn(ctx, 0, nth);
    if (!spin_until(&g_pending, 0, 0, 0)) {
        pthread_mutex_lock(&g_mu);
        g_main_waiting = 1;
        while (__atomic_load_n(&g_pending, __ATOMIC_SEQ_CST) > 0) pthread_cond_wait(&g_cv_done, &g_mu);
        g_main_waiting = 0;
        pthread_mutex_unlock(&g_mu);
    }
    pthread_mutex_unlock(&g_dispatch);
}
