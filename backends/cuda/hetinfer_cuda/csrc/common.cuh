// hetinfer CUDA backend: element types, conversions, vector loads and reductions.
// Compiled by NVRTC with no system headers: f16/bf16 are our own 16-bit structs,
// converted through PTX (f16) and bit arithmetic (bf16, round to nearest even).
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

struct __align__(2) f16_t { u16 b; };
struct __align__(2) bf16_t { u16 b; };

#define HI_INF __int_as_float(0x7f800000)
#define HI_NAN __int_as_float(0x7fc00000)

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(f16_t x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.b));
    return f;
}
__device__ __forceinline__ float to_f32(bf16_t x) { return __uint_as_float(((u32)x.b) << 16); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ f16_t from_f32<f16_t>(float x) {
    f16_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.b) : "f"(x));
    return h;
}
template <> __device__ __forceinline__ bf16_t from_f32<bf16_t>(float x) {
    u32 u = __float_as_uint(x);
    bf16_t r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {         // NaN stays a (quiet) NaN
        r.b = (u16)((u >> 16) | 0x40u);
        return r;
    }
    u += 0x7fffu + ((u >> 16) & 1u);               // round to nearest, ties to even
    r.b = (u16)(u >> 16);
    return r;
}

// 16 bytes of elements: one 128-bit load or store.
template <typename T> struct Vec16 {
    static constexpr int N = 16 / sizeof(T);
    union { uint4 u; T e[16 / sizeof(T)]; };
};

template <typename T> __device__ __forceinline__ Vec16<T> load16(const T* p) {
    Vec16<T> v;
    v.u = *reinterpret_cast<const uint4*>(p);
    return v;
}
template <typename T> __device__ __forceinline__ Vec16<T> load16_nc(const T* p) {   // read-only path
    Vec16<T> v;
    v.u = __ldg(reinterpret_cast<const uint4*>(p));
    return v;
}
template <typename T> __device__ __forceinline__ void store16(T* p, const Vec16<T>& v) {
    *reinterpret_cast<uint4*>(p) = v.u;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Whole-block reductions; every thread gets the result. blockDim.x a multiple of 32.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float sh[32];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();                 // a previous call may still be reading sh
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.f;
    return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v) {
    __shared__ float sh[32];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : -HI_INF;
    return warp_max(v);
}

// Programmatic dependent launch (sm_90 and later). A kernel launched with it (launch(...,
// pdl=True)) may start while the kernel before it still runs: it must call pdl_wait() before
// it reads anything that kernel writes (it returns once that kernel has finished and its writes
// are visible). pdl_trigger() lets such a next kernel start now. Without the launch attribute,
// or on an older GPU, both do nothing.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ i64 load_index(const void* p, int is64, i64 i) {
    return is64 ? reinterpret_cast<const i64*>(p)[i] : (i64) reinterpret_cast<const int*>(p)[i];
}
