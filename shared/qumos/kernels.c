/* The batch part of qumos.torchsim (encoder, readout and their gradients) as fused C
 * loops. Compiled at first use and called through ctypes by qumos/kernels.py; the
 * pure-torch code in torchsim.py is the reference and the fallback. Plain C99.
 *
 * Conventions, as in torchsim.py:
 * - States are sample-major: (B, d) complex, d = 2**n, stored as interleaved (re, im)
 *   pairs (torch's complex64 / complex128 layout). Wire k is bit k of a basis index
 *   (qubit 0 least significant).
 * - Encoder: input i is on wire i % n, layer i // n; inputs >= n_inputs are angle 0.
 *   Per wire, f (K = 2**L reals) is the Kronecker product of the (cos, sin) of the L half
 *   angles (bit l of k set: the sin of layer l) and the wire's two amplitudes are
 *   v = T^T f with T = t[w] (K, 4), columns (re amp0, im amp0, re amp1, im amp1). The
 *   state is the product psi[i] = prod_w v[w][bit_w(i)].
 * - Complex gradients follow torch: g = dL/dRe + i dL/dIm, so for y = a * b,
 *   grad a = grad y * conj(b).
 *
 * Layout inside: samples are processed in blocks of W, and every intermediate is stored
 * as rows of W values (one per sample of the block, a "lane"), so the innermost loop of
 * all arithmetic runs over the lanes: the compiler vectorises it, and there are no
 * reductions across it (which it would not vectorise without -ffast-math). Inputs and
 * outputs are transposed to and from this layout at the block's edges; the lanes of a
 * last, partial block are zero.
 *
 * The body below is written once for a real type REAL and instantiated for float
 * (functions *_f32) and double (*_f64) by including this file into itself.
 */
#ifndef REAL

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Samples per block, and the loop over them. "omp simd" (honoured with -fopenmp-simd,
 * which needs no OpenMP runtime) tells the compiler that the iterations are independent
 * (true: lane j only touches lane j of rows that do not overlap), so it vectorises these
 * loops without alias checks; without it, gcc -O3 left most of them scalar. Not for
 * reductions over the lanes. */
#define W 16
#define LANES _Pragma("omp simd") for (int j = 0; j < W; j++)

/* Entry (q, p) of an op's k x k gate is its entry e[k q + p]: one-qubit gates and two-qubit
 * gates row-major; a controlled gate (kind 4) reads the |1><1| block of its 4x4 matrix,
 * the rest being the identity (its entries are not read, their gradient is 0). */
static const int E1Q[4] = {0, 1, 2, 3}, ECTRL[4] = {10, 11, 14, 15};
static const int E2Q[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

/* cos and sin of W floats. Round-to-nearest quadrant, x - k pi/2 in three parts (Cody &
 * Waite) and the cephes single-precision polynomials on [-pi/4, pi/4]: within ~1 ulp of
 * libm, and vectorisable. |x| > 8192 (where the reduction loses accuracy) or NaN: libm. */
static void sincos_f32(const float *restrict x, float *restrict c, float *restrict s)
{
    LANES {
        const float k = (x[j] * 0.636619772f + 12582912.0f) - 12582912.0f;
        const float r = ((x[j] - k * 1.5703125f) - k * 4.837512969970703125e-4f)
                        - k * 7.54978995489188216e-8f;
        const float z = r * r;
        const float sr = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f)
                         * z * r + r;
        const float cr = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z
                          + 4.166664568298827e-2f) * z * z - 0.5f * z + 1.0f;
        const int q = (int)k;  /* x = r + q pi/2 */
        const float sq = q & 1 ? cr : sr, cq = q & 1 ? sr : cr;
        s[j] = q & 2 ? -sq : sq;
        c[j] = (q + 1) & 2 ? -cq : cq;
    }
    LANES if (!(fabsf(x[j]) <= 8192.0f)) {
        c[j] = cosf(x[j]);
        s[j] = sinf(x[j]);
    }
}

static void sincos_f64(const double *restrict x, double *restrict c, double *restrict s)
{
    LANES {
        c[j] = cos(x[j]);
        s[j] = sin(x[j]);
    }
}

#define REAL float
#define FN(name) name##_f32
#include __FILE__
#undef REAL
#undef FN

#define REAL double
#define FN(name) name##_f64
#include __FILE__

#else /* the body, for one REAL */

/* Row i of a block buffer: W lanes. A complex array of a block is stored as rows
 * (re of element 0, im of element 0, re of element 1, ...). */
#define ROW(buf, i) ((buf) + (size_t)(i) * W)

/* Work space of one block, for n wires and L encoder layers (K = 2**L, d = 2**n). */
typedef struct {
    REAL *h;      /* (L * n) rows: the half angle of input l * n + w (0 past n_inputs) */
    REAL *c, *s;  /* (L * n) rows: its cos and sin */
    REAL *F;      /* per wire 2K - 2 rows: the Kronecker prefixes, layers 0..l at row
                     2**(l+1) - 2 (2**(l+1) rows); the last, l = L - 1, is f */
    REAL *v;      /* per wire 4 rows: re, im of amplitude 0, re, im of amplitude 1 */
    REAL *P;      /* the state's prefixes: the product over wires 0..k at complex element
                     2**(k+1) - 2 (2**(k+1) elements); the last, k = n - 1, is psi */
} FN(block);

