// hetinfer CUDA kernels. One module per element type T, chosen by -DHI_DTYPE=0|1|2
// (f32, f16, bf16). Arithmetic and accumulation in f32. common.cuh is prepended.
// Arguments: pointers are device addresses, sizes are int (host checks ranges),
// `vec` flags say the host checked 16-byte alignment for 128-bit accesses.

#if HI_DTYPE == 0
typedef float T;
#elif HI_DTYPE == 1
typedef f16_t T;
#elif HI_DTYPE == 2
typedef bf16_t T;
#else
#error "HI_DTYPE must be 0 (f32), 1 (f16) or 2 (bf16)"
#endif

#define VEC (16 / (int)sizeof(T))

// f32 or T at run time, for arguments that may be either (an f32 residual stream
// beside T weights): is32 says which.
__device__ __forceinline__ float ldf(const void* p, int is32, size_t i) {
    return is32 ? reinterpret_cast<const float*>(p)[i] : to_f32(reinterpret_cast<const T*>(p)[i]);
}
__device__ __forceinline__ void stf(void* p, int is32, size_t i, float v) {
    if (is32) reinterpret_cast<float*>(p)[i] = v;
    else reinterpret_cast<T*>(p)[i] = from_f32<T>(v);
}

// ---------------------------------------------------------------- embedding
// out[t, :] = table[ids[t], :]; an id out of range writes NaN. out is T, or f32 (o32).
extern "C" __global__ void embedding(const void* __restrict__ ids, int ids64,
                                     const T* __restrict__ table, void* __restrict__ out, int o32,
                                     int V, int D, int vec) {
    pdl_trigger();
    const int t = blockIdx.x;
    const i64 id = load_index(ids, ids64, t);
    const size_t o = (size_t)t * D;
    if (id < 0 || id >= V) {
        for (int d = threadIdx.x; d < D; d += blockDim.x) stf(out, o32, o + d, HI_NAN);
        return;
    }
    const T* row = table + (size_t)id * D;
    if (vec && !o32) {
        T* op = reinterpret_cast<T*>(out) + o;
        for (int d = threadIdx.x * VEC; d < D; d += blockDim.x * VEC) store16(op + d, load16_nc(row + d));
    } else {
        for (int d = threadIdx.x; d < D; d += blockDim.x) stf(out, o32, o + d, to_f32(row[d]));
    }
}

// ---------------------------------------------------------------- rms_norm
// One block per row: sum of squares (128-bit loads where aligned), block reduction,
// then a second pass that scales and writes. x and out are T, or f32 (x32, o32: the
// 128-bit path is for all-T calls).
extern "C" __global__ void rms_norm(const void* __restrict__ xv, int x32, const T* __restrict__ w,
                                    void* __restrict__ outv, int o32, int D, float eps, int vec) {
    const size_t row = blockIdx.x;
    const size_t base = row * D;
    vec = vec && !x32 && !o32;
    const T* xr = reinterpret_cast<const T*>(xv) + base;
    float ss = 0.f;
    if (vec) {
        for (int d = threadIdx.x * VEC; d < D; d += blockDim.x * VEC) {
            Vec16<T> v = load16(xr + d);
#pragma unroll
            for (int e = 0; e < VEC; ++e) { float f = to_f32(v.e[e]); ss += f * f; }
        }
    } else {
        for (int d = threadIdx.x; d < D; d += blockDim.x) { float f = ldf(xv, x32, base + d); ss += f * f; }
    }
    ss = block_sum(ss);
    const float inv = rsqrtf(ss / (float)D + eps);
    if (vec) {
        T* o = reinterpret_cast<T*>(outv) + base;
        for (int d = threadIdx.x * VEC; d < D; d += blockDim.x * VEC) {
            Vec16<T> v = load16(xr + d), g = load16_nc(w + d), r;
#pragma unroll
            for (int e = 0; e < VEC; ++e) r.e[e] = from_f32<T>(to_f32(v.e[e]) * inv * to_f32(g.e[e]));
            store16(o + d, r);
        }
    } else {
        for (int d = threadIdx.x; d < D; d += blockDim.x)
            stf(outv, o32, base + d, ldf(xv, x32, base + d) * inv * to_f32(w[d]));
    }
}

// ---------------------------------------------------------------- elementwise
extern "C" __global__ void add(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out,
                               long long n, int vec) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (vec) {
        const long long nv = n / VEC;
        for (; i < nv; i += stride) {
            Vec16<T> x = load16(a + i * VEC), y = load16(b + i * VEC), r;
#pragma unroll
            for (int e = 0; e < VEC; ++e) r.e[e] = from_f32<T>(to_f32(x.e[e]) + to_f32(y.e[e]));
            store16(out + i * VEC, r);
        }
    } else {
        for (; i < n; i += stride) out[i] = from_f32<T>(to_f32(a[i]) + to_f32(b[i]));
    }
}

__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.f + expf(-g)) * u; }

// out is T, or f32 (o32): a result below T's normal range keeps its precision (silu of a
// large negative gate is tiny; rounded through f16 it lost up to 10% in the subnormals)
extern "C" __global__ void swiglu(const T* __restrict__ gate, const T* __restrict__ up,
                                  void* __restrict__ out, long long n, int vec, int o32) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (vec && !o32) {
        T* o = reinterpret_cast<T*>(out);
        const long long nv = n / VEC;
        for (; i < nv; i += stride) {
            Vec16<T> g = load16(gate + i * VEC), u = load16(up + i * VEC), r;
#pragma unroll
            for (int e = 0; e < VEC; ++e) r.e[e] = from_f32<T>(silu_mul(to_f32(g.e[e]), to_f32(u.e[e])));
            store16(o + i * VEC, r);
        }
    } else {
        for (; i < n; i += stride) stf(out, o32, i, silu_mul(to_f32(gate[i]), to_f32(up[i])));
    }
}

// ---------------------------------------------------------------- softmax
// One block per row: max, sum of exp, write.
extern "C" __global__ void softmax(const T* __restrict__ x, T* __restrict__ out, int D) {
    const size_t row = blockIdx.x;
    const T* xr = x + row * D;
    T* o = out + row * D;
    float m = -HI_INF;
    for (int d = threadIdx.x; d < D; d += blockDim.x) m = fmaxf(m, to_f32(xr[d]));
    m = block_max(m);
    float s = 0.f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) s += expf(to_f32(xr[d]) - m);
    s = block_sum(s);
    const float inv = 1.f / s;
    for (int d = threadIdx.x; d < D; d += blockDim.x) o[d] = from_f32<T>(expf(to_f32(xr[d]) - m) * inv);
}

// ---------------------------------------------------------------- argmax
// One block per row; the first index on ties; NaN counts as the largest (as numpy).
__device__ __forceinline__ bool better(float a, int ia, float b, int ib) {
    const bool an = a != a, bn = b != b;
    if (an != bn) return an;
    if (!an && a != b) return a > b;
    return ia < ib;
}

// argmax of xr[0..N) by the whole block (blockDim.x a multiple of 32); thread 0 gets it
__device__ __forceinline__ int block_argmax(const T* __restrict__ xr, int N) {
    float best = -HI_INF;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < N; i += blockDim.x) {
        const float v = to_f32(xr[i]);
        if (better(v, i, best, bi)) { best = v; bi = i; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (better(ov, oi, best, bi)) { best = ov; bi = oi; }
    }
    __shared__ float sv[32];
    __shared__ int si[32];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) { sv[w] = best; si[w] = bi; }
    __syncthreads();
    if (w == 0) {
        best = lane < nw ? sv[lane] : -HI_INF;
        bi = lane < nw ? si[lane] : 0x7fffffff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, best, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (better(ov, oi, best, bi)) { best = ov; bi = oi; }
        }
    }
    return bi == 0x7fffffff ? 0 : bi;
}

extern "C" __global__ void argmax(const T* __restrict__ x, int* __restrict__ out, int N) {
    const size_t row = blockIdx.x;
    const int a = block_argmax(x + row * N, N);
    if (threadIdx.x == 0) out[row] = a;
}

// ---------------------------------------------------------------- cast
#define CAST_KERNEL(NAME, TO)                                                              \
    extern "C" __global__ void NAME(const T* __restrict__ x, TO* __restrict__ out, long long n) { \
        const long long stride = (long long)gridDim.x * blockDim.x;                        \
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) \
            out[i] = from_f32<TO>(to_f32(x[i]));                                            \
    }
CAST_KERNEL(cast_to_f32, float)
CAST_KERNEL(cast_to_f16, f16_t)
CAST_KERNEL(cast_to_bf16, bf16_t)

// ---------------------------------------------------------------- rope
// Pair u of a (T, H, D) tensor walked one rotated pair at a time: its row th = t H + h, token t,
// pair index i < D / 2 and the two rotated elements' offsets j1, j2 within the row (adjacent
// for interleaved pairs, i and i + D / 2 for half rotation). Shared by rope and rope_kv_write.
struct RopePair {
    long long th;
    int t, i, j1, j2;
};
__device__ __forceinline__ RopePair rope_pair(long long u, int H, int D, int interleaved) {
    const int half = D / 2;
    RopePair r;
    r.i = (int)(u % half);
    r.th = u / half;
    r.t = (int)(r.th / H);
    r.j1 = interleaved ? 2 * r.i : r.i;
    r.j2 = interleaved ? 2 * r.i + 1 : r.i + half;
    return r;
}

// x, out (T, H, D); positions (T,) on the device; cos/sin f32 (P, D/2).
// One thread per rotated pair, which reads both elements before writing: out may be x.
extern "C" __global__ void rope(const T* x, const void* __restrict__ pos, int pos64,
                                const float* __restrict__ cosv, const float* __restrict__ sinv,
                                T* out, int ntok, int H, int D, int P, int interleaved) {
    const int half = D / 2;
    const long long total = (long long)ntok * H * half;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += stride) {
        const RopePair r = rope_pair(idx, H, D, interleaved);
        const i64 p = load_index(pos, pos64, r.t);
        const size_t base = (size_t)r.th * D;
        if (p < 0 || p >= P) {
            out[base + r.j1] = from_f32<T>(HI_NAN);
            out[base + r.j2] = from_f32<T>(HI_NAN);
            continue;
        }
        const float c = cosv[(size_t)p * half + r.i], s = sinv[(size_t)p * half + r.i];
        const float x1 = to_f32(x[base + r.j1]), x2 = to_f32(x[base + r.j2]);
        out[base + r.j1] = from_f32<T>(x1 * c - x2 * s);
        out[base + r.j2] = from_f32<T>(x2 * c + x1 * s);
    }
}

