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

// ---------------------------------------------------------------- embedding
// out[t, :] = table[ids[t], :]; an id out of range writes NaN.
extern "C" __global__ void embedding(const void* __restrict__ ids, int ids64,
                                     const T* __restrict__ table, T* __restrict__ out,
                                     int V, int D, int vec) {
    const int t = blockIdx.x;
    const i64 id = load_index(ids, ids64, t);
    T* o = out + (size_t)t * D;
    if (id < 0 || id >= V) {
        for (int d = threadIdx.x; d < D; d += blockDim.x) o[d] = from_f32<T>(HI_NAN);
        return;
    }
    const T* row = table + (size_t)id * D;
    if (vec) {
        for (int d = threadIdx.x * VEC; d < D; d += blockDim.x * VEC) store16(o + d, load16_nc(row + d));
    } else {
        for (int d = threadIdx.x; d < D; d += blockDim.x) o[d] = row[d];
    }
}

// ---------------------------------------------------------------- rms_norm
// One block per row: sum of squares (128-bit loads where aligned), block reduction,
// then a second pass that scales and writes.
extern "C" __global__ void rms_norm(const T* __restrict__ x, const T* __restrict__ w,
                                    T* __restrict__ out, int D, float eps, int vec) {
    const size_t row = blockIdx.x;
    const T* xr = x + row * D;
    T* o = out + row * D;
    float ss = 0.f;
    if (vec) {
        for (int d = threadIdx.x * VEC; d < D; d += blockDim.x * VEC) {
            Vec16<T> v = load16(xr + d);
#pragma unroll
            for (int e = 0; e < VEC; ++e) { float f = to_f32(v.e[e]); ss += f * f; }
        }
    } else {
        for (int d = threadIdx.x; d < D; d += blockDim.x) { float f = to_f32(xr[d]); ss += f * f; }
    }
    ss = block_sum(ss);
    const float inv = rsqrtf(ss / (float)D + eps);
    if (vec) {
        for (int d = threadIdx.x * VEC; d < D; d += blockDim.x * VEC) {
            Vec16<T> v = load16(xr + d), g = load16_nc(w + d), r;
#pragma unroll
            for (int e = 0; e < VEC; ++e) r.e[e] = from_f32<T>(to_f32(v.e[e]) * inv * to_f32(g.e[e]));
            store16(o + d, r);
        }
    } else {
        for (int d = threadIdx.x; d < D; d += blockDim.x)
            o[d] = from_f32<T>(to_f32(xr[d]) * inv * to_f32(w[d]));
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

extern "C" __global__ void swiglu(const T* __restrict__ gate, const T* __restrict__ up,
                                  T* __restrict__ out, long long n, int vec) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (vec) {
        const long long nv = n / VEC;
        for (; i < nv; i += stride) {
            Vec16<T> g = load16(gate + i * VEC), u = load16(up + i * VEC), r;
#pragma unroll
            for (int e = 0; e < VEC; ++e) r.e[e] = from_f32<T>(silu_mul(to_f32(g.e[e]), to_f32(u.e[e])));
            store16(out + i * VEC, r);
        }
    } else {
        for (; i < n; i += stride) out[i] = from_f32<T>(silu_mul(to_f32(gate[i]), to_f32(up[i])));
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

extern "C" __global__ void argmax(const T* __restrict__ x, int* __restrict__ out, int N) {
    const size_t row = blockIdx.x;
    const T* xr = x + row * N;
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
        if (lane == 0) out[row] = bi == 0x7fffffff ? 0 : bi;
    }
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
// x, out (T, H, D); positions (T,) on the device; cos/sin f32 (P, D/2).
// One thread per rotated pair, which reads both elements before writing: out may be x.
extern "C" __global__ void rope(const T* x, const void* __restrict__ pos, int pos64,
                                const float* __restrict__ cosv, const float* __restrict__ sinv,
                                T* out, int ntok, int H, int D, int P, int interleaved) {
    const int half = D / 2;
    const long long total = (long long)ntok * H * half;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += stride) {
        const int i = (int)(idx % half);
        const long long th = idx / half;             // t * H + h
        const int t = (int)(th / H);
        const i64 p = load_index(pos, pos64, t);
        const size_t base = (size_t)th * D;
        const int j1 = interleaved ? 2 * i : i;
        const int j2 = interleaved ? 2 * i + 1 : i + half;
        if (p < 0 || p >= P) {
            out[base + j1] = from_f32<T>(HI_NAN);
            out[base + j2] = from_f32<T>(HI_NAN);
            continue;
        }
        const float c = cosv[(size_t)p * half + i], s = sinv[(size_t)p * half + i];
        const float x1 = to_f32(x[base + j1]), x2 = to_f32(x[base + j2]);
        out[base + j1] = from_f32<T>(x1 * c - x2 * s);
        out[base + j2] = from_f32<T>(x2 * c + x1 * s);
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

// ---------------------------------------------------------------- attention
// q (ntok, Hq, D); caches (S, Hkv, D); out (ntok, Hq, D). Query t attends to cache
// rows 0..positions[t]. One block per (head, token), ATT_WARPS warps; each warp takes
// every ATT_WARPS-th key with an online softmax (running max, sum, weighted V in
// registers: lane holds d = lane + 32*i), then the warps' partials are merged.
// Serves decode (ntok = 1) and causal prefill alike. D <= 256.
#define ATT_WARPS 8
#define ATT_MAXD 256
extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
attention(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
          const void* __restrict__ pos, int pos64, T* __restrict__ out,
          int Hq, int Hkv, int D, int S, float scale) {
    const int h = blockIdx.x, t = blockIdx.y;
    const int kvh = h / (Hq / Hkv);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    i64 p = load_index(pos, pos64, t);
    const int L = p < 0 ? 0 : (int)(p >= S ? S : p + 1);
    const size_t kstride = (size_t)Hkv * D;

    float qr[ATT_MAXD / 32], acc[ATT_MAXD / 32];
    const T* qp = q + ((size_t)t * Hq + h) * D;
#pragma unroll
    for (int i = 0; i < ATT_MAXD / 32; ++i) {
        const int d = lane + 32 * i;
        qr[i] = d < D ? to_f32(qp[d]) * scale : 0.f;
        acc[i] = 0.f;
    }
    float m = -HI_INF, l = 0.f;
    for (int j = w; j < L; j += ATT_WARPS) {
        const T* kp = kc + (size_t)j * kstride + (size_t)kvh * D;
        const T* vp = vc + (size_t)j * kstride + (size_t)kvh * D;
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < ATT_MAXD / 32; ++i) {
            const int d = lane + 32 * i;
            if (d < D) s += qr[i] * to_f32(kp[d]);
        }
        s = warp_sum(s);
        const float mn = fmaxf(m, s);
        const float corr = expf(m - mn);            // 0 on the first key (m = -inf)
        const float e = expf(s - mn);
        l = l * corr + e;
#pragma unroll
        for (int i = 0; i < ATT_MAXD / 32; ++i) {
            const int d = lane + 32 * i;
            if (d < D) acc[i] = acc[i] * corr + e * to_f32(vp[d]);
        }
        m = mn;
    }
    __shared__ float sm[ATT_WARPS], sl[ATT_WARPS];
    __shared__ float sacc[ATT_WARPS][ATT_MAXD];
    if (lane == 0) { sm[w] = m; sl[w] = l; }
#pragma unroll
    for (int i = 0; i < ATT_MAXD / 32; ++i) {
        const int d = lane + 32 * i;
        if (d < D) sacc[w][d] = acc[i];
    }
    __syncthreads();
    float M = -HI_INF;
#pragma unroll
    for (int ww = 0; ww < ATT_WARPS; ++ww) M = fmaxf(M, sm[ww]);
    float f[ATT_WARPS], Ls = 0.f;
#pragma unroll
    for (int ww = 0; ww < ATT_WARPS; ++ww) {
        f[ww] = sm[ww] == -HI_INF ? 0.f : expf(sm[ww] - M);
        Ls += sl[ww] * f[ww];
    }
    const float inv = L > 0 ? 1.f / Ls : HI_NAN;
    T* op = out + ((size_t)t * Hq + h) * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float o = 0.f;
#pragma unroll
        for (int ww = 0; ww < ATT_WARPS; ++ww) o += sacc[ww][d] * f[ww];
        op[d] = from_f32<T>(o * inv);
    }
}

// ---------------------------------------------------------------- matmul
// Decode GEMV: out (M, N) = x (M, K) @ w (N, K)^T (+ bias), for small M. One warp per
// output column n (GEMV_WARPS per block); each lane streams 16-byte chunks of the
// weight row (read once per 4 rows of x) and accumulates in f32.
#define GEMV_WARPS 4
#define GEMV_MT 4
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias, int has_bias,
     T* __restrict__ out, int M, int N, int K, int vec) {
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (n >= N) return;
    const T* wr = w + (size_t)n * K;
    const float b = has_bias ? to_f32(bias[n]) : 0.f;
    for (int m0 = 0; m0 < M; m0 += GEMV_MT) {
        float acc[GEMV_MT];
#pragma unroll
        for (int mi = 0; mi < GEMV_MT; ++mi) acc[mi] = 0.f;
        if (vec) {
            const int KV = K / VEC;
#pragma unroll 2
            for (int kv = lane; kv < KV; kv += 32) {
                const Vec16<T> wv = load16_nc(wr + (size_t)kv * VEC);
                float wf[VEC];
#pragma unroll
                for (int e = 0; e < VEC; ++e) wf[e] = to_f32(wv.e[e]);
#pragma unroll
                for (int mi = 0; mi < GEMV_MT; ++mi) {
                    if (m0 + mi < M) {
                        const Vec16<T> xv = load16(x + (size_t)(m0 + mi) * K + (size_t)kv * VEC);
#pragma unroll
                        for (int e = 0; e < VEC; ++e) acc[mi] += wf[e] * to_f32(xv.e[e]);
                    }
                }
            }
        } else {
            for (int k = lane; k < K; k += 32) {
                const float wf = to_f32(wr[k]);
#pragma unroll
                for (int mi = 0; mi < GEMV_MT; ++mi)
                    if (m0 + mi < M) acc[mi] += wf * to_f32(x[(size_t)(m0 + mi) * K + k]);
            }
        }
#pragma unroll
        for (int mi = 0; mi < GEMV_MT; ++mi) {
            const float s = warp_sum(acc[mi]);
            if (lane == 0 && m0 + mi < M) out[(size_t)(m0 + mi) * N + n] = from_f32<T>(s + b);
        }
    }
}

// out (M, N) += bias (N,), after a cuBLAS product.
extern "C" __global__ void bias_add(T* __restrict__ out, const T* __restrict__ bias, int M, int N) {
    const long long total = (long long)M * N;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride)
        out[i] = from_f32<T>(to_f32(out[i]) + to_f32(bias[i % N]));
}