static FN(block) FN(block_alloc)(int n, int L)
{
    const size_t K = (size_t)1 << L, d = (size_t)1 << n;
    const size_t rows = 3 * (size_t)L * n + n * (2 * K - 2) + 4 * (size_t)n + 2 * (2 * d - 2);
    FN(block) w;
    w.h = calloc((size_t)W * rows, sizeof(REAL));
    w.c = w.h + (size_t)W * L * n;
    w.s = w.c + (size_t)W * L * n;
    w.F = w.s + (size_t)W * L * n;
    w.v = w.F + (size_t)W * n * (2 * K - 2);
    w.P = w.v + (size_t)W * 4 * n;
    return w;
}

/* rows (cols rows) <- the block's samples b0 .. b0 + nb - 1 of src (B, cols), transposed;
 * the lanes past nb are zero. */
static void FN(load_rows)(REAL *rows, const REAL *src, long b0, int nb, size_t cols)
{
    if (nb < W)
        memset(rows, 0, sizeof(REAL) * W * cols);
    for (int j = 0; j < nb; j++)
        for (size_t r = 0; r < cols; r++)
            rows[r * W + j] = src[(b0 + j) * cols + r];
}

/* dst (B, cols) <- the first nb lanes of rows (cols rows), at samples b0 .. b0 + nb - 1. */
static void FN(store_rows)(REAL *dst, const REAL *rows, long b0, int nb, size_t cols)
{
    for (int j = 0; j < nb; j++)
        for (size_t r = 0; r < cols; r++)
            dst[(b0 + j) * cols + r] = rows[r * W + j];
}

/* Forward of the block's samples b0 .. b0 + nb - 1: angles, features, state (in w). */
static void FN(encode_block)(FN(block) *w, long b0, int nb, int n, int n_inputs, int L,
                             const REAL *x, const REAL *t)
{
    const int K = 1 << L, FW = 2 * K - 2;
    FN(load_rows)(w->h, x, b0, nb, n_inputs);  /* rows past n_inputs stay 0 */
    for (int i = 0; i < n_inputs; i++) {
        REAL *h = ROW(w->h, i);
        LANES h[j] *= (REAL)0.5;
    }
    for (int i = 0; i < L * n; i++)
        FN(sincos)(ROW(w->h, i), ROW(w->c, i), ROW(w->s, i));
    for (int wire = 0; wire < n; wire++) {
        REAL *Fw = ROW(w->F, wire * FW);
        memcpy(ROW(Fw, 0), ROW(w->c, wire), sizeof(REAL) * W);
        memcpy(ROW(Fw, 1), ROW(w->s, wire), sizeof(REAL) * W);
        for (int l = 1; l < L; l++) {
            const int m = 1 << l;
            const REAL *cl = ROW(w->c, l * n + wire), *sl = ROW(w->s, l * n + wire);
            for (int k = 0; k < m; k++) {
                const REAL *prev = ROW(Fw, m - 2 + k);
                REAL *lo = ROW(Fw, 2 * m - 2 + k), *hi = ROW(Fw, 3 * m - 2 + k);
                LANES {
                    lo[j] = prev[j] * cl[j];
                    hi[j] = prev[j] * sl[j];
                }
            }
        }
        const REAL *tw = t + (size_t)wire * K * 4;
        for (int q = 0; q < 4; q++) {
            REAL *vq = ROW(w->v, 4 * wire + q);
            LANES vq[j] = 0;
            for (int k = 0; k < K; k++) {
                const REAL tk = tw[4 * k + q];
                const REAL *f = ROW(Fw, K - 2 + k);
                LANES vq[j] += tk * f[j];
            }
        }
    }
    /* psi = v[n-1] (x) ... (x) v[0], keeping every prefix */
    memcpy(w->P, w->v, sizeof(REAL) * W * 4);
    for (int k = 1; k < n; k++) {
        const int m = 1 << k;
        const REAL *a_re = ROW(w->v, 4 * k), *a_im = ROW(w->v, 4 * k + 1);
        const REAL *b_re = ROW(w->v, 4 * k + 2), *b_im = ROW(w->v, 4 * k + 3);
        for (int e = 0; e < m; e++) {
            const REAL *p_re = ROW(w->P, 2 * (m - 2 + e)), *p_im = p_re + W;
            REAL *lo_re = ROW(w->P, 2 * (2 * m - 2 + e)), *lo_im = lo_re + W;
            REAL *hi_re = ROW(w->P, 2 * (3 * m - 2 + e)), *hi_im = hi_re + W;
            LANES {
                lo_re[j] = a_re[j] * p_re[j] - a_im[j] * p_im[j];
                lo_im[j] = a_re[j] * p_im[j] + a_im[j] * p_re[j];
                hi_re[j] = b_re[j] * p_re[j] - b_im[j] * p_im[j];
                hi_im[j] = b_re[j] * p_im[j] + b_im[j] * p_re[j];
            }
        }
    }
}

/* Encoder forward: x (B, n_inputs), t (M, n, 2**L, 4) -> psi (B, 2**n) complex. The rows
 * are M segments of B / M (M models, model-major): segment m uses t[m]. Blocks of samples
 * do not cross segments. */
void FN(qk_encode_fwd)(long B, long M, int n, int n_inputs, int L, const REAL *x,
                       const REAL *t, REAL *psi)
{
    const size_t d = (size_t)1 << n, tsize = (size_t)n * 4 << L;
    const long seg = M > 0 ? B / M : 0;
    FN(block) w = FN(block_alloc)(n, L);
    const REAL *out = ROW(w.P, 2 * (d - 2));
    for (long m = 0; m < M; m++) {
        const long end = (m + 1) * seg;
        for (long b0 = m * seg; b0 < end; b0 += W) {
            const int nb = end - b0 < W ? (int)(end - b0) : W;
            FN(encode_block)(&w, b0, nb, n, n_inputs, L, x, t + m * tsize);
            FN(store_rows)(psi, out, b0, nb, 2 * d);
        }
    }
    free(w.h);
}