// ---------------------------------------------------------------- kv_cache_write
// k, v (ntok, Hkv*D) -> rows positions[t] of the caches (S, Hkv*D); out-of-range rows skipped.
extern "C" __global__ void kv_cache_write(const T* __restrict__ k, const T* __restrict__ v,
                                          T* __restrict__ kc, T* __restrict__ vc,
                                          const void* __restrict__ pos, int pos64,
                                          int ntok, int rowlen, int S) {
    const long long total = (long long)ntok * rowlen;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += stride) {
        const int t = (int)(idx / rowlen), r = (int)(idx % rowlen);
        const i64 p = load_index(pos, pos64, t);
        if (p < 0 || p >= S) continue;
        kc[(size_t)p * rowlen + r] = k[idx];
        vc[(size_t)p * rowlen + r] = v[idx];
    }
}

// ---------------------------------------------------------------- rope_kv_write
// rope and kv_cache_write in one launch: q (T, Hq, D) rotated in place; k (T, Hkv, D)
// rotated into k_cache rows positions[t]; v (T, Hkv, D) copied into v_cache rows. A
// thread per rotated pair of q or k, or per element of v. A position outside the rope
// table makes q NaN (as rope); outside the cache, k and v are not written (as kv_cache_write).
// PAGED (rope_paged_kv_write): token t's row is slots[t] of the pools (NB, BS, Hkv, D) seen
// as S = NB BS rows of Hkv D (block slot / BS, row slot % BS); a slot < 0 writes nothing.

// the cache row of token t's k and v: its position, or (PAGED) its slot; -1 outside [0, S)
template <bool PAGED>
__device__ __forceinline__ i64 kv_row(const void* __restrict__ pos, int pos64, const int* __restrict__ slots,
                                      int t, int S) {
    const i64 r = PAGED ? (i64)slots[t] : load_index(pos, pos64, t);
    return r >= 0 && r < S ? r : -1;
}

template <bool PAGED>
__device__ __forceinline__ void rope_kv_write_body(
        T* q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ kc, T* __restrict__ vc,
        const void* __restrict__ pos, int pos64, const int* __restrict__ slots,
        const float* __restrict__ cosv, const float* __restrict__ sinv,
        int ntok, int Hq, int Hkv, int D, int P, int S, int interleaved) {
    pdl_trigger();
    pdl_wait();
    const int half = D / 2;
    const long long nq = (long long)ntok * Hq * half, nk = (long long)ntok * Hkv * half;
    const long long total = nq + nk + (long long)ntok * Hkv * D;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const size_t rowlen = (size_t)Hkv * D;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += stride) {
        if (idx >= nq + nk) {                                   // v element
            const long long e = idx - nq - nk;
            const int t = (int)(e / rowlen);
            const i64 dst = kv_row<PAGED>(pos, pos64, slots, t, S);
            if (dst >= 0) vc[(size_t)dst * rowlen + e % rowlen] = v[e];
            continue;
        }
        const bool isq = idx < nq;
        const int H = isq ? Hq : Hkv;
        const RopePair r = rope_pair(isq ? idx : idx - nq, H, D, interleaved);
        const i64 p = load_index(pos, pos64, r.t);
        const size_t base = (size_t)r.th * D;
        if (p < 0 || p >= P) {
            if (isq) { q[base + r.j1] = from_f32<T>(HI_NAN); q[base + r.j2] = from_f32<T>(HI_NAN); }
            continue;
        }
        const float c = cosv[(size_t)p * half + r.i], s = sinv[(size_t)p * half + r.i];
        const T* src = isq ? q : k;
        const float x1 = to_f32(src[base + r.j1]), x2 = to_f32(src[base + r.j2]);
        const T r1 = from_f32<T>(x1 * c - x2 * s), r2 = from_f32<T>(x2 * c + x1 * s);
        if (isq) {
            q[base + r.j1] = r1;
            q[base + r.j2] = r2;
        } else {
            const i64 dst = kv_row<PAGED>(pos, pos64, slots, r.t, S);
            if (dst >= 0) {
                const size_t o = (size_t)dst * rowlen + (size_t)(r.th % H) * D;
                kc[o + r.j1] = r1;
                kc[o + r.j2] = r2;
            }
        }
    }
}

// caches (S, Hkv, D)
extern "C" __global__ void rope_kv_write(T* q, const T* __restrict__ k, const T* __restrict__ v,
                                         T* __restrict__ kc, T* __restrict__ vc,
                                         const void* __restrict__ pos, int pos64,
                                         const float* __restrict__ cosv, const float* __restrict__ sinv,
                                         int ntok, int Hq, int Hkv, int D, int P, int S, int interleaved) {
    rope_kv_write_body<false>(q, k, v, kc, vc, pos, pos64, nullptr, cosv, sinv, ntok, Hq, Hkv, D, P, S,
                              interleaved);
}

// pools (NB, BS, Hkv, D), S = NB BS slots; slots (T,) i32
extern "C" __global__ void rope_paged_kv_write(T* q, const T* __restrict__ k, const T* __restrict__ v,
                                               T* __restrict__ kp, T* __restrict__ vp,
                                               const void* __restrict__ pos, int pos64,
                                               const int* __restrict__ slots,
                                               const float* __restrict__ cosv, const float* __restrict__ sinv,
                                               int ntok, int Hq, int Hkv, int D, int P, int S, int interleaved) {
    rope_kv_write_body<true>(q, k, v, kp, vp, pos, pos64, slots, cosv, sinv, ntok, Hq, Hkv, D, P, S,
                             interleaved);
}

// ---------------------------------------------------------------- attention (decode)
// One query token: q (1, Hq, D); caches (S, Hkv, D); out (1, Hq, D). The token attends
// to cache rows 0..L-1, L = positions[0] + 1 read on the device (a captured graph
// replays with new positions). Split along the sequence (flash-decoding): grid
// (Hq, nsplit) of 8 warps; block (hq, s) takes rows [s C, s C + C) for query head hq
// (kv head hq / G). The time is latency, not bytes, so every step issues its loads at
// once: warp w takes rows w, w + 8, ... in batches of NB, a lane holds q[d] for
// d = lane + 32 i (DPL of them) and loads that d of NB K rows and NB V rows before
// using any; a warp sum per row gives the scores; each warp keeps an online softmax
// (max, sum, acc) over its rows; the warps are merged through shared memory.
// With one split the block writes the result. Otherwise it writes its partial (max,
// sum, acc[D]) to `part`, and the last block of the head (a counter, reset by that
// block) merges the splits, in split order. Splits past L exit at once.
#define ADEC_WARPS 8
#define ADEC_MAXD 256

// Where key j of the keys attended to is, as an element offset from the cache's start
// (its kv head's column): j rows of Hkv D apart (a contiguous cache), or position j of one
// sequence in block-paged pools (NB, BS, Hkv, D): block table[j / BS], row j % BS.
struct KvRows {
    size_t kstride;
    __device__ __forceinline__ size_t row(int j) const { return (size_t)j * kstride; }
};
struct KvPaged {
    const int* table;
    int BS;
    size_t kstride;
    __device__ __forceinline__ size_t row(int j) const {
        return ((size_t)table[j / BS] * BS + j % BS) * kstride;
    }
};

// Block (s = blockIdx.y) of one query row and head: qh, op that head of q and out; kc, vc
// at its kv head; keys 0..L-1 in splits of C; pg the head's partials (nsplit (D + 2)) and
// cnt its counter.
template <int DPL, int NB, class KV>
__device__ __forceinline__ void attention_decode_body(
        const T* __restrict__ qh, const T* __restrict__ kc, const T* __restrict__ vc, KV rows,
        T* __restrict__ op, int D, int L, float scale, int C, float* __restrict__ pg, int* __restrict__ cnt) {
    __shared__ float s_m[ADEC_WARPS], s_l[ADEC_WARPS], s_acc[ADEC_WARPS][32 * DPL];
    __shared__ int s_last;
    const int s = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int active = (L + C - 1) / C;            // splits holding at least one key
    if (L == 0) {                                   // nothing to attend to: NaN, as the reference
        if (s == 0)
            for (int d = tid; d < D; d += blockDim.x) op[d] = from_f32<T>(HI_NAN);
        return;
    }
    if (s >= active) return;
    const int j0 = s * C, n = min(C, L - j0);
    float qr[DPL], acc[DPL];
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
        const int d = lane + 32 * i;
        qr[i] = d < D ? to_f32(qh[d]) * scale : 0.f;
        acc[i] = 0.f;
    }
    float m = -HI_INF, l = 0.f;
    for (int jb = warp; jb < n; jb += ADEC_WARPS * NB) {
        float kv[NB][DPL], vv[NB][DPL];
#pragma unroll
        for (int u = 0; u < NB; ++u) {
            const int jj = jb + u * ADEC_WARPS;
            const size_t off = jj < n ? rows.row(j0 + jj) : 0;      // keys past L: never read
#pragma unroll
            for (int i = 0; i < DPL; ++i) {
                const int d = lane + 32 * i;
                const bool ok = jj < n && d < D;
                kv[u][i] = ok ? to_f32(kc[off + d]) : 0.f;
                vv[u][i] = ok ? to_f32(vc[off + d]) : 0.f;
            }
        }
        float sc[NB];
#pragma unroll
        for (int u = 0; u < NB; ++u) {
            float dot = 0.f;
#pragma unroll
            for (int i = 0; i < DPL; ++i) dot += qr[i] * kv[u][i];
            sc[u] = dot;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
            for (int u = 0; u < NB; ++u) sc[u] += __shfl_xor_sync(0xffffffffu, sc[u], o);
        }
        float bm = -HI_INF;
#pragma unroll
        for (int u = 0; u < NB; ++u)
            if (jb + u * ADEC_WARPS < n) bm = fmaxf(bm, sc[u]);
        const float mn = fmaxf(m, bm);
        const float corr = expf(m - mn);            // 0 on the first batch (m = -inf)
        l *= corr;
#pragma unroll
        for (int i = 0; i < DPL; ++i) acc[i] *= corr;
#pragma unroll
        for (int u = 0; u < NB; ++u) {
            if (jb + u * ADEC_WARPS < n) {
                const float pu = expf(sc[u] - mn);
                l += pu;
#pragma unroll
                for (int i = 0; i < DPL; ++i) acc[i] += pu * vv[u][i];
            }
        }
        m = mn;
    }
    if (lane == 0) { s_m[warp] = m; s_l[warp] = l; }
#pragma unroll
    for (int i = 0; i < DPL; ++i) s_acc[warp][lane + 32 * i] = acc[i];
    __syncthreads();
    float M = -HI_INF;
#pragma unroll
    for (int w = 0; w < ADEC_WARPS; ++w) M = fmaxf(M, s_m[w]);
    float wt[ADEC_WARPS], Ls = 0.f;