// A plain shared-memory tiled GEMM (f32 accumulation) for larger M when CuPy/cuBLAS is
// not installed: correct, not fast. 16x16 threads, one output each.
#define TILE 16
extern "C" __global__ void gemm_tiled(const T* __restrict__ x, const T* __restrict__ w,
                                      const T* __restrict__ bias, int has_bias, T* __restrict__ out,
                                      int M, int N, int K) {
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
    if (m < M && n < N) out[(size_t)m * N + n] = from_f32<T>(acc + (has_bias ? to_f32(bias[n]) : 0.f));
}

// ---------------------------------------------------------------- strided copy
// dst[i] = src[i] element by element over one shape, each side with its own strides
// (in elements, signed): gathers a strided view into a contiguous buffer and scatters
// it back. Dtype-blind: copies 2, 4 or 8 byte words.
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
STRIDED_COPY(strided_copy_2, unsigned short)
STRIDED_COPY(strided_copy_4, unsigned int)
STRIDED_COPY(strided_copy_8, unsigned long long)

// ---------------------------------------------------------------- penalties
// Repetition penalty on seen tokens (HF/CTRL), presence and frequency penalties from
// output counts (OpenAI). Elementwise; out may be logits.
extern "C" __global__ void penalties(const T* logits, const int* __restrict__ counts,
                                     const int* __restrict__ seen, T* out, long long n,
                                     float repetition, float presence, float frequency) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float x = to_f32(logits[i]);
        if (seen[i] != 0) x = x > 0.f ? x / repetition : x * repetition;
        const int c = counts[i];
        x -= presence * (float)(c > 0) + frequency * (float)c;
        out[i] = from_f32<T>(x);
    }
}