/* Encoder backward of one block whose forward is in w: G (2d rows) holds the grad of psi
 * and is overwritten; gx (n_inputs rows) gets the grad of x (need_x), acc (n K 4 rows)
 * += the per-lane grad of t (need_t). gv, gf, g_c, g_s: work rows (4n, K, 1, 1). */
static void FN(encode_block_bwd)(const FN(block) *wp, REAL *G, REAL *gv, REAL *gf, REAL *g_c,
                                 REAL *g_s, REAL *gx, REAL *acc, int n, int n_inputs, int L,
                                 const REAL *t, int need_x, int need_t)
{
    const int K = 1 << L, FW = 2 * K - 2;
    const FN(block) w = *wp;
    /* grad of each wire's v, from the last wire down: prefix_k = v[k] (x) prefix_{k-1} */
    for (int k = n - 1; k >= 1; k--) {
        const int m = 1 << k;
        const REAL *a_re = ROW(w.v, 4 * k), *a_im = ROW(w.v, 4 * k + 1);
        const REAL *b_re = ROW(w.v, 4 * k + 2), *b_im = ROW(w.v, 4 * k + 3);
        REAL *g0_re = ROW(gv, 4 * k), *g0_im = ROW(gv, 4 * k + 1);
        REAL *g1_re = ROW(gv, 4 * k + 2), *g1_im = ROW(gv, 4 * k + 3);
        LANES g0_re[j] = g0_im[j] = g1_re[j] = g1_im[j] = 0;
        for (int e = 0; e < m; e++) {
            const REAL *p_re = ROW(w.P, 2 * (m - 2 + e)), *p_im = p_re + W;
            REAL *h0_re = ROW(G, 2 * e), *h0_im = h0_re + W;
            const REAL *h1_re = ROW(G, 2 * (m + e)), *h1_im = h1_re + W;
            LANES {
                /* g_v[k][bit] += G[bit, e] * conj(prefix_{k-1}[e]) */
                g0_re[j] += h0_re[j] * p_re[j] + h0_im[j] * p_im[j];
                g0_im[j] += h0_im[j] * p_re[j] - h0_re[j] * p_im[j];
                g1_re[j] += h1_re[j] * p_re[j] + h1_im[j] * p_im[j];
                g1_im[j] += h1_im[j] * p_re[j] - h1_re[j] * p_im[j];
                /* grad prefix_{k-1}[e] = sum over the bit of G[bit, e] * conj(v[k][bit]) */
                const REAL re = h0_re[j] * a_re[j] + h0_im[j] * a_im[j]
                                + h1_re[j] * b_re[j] + h1_im[j] * b_im[j];
                h0_im[j] = h0_im[j] * a_re[j] - h0_re[j] * a_im[j]
                           + h1_im[j] * b_re[j] - h1_re[j] * b_im[j];
                h0_re[j] = re;
            }
        }
    }
    memcpy(gv, G, sizeof(REAL) * W * 4);
    /* v[w] = T^T f, real: gv's 4 rows are the grad of T's columns */
    for (int wire = 0; wire < n; wire++) {
        const REAL *Fw = ROW(w.F, wire * FW), *f = ROW(Fw, K - 2), *gw = ROW(gv, 4 * wire);
        const REAL *tw = t + (size_t)wire * K * 4;
        if (need_t)
            for (int k = 0; k < K; k++)
                for (int q = 0; q < 4; q++) {
                    REAL *a = ROW(acc, (wire * K + k) * 4 + q);
                    const REAL *fk = ROW(f, k), *gq = ROW(gw, q);
                    LANES a[j] += fk[j] * gq[j];
                }
        if (!need_x)
            continue;
        for (int k = 0; k < K; k++) {
            REAL *g = ROW(gf, k);
            const REAL t0 = tw[4 * k], t1 = tw[4 * k + 1], t2 = tw[4 * k + 2], t3 = tw[4 * k + 3];
            const REAL *g0 = ROW(gw, 0), *g1 = ROW(gw, 1);
            const REAL *g2 = ROW(gw, 2), *g3 = ROW(gw, 3);
            LANES g[j] = t0 * g0[j] + t1 * g1[j] + t2 * g2[j] + t3 * g3[j];
        }
        /* f's prefix for layers 0..l = (c_l, s_l) (x) prefix_{l-1}, from the last layer down */
        for (int l = L - 1; l >= 0; l--) {
            const int i = l * n + wire;
            const REAL *cl = ROW(w.c, i), *sl = ROW(w.s, i);
            if (l == 0) {
                memcpy(g_c, gf, sizeof(REAL) * W * 2);  /* g_c, g_s are adjacent rows */
            } else {
                const int m = 1 << l;
                LANES g_c[j] = g_s[j] = 0;
                for (int e = 0; e < m; e++) {
                    const REAL *pre = ROW(Fw, m - 2 + e);
                    REAL *lo = ROW(gf, e);
                    const REAL *hi = ROW(gf, m + e);
                    LANES {
                        g_c[j] += lo[j] * pre[j];
                        g_s[j] += hi[j] * pre[j];
                        lo[j] = lo[j] * cl[j] + hi[j] * sl[j];
                    }
                }
            }
            if (i < n_inputs) {  /* d cos(x/2) = -sin(x/2) / 2, d sin(x/2) = cos(x/2) / 2 */
                REAL *g = ROW(gx, i);
                LANES g[j] = (g_s[j] * cl[j] - g_c[j] * sl[j]) * (REAL)0.5;
            }
        }
    }
}