#pragma unroll
    for (int w = 0; w < ADEC_WARPS; ++w) {
        wt[w] = s_m[w] == -HI_INF ? 0.f : expf(s_m[w] - M);
        Ls += wt[w] * s_l[w];
    }
    if (active == 1) {
        for (int d = tid; d < D; d += blockDim.x) {
            float a = 0.f;
#pragma unroll
            for (int w = 0; w < ADEC_WARPS; ++w) a += wt[w] * s_acc[w][d];
            op[d] = from_f32<T>(a / Ls);
        }
        return;
    }
    // partials: pg[s (D + 2) + {0: max, 1: sum, 2..: acc}]
    float* pp = pg + (size_t)s * (D + 2);
    for (int d = tid; d < D; d += blockDim.x) {
        float a = 0.f;
#pragma unroll
        for (int w = 0; w < ADEC_WARPS; ++w) a += wt[w] * s_acc[w][d];
        pp[2 + d] = a;
    }
    if (tid == 0) { pp[0] = M; pp[1] = Ls; }
    __threadfence();
    __syncthreads();
    if (tid == 0) s_last = atomicAdd(cnt, 1) == active - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    float PM = -HI_INF;
    for (int k = 0; k < active; ++k) PM = fmaxf(PM, __ldcg(pg + (size_t)k * (D + 2)));
    float PL = 0.f;
    for (int k = 0; k < active; ++k) {
        const float* pk = pg + (size_t)k * (D + 2);
        PL += expf(__ldcg(pk) - PM) * __ldcg(pk + 1);
    }
    for (int d = tid; d < D; d += blockDim.x) {
        float a = 0.f;
        for (int k = 0; k < active; ++k) {
            const float* pk = pg + (size_t)k * (D + 2);
            a += expf(__ldcg(pk) - PM) * __ldcg(pk + 2 + d);
        }
        op[d] = from_f32<T>(a / PL);
    }
    if (tid == 0) *cnt = 0;              // ready for the next call
}

// attention_decode: block (hq, s); part (Hq, nsplit, D + 2), count (Hq,)
template <int DPL, int NB>
__device__ __forceinline__ void attention_decode_cache(
        const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
        const void* __restrict__ pos, int pos64, T* __restrict__ out,
        int Hq, int Hkv, int D, int S, float scale, int C, float* __restrict__ part, int* __restrict__ count) {
    pdl_trigger();                                 // the o product may start its weight loads
    pdl_wait();                                    // q, k, v: the previous kernel's output
    const int hq = blockIdx.x, h = hq / (Hq / Hkv);
    const i64 p = load_index(pos, pos64, 0);
    const int L = p < 0 ? 0 : (int)(p >= S ? S : p + 1);
    attention_decode_body<DPL, NB>(q + (size_t)hq * D, kc + (size_t)h * D, vc + (size_t)h * D,
                                   KvRows{(size_t)Hkv * D}, out + (size_t)hq * D, D, L, scale, C,
                                   part + (size_t)hq * gridDim.y * (D + 2), count + hq);
}

// head dims up to 64, 128, 256 (d per lane 2, 4, 8; rows per batch 8, 8, 4)
#define ADEC_KERNEL(NAME, DPL, NB)                                                                 \
    extern "C" __global__ void __launch_bounds__(ADEC_WARPS * 32)                                  \
    NAME(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,              \
         const void* __restrict__ pos, int pos64, T* __restrict__ out, int Hq, int Hkv, int D, int S, \
         float scale, int C, float* __restrict__ part, int* __restrict__ count) {                  \
        attention_decode_cache<DPL, NB>(q, kc, vc, pos, pos64, out, Hq, Hkv, D, S, scale, C, part, count); \
    }
ADEC_KERNEL(attention_decode_d64, 2, 8)
ADEC_KERNEL(attention_decode_d128, 4, 8)
ADEC_KERNEL(attention_decode_d256, 8, 4)

// ---------------------------------------------------------------- attention (prefill)
// Causal attention of ntok query tokens at positions[t] over cache rows 0..positions[t]
// (the chunk's own keys are in the cache already). Tiled with an online softmax: grid
// (Hq, ceil(ntok / 32)), 128 threads; a block holds 32 queries of one head and walks
// 32-row tiles of K and V (f32 in shared memory) up to the largest position of its
// queries. Thread t: query row r = t / 4, sub = t % 4: scores of keys sub, sub+4, ...
// (8 independent dot products, d outer) and output columns sub, sub+4, ... of its row
// (DQ of them); a row's four threads share a warp. Tiles are read with 16-byte loads,
// a few in flight per thread before any is stored. A row's keys past its position are
// masked: exact zeros in its sums and no change to its running max, so its result does
// not depend on the other rows of its tile.
#define APF_Q 32
#define APF_K 32

// One tile of nq <= 32 query rows of one head: q0, out0 its first row's head, rows qstride
// apart; kc, vc at its kv head; thread tid < 32 passes rowpos, the position of row tid
// (-1: none; it sees keys 0..rowpos).
template <int DQ, class KV>
__device__ __forceinline__ void attention_prefill_body(
        const T* __restrict__ q0, int qstride, const T* __restrict__ kc, const T* __restrict__ vc, KV rows,
        T* __restrict__ out0, int nq, int rowpos, int D, float scale) {
    extern __shared__ float sm[];
    const int Dp = D + 1;                          // padded rows: no bank conflicts
    float* qs = sm;                                // (32, Dp)
    float* ks = qs + APF_Q * Dp;                   // (32, Dp)
    float* vs = ks + APF_K * Dp;                   // (32, Dp)
    float* ps = vs + APF_K * Dp;                   // (32, 33)
    const int tid = threadIdx.x, r = tid >> 2, sub = tid & 3;
    __shared__ int s_pos[APF_Q];
    __shared__ int s_maxp;
    if (tid < APF_Q) s_pos[tid] = rowpos;
    for (int i = tid; i < APF_Q * D; i += blockDim.x) {
        const int rr = i / D, d = i % D;
        qs[rr * Dp + d] = rr < nq ? to_f32(q0[(size_t)rr * qstride + d]) * scale : 0.f;
    }
    __syncthreads();
    if (tid == 0) {
        int m = -1;
        for (int i = 0; i < APF_Q; ++i) m = max(m, s_pos[i]);
        s_maxp = m;
    }
    __syncthreads();
    const int my = s_pos[r], maxp = s_maxp;
    const int vec = (D % VEC == 0) && ((((size_t)kc) | ((size_t)vc) | (rows.kstride * sizeof(T))) % 16 == 0);
    const int cpr = D / VEC;                       // 16-byte chunks per row
    float m = -HI_INF, l = 0.f;
    float acc[DQ];
#pragma unroll
    for (int i = 0; i < DQ; ++i) acc[i] = 0.f;

    for (int j0 = 0; j0 <= maxp; j0 += APF_K) {
        if (vec) {
            for (int i0 = tid; i0 < APF_K * cpr; i0 += 4 * blockDim.x) {
                Vec16<T> kb[4], vb[4];
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                    const int i = i0 + u * blockDim.x, jj = i / cpr;
                    if (i < APF_K * cpr && j0 + jj <= maxp) {
                        const size_t off = rows.row(j0 + jj) + (i % cpr) * VEC;
                        kb[u] = load16_nc(kc + off);
                        vb[u] = load16_nc(vc + off);
                    }
                }
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                    const int i = i0 + u * blockDim.x, jj = i / cpr, d0 = (i % cpr) * VEC;
                    if (i < APF_K * cpr) {
                        const bool ok = j0 + jj <= maxp;
#pragma unroll
                        for (int e = 0; e < VEC; ++e) {
                            ks[jj * Dp + d0 + e] = ok ? to_f32(kb[u].e[e]) : 0.f;
                            vs[jj * Dp + d0 + e] = ok ? to_f32(vb[u].e[e]) : 0.f;
                        }
                    }
                }
            }
        } else {
            for (int i = tid; i < APF_K * D; i += blockDim.x) {
                const int jj = i / D, d = i % D;
                const bool ok = j0 + jj <= maxp;
                const size_t off = ok ? rows.row(j0 + jj) + d : 0;
                ks[jj * Dp + d] = ok ? to_f32(kc[off]) : 0.f;
                vs[jj * Dp + d] = ok ? to_f32(vc[off]) : 0.f;
            }
        }
        __syncthreads();
        float sc[APF_K / 4];
#pragma unroll
        for (int u = 0; u < APF_K / 4; ++u) sc[u] = 0.f;
        const float* qr = qs + r * Dp;
#pragma unroll 4
        for (int d = 0; d < D; ++d) {
            const float qv = qr[d];
#pragma unroll
            for (int u = 0; u < APF_K / 4; ++u) sc[u] += qv * ks[(sub + 4 * u) * Dp + d];
        }
        float tmax = -HI_INF;
#pragma unroll
        for (int u = 0; u < APF_K / 4; ++u) {
            if (j0 + sub + 4 * u > my) sc[u] = -HI_INF;
            tmax = fmaxf(tmax, sc[u]);
        }
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
        const float mn = fmaxf(m, tmax);
        const float corr = mn == -HI_INF ? 1.f : expf(m - mn);
        float psum = 0.f;
#pragma unroll
        for (int u = 0; u < APF_K / 4; ++u) {
            const float e = sc[u] == -HI_INF ? 0.f : expf(sc[u] - mn);
            ps[r * 33 + sub + 4 * u] = e;
            psum += e;
        }
        psum += __shfl_xor_sync(0xffffffffu, psum, 1);
        psum += __shfl_xor_sync(0xffffffffu, psum, 2);
        l = l * corr + psum;
        m = mn;
        __syncwarp();
#pragma unroll
        for (int i = 0; i < DQ; ++i) acc[i] *= corr;
#pragma unroll 4
        for (int jj = 0; jj < APF_K; ++jj) {
            const float pr = ps[r * 33 + jj];
            const float* vr = vs + jj * Dp + sub;
#pragma unroll
            for (int i = 0; i < DQ; ++i)
                if (sub + 4 * i < D) acc[i] += pr * vr[4 * i];
        }
        __syncthreads();                           // before the next tile overwrites ks, vs
    }
    if (r < nq) {
        const float inv = (my >= 0 && l > 0.f) ? 1.f / l : HI_NAN;
        T* op = out0 + (size_t)r * qstride;
#pragma unroll
        for (int i = 0; i < DQ; ++i) {
            const int d = sub + 4 * i;
            if (d < D) op[d] = from_f32<T>(acc[i] * inv);
        }
    }
}

// attention_prefill: block (h, tile of 32 tokens)
template <int DQ>
__device__ __forceinline__ void attention_prefill_cache(
        const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
        const void* __restrict__ pos, int pos64, T* __restrict__ out,
        int ntok, int Hq, int Hkv, int D, int S, float scale) {
    const int h = blockIdx.x, t0 = blockIdx.y * APF_Q, kvh = h / (Hq / Hkv), tid = threadIdx.x;
    int pr = -1;
    if (tid < APF_Q && t0 + tid < ntok) {
        const i64 pp = load_index(pos, pos64, t0 + tid);
        pr = pp < 0 ? -1 : (int)(pp >= S ? S - 1 : pp);
    }
    const size_t o = ((size_t)t0 * Hq + h) * D;
    attention_prefill_body<DQ>(q + o, Hq * D, kc + (size_t)kvh * D, vc + (size_t)kvh * D,
                               KvRows{(size_t)Hkv * D}, out + o, min(APF_Q, ntok - t0), pr, D, scale);
}