// ---------------------------------------------------------------- sample
// One block per row of logits (B, V): temperature, top-k, top-p, min-p, then the
// inverse CDF in token-id order over the kept set, driven by uniform[row] (as
// reference.sample). Temperature 0 is argmax (the host launches `argmax` instead).
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
sample(const T* __restrict__ logits, const float* __restrict__ uniform, int* __restrict__ out,
       int V, float invT, int top_k, float top_p, float min_p) {
    const size_t row = blockIdx.x;
    const T* x = logits + row * (size_t)V;
    const int tid = threadIdx.x, nt = blockDim.x;
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

// ---------------------------------------------------------------- attention_decode_split
// Decode attention (one query token), split along the sequence (flash-decoding) and
// grouped by kv head: grid (Hkv, nsplit), 4 warps. Block (h, s) reads its slice of
// keys/values of kv head h (rows s*C .. s*C+C-1 of 0..L-1, C = ceil(L / nsplit), L from
// the position on the device) for all G = Hq/Hkv query heads of the group (a warp per
// query head, online softmax), writes partial (max, sum, acc[D]) in f32 to part; the
// last block of kv head h (counter, reset after) merges the nsplit partials.
#define ADS_WARPS 4
extern "C" __global__ void __launch_bounds__(ADS_WARPS * 32)
attention_decode_split(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
                       const void* __restrict__ pos, int pos64, T* __restrict__ out,
                       int Hq, int Hkv, int D, int S, float scale, int nsplit,
                       float* part, u32* count) {
    const int h = blockIdx.x, s = blockIdx.y;
    const int G = Hq / Hkv;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const i64 p = load_index(pos, pos64, 0);
    const int L = p < 0 ? 0 : (int)(p >= S ? S : p + 1);
    const int C = (L + nsplit - 1) / nsplit;
    const int j0 = min(L, s * C), j1 = min(L, j0 + C);
    const size_t kstride = (size_t)Hkv * D;
    const int PD = D + 2;
    for (int g = w; g < G; g += ADS_WARPS) {
        const int hq = h * G + g;
        float qr[ATT_MAXD / 32], acc[ATT_MAXD / 32];
        const T* qp = q + (size_t)hq * D;
#pragma unroll
        for (int i = 0; i < ATT_MAXD / 32; ++i) {
            const int d = lane + 32 * i;
            qr[i] = d < D ? to_f32(qp[d]) * scale : 0.f;
            acc[i] = 0.f;
        }
        float m = -HI_INF, l = 0.f;
        for (int j = j0; j < j1; ++j) {
            const T* kp = kc + (size_t)j * kstride + (size_t)h * D;
            const T* vp = vc + (size_t)j * kstride + (size_t)h * D;
            float sc = 0.f;
#pragma unroll
            for (int i = 0; i < ATT_MAXD / 32; ++i) {
                const int d = lane + 32 * i;
                if (d < D) sc += qr[i] * to_f32(kp[d]);
            }
            sc = warp_sum(sc);
            const float mn = fmaxf(m, sc);
            const float corr = expf(m - mn);
            const float e = expf(sc - mn);
            l = l * corr + e;
#pragma unroll
            for (int i = 0; i < ATT_MAXD / 32; ++i) {
                const int d = lane + 32 * i;
                if (d < D) acc[i] = acc[i] * corr + e * to_f32(vp[d]);
            }
            m = mn;
        }
        float* pp = part + ((size_t)hq * nsplit + s) * PD;
        if (lane == 0) { pp[0] = m; pp[1] = l; }
#pragma unroll
        for (int i = 0; i < ATT_MAXD / 32; ++i) {
            const int d = lane + 32 * i;
            if (d < D) pp[2 + d] = acc[i];
        }
    }
    __threadfence();
    __syncthreads();
    __shared__ bool last;
    if (threadIdx.x == 0) last = atomicAdd(&count[h], 1u) == (u32)(nsplit - 1);
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int g = 0; g < G; ++g) {
        const int hq = h * G + g;
        const float* base = part + (size_t)hq * nsplit * PD;
        float M = -HI_INF;
        for (int sp = 0; sp < nsplit; ++sp) M = fmaxf(M, __ldcg(base + (size_t)sp * PD));
        float Ls = 0.f;
        for (int sp = 0; sp < nsplit; ++sp) {
            const float mm = __ldcg(base + (size_t)sp * PD);
            if (mm != -HI_INF) Ls += __ldcg(base + (size_t)sp * PD + 1) * expf(mm - M);
        }
        const float inv = L > 0 ? 1.f / Ls : HI_NAN;
        for (int d = threadIdx.x; d < D; d += blockDim.x) {
            float o = 0.f;
            for (int sp = 0; sp < nsplit; ++sp) {
                const float mm = __ldcg(base + (size_t)sp * PD);
                if (mm != -HI_INF) o += __ldcg(base + (size_t)sp * PD + 2 + d) * expf(mm - M);
            }
            out[(size_t)hq * D + d] = from_f32<T>(o * inv);
        }
    }
    if (threadIdx.x == 0) count[h] = 0;
}