/* Encoder backward: from x, t and g_psi (B, 2**n) complex, g_x (B, n_inputs) (if need_x)
 * and g_t (M, n, 2**L, 4), each summed over its segment's rows (if need_t). Segments as in
 * qk_encode_fwd. Recomputes the forward. */
void FN(qk_encode_bwd)(long B, long M, int n, int n_inputs, int L, const REAL *x,
                       const REAL *t_all, const REAL *g_psi, int need_x, int need_t,
                       REAL *g_x, REAL *g_t_all)
{
    const size_t d = (size_t)1 << n;
    const int K = 1 << L;
    FN(block) w = FN(block_alloc)(n, L);
    /* G: grad of the current prefix (2d rows); gv: grad of v (4n rows); gf: grad of f (K
     * rows); g_c, g_s: of one layer's cos, sin; gx: grad x (n_inputs rows); acc: per-lane
     * sums of g_t (n K 4 rows) */
    const size_t acc_rows = need_t ? (size_t)n * K * 4 : 0;
    REAL *G = calloc((size_t)W * (2 * d + 4 * n + K + 2 + n_inputs + acc_rows), sizeof(REAL));
    REAL *gv = ROW(G, 2 * d), *gf = ROW(gv, 4 * n), *g_c = ROW(gf, K), *g_s = ROW(g_c, 1);
    REAL *gx = ROW(g_s, 1), *acc = ROW(gx, n_inputs);
    const size_t tsize = (size_t)n * K * 4;
    const long seg = M > 0 ? B / M : 0;
    for (long sg = 0; sg < M; sg++) {  /* segments: one per model */
        const REAL *t = t_all + sg * tsize;
        const long end = (sg + 1) * seg;
        if (need_t)
            memset(acc, 0, sizeof(REAL) * W * acc_rows);
        for (long b0 = sg * seg; b0 < end; b0 += W) {
            const int nb = end - b0 < W ? (int)(end - b0) : W;
            FN(encode_block)(&w, b0, nb, n, n_inputs, L, x, t);
            FN(load_rows)(G, g_psi, b0, nb, 2 * d);
            FN(encode_block_bwd)(&w, G, gv, gf, g_c, g_s, gx, acc, n, n_inputs, L, t, need_x, need_t);
            if (need_x)
                FN(store_rows)(g_x, gx, b0, nb, n_inputs);
        }
        for (size_t r = 0; r < acc_rows; r++) {  /* the sum over the lanes (not LANES: a reduction) */
            double sum = 0;
            for (int j = 0; j < W; j++)
                sum += ROW(acc, r)[j];
            g_t_all[sg * tsize + r] = (REAL)sum;
        }
    }
    free(G);
    free(w.h);
}

/* o (n rows) = <Z_q> of the block's states phi (2d rows): sum_i |phi_i|^2 z_q(i). */
static void FN(readout_block)(const REAL *phi, REAL *o, size_t d, int n)
{
    memset(o, 0, sizeof(REAL) * W * n);
    for (size_t i = 0; i < d; i++) {
        const REAL *re = ROW(phi, 2 * i), *im = ROW(phi, 2 * i + 1);
        REAL prob[W];
        LANES prob[j] = re[j] * re[j] + im[j] * im[j];
        for (int q = 0; q < n; q++) {
            REAL *oq = ROW(o, q);
            if ((i >> q) & 1)
                LANES oq[j] -= prob[j];
            else
                LANES oq[j] += prob[j];
        }
    }
}

/* Readout: phi (B, 2**n) complex -> out (B, n), out[b, q] = sum_i |phi_i|^2 z_q(i), with
 * z_q(i) = +1 if bit q of i is 0 else -1. */
void FN(qk_readout_fwd)(long B, int n, const REAL *phi, REAL *out)
{
    const size_t d = (size_t)1 << n;
    REAL *rows = malloc(sizeof(REAL) * W * (2 * d + n)), *o = ROW(rows, 2 * d);
    for (long b0 = 0; b0 < B; b0 += W) {
        const int nb = B - b0 < W ? (int)(B - b0) : W;
        FN(load_rows)(rows, phi, b0, nb, 2 * d);
        FN(readout_block)(rows, o, d, n);
        FN(store_rows)(out, o, b0, nb, n);
    }
    free(rows);
}

/* Readout backward: g_phi[b, i] = 2 phi[b, i] sum_q g_out[b, q] z_q(i). Per sample: the
 * arrays are already contiguous along i. */
void FN(qk_readout_bwd)(long B, int n, const REAL *phi, const REAL *g_out, REAL *g_phi)
{
    const size_t d = (size_t)1 << n;
    REAL *zg = malloc(sizeof(REAL) * d);
    for (long b = 0; b < B; b++) {
        const REAL *g = g_out + (size_t)n * b, *p = phi + 2 * d * b;
        REAL *gp = g_phi + 2 * d * b;
        /* zg[i] = 2 sum_q g[q] z_q(i), built bit by bit: setting bit q subtracts 4 g[q] */
        zg[0] = 0;
        for (int q = 0; q < n; q++)
            zg[0] += 2 * g[q];
        for (int q = 0; q < n; q++) {
            const size_t m = (size_t)1 << q;
            for (size_t i = 0; i < m; i++)
                zg[m + i] = zg[i] - 4 * g[q];
        }
        for (size_t i = 0; i < d; i++) {
            gp[2 * i] = zg[i] * p[2 * i];
            gp[2 * i + 1] = zg[i] * p[2 * i + 1];
        }
    }
    free(zg);
}