// head dims up to 64, 128, 256 (DQ = output columns per thread: 16, 32, 64)
#define APF_KERNEL(NAME, DQ)                                                                       \
    extern "C" __global__ void __launch_bounds__(128)                                              \
    NAME(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,              \
         const void* __restrict__ pos, int pos64, T* __restrict__ out,                             \
         int ntok, int Hq, int Hkv, int D, int S, float scale) {                                   \
        attention_prefill_cache<DQ>(q, kc, vc, pos, pos64, out, ntok, Hq, Hkv, D, S, scale);       \
    }
APF_KERNEL(attention_prefill_d64, 16)
APF_KERNEL(attention_prefill_d128, 32)
APF_KERNEL(attention_prefill_d256, 64)

// ---------------------------------------------------------------- paged attention
// q (T, Hq, D): rows qs[b] .. qs[b + 1] of sequence b; pools (NB, BS, Hkv, D): key j of
// sequence b at block bt[b, j / BS] (bt (B, MB)), row j % BS; its n rows are the last n of
// its L = cl[b] positions. Two kernels, each launched over the whole batch with a grid
// from shapes alone (T, B, MB BS: the index tensors are read on the device only, so a
// captured graph replays with new ones); a block whose sequence is not its kernel's kind
// returns at once:
// - paged_decode: sequences of one query row (decode), split along their keys as in
//   attention_decode: grid (Hq, nsplit, B), nsplit = min(PADEC_SPLITS, ceil(MB BS /
//   PADEC_MIN)); splits of C = max(PADEC_MIN, ceil(L / PADEC_SPLITS)) keys, so at most
//   PADEC_SPLITS of them hold keys; the others return.
// - paged_prefill: sequences of more rows (prefill chunks), in tiles of 32 rows as in
//   attention_prefill: grid (Hq, tiles), tiles >= the sum of ceil(n / 32) over them;
//   block y finds its sequence and tile.
// Keys at or past a sequence's length are never read, nor its table entries past them.
// Batch invariance: every row is computed in an order fixed by its own sequence alone (its
// row count, length and keys, and its position): a decode row's split size, and so its
// splits and their merge order, come from L; a prefill row walks 32-key tiles from key 0
// with the keys past its position masked (exact zeros, whichever rows share its tile).
// Nothing depends on B, on the other sequences or on where the rows sit in q, so a request
// gives the same bits alone or in a batch of any size.
#define PADEC_MIN 64
#define PADEC_SPLITS 64
template <int DPL, int NB>
__device__ __forceinline__ void paged_decode_body(
        const T* __restrict__ q, const T* __restrict__ kp, const T* __restrict__ vp,
        const int* __restrict__ qs, const int* __restrict__ cl, const int* __restrict__ bt, T* __restrict__ out,
        int Hq, int Hkv, int D, int MB, int BS, float scale, float* __restrict__ part, int* __restrict__ count) {
    pdl_trigger();
    pdl_wait();
    const int hq = blockIdx.x, b = blockIdx.z;
    const int r0 = qs[b];
    if (qs[b + 1] - r0 != 1) return;               // not a decode row: paged_prefill's
    const int L = max(0, min(cl[b], MB * BS));
    const int C = max(PADEC_MIN, (L + PADEC_SPLITS - 1) / PADEC_SPLITS);
    const int h = hq / (Hq / Hkv);
    const size_t o = ((size_t)r0 * Hq + hq) * D, rh = (size_t)b * Hq + hq;
    // part (B, Hq, nsplit, D + 2), count (B, Hq)
    attention_decode_body<DPL, NB>(q + o, kp + (size_t)h * D, vp + (size_t)h * D,
                                   KvPaged{bt + (size_t)b * MB, BS, (size_t)Hkv * D}, out + o, D, L, scale, C,
                                   part + rh * gridDim.y * (D + 2), count + rh);
}

template <int DQ>
__device__ __forceinline__ void paged_prefill_body(
        const T* __restrict__ q, const T* __restrict__ kp, const T* __restrict__ vp,
        const int* __restrict__ qs, const int* __restrict__ cl, const int* __restrict__ bt, T* __restrict__ out,
        int B, int Hq, int Hkv, int D, int MB, int BS, float scale) {
    __shared__ int s_b, s_tile;
    const int tid = threadIdx.x, lane = tid & 31;
    if (tid < 32) {            // warp 0: block y is tile g of the sequences of >= 2 rows, in order
        int g = blockIdx.y, fb = -1, ft = 0;
        for (int base = 0; base < B; base += 32) {
            const int b = base + lane;
            const int n = b < B ? qs[b + 1] - qs[b] : 0;
            const int tiles = n >= 2 ? (n + APF_Q - 1) / APF_Q : 0;
            int inc = tiles;                       // inclusive scan of the tiles over the lanes
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int v = __shfl_up_sync(0xffffffffu, inc, o);
                if (lane >= o) inc += v;
            }
            const int total = __shfl_sync(0xffffffffu, inc, 31);
            if (g < total) {
                const int first = __ffs(__ballot_sync(0xffffffffu, inc > g)) - 1;
                fb = base + first;
                ft = g - __shfl_sync(0xffffffffu, inc - tiles, first);
                break;
            }
            g -= total;
        }
        if (lane == 0) { s_b = fb; s_tile = ft; }
    }
    __syncthreads();
    const int b = s_b;
    if (b < 0) return;                             // past the last tile
    const int r0 = qs[b], n = qs[b + 1] - r0, i0 = s_tile * APF_Q;
    const int L = max(0, min(cl[b], MB * BS));
    const int h = blockIdx.x, kvh = h / (Hq / Hkv);
    int pr = -1;
    if (tid < APF_Q && i0 + tid < n) pr = max(-1, L - n + i0 + tid);
    const size_t o = ((size_t)(r0 + i0) * Hq + h) * D;
    attention_prefill_body<DQ>(q + o, Hq * D, kp + (size_t)kvh * D, vp + (size_t)kvh * D,
                               KvPaged{bt + (size_t)b * MB, BS, (size_t)Hkv * D}, out + o,
                               min(APF_Q, n - i0), pr, D, scale);
}

// head dims up to 64, 128, 256, as attention_decode and attention_prefill
#define PADEC_KERNEL(NAME, DPL, NB)                                                                \
    extern "C" __global__ void __launch_bounds__(ADEC_WARPS * 32)                                  \
    NAME(const T* __restrict__ q, const T* __restrict__ kp, const T* __restrict__ vp,              \
         const int* __restrict__ qs, const int* __restrict__ cl, const int* __restrict__ bt,       \
         T* __restrict__ out, int Hq, int Hkv, int D, int MB, int BS, float scale,                 \
         float* __restrict__ part, int* __restrict__ count) {                                      \
        paged_decode_body<DPL, NB>(q, kp, vp, qs, cl, bt, out, Hq, Hkv, D, MB, BS, scale, part, count); \
    }
PADEC_KERNEL(paged_decode_d64, 2, 8)
PADEC_KERNEL(paged_decode_d128, 4, 8)
PADEC_KERNEL(paged_decode_d256, 8, 4)

#define PAPF_KERNEL(NAME, DQ)                                                                      \
    extern "C" __global__ void __launch_bounds__(128)                                              \
    NAME(const T* __restrict__ q, const T* __restrict__ kp, const T* __restrict__ vp,              \
         const int* __restrict__ qs, const int* __restrict__ cl, const int* __restrict__ bt,       \
         T* __restrict__ out, int B, int Hq, int Hkv, int D, int MB, int BS, float scale) {        \
        paged_prefill_body<DQ>(q, kp, vp, qs, cl, bt, out, B, Hq, Hkv, D, MB, BS, scale);          \
    }
PAPF_KERNEL(paged_prefill_d64, 16)
PAPF_KERNEL(paged_prefill_d128, 32)
PAPF_KERNEL(paged_prefill_d256, 64)


// ---------------------------------------------------------------- matmul (decode GEMV)
// out = residual + act(pro(x) @ w^T + bias) for a few rows of x (M <= GEMV_MAXM).
// pro: 0 none; 1 rms_norm: x -> x * rsqrt(mean(x^2) + eps) * nw (K,). act: 0 none, out
// (M, N); 1 swiglu over the halves [gate | up] of the N outputs: out (M, N / 2) =
// silu(y[:, :N/2]) * y[:, N/2:]. x is T or f32 (x32); residual and out are T or f32
// (r32, o32); out may be residual (each element is read, then written, by one lane).
// Each warp streams two weight rows (rpw = 2: rows n, n + 1; with swiglu: gate row n and
// up row n + N/2, so the warp owns an output) or one, 16 bytes per lane per load, the
// rows sharing the loads of x; accumulation in f32. The norm needs no pass of its own:
// rms_norm(x) . w = rsqrt(mean(x^2) + eps) * ((x * nw) . w), and a warp's walk over its
// row reads every x once, so it sums x^2 as it goes.
// Weights: T (WK 0), or int8 with per-group scales, f16 (WK 1) or f32 (WK 2): each
// 16-value chunk is widened in registers (byte permutes into floats) and its dot
// product scaled once (with vec, groups are multiples of 16). vec: the host checked
// 16-byte alignment of w, x, nw and that K (and for int8 the group) fits the chunks.
#define GEMV_WARPS 8
#define GEMV_MAXM 8

template <typename S> __device__ __forceinline__ float ld_scale(const S* p, size_t i) { return to_f32(p[i]); }

// four signed bytes of w -> floats, exactly: bias to unsigned, place in a float's mantissa
__device__ __forceinline__ void i8x4(u32 w, float* f) {
    w ^= 0x80808080u;
    f[0] = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7540)) - 8388736.f;
    f[1] = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7541)) - 8388736.f;
    f[2] = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7542)) - 8388736.f;
    f[3] = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7543)) - 8388736.f;
}

// NE consecutive elements of x (f32 if x32, else T) from element i, with 16-byte loads
template <int NE> __device__ __forceinline__ void ldx16(const void* x, int x32, size_t i, float* f) {
    if (x32) {
        const float4* p = reinterpret_cast<const float4*>(reinterpret_cast<const float*>(x) + i);
#pragma unroll
        for (int q = 0; q < NE / 4; ++q) {
            const float4 v = __ldg(p + q);
            f[4 * q] = v.x; f[4 * q + 1] = v.y; f[4 * q + 2] = v.z; f[4 * q + 3] = v.w;
        }
    } else {
        const T* p = reinterpret_cast<const T*>(x) + i;
#pragma unroll
        for (int q = 0; q < NE / VEC; ++q) {
            const Vec16<T> v = load16_nc(p + q * VEC);
#pragma unroll
            for (int e = 0; e < VEC; ++e) f[q * VEC + e] = to_f32(v.e[e]);
        }
    }
}

