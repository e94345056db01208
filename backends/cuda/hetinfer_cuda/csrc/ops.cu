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