/* ---- the ansatz unitary, gate by gate ----------------------------------------------------
 * R = U^T (d, d) per model: row j is U|j>, the basis state e_j run through a program of
 * ops, each an int[4] (kind, a, b, off) on the model's gate entries g (G complex numbers,
 * model m's at g + 2 G m; a shared set: M = 1):
 *   kind 0  a one-qubit gate on wire a, the 2x2 matrix g[off .. off + 3] (row-major);
 *   kind 1  a two-qubit gate on wires a, b, the 4x4 matrix g[off .. off + 15] in the
 *           basis |a b> (bit of wire a the more significant: p = 2 bit_a + bit_b);
 *   kind 2  diagonal: amplitude i times g[off + i];
 *   kind 3  a constant signed permutation, table b: out[k] = sign[b d + k] in[perm[b d + k]];
 *   kind 4  a controlled two-qubit gate, control a, target b: |0><0| (x) I + |1><1| (x) V,
 *           g[off .. off + 15] its 4x4 matrix as kind 1, of which only V is read.
 * The rows of one block (W of them, one model) are the lanes, so every op is a few
 * scalar-times-lanes products: a 2-qubit gate costs 16 complex multiply-adds per 4
 * amplitudes instead of a dense (d, d) product, and there is no graph of small ops.
 * The forward keeps each op's input state in `tape` (M, blocks, n_ops, 2d, W) for the
 * backward. */

/* lanes y (re, im rows) = c * x, c a complex scalar; acc: y += c * x */
#define CMUL_SET(yr, yi, cr, ci, xr, xi) LANES { yr[j] = cr * xr[j] - ci * xi[j]; yi[j] = cr * xi[j] + ci * xr[j]; }
#define CMUL_ADD(yr, yi, cr, ci, xr, xi) LANES { yr[j] += cr * xr[j] - ci * xi[j]; yi[j] += cr * xi[j] + ci * xr[j]; }

static void FN(op_fwd)(const int *op, int n, const REAL *g, const int *perm, const REAL *sign,
                       REAL *S, REAL *tmp)
{
    const int d = 1 << n, kind = op[0], a = op[1], b = op[2];
    const REAL *c = g + 2 * (size_t)op[3];
    if (kind == 0 || kind == 4) {
        /* the 2x2 on wire t, where bit a is set (kind 4) or everywhere (kind 0) */
        const int t = kind == 0 ? a : b, on = kind == 0 ? 0 : 1 << a;
        const int *e = kind == 0 ? E1Q : ECTRL;
        for (int i = 0; i < d; i++) {
            if (((i >> t) & 1) || (i & on) != on)
                continue;
            const int i1 = i | (1 << t);
            REAL *x0r = ROW(S, 2 * i), *x0i = ROW(S, 2 * i + 1);
            REAL *x1r = ROW(S, 2 * i1), *x1i = ROW(S, 2 * i1 + 1);
            REAL *t0r = ROW(tmp, 0), *t0i = ROW(tmp, 1), *t1r = ROW(tmp, 2), *t1i = ROW(tmp, 3);
            CMUL_SET(t0r, t0i, c[2 * e[0]], c[2 * e[0] + 1], x0r, x0i);
            CMUL_ADD(t0r, t0i, c[2 * e[1]], c[2 * e[1] + 1], x1r, x1i);
            CMUL_SET(t1r, t1i, c[2 * e[2]], c[2 * e[2] + 1], x0r, x0i);
            CMUL_ADD(t1r, t1i, c[2 * e[3]], c[2 * e[3] + 1], x1r, x1i);
            memcpy(x0r, t0r, sizeof(REAL) * 2 * W);  /* re, im rows are adjacent */
            memcpy(x1r, t1r, sizeof(REAL) * 2 * W);
        }
    } else if (kind == 1) {
        for (int i = 0; i < d; i++) {
            if (((i >> a) & 1) || ((i >> b) & 1))
                continue;
            int idx[4];
            for (int p = 0; p < 4; p++)
                idx[p] = i | (((p >> 1) & 1) << a) | ((p & 1) << b);
            for (int q = 0; q < 4; q++) {
                REAL *tr = ROW(tmp, 2 * q), *ti = ROW(tmp, 2 * q + 1);
                LANES tr[j] = ti[j] = 0;
                for (int p = 0; p < 4; p++) {
                    const REAL *xr = ROW(S, 2 * idx[p]), *xi = ROW(S, 2 * idx[p] + 1);
                    const REAL cr = c[2 * (4 * q + p)], ci = c[2 * (4 * q + p) + 1];
                    CMUL_ADD(tr, ti, cr, ci, xr, xi);
                }
            }
            for (int q = 0; q < 4; q++)
                memcpy(ROW(S, 2 * idx[q]), ROW(tmp, 2 * q), sizeof(REAL) * 2 * W);
        }
    } else if (kind == 2) {
        for (int i = 0; i < d; i++) {
            REAL *xr = ROW(S, 2 * i), *xi = ROW(S, 2 * i + 1);
            const REAL cr = c[2 * i], ci = c[2 * i + 1];
            LANES {
                const REAL re = cr * xr[j] - ci * xi[j];
                xi[j] = cr * xi[j] + ci * xr[j];
                xr[j] = re;
            }
        }
    } else {
        memcpy(tmp, S, sizeof(REAL) * 2 * d * W);
        const int *pk = perm + (size_t)b * d;
        const REAL *sk = sign + (size_t)b * d;
        for (int k = 0; k < d; k++) {
            const REAL *xr = ROW(tmp, 2 * pk[k]), *xi = ROW(tmp, 2 * pk[k] + 1);
            REAL *yr = ROW(S, 2 * k), *yi = ROW(S, 2 * k + 1);
            const REAL sg = sk[k];
            LANES {
                yr[j] = sg * xr[j];
                yi[j] = sg * xi[j];
            }
        }
    }
}