// x for NE elements from column k of row m, into f (times nw for rms_norm, ss += x^2)
template <int NE> __device__ __forceinline__ void prologue16(const void* x, int x32, const T* nw, int pro,
                                                            int m, int K, int k, float* f, float& ss) {
    ldx16<NE>(x, x32, (size_t)m * K + k, f);
    if (pro == 1) {
        float g[NE];
        ldx16<NE>(nw, 0, k, g);
#pragma unroll
        for (int e = 0; e < NE; ++e) { ss += f[e] * f[e]; f[e] *= g[e]; }
    }
}

__device__ __forceinline__ float prologue1(const void* x, int x32, const T* nw, int pro,
                                           int m, int K, int k, float& ss) {
    const float v = ldf(x, x32, (size_t)m * K + k);
    if (pro == 1) { ss += v * v; return v * to_f32(nw[k]); }
    return v;
}

template <int WK, typename S, int MM>
__device__ __forceinline__ void gemv_body(const void* __restrict__ x, int x32, const void* __restrict__ w,
                                          const S* __restrict__ scales, int G,
                                          const T* __restrict__ bias, const T* __restrict__ nw, float eps,
                                          int pro, int act, const void* residual, int r32, void* out, int o32,
                                          int M, int N, int K, int vec, int rpw) {
    pdl_trigger();                                  // (launched without pdl: no wait needed)
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int No = act ? N / 2 : N;                 // outputs per row of x
    int n0, n1;
    bool two;
    if (act) {                                      // gate row n0, up row n0 + N/2
        n0 = blockIdx.x * GEMV_WARPS + warp;
        if (n0 >= No) return;
        n1 = n0 + No;
        two = true;
    } else {
        n0 = (blockIdx.x * GEMV_WARPS + warp) * rpw;
        if (n0 >= N) return;
        two = rpw == 2 && n0 + 1 < N;
        n1 = two ? n0 + 1 : n0;
    }
    float acc0[MM], acc1[MM], ss[MM];
#pragma unroll
    for (int m = 0; m < MM; ++m) { acc0[m] = 0.f; acc1[m] = 0.f; ss[m] = 0.f; }
    const int ng = WK ? K / G : 0;

    if (WK == 0) {
        const T* w0 = reinterpret_cast<const T*>(w) + (size_t)n0 * K;
        const T* w1 = reinterpret_cast<const T*>(w) + (size_t)n1 * K;
        if (vec) {
            const int KV = K / VEC;
#pragma unroll (MM == 1 ? 8 : 4)      // one row of x: every chunk of a lane in flight at once (K <= 8192)
            for (int c = lane; c < KV; c += 32) {
                const Vec16<T> a = load16_nc(w0 + (size_t)c * VEC);
                const Vec16<T> b = load16_nc(w1 + (size_t)c * VEC);
#pragma unroll
                for (int m = 0; m < MM; ++m) {
                    if (m < M) {
                        float xf[VEC];
                        prologue16<VEC>(x, x32, nw, pro, m, K, c * VEC, xf, ss[m]);
#pragma unroll
                        for (int e = 0; e < VEC; ++e) {
                            acc0[m] += to_f32(a.e[e]) * xf[e];
                            acc1[m] += to_f32(b.e[e]) * xf[e];
                        }
                    }
                }
            }
        } else {
            for (int k = lane; k < K; k += 32) {
                const float a = to_f32(w0[k]), b = to_f32(w1[k]);
#pragma unroll
                for (int m = 0; m < MM; ++m)
                    if (m < M) {
                        const float xv = prologue1(x, x32, nw, pro, m, K, k, ss[m]);
                        acc0[m] += a * xv;
                        acc1[m] += b * xv;
                    }
            }
        }
    } else {
        const signed char* w0 = reinterpret_cast<const signed char*>(w) + (size_t)n0 * K;
        const signed char* w1 = reinterpret_cast<const signed char*>(w) + (size_t)n1 * K;
        const S* s0 = scales + (size_t)n0 * ng;
        const S* s1 = scales + (size_t)n1 * ng;
        if (vec) {
            const int KV = K / 16;
#pragma unroll (MM == 1 ? 4 : 2)
            for (int c = lane; c < KV; c += 32) {
                const uint4 a = __ldg(reinterpret_cast<const uint4*>(w0) + c);
                const uint4 b = __ldg(reinterpret_cast<const uint4*>(w1) + c);
                const int g = (c * 16) / G;
                const float sa = ld_scale(s0, g), sb = ld_scale(s1, g);
                float af[16], bf[16];
                i8x4(a.x, af); i8x4(a.y, af + 4); i8x4(a.z, af + 8); i8x4(a.w, af + 12);
                i8x4(b.x, bf); i8x4(b.y, bf + 4); i8x4(b.z, bf + 8); i8x4(b.w, bf + 12);
#pragma unroll
                for (int m = 0; m < MM; ++m) {
                    if (m < M) {
                        float xf[16];
                        prologue16<16>(x, x32, nw, pro, m, K, c * 16, xf, ss[m]);
                        float da = 0.f, db = 0.f;
#pragma unroll
                        for (int e = 0; e < 16; ++e) { da += af[e] * xf[e]; db += bf[e] * xf[e]; }
                        acc0[m] += sa * da;
                        acc1[m] += sb * db;
                    }
                }
            }
        } else {
            for (int k = lane; k < K; k += 32) {
                const float a = (float)w0[k] * ld_scale(s0, k / G), b = (float)w1[k] * ld_scale(s1, k / G);
#pragma unroll
                for (int m = 0; m < MM; ++m)
                    if (m < M) {
                        const float xv = prologue1(x, x32, nw, pro, m, K, k, ss[m]);
                        acc0[m] += a * xv;
                        acc1[m] += b * xv;
                    }
            }
        }
    }
#pragma unroll
    for (int m = 0; m < MM; ++m) {
        if (m < M) {
            const float inv = pro == 1 ? rsqrtf(warp_sum(ss[m]) / (float)K + eps) : 1.f;
            const float s0v = warp_sum(acc0[m]) * inv;
            const float s1v = warp_sum(acc1[m]) * inv;
            if (lane == 0) {
                if (act) {
                    const size_t o = (size_t)m * No + n0;
                    float g = s0v, u = s1v;
                    if (bias) { g += to_f32(bias[n0]); u += to_f32(bias[n1]); }
                    float v = silu_mul(g, u);
                    if (residual) v += ldf(residual, r32, o);
                    stf(out, o32, o, v);
                } else {
                    for (int r = 0; r < (two ? 2 : 1); ++r) {
                        const int n = r ? n1 : n0;
                        const size_t o = (size_t)m * N + n;
                        float v = r ? s1v : s0v;
                        if (bias) v += to_f32(bias[n]);
                        if (residual) v += ldf(residual, r32, o);
                        stf(out, o32, o, v);
                    }
                }
            }
        }
    }
}

// gemv*: up to GEMV_MAXM rows of x; gemv*_m1: one row (decode), fewer registers
#define GEMV_KERNEL(NAME, WK, S, MM)                                                                \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                   \
    NAME(const void* __restrict__ x, int x32, const void* __restrict__ w, const void* __restrict__ scales, \
         int G, const T* __restrict__ bias, const T* __restrict__ nw, float eps, int pro, int act,    \
         const void* residual, int r32, void* out, int o32, int M, int N, int K, int vec, int rpw) {  \
        gemv_body<WK, S, MM>(x, x32, w, reinterpret_cast<const S*>(scales), G, bias, nw, eps, pro,   \
                             act, residual, r32, out, o32, M, N, K, vec, rpw);                      \
    }
GEMV_KERNEL(gemv, 0, float, GEMV_MAXM)
GEMV_KERNEL(gemv_i8_s16, 1, f16_t, GEMV_MAXM)
GEMV_KERNEL(gemv_i8_s32, 2, float, GEMV_MAXM)
GEMV_KERNEL(gemv_m1, 0, float, 1)
GEMV_KERNEL(gemv_i8_s16_m1, 1, f16_t, 1)
GEMV_KERNEL(gemv_i8_s32_m1, 2, float, 1)

