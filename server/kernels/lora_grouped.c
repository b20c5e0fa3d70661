/* The LoRA side branch of one fused site for a step's rows, grouped by adapter:
 * y[row, out_p] += (x[row] A_g)[cols_{g,p}] Bt_{g,p} for every row of every group g (one adapter each),
 * as server.lora.apply.lora_apply computes it with torch.bmm over stacked ("cover") weights.
 *
 * Why: in torch a step's LoRA on CPU is hundreds of small batched matmuls plus gathers and scatters, far
 * slower than streaming its weights once. Here a task is (group, some of its rows): A_g is read once per
 * task, front to back, into x A_g held in L1, then each projection's B^T is read once, front to back, and
 * added straight into the rows of y, four rows at a time (sequential reads stream at the memory's rate;
 * strided register tiles did not). Tasks touch disjoint rows of y, so they run in parallel unlocked. A
 * group's rows go to as few tasks as keep every thread busy (up to MAX_ROWS each), as each task reads its
 * adapter whole. The weights are prefetched 8 KB ahead of use.
 *
 * Each group's weights are read where its device slot keeps them (a table of pointers), so no step copies
 * adapters into a stacked batch: with Zipf traffic the set of adapters in a batch changes every few steps.
 * Measured by `make bench` (mixed8-16, all8-16, zipf100); figures and what was tried in docs/decisions.md.
 *
 * Layouts: x [T][ldx], y [T][ldy]. Group g's entries are e in [offsets[g], offsets[g + 1]), entry e being
 * row rows[e] (rows NULL: row e). tab holds, per group, 2 + 3 * n_proj longs: A_g's address ([in][w_g], A^T of
 * the group's projections side by side), w_g (0: the adapter has nothing at this site), then per projection
 * its B^T's address ([cols][out_n_p], alpha/r folded in; 0: the adapter lacks it), its first column in w_g,
 * and cols.
 */
#include <immintrin.h>

#define MAX_ROWS 8
#define MAX_W 1024
#define AHEAD 8192

static inline void prefetch_range(const void *start, long bytes) {
    for (long b = 0; b < bytes; b += 64) _mm_prefetch((const char *)start + b, _MM_HINT_T0);
}

/* xa[j][0 .. w) = x_j A for j < nr; A [in][w] is read once, front to back (the accumulators live in L1).
 * Four input rows per pass over the accumulators: a quarter of the loads and stores of one at a time. */
static void shrink(const float *const *xr, int nr, const float *restrict A, long in, long w, float (*xa)[MAX_W]) {
    for (int j = 0; j < nr; j++)
        for (long c = 0; c < w; c++) xa[j][c] = 0.0f;
    long k = 0;
    for (; k + 4 <= in; k += 4) {
        const float *restrict a0 = A + k * w, *restrict a1 = a0 + w, *restrict a2 = a1 + w, *restrict a3 = a2 + w;
        prefetch_range((const char *)a0 + AHEAD, 4 * w * sizeof(float));
        for (int j = 0; j < nr; j++) {
            float x0 = xr[j][k], x1 = xr[j][k + 1], x2 = xr[j][k + 2], x3 = xr[j][k + 3];
            float *restrict acc = xa[j];
            for (long c = 0; c < w; c++) acc[c] += x0 * a0[c] + x1 * a1[c] + x2 * a2[c] + x3 * a3[c];
        }
    }
    for (; k < in; k++) {
        const float *restrict a = A + k * w;
        for (int j = 0; j < nr; j++) {
            float xk = xr[j][k];
            float *restrict acc = xa[j];
            for (long c = 0; c < w; c++) acc[c] += xk * a[c];
        }
    }
}

/* y_j[0 .. out_n) += xa[j][col0 .. col0+cols) Bt for j < nr; Bt [cols][out_n] is read once, front to back,
 * four of its rows at a time (four sequential streams), so each y row is read and written a quarter as often. */
static void expand(float *const *yr, long y0, int nr, float (*xa)[MAX_W], long col0, long cols,
                   const float *restrict Bt, long out_n) {
    long c = 0;
    for (; c + 4 <= cols; c += 4) {
        const float *restrict b0 = Bt + c * out_n, *restrict b1 = b0 + out_n, *restrict b2 = b1 + out_n,
                    *restrict b3 = b2 + out_n;
        prefetch_range((const char *)b0 + AHEAD, 4 * out_n * sizeof(float));
        for (int j = 0; j < nr; j++) {
            const float *s = xa[j] + col0 + c;
            float s0 = s[0], s1 = s[1], s2 = s[2], s3 = s[3];
            float *restrict y = yr[j] + y0;
            for (long o = 0; o < out_n; o++) y[o] += s0 * b0[o] + s1 * b1[o] + s2 * b2[o] + s3 * b3[o];
        }
    }
    for (; c < cols; c++) {
        const float *restrict b = Bt + c * out_n;
        for (int j = 0; j < nr; j++) {
            float s = xa[j][col0 + c];
            float *restrict y = yr[j] + y0;
            for (long o = 0; o < out_n; o++) y[o] += s * b[o];
        }
    }
}

/* Returns 0, or -1 (nothing written) where some w_g is beyond this kernel's scratch. */
int lora_slot_groups(const float *x, long ldx, float *y, long ldy, long in, long n_groups, const long *offsets,
                     const long *rows, const long *tab, long n_proj, const long *out0, const long *out_n, int threads) {
    const long entry = 2 + 3 * n_proj;
    long busy = 0;
    for (long g = 0; g < n_groups; g++) {
        if (tab[g * entry + 1] > MAX_W) return -1;
        busy += tab[g * entry + 1] > 0 && offsets[g + 1] > offsets[g];
    }
    if (busy == 0) return 0;
    long tasks_wanted = busy >= threads ? 1 : (threads + busy - 1) / busy;  /* per group */
    long first_task[n_groups + 1], rows_per_task[n_groups];
    first_task[0] = 0;
    for (long g = 0; g < n_groups; g++) {
        long size = offsets[g + 1] - offsets[g], rpt = (size + tasks_wanted - 1) / tasks_wanted;
        rpt = rpt > MAX_ROWS ? MAX_ROWS : rpt < 1 ? 1 : rpt;
        rows_per_task[g] = rpt;
        first_task[g + 1] = first_task[g] + (tab[g * entry + 1] > 0 ? (size + rpt - 1) / rpt : 0);
    }
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long task = 0; task < first_task[n_groups]; task++) {
        long g = 0;
        while (first_task[g + 1] <= task) g++;
        const long *t = tab + g * entry;
        long e0 = offsets[g] + (task - first_task[g]) * rows_per_task[g], e1 = e0 + rows_per_task[g];
        if (e1 > offsets[g + 1]) e1 = offsets[g + 1];
        const float *xr[MAX_ROWS];
        float *yr[MAX_ROWS];
        int nr = 0;
        for (long e = e0; e < e1; e++) {
            long row = rows ? rows[e] : e;
            xr[nr] = x + row * ldx;
            yr[nr] = y + row * ldy;
            nr++;
        }
        float xa[MAX_ROWS][MAX_W];
        shrink(xr, nr, (const float *)t[0], in, t[1], xa);
        for (long p = 0; p < n_proj; p++)
            if (t[2 + p])
                expand(yr, out0[p], nr, xa, t[2 + n_proj + p], t[2 + 2 * n_proj + p], (const float *)t[2 + p], out_n[p]);
    }
    return 0;
}