/* Backward of one op: X its input state (from the tape), G the grad of its output,
 * replaced by the grad of its input; acc (2 G_total rows) += the grad of its entries,
 * per lane. Complex gradients as torch: for y = c x, grad c = grad y conj(x) and
 * grad x = conj(c) grad y. */
static void FN(op_bwd)(const int *op, int n, const REAL *g, const int *perm, const REAL *sign,
                       const REAL *X, REAL *G, REAL *acc, REAL *tmp)
{
    const int d = 1 << n, kind = op[0], a = op[1], b = op[2];
    const REAL *c = g + 2 * (size_t)op[3];
    REAL *ac = ROW(acc, 2 * (size_t)op[3]);
    if (kind == 0 || kind == 1 || kind == 4) {
        /* k x k gate on the amplitudes idx; entry (q, p) is c[e[k q + p]] */
        const int k = kind == 1 ? 4 : 2, t = kind == 4 ? b : a, on = kind == 4 ? 1 << a : 0;
        const int *e = kind == 0 ? E1Q : kind == 4 ? ECTRL : E2Q;
        for (int i = 0; i < d; i++) {
            if (((i >> t) & 1) || (kind == 1 && ((i >> b) & 1)) || (i & on) != on)
                continue;
            int idx[4];
            if (kind != 1) {
                idx[0] = i;
                idx[1] = i | (1 << t);
            } else {
                for (int p = 0; p < 4; p++)
                    idx[p] = i | (((p >> 1) & 1) << a) | ((p & 1) << b);
            }
            for (int q = 0; q < k; q++) {  /* grad c[q][p] += grad y[q] conj(x[p]) */
                const REAL *gr = ROW(G, 2 * idx[q]), *gi = ROW(G, 2 * idx[q] + 1);
                for (int p = 0; p < k; p++) {
                    const REAL *xr = ROW(X, 2 * idx[p]), *xi = ROW(X, 2 * idx[p] + 1);
                    REAL *ar = ROW(ac, 2 * e[k * q + p]), *ai = ROW(ac, 2 * e[k * q + p] + 1);
                    LANES {
                        ar[j] += gr[j] * xr[j] + gi[j] * xi[j];
                        ai[j] += gi[j] * xr[j] - gr[j] * xi[j];
                    }
                }
            }
            for (int p = 0; p < k; p++) {  /* grad x[p] = sum_q conj(c[q][p]) grad y[q] */
                REAL *tr = ROW(tmp, 2 * p), *ti = ROW(tmp, 2 * p + 1);
                LANES tr[j] = ti[j] = 0;
                for (int q = 0; q < k; q++) {
                    const REAL *gr = ROW(G, 2 * idx[q]), *gi = ROW(G, 2 * idx[q] + 1);
                    const REAL cr = c[2 * e[k * q + p]], ci = -c[2 * e[k * q + p] + 1];
                    CMUL_ADD(tr, ti, cr, ci, gr, gi);
                }
            }
            for (int p = 0; p < k; p++)
                memcpy(ROW(G, 2 * idx[p]), ROW(tmp, 2 * p), sizeof(REAL) * 2 * W);
        }
    } else if (kind == 2) {
        for (int i = 0; i < d; i++) {
            const REAL *xr = ROW(X, 2 * i), *xi = ROW(X, 2 * i + 1);
            REAL *gr = ROW(G, 2 * i), *gi = ROW(G, 2 * i + 1);
            REAL *ar = ROW(ac, 2 * i), *ai = ROW(ac, 2 * i + 1);
            const REAL cr = c[2 * i], ci = c[2 * i + 1];
            LANES {
                ar[j] += gr[j] * xr[j] + gi[j] * xi[j];
                ai[j] += gi[j] * xr[j] - gr[j] * xi[j];
                const REAL re = cr * gr[j] + ci * gi[j];
                gi[j] = cr * gi[j] - ci * gr[j];
                gr[j] = re;
            }
        }
    } else {  /* out[k] = sign[k] in[perm[k]]: grad in[perm[k]] = sign[k] grad out[k] */
        memcpy(tmp, G, sizeof(REAL) * 2 * d * W);
        const int *pk = perm + (size_t)b * d;
        const REAL *sk = sign + (size_t)b * d;
        for (int k = 0; k < d; k++) {
            const REAL *xr = ROW(tmp, 2 * k), *xi = ROW(tmp, 2 * k + 1);
            REAL *yr = ROW(G, 2 * pk[k]), *yi = ROW(G, 2 * pk[k] + 1);
            const REAL sg = sk[k];
            LANES {
                yr[j] = sg * xr[j];
                yi[j] = sg * xi[j];
            }
        }
    }
}

/* R (M, d, d) complex of the program (see above); tape (M, blocks, n_ops, 2d, W) real,
 * blocks = ceil(d / W), or NULL when no backward follows. */