// Decode GEMV of int8 weights by integer dot products (one row of x; f16/bf16 runs).
// The block first writes y = x (times nw with rms_norm) to shared memory in 16-bit fixed
// point per 16 values: y ~= (hi + lo / 256) * sx with hi, lo int8 and sx = amax / 127 of the
// 16 (error <= amax / 65024). A 16-byte chunk of a weight row then costs eight dp4a against
// hi and lo and one float multiply-add, instead of widening every byte to a float (the float
// kernel above spends ~5 instructions per weight byte; this one ~1). Each warp owns R rows;
// U chunks of each are in flight, the first requested before the prologue so its latency
// hides behind it. Needs K % 16 == 0, G % 16 == 0, 16-byte aligned w, x and nw.
__device__ __forceinline__ int dp4a(u32 a, u32 b, int c) {
    int d;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

__device__ __forceinline__ int dot16_i8(const uint4& w, const uint4& x, int c) {
    return dp4a(w.w, x.w, dp4a(w.z, x.z, dp4a(w.y, x.y, dp4a(w.x, x.x, c))));
}

template <typename S, int R, int U>
__device__ __forceinline__ void gemv_dp4a_body(const void* __restrict__ x, int x32, const signed char* __restrict__ w,
                                               const S* __restrict__ scales, int G, const T* __restrict__ bias,
                                               const T* __restrict__ nw, float eps, int pro, int act,
                                               const void* residual, int r32, void* out, int o32, int N, int K) {
    // U: chunks of each row in flight per lane
    constexpr int H = R > 1 ? R / 2 : 1;            // swiglu: gate rows per warp (R >= 2)
    pdl_trigger();
    extern __shared__ __align__(16) unsigned char dsm[];
    __shared__ float red[GEMV_WARPS];
    const int KV = K / 16, ng = K / G;
    uint4* xh = reinterpret_cast<uint4*>(dsm);     // (KV) hi bytes of y
    uint4* xl = xh + KV;                            // (KV) lo bytes
    float* xs = reinterpret_cast<float*>(xl + KV);  // (KV) sx / 256
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int No = act ? N / 2 : N;
    const int wg = blockIdx.x * GEMV_WARPS + warp;
    int rows[R], outs[R];                           // weight rows; output index (or -1)
#pragma unroll
    for (int r = 0; r < R; ++r) {
        if (act) {                                  // gate rows n.., then their up rows n + No..
            const int n = wg * H + (r % H);
            const int ok = n < No;
            rows[r] = ok ? (r < H ? n : n + No) : 0;
            outs[r] = ok && r < H ? n : -1;
        } else {
            const int n = wg * R + r;
            rows[r] = n < N ? n : 0;
            outs[r] = n < N ? n : -1;
        }
    }
    const int nper = lane < KV ? (KV - lane + 31) / 32 : 0;     // chunks lane, lane + 32, ...
    uint4 buf[U][R];
    float sw[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u)
        if (u < nper) {
            const int c = lane + 32 * u;
#pragma unroll
            for (int r = 0; r < R; ++r) {
                buf[u][r] = __ldg(reinterpret_cast<const uint4*>(w + (size_t)rows[r] * K) + c);
                sw[u][r] = ld_scale(scales, (size_t)rows[r] * ng + (c * 16) / G);
            }
        }
    pdl_wait();                                     // x is the previous kernel's output
    // prologue: y in fixed point, and sum x^2 for the norm
    float ss = 0.f;
    for (int c = threadIdx.x; c < KV; c += blockDim.x) {
        float f[16];
        prologue16<16>(x, x32, nw, pro, 0, K, c * 16, f, ss);
        float amax = 0.f;
        bool finite = true;
#pragma unroll
        for (int e = 0; e < 16; ++e) { amax = fmaxf(amax, fabsf(f[e])); finite = finite && fabsf(f[e]) <= 3.4e38f; }
        const float inv = amax > 0.f && finite ? 127.f / amax : 0.f;
        u32 h[4], l[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            u32 hh = 0, ll = 0;
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                const float t = f[4 * q + b] * inv;
                const int hi = __float2int_rn(t);
                const int lo = max(-128, min(127, __float2int_rn((t - (float)hi) * 256.f)));
                hh |= (u32)(hi & 0xff) << (8 * b);
                ll |= (u32)(lo & 0xff) << (8 * b);
            }
            h[q] = hh;
            l[q] = ll;
        }
        xh[c] = make_uint4(h[0], h[1], h[2], h[3]);
        xl[c] = make_uint4(l[0], l[1], l[2], l[3]);
        xs[c] = finite ? amax * (1.f / (127.f * 256.f)) : HI_NAN;
    }
    ss = warp_sum(ss);
    if (lane == 0) red[warp] = ss;
    __syncthreads();
    float inv_rms = 1.f;
    if (pro) {
        float t = 0.f;
#pragma unroll
        for (int i = 0; i < GEMV_WARPS; ++i) t += red[i];
        inv_rms = rsqrtf(t / (float)K + eps);
    }
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = 0.f;
    for (int j0 = 0; j0 < nper; j0 += U) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int j = j0 + u;
            if (j < nper) {
                const int c = lane + 32 * j;
                const uint4 a = xh[c], b = xl[c];
                const float sx = xs[c];
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    const int v = dot16_i8(buf[u][r], a, 0) * 256 + dot16_i8(buf[u][r], b, 0);
                    acc[r] = fmaf((float)v, sx * sw[u][r], acc[r]);
                }
                if (j + U < nper) {
                    const int cn = c + 32 * U;
#pragma unroll
                    for (int r = 0; r < R; ++r) {
                        buf[u][r] = __ldg(reinterpret_cast<const uint4*>(w + (size_t)rows[r] * K) + cn);
                        sw[u][r] = ld_scale(scales, (size_t)rows[r] * ng + (cn * 16) / G);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = warp_sum(acc[r]) * inv_rms;
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < (act ? H : R); ++r) {
            const int n = outs[r];
            if (n < 0) continue;
            float v = acc[r];
            if (act) {
                const int ru = r + H < R ? r + H : r;
                float u = acc[ru];
                if (bias) { v += to_f32(bias[rows[r]]); u += to_f32(bias[rows[ru]]); }
                v = silu_mul(v, u);
            } else if (bias) {
                v += to_f32(bias[n]);
            }
            if (residual) v += ldf(residual, r32, n);
            stf(out, o32, n, v);
        }
    }
}

// R rows per warp, U chunks of each in flight, at least MINB blocks per multiprocessor. (Forcing
// 3 blocks for R = 4, so that tinyllama's gate/up grid fits one wave, spilled registers and
// moved the whole step by < 1%: run 7 of 2026-11-22.)
#define GEMV_DP4A_KERNEL(NAME, S, R, U, MINB)                                                      \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32, MINB)                             \
    NAME(const void* __restrict__ x, int x32, const void* __restrict__ w, const void* __restrict__ scales, \
         int G, const T* __restrict__ bias, const T* __restrict__ nw, float eps, int pro, int act,    \
         const void* residual, int r32, void* out, int o32, int N, int K) {                          \
        gemv_dp4a_body<S, R, U>(x, x32, reinterpret_cast<const signed char*>(w),                    \
                                reinterpret_cast<const S*>(scales), G, bias, nw, eps, pro, act, residual, \
                                r32, out, o32, N, K);                                               \
    }
GEMV_DP4A_KERNEL(gemv_dp4a_s16_r1, f16_t, 1, 8, 3)
GEMV_DP4A_KERNEL(gemv_dp4a_s16_r1u16, f16_t, 1, 16, 2)
GEMV_DP4A_KERNEL(gemv_dp4a_s16_r2, f16_t, 2, 4, 3)
GEMV_DP4A_KERNEL(gemv_dp4a_s16_r4, f16_t, 4, 2, 2)
GEMV_DP4A_KERNEL(gemv_dp4a_s32_r1, float, 1, 8, 3)
GEMV_DP4A_KERNEL(gemv_dp4a_s32_r1u16, float, 1, 16, 2)
GEMV_DP4A_KERNEL(gemv_dp4a_s32_r2, float, 2, 4, 3)
GEMV_DP4A_KERNEL(gemv_dp4a_s32_r4, float, 4, 2, 2)

// Prefill: after a cuBLAS product y (M, N), out = residual + act(y + bias), out and
// residual T or f32 (out may be residual); act 1: swiglu of the halves, out (M, N / 2).
extern "C" __global__ void matmul_epilogue(const T* __restrict__ y, const T* __restrict__ bias, int act,
                                           const void* residual, int r32, void* out, int o32, int M, int N) {
    const int No = act ? N / 2 : N;
    const long long total = (long long)M * No;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const long long m = i / No, n = i % No;
        float v = to_f32(y[m * N + n]);
        if (bias) v += to_f32(bias[n]);
        if (act) {
            float u = to_f32(y[m * N + No + n]);
            if (bias) u += to_f32(bias[No + n]);
            v = silu_mul(v, u);
        }
        if (residual) v += ldf(residual, r32, i);
        stf(out, o32, i, v);
    }
}

// int8 (N, K) with scales (N, K / G) f16 (s32 = 0) or f32 -> T (N, K), for a cuBLAS product
extern "C" __global__ void dequant_i8(const signed char* __restrict__ q, const void* __restrict__ scales,
                                      int s32, T* __restrict__ out, int N, int K, int G) {
    const long long total = (long long)N * K;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const int ng = K / G;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const long long n = i / K, k = i % K;
        const size_t si = (size_t)n * ng + k / G;
        const float s = s32 ? reinterpret_cast<const float*>(scales)[si]
                            : to_f32(reinterpret_cast<const f16_t*>(scales)[si]);
        out[i] = from_f32<T>((float)q[i] * s);
    }
}

// A plain shared-memory tiled GEMM (f32 accumulation) for larger M when CuPy/cuBLAS is
// not installed: correct, not fast. 16x16 threads, one output each; writes T (the
// epilogue adds bias and residual).
#define TILE 16
extern "C" __global__ void gemm_tiled(const T* __restrict__ x, const T* __restrict__ w,
                                      T* __restrict__ out, int M, int N, int K) {
    __shared__ float xs[TILE][TILE + 1], ws[TILE][TILE + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int m = blockIdx.y * TILE + ty, n = blockIdx.x * TILE + tx;
    const int wn = blockIdx.x * TILE + ty;           // weight row this thread loads
    float acc = 0.f;
    for (int k0 = 0; k0 < K; k0 += TILE) {
        xs[ty][tx] = (m < M && k0 + tx < K) ? to_f32(x[(size_t)m * K + k0 + tx]) : 0.f;
        ws[ty][tx] = (wn < N && k0 + tx < K) ? to_f32(w[(size_t)wn * K + k0 + tx]) : 0.f;
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TILE; ++kk) acc += xs[ty][kk] * ws[tx][kk];
        __syncthreads();
    }
    if (m < M && n < N) out[(size_t)m * N + n] = from_f32<T>(acc);
}

// ---------------------------------------------------------------- strided copy
// dst[i] = src[i] element by element over one shape, each side with its own strides
// (in elements, signed): gathers a strided view into a contiguous buffer and scatters
// it back. Dtype-blind: copies 1, 2, 4 or 8 byte words.
#define COPY_MAXDIM 8
struct Layout2 {
    int ndim;
    long long shape[COPY_MAXDIM];
    long long sstride[COPY_MAXDIM];
    long long dstride[COPY_MAXDIM];
};

#define STRIDED_COPY(NAME, W)                                                               \
    extern "C" __global__ void NAME(const W* __restrict__ src, W* __restrict__ dst,          \
                                    long long n, Layout2 lay) {                              \
        const long long stride = (long long)gridDim.x * blockDim.x;                          \
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) { \
            long long rest = i, so = 0, dof = 0;                                             \
            for (int d = lay.ndim - 1; d >= 0; --d) {                                        \
                const long long c = rest % lay.shape[d];                                     \
                rest /= lay.shape[d];                                                        \
                so += c * lay.sstride[d];                                                    \
                dof += c * lay.dstride[d];                                                   \
            }                                                                                \
            dst[dof] = src[so];                                                              \
        }                                                                                    \
    }
STRIDED_COPY(strided_copy_1, unsigned char)
STRIDED_COPY(strided_copy_2, unsigned short)
STRIDED_COPY(strided_copy_4, unsigned int)
STRIDED_COPY(strided_copy_8, unsigned long long)

// ---------------------------------------------------------------- penalties
// Repetition penalty on seen tokens (HF/CTRL), presence and frequency penalties from
// output counts (OpenAI), each row (B, V) with its own values of the three (B,) tensors.
// Grid (blocks, B): blockIdx.y is the row. Elementwise; out may be logits.
extern "C" __global__ void penalties(const T* logits, const int* __restrict__ counts,
                                     const int* __restrict__ seen, T* out, int V,
                                     const float* __restrict__ repetition, const float* __restrict__ presence,
                                     const float* __restrict__ frequency) {
    const size_t row = blockIdx.y, base = row * V;
    const float rp = repetition[row], pr = presence[row], fr = frequency[row];
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < V; j += gridDim.x * blockDim.x) {
        const size_t i = base + j;
        float x = to_f32(logits[i]);
        if (seen[i] != 0) x = x > 0.f ? x / rp : x * rp;
        const int c = counts[i];
        x -= pr * (float)(c > 0) + fr * (float)c;
        out[i] = from_f32<T>(x);
    }
}

// ---------------------------------------------------------------- sample
// One block per row of logits (B, V): temperature, top-k, top-p, min-p, then the
// inverse CDF in token-id order over the kept set, driven by uniform[row] (as
// reference.sample). Each row reads its own parameters from the (B,) tensors (on the
// device: a captured graph replays with new ones); a row of temperature 0 is argmax
// (block_argmax: the first index on ties), in the same launch.
//
// e_i = exp((x_i - max x) / T) in f32 (the largest is exactly 1). Masses are summed
// as 64-bit fixed point (e * 2^40), so every sum is exact and the result does not
// depend on the order of the block's atomics: the same inputs give the same token.
// Thresholds are found by radix select (4 passes of 8 bits) over order-preserving
// 32-bit keys of the logits: top-k on counts (ties at the k-th value are kept), top-p
// on masses (the smallest set, in descending order with ties broken by token id, whose
// mass before each member is < top_p). min-p keeps e_i >= min_p. Then two passes over
// contiguous per-thread chunks (in token-id order) with block scans find the rank of
// each tie at the top-p boundary and the token where the cumulative mass passes
// uniform x total.
#define SMP_FIX 1099511627776.0f     // 2^40
typedef unsigned long long u64;

__device__ __forceinline__ u32 order_key(float x) {
    x = x + 0.0f;                                    // -0 -> +0: equal values, equal keys
    const u32 u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ u64 fixmass(float x, float xmax, float invT) {
    const float e = expf((x - xmax) * invT);
    return (u64)(e * SMP_FIX);
}

template <typename V> __device__ __forceinline__ V shfl_up(V v, int o) { return __shfl_up_sync(0xffffffffu, v, o); }

// Exclusive scan over the block (blockDim.x a multiple of 32, <= 1024); the block's
// total goes to *total. Integer types only (exact, so the order does not matter).
template <typename V> __device__ V block_exclusive_scan(V v, V* total) {
    __shared__ V warp_pre[32];
    __shared__ V tot_sh;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    V inc = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const V n = shfl_up(inc, o);
        if (lane >= o) inc += n;
    }
    __syncthreads();                                   // earlier calls may still read warp_pre
    if (lane == 31) warp_pre[w] = inc;                 // the warp's total
    __syncthreads();
    if (w == 0) {
        const V t = lane < nw ? warp_pre[lane] : (V)0;
        V ti = t;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const V n = shfl_up(ti, o);
            if (lane >= o) ti += n;
        }
        __syncwarp();
        if (lane < nw) warp_pre[lane] = ti - t;        // exclusive prefix of the warps
        if (lane == 31) tot_sh = ti;                   // lanes >= nw add 0: lane 31 holds the total
    }
    __syncthreads();
    const V res = warp_pre[w] + inc - v;
    *total = tot_sh;
    return res;
}

extern "C" __global__ void __launch_bounds__(1024)
sample(const T* __restrict__ logits, const float* __restrict__ uniform, int* __restrict__ out, int V,
       const float* __restrict__ temperature, const int* __restrict__ top_ks, const float* __restrict__ top_ps,
       const float* __restrict__ min_ps) {
    const size_t row = blockIdx.x;
    const T* x = logits + row * (size_t)V;
    const int tid = threadIdx.x, nt = blockDim.x;
    const float temp = temperature[row];
    if (!(temp > 0.f)) {                           // greedy row (uniform across the block)
        const int a = block_argmax(x, V);
        if (tid == 0) out[row] = a;
        return;
    }
    const float invT = 1.f / temp, top_p = top_ps[row], min_p = min_ps[row];
    const int top_k = top_ks[row];
    __shared__ u32 hcnt[256];
    __shared__ u64 hmass[256];
    __shared__ u32 s_prefix, s_remaining;
    __shared__ u64 s_above;
    __shared__ u64 s_sum;
    __shared__ int s_answer, s_last;

    // max logit
    float m = -HI_INF;
    for (int i = tid; i < V; i += nt) m = fmaxf(m, to_f32(x[i]));
    const float xmax = block_max(m);

    // ---- top-k: the k-th largest key (count radix select)
    const bool use_k = top_k > 0 && top_k < V;
    u32 kth = 0;
    if (use_k) {
        u32 prefix = 0, mask = 0;
        u32 remaining = (u32)top_k;
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int b = tid; b < 256; b += nt) hcnt[b] = 0;
            __syncthreads();
            for (int i = tid; i < V; i += nt) {
                const u32 k = order_key(to_f32(x[i]));
                if ((k & mask) == prefix) atomicAdd(&hcnt[(k >> shift) & 255u], 1u);
            }
            __syncthreads();
            if (tid == 0) {
                u32 rem = remaining;
                int b = 255;
                for (; b > 0; --b) {
                    if (hcnt[b] >= rem) break;
                    rem -= hcnt[b];
                }
                s_prefix = prefix | ((u32)b << shift);
                s_remaining = rem;
            }
            __syncthreads();
            prefix = s_prefix;
            remaining = s_remaining;
            mask |= 255u << shift;
            __syncthreads();
        }
        kth = prefix;
    }

    // ---- mass of the top-k set
    if (tid == 0) s_sum = 0;
    __syncthreads();
    {
        u64 part = 0;
        for (int i = tid; i < V; i += nt) {
            const float f = to_f32(x[i]);
            if (!use_k || order_key(f) >= kth) part += fixmass(f, xmax, invT);
        }
        atomicAdd(&s_sum, part);
    }
    __syncthreads();
    const u64 SA = s_sum;

    // ---- top-p: kappa = the smallest key (within top-k) with mass(keys > kappa) < P
    const bool use_p = top_p < 1.0f;
    const double P = (double)top_p * (double)SA;
    u32 kappa = 0;
    u64 G = 0, qk = 0;
    if (use_p) {
        u32 prefix = 0, mask = 0;
        u64 above = 0;
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int b = tid; b < 256; b += nt) { hcnt[b] = 0; hmass[b] = 0; }
            __syncthreads();
            for (int i = tid; i < V; i += nt) {
                const float f = to_f32(x[i]);
                const u32 k = order_key(f);
                if ((k & mask) == prefix && (!use_k || k >= kth)) {
                    const u32 b = (k >> shift) & 255u;
                    atomicAdd(&hcnt[b], 1u);
                    atomicAdd(&hmass[b], fixmass(f, xmax, invT));
                }
            }
            __syncthreads();
            if (tid == 0) {
                u64 cum = 0, chosen_cum = 0;
                int chosen = -1;
                for (int b = 255; b >= 0; --b) {
                    if (hcnt[b] > 0 && (double)(above + cum) < P) { chosen = b; chosen_cum = cum; }
                    cum += hmass[b];
                }
                if (chosen < 0) chosen = 255;          // cannot happen (the top bin qualifies)
                s_prefix = prefix | ((u32)chosen << shift);
                s_above = above + chosen_cum;
            }
            __syncthreads();
            prefix = s_prefix;
            above = s_above;
            mask |= 255u << shift;
            __syncthreads();
        }
        kappa = prefix;
        G = above;
        // the mass of one token at kappa, computed as for the tokens themselves
        const u32 kb = (kappa & 0x80000000u) ? (kappa & 0x7fffffffu) : ~kappa;
        qk = fixmass(__uint_as_float(kb), xmax, invT);
    }

    // ---- per-thread contiguous chunks, in token-id order
    const int chunk = (V + nt - 1) / nt;
    const int lo = min(V, tid * chunk), hi = min(V, lo + chunk);
    u32 tie_before = 0;
    if (use_p) {                    // rank of this chunk's first kappa-tie among all ties
        u32 c = 0;
        for (int i = lo; i < hi; ++i) c += order_key(to_f32(x[i])) == kappa;
        u32 tot;
        tie_before = block_exclusive_scan<u32>(c, &tot);
    }
    // kept(i): in top-k, in top-p (ties at kappa by rank), e >= min_p
#define SMP_KEPT(f, k, r, q)                                                             \
    ((!use_k || (k) >= kth) &&                                                           \
     (!use_p || (k) > kappa || ((k) == kappa && (double)(G + (u64)(r) * qk) < P)) &&     \
     (min_p <= 0.f || expf(((f) - xmax) * invT) >= min_p))
    u64 mine = 0;
    int last = -1;
    {
        u32 r = tie_before;
        for (int i = lo; i < hi; ++i) {
            const float f = to_f32(x[i]);
            const u32 k = order_key(f);
            const u64 q = fixmass(f, xmax, invT);
            if (SMP_KEPT(f, k, r, q)) { mine += q; last = i; }
            if (use_p && k == kappa) ++r;
        }
    }
    u64 W;
    const u64 before = block_exclusive_scan<u64>(mine, &W);
    if (tid == 0) { s_answer = -1; s_last = -1; }
    __syncthreads();
    if (last >= 0) atomicMax(&s_last, last);
    if (W > 0) {
        u64 target = (u64)((double)uniform[row] * (double)W);
        if (target >= W) target = W - 1;
        if (mine > 0 && before <= target && target < before + mine) {
            u64 c = before;
            u32 r = tie_before;
            for (int i = lo; i < hi; ++i) {
                const float f = to_f32(x[i]);
                const u32 k = order_key(f);
                const u64 q = fixmass(f, xmax, invT);
                if (SMP_KEPT(f, k, r, q)) {
                    c += q;
                    if (c > target) { s_answer = i; break; }
                }
                if (use_p && k == kappa) ++r;
            }
        }
    }
    __syncthreads();
    if (tid == 0) {
        int a = s_answer >= 0 ? s_answer : s_last;
        out[row] = a >= 0 ? a : 0;
    }
#undef SMP_KEPT
}

// ---------------------------------------------------------------- fill_uniform
// out[i] = lo + span * u(i, seed), u in [0, 1) from a 64-bit hash (splitmix64):
// benchmark weights made on the device.
extern "C" __global__ void fill_uniform(T* __restrict__ out, long long n, long long seed, float lo, float span) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        unsigned long long z = (unsigned long long)i + 0x9e3779b97f4a7c15ull * ((unsigned long long)seed + 1);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        const float u = (float)(z >> 40) * (1.0f / 16777216.0f);
        out[i] = from_f32<T>(lo + span * u);
    }
}