void FN(qk_unitary_fwd)(long M, int n, int n_ops, const int *ops, long G_total, const REAL *g,
                        const int *perm, const REAL *sign, REAL *tape, REAL *r)
{
    const int d = 1 << n, blocks = (d + W - 1) / W;
    const size_t state = (size_t)2 * d * W;
    REAL *S = malloc(sizeof(REAL) * (state + 2 * (size_t)d * W));
    REAL *tmp = S + state;
    for (long m = 0; m < M; m++) {
        const REAL *gm = g + 2 * (size_t)G_total * m;
        for (int blk = 0; blk < blocks; blk++) {
            const int j0 = blk * W, nb = d - j0 < W ? d - j0 : W;
            memset(S, 0, sizeof(REAL) * state);
            for (int j = 0; j < nb; j++)
                ROW(S, 2 * (j0 + j))[j] = 1;  /* lane j: the basis state e_{j0 + j} */
            REAL *tp = tape ? tape + ((size_t)m * blocks + blk) * n_ops * state : NULL;
            for (int o = 0; o < n_ops; o++) {
                if (tp)  /* NULL: no backward will follow */
                    memcpy(tp + o * state, S, sizeof(REAL) * state);
                FN(op_fwd)(ops + 4 * o, n, gm, perm, sign, S, tmp);
            }
            FN(store_rows)(r + 2 * (size_t)d * d * m, S, j0, nb, 2 * d);
        }
    }
    free(S);
}

/* grad g (M, G_total) complex from grad R (M, d, d), the tape of qk_unitary_fwd. */
void FN(qk_unitary_bwd)(long M, int n, int n_ops, const int *ops, long G_total, const REAL *g,
                        const int *perm, const REAL *sign, const REAL *tape, const REAL *g_r,
                        REAL *g_g)
{
    const int d = 1 << n, blocks = (d + W - 1) / W;
    const size_t state = (size_t)2 * d * W;
    REAL *G = malloc(sizeof(REAL) * (2 * state + 2 * (size_t)G_total * W));
    REAL *tmp = G + state, *acc = tmp + state;
    for (long m = 0; m < M; m++) {
        const REAL *gm = g + 2 * (size_t)G_total * m;
        memset(acc, 0, sizeof(REAL) * 2 * G_total * W);
        for (int blk = 0; blk < blocks; blk++) {
            const int j0 = blk * W, nb = d - j0 < W ? d - j0 : W;
            FN(load_rows)(G, g_r + 2 * (size_t)d * d * m, j0, nb, 2 * d);
            const REAL *tp = tape + ((size_t)m * blocks + blk) * n_ops * state;
            for (int o = n_ops - 1; o >= 0; o--)
                FN(op_bwd)(ops + 4 * o, n, gm, perm, sign, tp + o * state, G, acc, tmp);
        }
        for (long e = 0; e < 2 * G_total; e++) {  /* the sum over the lanes */
            double sum = 0;
            for (int j = 0; j < W; j++)
                sum += ROW(acc, e)[j];
            g_g[2 * (size_t)G_total * m + e] = (REAL)sum;
        }
    }
    free(G);
}


/* ---- encoder, psi @ R and readout in one pass ------------------------------------------
 * out = readout(encode(x, t) @ r) without the (B, d) states ever leaving a block: per
 * block psi (lanes) -> phi[i] = sum_j psi[j] r[j][i] -> <Z_q>. The rows are S segments of
 * B / S (S models, model-major); segment s uses t + s t_step and r + s r_step (a step of 0:
 * one t or r shared by all). r NULL: no ansatz steps (phi = psi). */

/* phi (2d rows) = psi @ r for the block's lanes */
static void FN(apply_r)(const REAL *psi, const REAL *r, REAL *phi, size_t d)
{
    for (size_t i = 0; i < d; i++) {
        REAL *yr = ROW(phi, 2 * i), *yi = ROW(phi, 2 * i + 1);
        LANES yr[j] = yi[j] = 0;
        for (size_t k = 0; k < d; k++) {
            const REAL cr = r[2 * (k * d + i)], ci = r[2 * (k * d + i) + 1];
            const REAL *xr = ROW(psi, 2 * k), *xi = ROW(psi, 2 * k + 1);
            CMUL_ADD(yr, yi, cr, ci, xr, xi);
        }
    }
}

/* The block's forward up to phi: encode (psi in w), then phi = psi @ rs into `phi` (2d
 * rows); returns phi, or psi itself without rs. */
static const REAL *FN(eur_block)(FN(block) *w, long b0, int nb, int n, int n_inputs, int L,
                                 const REAL *x, const REAL *ts, const REAL *rs, REAL *phi)
{
    const size_t d = (size_t)1 << n;
    const REAL *psi = ROW(w->P, 2 * (d - 2));
    FN(encode_block)(w, b0, nb, n, n_inputs, L, x, ts);
    if (!rs)
        return psi;
    FN(apply_r)(psi, rs, phi, d);
    return phi;
}

void FN(qk_eur_fwd)(long B, long S, int n, int n_inputs, int L, const REAL *x, const REAL *t,
                    long t_step, const REAL *r, long r_step, REAL *out)
{
    const size_t d = (size_t)1 << n;
    const long seg = S > 0 ? B / S : 0;
    FN(block) w = FN(block_alloc)(n, L);
    REAL *phi = malloc(sizeof(REAL) * W * (2 * d + n)), *o = ROW(phi, 2 * d);
    for (long sg = 0; sg < S; sg++) {
        const REAL *ts = t + sg * t_step, *rs = r ? r + 2 * sg * r_step : NULL;
        for (long b0 = sg * seg; b0 < (sg + 1) * seg; b0 += W) {
            const int nb = (sg + 1) * seg - b0 < W ? (int)((sg + 1) * seg - b0) : W;
            const REAL *ph = FN(eur_block)(&w, b0, nb, n, n_inputs, L, x, ts, rs, phi);
            FN(readout_block)(ph, o, d, n);
            FN(store_rows)(out, o, b0, nb, n);
        }
    }
    free(phi);
    free(w.h);
}