// ---------------------------------------------------------------- read_sum
// Bandwidth probe: sums n 16-byte words as 4 u32 lanes (the value is irrelevant; the
// reads are what is timed). One atomic per block.
extern "C" __global__ void read_sum(const uint4* __restrict__ p, long long n, unsigned int* __restrict__ out) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    unsigned int acc = 0;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
        const uint4 a = __ldg(p + i), b = __ldg(p + i + stride), c = __ldg(p + i + 2 * stride),
                    d = __ldg(p + i + 3 * stride);
        acc += a.x ^ b.y ^ c.z ^ d.w ^ a.w ^ b.x ^ c.y ^ d.z;
    }
    for (; i < n; i += stride) { const uint4 a = __ldg(p + i); acc += a.x ^ a.w; }
    acc = __reduce_add_sync(0xffffffffu, acc);
    if ((threadIdx.x & 31) == 0 && acc == 0x12345678u) atomicAdd(out, 1u);
}

// ---------------------------------------------------------------- argmax_split
// argmax for long rows (vocabularies): grid (blocks per row, rows). Each block reduces
// its share to one 64-bit key (order-preserving value bits << 32 | ~index: the larger
// value wins, then the smaller index; NaN counts as the largest, as numpy), atomicMax
// into best[row]; the last block of the row (counter) writes the index and resets
// best[row] and count[row] to 0 for the next call (scratch zeroed once at allocation).
__device__ __forceinline__ u64 argmax_key(float v, int i) {
    const u32 k = (v != v) ? 0xffffffffu : order_key(v);
    return ((u64)k << 32) | (u64)(0xffffffffu - (u32)i);
}
__device__ __forceinline__ u64 umax64(u64 a, u64 b) { return a > b ? a : b; }

extern "C" __global__ void argmax_split(const T* __restrict__ x, int* __restrict__ out, int N,
                                        u64* best, u32* count) {
    const int row = blockIdx.y, nb = gridDim.x;
    const T* xr = x + (size_t)row * N;
    u64 k = 0;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < N; i += nb * blockDim.x)
        k = umax64(k, argmax_key(to_f32(xr[i]), i));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) k = umax64(k, __shfl_xor_sync(0xffffffffu, k, o));
    __shared__ u64 sk[32];
    __shared__ bool last;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) sk[w] = k;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int i = 1; i < nw; ++i) k = umax64(k, sk[i]);
        atomicMax(&best[row], k);
        __threadfence();
        last = atomicAdd(&count[row], 1u) == (u32)(nb - 1);
        if (last) {
            __threadfence();
            const u64 b = atomicExch(&best[row], 0ull);
            count[row] = 0;
            out[row] = (int)(0xffffffffu - (u32)(b & 0xffffffffull));
        }
    }
}


// ---------------------------------------------------------------- batch-invariant GEMM
// out (M, N) = x (M, K) @ w (N, K)^T on the tensor cores (mma.sync m16n8k16, f16/bf16
// inputs, f32 accumulators), for HETINFER_CUDA_BATCH_INVARIANT=1 (kernels.matmul). Every
// output element gets one f32 accumulator that takes the 16-wide chunks of K in order,
// from k = 0 up to the last BI_BK step (zeros past K, for every M the same): its arithmetic
// depends on K alone -- not on M, the tile shape, or where its row sits in a tile (mma
// computes each element from its own row and column). No split-K. A CTA owns a BM x BN
// tile: its warps split BN, each warp covers all BM rows (WN columns); K walks in BI_BK
// steps through a cp.async ring of STAGES tiles in shared memory (as many as fit in
// BI_SMEM bytes, at most 8; rows padded to 144 bytes, conflict-free ldmatrix). Rows past M and columns past N/K load as zeros. vec: K % 8 == 0
// and x, w 16-byte aligned (16-byte cp.async); else element loads of the same values.
// Writes T, or f32 with o32 (bias / swiglu / residual are the epilogue kernel's).
#if HI_DTYPE != 0
#define BI_BK 64
#define BI_LDS (BI_BK + 8)
#define BI_SMEM 110592                   // shared bytes a CTA may use (two CTAs per SM)

__device__ __forceinline__ u32 bi_smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 8 elements (16 bytes) of row `row` (of `rows`, row length K) from column k into shared dst;
// zeros where out of range.
__device__ __forceinline__ void bi_chunk(T* dst, const T* __restrict__ src, int row, int rows, int k,
                                         int K, int vec) {
    if (vec) {
        const bool ok = row < rows && k < K;          // K % 8 == 0: a chunk is all in or all out
        const T* s = ok ? src + (size_t)row * K + k : src;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                     :: "r"(bi_smem_addr(dst)), "l"(s), "r"(ok ? 16 : 0) : "memory");
    } else {
        Vec16<T> v;
        v.u.x = v.u.y = v.u.z = v.u.w = 0u;
        if (row < rows) {
            const T* s = src + (size_t)row * K;
#pragma unroll
            for (int j = 0; j < 8; ++j)
                if (k + j < K) v.e[j] = s[k + j];
        }
        *reinterpret_cast<uint4*>(dst) = v.u;
    }
}

__device__ __forceinline__ void bi_mma(float* c, const u32* a, u32 b0, u32 b1) {
#if HI_DTYPE == 1
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
#endif
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int BM, int BN, int WARPS>
__device__ __forceinline__ void gemm_bi_body(const T* __restrict__ x, const T* __restrict__ w,
                                             void* __restrict__ out, int o32, int M, int N, int K, int vec) {
    constexpr int WN = BN / WARPS, MT = BM / 16, NT = WN / 8, THREADS = WARPS * 32;
    constexpr int CPR = BI_BK / 8;                          // 16-byte chunks per tile row
    constexpr int STAGE = (BM + BN) * BI_LDS;               // elements per stage
    constexpr int STAGES = BI_SMEM / (STAGE * 2) < 8 ? BI_SMEM / (STAGE * 2) : 8;
    static_assert(WN % 8 == 0 && BM % 16 == 0, "tile shape");
    extern __shared__ __align__(16) unsigned char dsm[];
    T* sm = reinterpret_cast<T*>(dsm);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const T* xs = x + (size_t)m0 * K;                       // this tile's first row
    const T* ws = w + (size_t)n0 * K;
    const int mrows = M - m0, nrows = N - n0;
    const int ktiles = (K + BI_BK - 1) / BI_BK;

    auto load_stage = [&](int slot, int kt) {
        T* sa = sm + slot * STAGE;
        T* sb = sa + BM * BI_LDS;
        const int k0 = kt * BI_BK;
#pragma unroll
        for (int c = tid; c < (BM + BN) * CPR; c += THREADS) {
            const int r = c / CPR, kc = (c % CPR) * 8;
            if (r < BM) bi_chunk(sa + r * BI_LDS + kc, xs, r, mrows, k0 + kc, K, vec);
            else bi_chunk(sb + (r - BM) * BI_LDS + kc, ws, r - BM, nrows, k0 + kc, K, vec);
        }
    };

    float acc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < ktiles) load_stage(s, s);
        asm volatile("cp.async.commit_group;" ::: "memory");
    }
    // ldmatrix lane addresses (elements within a stage): A x4 -> rows (lane & 15), k + (lane >> 4) * 8;
    // B x4 (two n8 tiles) -> n (lane & 7) + (lane >> 4) * 8, k + ((lane >> 3) & 1) * 8
    const int a_off = (lane & 15) * BI_LDS + (lane >> 4) * 8;
    const int bl = NT == 1 ? (lane & 15) : lane;           // x2 (one n8 tile): lanes 0-15
    const int b_off = BM * BI_LDS + (warp * WN + (bl & 7) + (bl >> 4) * 8) * BI_LDS + ((bl >> 3) & 1) * 8;
    for (int kt = 0; kt < ktiles; ++kt) {
        asm volatile("cp.async.wait_group %0;" :: "n"(STAGES - 2) : "memory");
        __syncthreads();                                    // stage kt landed; stage kt - 1 is free
        const int nk = kt + STAGES - 1;
        if (nk < ktiles) load_stage(nk % STAGES, nk);
        asm volatile("cp.async.commit_group;" ::: "memory");
        const T* st = sm + (kt % STAGES) * STAGE;
#pragma unroll
        for (int kk = 0; kk < BI_BK; kk += 16) {
            u32 a[MT][4], b[NT][2];
#pragma unroll
            for (int i = 0; i < MT; ++i)
                asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                             : "=r"(a[i][0]), "=r"(a[i][1]), "=r"(a[i][2]), "=r"(a[i][3])
                             : "r"(bi_smem_addr(st + a_off + i * 16 * BI_LDS + kk)));
#pragma unroll
            for (int j = 0; j + 1 < NT; j += 2)
                asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                             : "=r"(b[j][0]), "=r"(b[j][1]), "=r"(b[j + 1][0]), "=r"(b[j + 1][1])
                             : "r"(bi_smem_addr(st + b_off + j * 8 * BI_LDS + kk)));
            if (NT & 1)                                     // lanes 0-15 give the addresses
                asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];"
                             : "=r"(b[NT - 1][0]), "=r"(b[NT - 1][1])
                             : "r"(bi_smem_addr(st + b_off + (NT - 1) * 8 * BI_LDS + kk)));
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
                for (int j = 0; j < NT; ++j) bi_mma(acc[i][j], a[i], b[j][0], b[j][1]);
        }
    }
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    // c0, c1: row g, columns 2t, 2t + 1; c2, c3: row g + 8
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int m = m0 + i * 16 + g + (q >> 1) * 8;
                const int n = n0 + warp * WN + j * 8 + 2 * t + (q & 1);
                if (m < M && n < N) stf(out, o32, (size_t)m * N + n, acc[i][j][q]);
            }
}

// gemm_bi_<BM>_<BN>: WARPS warps (BN / WARPS columns each); dynamic shared memory
// STAGES * (BM + BN) * BI_LDS * sizeof(T) bytes (kernels._gemm_bi computes the same);
// grid (ceil(M / BM), ceil(N / BN)): CTAs of one W tile run side by side (prefill).
#define GEMM_BI_KERNEL(BM, BN, WARPS)                                                                 \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                         \
    gemm_bi_##BM##_##BN(const T* __restrict__ x, const T* __restrict__ w, void* __restrict__ out,    \
                        int o32, int M, int N, int K, int vec) {                                      \
        gemm_bi_body<BM, BN, WARPS>(x, w, out, o32, M, N, K, vec);                                    \
    }
GEMM_BI_KERNEL(16, 16, 2)
GEMM_BI_KERNEL(16, 32, 4)
GEMM_BI_KERNEL(16, 64, 4)
GEMM_BI_KERNEL(16, 128, 4)
GEMM_BI_KERNEL(32, 16, 2)
GEMM_BI_KERNEL(32, 32, 4)
GEMM_BI_KERNEL(32, 64, 4)
GEMM_BI_KERNEL(32, 128, 4)
GEMM_BI_KERNEL(64, 16, 2)
GEMM_BI_KERNEL(64, 32, 4)
GEMM_BI_KERNEL(64, 64, 4)
GEMM_BI_KERNEL(64, 128, 4)
#endif