/* Backward of qk_eur_fwd (recomputes the forward per block): g_x (B, n_inputs) if need_x;
 * g_t, g_r (zeroed by the caller, laid out as t, r) += each segment's sums at s t_step,
 * s r_step, if need_t / need_r. */
void FN(qk_eur_bwd)(long B, long S, int n, int n_inputs, int L, const REAL *x, const REAL *t,
                    long t_step, const REAL *r, long r_step, const REAL *g_out, int need_x,
                    int need_t, int need_r, REAL *g_x, REAL *g_t, REAL *g_r)
{
    const size_t d = (size_t)1 << n;
    const int K = 1 << L;
    const long seg = S > 0 ? B / S : 0;
    need_r = need_r && r != NULL;
    FN(block) w = FN(block_alloc)(n, L);
    const size_t acc_t = need_t ? (size_t)n * K * 4 : 0, acc_r = need_r ? 2 * d * d : 0;
    /* phi, grad phi (2d rows each), G = grad psi (2d), gv (4n), gf (K), g_c, g_s, gx
     * (n_inputs), gq (n), zg (1), then the per-lane sums of g_t and g_r */
    const size_t rows = 6 * d + 4 * (size_t)n + K + 2 + n_inputs + n + 1 + acc_t + acc_r;
    REAL *phi = calloc((size_t)W * rows, sizeof(REAL));
    REAL *gphi = ROW(phi, 2 * d), *G = ROW(gphi, 2 * d), *gv = ROW(G, 2 * d);
    REAL *gf = ROW(gv, 4 * n), *g_c = ROW(gf, K), *g_s = ROW(g_c, 1), *gx = ROW(g_s, 1);
    REAL *gq = ROW(gx, n_inputs), *zg = ROW(gq, n), *at = ROW(zg, 1), *ar = ROW(at, acc_t);
    const REAL *psi = ROW(w.P, 2 * (d - 2));
    for (long sg = 0; sg < S; sg++) {
        const REAL *ts = t + sg * t_step, *rs = r ? r + 2 * sg * r_step : NULL;
        memset(at, 0, sizeof(REAL) * W * (acc_t + acc_r));
        for (long b0 = sg * seg; b0 < (sg + 1) * seg; b0 += W) {
            const int nb = (sg + 1) * seg - b0 < W ? (int)((sg + 1) * seg - b0) : W;
            const REAL *ph = FN(eur_block)(&w, b0, nb, n, n_inputs, L, x, ts, rs, phi);
            /* readout: grad phi[i] = 2 phi[i] sum_q g_out[q] z_q(i) */
            FN(load_rows)(gq, g_out, b0, nb, n);
            for (size_t i = 0; i < d; i++) {
                LANES zg[j] = 0;
                for (int q = 0; q < n; q++) {
                    const REAL *g = ROW(gq, q);
                    if ((i >> q) & 1)
                        LANES zg[j] -= g[j];
                    else
                        LANES zg[j] += g[j];
                }
                const REAL *pr = ROW(ph, 2 * i), *pi = ROW(ph, 2 * i + 1);
                REAL *yr = ROW(gphi, 2 * i), *yi = ROW(gphi, 2 * i + 1);
                LANES {
                    yr[j] = 2 * zg[j] * pr[j];
                    yi[j] = 2 * zg[j] * pi[j];
                }
            }
            if (rs) {
                /* phi = psi @ r: grad r[k][i] += conj(psi[k]) grad phi[i];
                 * grad psi[k] = sum_i conj(r[k][i]) grad phi[i] */
                for (size_t k = 0; k < d; k++) {
                    const REAL *xr = ROW(psi, 2 * k), *xi = ROW(psi, 2 * k + 1);
                    REAL *hr = ROW(G, 2 * k), *hi = ROW(G, 2 * k + 1);
                    LANES hr[j] = hi[j] = 0;
                    for (size_t i = 0; i < d; i++) {
                        const REAL *yr = ROW(gphi, 2 * i), *yi = ROW(gphi, 2 * i + 1);
                        const REAL cr = rs[2 * (k * d + i)], ci = -rs[2 * (k * d + i) + 1];
                        CMUL_ADD(hr, hi, cr, ci, yr, yi);
                        if (need_r) {
                            REAL *ur = ROW(ar, 2 * (k * d + i)), *ui = ROW(ar, 2 * (k * d + i) + 1);
                            LANES {
                                ur[j] += xr[j] * yr[j] + xi[j] * yi[j];
                                ui[j] += xr[j] * yi[j] - xi[j] * yr[j];
                            }
                        }
                    }
                }
            } else {
                memcpy(G, gphi, sizeof(REAL) * W * 2 * d);
            }
            FN(encode_block_bwd)(&w, G, gv, gf, g_c, g_s, gx, at, n, n_inputs, L, ts, need_x,
                                 need_t);
            if (need_x)
                FN(store_rows)(g_x, gx, b0, nb, n_inputs);
        }
        for (size_t e = 0; e < acc_t; e++) {  /* the sums over the lanes */
            double sum = 0;
            for (int j = 0; j < W; j++)
                sum += ROW(at, e)[j];
            g_t[sg * t_step + e] += (REAL)sum;
        }
        for (size_t e = 0; e < acc_r; e++) {
            double sum = 0;
            for (int j = 0; j < W; j++)
                sum += ROW(ar, e)[j];
            g_r[2 * sg * r_step + e] += (REAL)sum;
        }
    }
    free(phi);
    free(w.h);
}

#undef CMUL_SET
#undef CMUL_ADD

#undef ROW
#endif
