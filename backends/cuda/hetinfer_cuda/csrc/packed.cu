// hetinfer CUDA kernels for GGUF weights kept packed (hetinfer.packed: the block layouts).
// One module per activation type T (-DHI_DTYPE=0|1|2: f32, f16, bf16); common.cuh is prepended.
// A packed weight is N rows of K / BS blocks of TS bytes, each row packed on its own.
//
// Decode GEMV (M <= 8 rows of x): y[m, n] = sum_k x[m, k] * W[n, k], W dequantized in registers.
//   * The block first writes x (times the rms_norm weight when fused) to shared memory in 16-bit
//     fixed point per group of 16 values: x ~= (256 hi + lo) * sx, hi int8, lo uint8, sx =
//     amax / 32767 (error <= amax / 65534 of the group), and each group's float sum.
//   * Every format decodes to "units": 16 consecutive values sharing one scale a and offset b,
//     value = a q + b with q one byte (Q8_0 signed, the others unsigned). A unit then costs eight
//     dp4a against hi/lo and two float multiply-adds: a sx v + b sum(x).
//   * An "item" is two units read from one 16-byte run of quants. A warp owns a pair of weight
//     rows at a time (with swiglu a gate row and its up row) and walks them in chunks of 64 or
//     128 items; the bytes of both rows reach the warp's shared staging ring by cp.async (the
//     aligned 16-byte window around the chunk: blocks of 34, 18, 22, 210 bytes are only 2-byte
//     aligned), a chunk ahead of the one being decoded. Each x load serves both rows.
//   * Fused: rms_norm prologue (norm weight nw), bias, swiglu of [gate | up] halves, residual;
//     out and residual T or f32. Nothing is allocated (capturable in a CUDA graph).
// Prefill: dequant_<fmt> writes the (N, K) T matrix for a cuBLAS product.

#if HI_DTYPE == 0
typedef float T;
#elif HI_DTYPE == 1
typedef f16_t T;
#elif HI_DTYPE == 2
typedef bf16_t T;
#else
#error "HI_DTYPE must be 0 (f32), 1 (f16) or 2 (bf16)"
#endif

typedef unsigned char u8;

__device__ __forceinline__ float pk_ldf(const void* p, int is32, size_t i) {
    return is32 ? reinterpret_cast<const float*>(p)[i] : to_f32(reinterpret_cast<const T*>(p)[i]);
}
__device__ __forceinline__ void pk_stf(void* p, int is32, size_t i, float v) {
    if (is32) reinterpret_cast<float*>(p)[i] = v;
    else reinterpret_cast<T*>(p)[i] = from_f32<T>(v);
}
__device__ __forceinline__ float pk_silu_mul(float g, float u) { return g / (1.f + expf(-g)) * u; }
__device__ __forceinline__ float pk_h2f(u32 h) {
    f16_t v;
    v.b = (u16)(h & 0xffffu);
    return to_f32(v);
}

// ---------------------------------------------------------------- formats
// QT: 0 q8_0, 1 q4_0, 2 q4_1, 3 q5_0, 4 q5_1, 5 q4_k, 6 q5_k, 7 q6_k (packed.py _CODE).
// AL: how the GEMV may load a block from its staging buffer: 0 any 2-byte alignment (funnel
// shifts), 1 4-byte aligned, 3 16-byte aligned (the block size is a multiple of 16 bytes).
// (2: 16-byte aligned global memory through __ldg; the dequantize kernel uses 0.)
template <int QT> struct PkFmt;
template <> struct PkFmt<0> { static constexpr int BS = 32, TS = 34, AL = 0; static constexpr bool SG = true; };
template <> struct PkFmt<1> { static constexpr int BS = 32, TS = 18, AL = 0; static constexpr bool SG = false; };
template <> struct PkFmt<2> { static constexpr int BS = 32, TS = 20, AL = 1; static constexpr bool SG = false; };
template <> struct PkFmt<3> { static constexpr int BS = 32, TS = 22, AL = 0; static constexpr bool SG = false; };
template <> struct PkFmt<4> { static constexpr int BS = 32, TS = 24, AL = 1; static constexpr bool SG = false; };
template <> struct PkFmt<5> { static constexpr int BS = 256, TS = 144, AL = 3; static constexpr bool SG = false; };
template <> struct PkFmt<6> { static constexpr int BS = 256, TS = 176, AL = 3; static constexpr bool SG = false; };
template <> struct PkFmt<7> { static constexpr int BS = 256, TS = 210, AL = 0; static constexpr bool SG = false; };

// A chunk: the items (32 values each) of a row a warp decodes per step, ck at run time (a multiple
// of 32 and of the items per block, at most CHUNK: 128 = 4 per lane for the 256-value formats, 64
// for the 32-value ones, whose 34-byte blocks would need 141 KB of staging per block at 128).
// The launcher (packed.py plan) picks ck, the chunks in flight per warp and the K split.
template <int QT> struct PkGeo {
    typedef PkFmt<QT> F;
    static constexpr int IPB = F::BS / 32;                   // items per block
    static constexpr int CHUNK = F::BS == 256 ? 128 : 64;    // most items of a chunk
    static constexpr int NV = (CHUNK / IPB * F::TS + 45) / 16; // 16-byte copies of a row's window, at most
    static constexpr int P = (NV + 31) / 32;                 // per lane
};
// bytes of a row's staging window for chunks of ck items (+ slack for funnel reads): packed.py _win
template <int QT> __device__ __forceinline__ int pk_win(int ck) {
    return ((ck / PkGeo<QT>::IPB) * PkFmt<QT>::TS + 45) / 16 * 16 + 16;
}

// loads at byte offset o (even) from base (16-byte aligned)
template <int AL> __device__ __forceinline__ u32 pk_ld32(const u8* base, int o) {
    if constexpr (AL == 2) {
        return __ldg(reinterpret_cast<const unsigned int*>(base + o));
    } else if constexpr (AL == 1 || AL == 3) {
        return *reinterpret_cast<const u32*>(base + o);
    } else {
        const u32* q = reinterpret_cast<const u32*>(base + (o & ~3));
        const u32 sh = (u32)(o & 2) * 8u;
        const u32 hi = sh ? q[1] : 0u;
        return __funnelshift_r(q[0], hi, sh);
    }
}
template <int AL> __device__ __forceinline__ uint4 pk_ld128(const u8* base, int o) {
    if constexpr (AL == 2) {
        return __ldg(reinterpret_cast<const uint4*>(base + o));
    } else if constexpr (AL == 3) {
        return *reinterpret_cast<const uint4*>(base + o);
    } else if constexpr (AL == 1) {
        const u32* q = reinterpret_cast<const u32*>(base + o);
        return make_uint4(q[0], q[1], q[2], q[3]);
    } else {
        const u32* q = reinterpret_cast<const u32*>(base + (o & ~3));
        const u32 sh = (u32)(o & 2) * 8u;
        const u32 w0 = q[0], w1 = q[1], w2 = q[2], w3 = q[3];
        const u32 w4 = sh ? q[4] : 0u;
        return make_uint4(__funnelshift_r(w0, w1, sh), __funnelshift_r(w1, w2, sh),
                          __funnelshift_r(w2, w3, sh), __funnelshift_r(w3, w4, sh));
    }
}
template <int AL> __device__ __forceinline__ u32 pk_ld16(const u8* base, int o) {
    if constexpr (AL == 2) return (u32)__ldg(reinterpret_cast<const unsigned short*>(base + o));
    else return (u32)*reinterpret_cast<const u16*>(base + o);
}
template <int AL> __device__ __forceinline__ int pk_lds8(const u8* base, int o) {   // a signed byte
    if constexpr (AL == 2) return (int)(signed char)__ldg(base + o);
    else return (int)(signed char)base[o];
}

struct PkRaw { uint4 a, b, c; };         // the bytes an item needs, as loaded
struct PkItem {                          // two units of 16 values: value = a q + b
    uint4 qa, qb;
    float aa, ba, ab, bb;
    int ea, eb;                          // first value of each unit within the block
};

__device__ __forceinline__ uint4 pk_and(uint4 v, u32 m) { return make_uint4(v.x & m, v.y & m, v.z & m, v.w & m); }
__device__ __forceinline__ uint4 pk_shr(uint4 v, int s) { return make_uint4(v.x >> s, v.y >> s, v.z >> s, v.w >> s); }
__device__ __forceinline__ uint4 pk_or(uint4 a, uint4 b) { return make_uint4(a.x | b.x, a.y | b.y, a.z | b.z, a.w | b.w); }
// 4 bits of v (bits 0..3) -> bit 4 of bytes 0..3
__device__ __forceinline__ u32 pk_hb(u32 v) { return (((v & 0xfu) * 0x00204081u) & 0x01010101u) << 4; }
__device__ __forceinline__ uint4 pk_hb16(u32 v) {       // 16 bits -> bit 4 of 16 bytes
    return make_uint4(pk_hb(v), pk_hb(v >> 4), pk_hb(v >> 8), pk_hb(v >> 12));
}

// item it (0 .. IPB-1) of the block at byte offset o from base
template <int QT, int AL> __device__ __forceinline__ PkRaw pk_raw(const u8* base, int o, int it) {
    PkRaw r;
    r.b = make_uint4(0, 0, 0, 0);
    r.c = make_uint4(0, 0, 0, 0);
    if constexpr (QT == 0) {
        r.a = pk_ld128<AL>(base, o + 2);
        r.b = pk_ld128<AL>(base, o + 18);
        r.c.x = pk_ld16<AL>(base, o);
    } else if constexpr (QT == 1) {
        r.a = pk_ld128<AL>(base, o + 2);
        r.c.x = pk_ld16<AL>(base, o);
    } else if constexpr (QT == 2) {
        r.a = pk_ld128<AL>(base, o + 4);
        r.c.x = pk_ld32<AL>(base, o);
    } else if constexpr (QT == 3) {
        r.a = pk_ld128<AL>(base, o + 6);
        r.c.x = pk_ld16<AL>(base, o);
        r.c.y = pk_ld32<AL>(base, o + 2);
    } else if constexpr (QT == 4) {
        r.a = pk_ld128<AL>(base, o + 8);
        r.c.x = pk_ld32<AL>(base, o);
        r.c.y = pk_ld32<AL>(base, o + 4);
    } else if constexpr (QT == 5) {
        r.a = pk_ld128<AL>(base, o);                                     // d, dmin, scales
        r.b = pk_ld128<AL>(base, o + 16 + 32 * (it >> 1) + 16 * (it & 1));
    } else if constexpr (QT == 6) {
        r.a = pk_ld128<AL>(base, o);
        r.b = pk_ld128<AL>(base, o + 48 + 32 * (it >> 1) + 16 * (it & 1));
        r.c = pk_ld128<AL>(base, o + 16 + 16 * (it & 1));                // qh
    } else {
        const int h = it >> 2, j = it & 3;
        r.a = pk_ld128<AL>(base, o + 64 * h + 16 * j);                   // ql
        r.b = pk_ld128<AL>(base, o + 128 + 32 * h + 16 * (j & 1));       // qh
        r.c.x = pk_ld16<AL>(base, o + 208);
        r.c.y = (u32)pk_lds8<AL>(base, o + 192 + 8 * h + j);
        r.c.z = (u32)pk_lds8<AL>(base, o + 192 + 8 * h + 4 + j);
    }
    return r;
}

// byte b (0 or 1) of v as a float: 2^23 + byte through the float bits, minus 2^23 (no I2F)
__device__ __forceinline__ float pk_b2f(u32 v, int b) {
    return __uint_as_float(__byte_perm(v, 0x4b000000u, b ? 0x7441 : 0x7440)) - 8388608.f;
}
// 6-bit scales and mins of sub-blocks 2c and 2c + 1 of a q4_k / q5_k block (s0, s1, s2: scale
// bytes 0-3, 4-7, 8-11), two at a time in the low 16 bits: j < 4: sc = s[j] & 63, m = s[j+4] & 63;
// j >= 4: sc = (s[j+4] & 15) | (s[j-4] >> 6) << 4, m = (s[j+4] >> 4) | (s[j] >> 6) << 4.
__device__ __forceinline__ void pk_scale_min2(u32 s0, u32 s1, u32 s2, int c, float& sca, float& mna,
                                              float& scb, float& mnb) {
    const int sh = 16 * (c & 1);
    const u32 t0 = s0 >> sh, t1 = s1 >> sh, t2 = s2 >> sh;
    const bool hi = c >= 2;
    const u32 scp = hi ? (t2 & 0x0f0fu) | ((t0 >> 2) & 0x3030u) : t0 & 0x3f3fu;
    const u32 mnp = hi ? ((t2 >> 4) & 0x0f0fu) | ((t1 >> 2) & 0x3030u) : t1 & 0x3f3fu;
    sca = pk_b2f(scp, 0); scb = pk_b2f(scp, 1);
    mna = pk_b2f(mnp, 0); mnb = pk_b2f(mnp, 1);
}

// The second unit of a 4-bit format without a fifth bit (q4_0, q4_1, q4_k) keeps its high
// nibbles in place (16 q, up to 240: q b-dot products stay within 2^27) and its scale takes the
// 1/16, exact in float: one AND per word instead of a shift and an AND.
template <int QT> __device__ __forceinline__ PkItem pk_decode(const PkRaw& r, int it) {
    PkItem t;
    if constexpr (QT == 0) {
        const float d = pk_h2f(r.c.x);
        t.qa = r.a; t.qb = r.b;
        t.aa = t.ab = d; t.ba = t.bb = 0.f;
        t.ea = 0; t.eb = 16;
    } else if constexpr (QT <= 4) {
        float d, b;
        u32 qh = 0;
        if constexpr (QT == 1 || QT == 3) {
            d = pk_h2f(r.c.x);
            b = QT == 1 ? -8.f * d : -16.f * d;
        } else {
            d = pk_h2f(r.c.x);
            b = pk_h2f(r.c.x >> 16);
        }
        if constexpr (QT >= 3) qh = r.c.y;
        t.qa = pk_and(r.a, 0x0f0f0f0fu);
        t.aa = t.ab = d; t.ba = t.bb = b;
        if constexpr (QT >= 3) {
            t.qb = pk_and(pk_shr(r.a, 4), 0x0f0f0f0fu);
            t.qa = pk_or(t.qa, pk_hb16(qh));
            t.qb = pk_or(t.qb, pk_hb16(qh >> 16));
        } else {                                    // high nibbles in place: 16 q (pk_decode notes)
            t.qb = pk_and(r.a, 0xf0f0f0f0u);
            t.ab = d * 0.0625f;
        }
        t.ea = 0; t.eb = 16;
    } else if constexpr (QT == 5 || QT == 6) {
        const int c = it >> 1, hh = it & 1;
        const int sa = 2 * c, sb = 2 * c + 1;
        const float d = pk_h2f(r.a.x), dm = pk_h2f(r.a.x >> 16);
        float sca, mna, scb, mnb;
        pk_scale_min2(r.a.y, r.a.z, r.a.w, c, sca, mna, scb, mnb);
        t.qa = pk_and(r.b, 0x0f0f0f0fu);
        t.qb = QT == 5 ? pk_and(r.b, 0xf0f0f0f0u) : pk_and(pk_shr(r.b, 4), 0x0f0f0f0fu);
        if constexpr (QT == 6) {
            t.qa = pk_or(t.qa, make_uint4(((r.c.x >> sa) & 0x01010101u) << 4, ((r.c.y >> sa) & 0x01010101u) << 4,
                                          ((r.c.z >> sa) & 0x01010101u) << 4, ((r.c.w >> sa) & 0x01010101u) << 4));
            t.qb = pk_or(t.qb, make_uint4(((r.c.x >> sb) & 0x01010101u) << 4, ((r.c.y >> sb) & 0x01010101u) << 4,
                                          ((r.c.z >> sb) & 0x01010101u) << 4, ((r.c.w >> sb) & 0x01010101u) << 4));
        }
        t.aa = d * sca; t.ba = -(dm * mna);
        t.ab = d * scb * (QT == 5 ? 0.0625f : 1.f); t.bb = -(dm * mnb);
        t.ea = 64 * c + 16 * hh; t.eb = t.ea + 32;
    } else {
        const int h = it >> 2, j = it & 3;
        const int s0 = 2 * (j >> 1);
        const float d = pk_h2f(r.c.x);
        const uint4 hi_a = pk_and(pk_shr(r.b, s0), 0x03030303u);
        const uint4 hi_b = pk_and(pk_shr(r.b, s0 + 4), 0x03030303u);
        t.qa = pk_or(pk_and(r.a, 0x0f0f0f0fu), make_uint4(hi_a.x << 4, hi_a.y << 4, hi_a.z << 4, hi_a.w << 4));
        t.qb = pk_or(pk_and(pk_shr(r.a, 4), 0x0f0f0f0fu),
                     make_uint4(hi_b.x << 4, hi_b.y << 4, hi_b.z << 4, hi_b.w << 4));
        t.aa = d * (float)(int)r.c.y; t.ba = -32.f * t.aa;
        t.ab = d * (float)(int)r.c.z; t.bb = -32.f * t.ab;
        t.ea = 128 * h + 16 * j; t.eb = t.ea + 64;
    }
    return t;
}

// ---------------------------------------------------------------- dot products
template <bool SG> __device__ __forceinline__ int pk_dph(u32 a, u32 b, int c) {     // b signed
    int d;
    if constexpr (SG) asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    else asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
template <bool SG> __device__ __forceinline__ int pk_dpl(u32 a, u32 b, int c) {     // b unsigned
    int d;
    if constexpr (SG) asm("dp4a.s32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    else asm("dp4a.u32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
// sum q[i] (256 hi[i] + lo[i]) over 16 bytes
template <bool SG> __device__ __forceinline__ int pk_dot16(const uint4& q, const uint4& h, const uint4& l) {
    const int vh = pk_dph<SG>(q.w, h.w, pk_dph<SG>(q.z, h.z, pk_dph<SG>(q.y, h.y, pk_dph<SG>(q.x, h.x, 0))));
    const int vl = pk_dpl<SG>(q.w, l.w, pk_dpl<SG>(q.z, l.z, pk_dpl<SG>(q.y, l.y, pk_dpl<SG>(q.x, l.x, 0))));
    return vh * 256 + vl;                           // two independent chains
}

// 16 values from element i of p (f32 when is32, else T), 16-byte loads when vec
__device__ __forceinline__ void pk_ld16f(const void* p, int is32, size_t i, int vec, float* f) {
    if (is32 || sizeof(T) == 4) {
        const float* q = reinterpret_cast<const float*>(p) + i;
        if (vec) {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const float4 v = *reinterpret_cast<const float4*>(q + 4 * k);
                f[4 * k] = v.x; f[4 * k + 1] = v.y; f[4 * k + 2] = v.z; f[4 * k + 3] = v.w;
            }
        } else {
#pragma unroll
            for (int e = 0; e < 16; ++e) f[e] = q[e];
        }
    } else {
        const T* q = reinterpret_cast<const T*>(p) + i;
        if (vec) {
#pragma unroll
            for (int k = 0; k < 16; k += Vec16<T>::N) {
                const Vec16<T> v = load16(q + k);
#pragma unroll
                for (int e = 0; e < Vec16<T>::N; ++e) f[k + e] = to_f32(v.e[e]);
            }
        } else {
#pragma unroll
            for (int e = 0; e < 16; ++e) f[e] = to_f32(q[e]);
        }
    }
}

// ---------------------------------------------------------------- GEMV
// x groups in shared memory are permuted per window of 16 groups (256 values) so that the
// 8 items of a window (lanes 8i .. 8i+7) read slots 0..7 (first units) and 8..15 (second
// units): a quarter warp's 16-byte loads are consecutive, free of bank conflicts. Item i of a
// row (its first value 32 i for the 32-value formats, in block i / 8 for the k-quants) reads
// slots 16 (i / 8) + (i % 8) and that + 8. A last window of fewer than 16 groups (32-value
// formats with K % 256 != 0) keeps groups in place.
template <int QT> __device__ __forceinline__ int pk_slot(int g, int nfull) {
    const int wdw = g >> 4, gl = g & 15;
    if (wdw >= nfull) return g;
    int s;
    if constexpr (PkFmt<QT>::BS == 32) s = (gl >> 1) + 8 * (gl & 1);                    // 2b + u
    else if constexpr (QT == 7) s = 8 * ((gl >> 2) & 1) + 4 * (gl >> 3) + (gl & 3);      // 8h + 4u + j
    else s = 8 * ((gl >> 1) & 1) + 2 * (gl >> 2) + (gl & 1);                             // 4c + 2u + hh
    return (wdw << 4) + s;
}

// asynchronous 16-byte copy global -> shared (sm_80+), and its commit / wait
__device__ __forceinline__ u32 pk_smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
__device__ __forceinline__ void pk_cp16(u32 dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void pk_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void pk_wait() {
    asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
}

// byte offset within its aligned window of chunk c (cb blocks each) of row `row`
template <int QT> __device__ __forceinline__ int pk_win_off(const u8* w, size_t rowbytes, int row, int c, int cb) {
    const size_t a = reinterpret_cast<size_t>(w) + (size_t)row * rowbytes + (size_t)c * cb * PkFmt<QT>::TS;
    return (int)(a & 15);
}

// copy the aligned 16-byte window around chunk c of row `row` into dst (shared), lanes interleaved
template <int QT> __device__ __forceinline__ void pk_issue(const u8* w, size_t rowbytes, int row, int c, int cb,
                                                           int nblk, int lane, u8* dst) {
    typedef PkGeo<QT> Gm;
    const int b0 = c * cb;
    const int nb = min(cb, nblk - b0);
    const size_t a = reinterpret_cast<size_t>(w) + (size_t)row * rowbytes + (size_t)b0 * PkFmt<QT>::TS;
    const int off = (int)(a & 15);
    const int n16 = (off + nb * PkFmt<QT>::TS + 15) >> 4;
    const u8* g = reinterpret_cast<const u8*>(a - (size_t)off) + 16 * lane;   // this lane's first copy
    const u32 d = pk_smem_addr(dst) + 16 * lane;
#pragma unroll
    for (int p = 0; p < Gm::P; ++p)                 // then every 512 bytes (constant offsets)
        if (lane + 32 * p < n16) pk_cp16(d + 512 * p, g + 512 * p);
}

// wait until at most n (0 .. 3, warp-uniform) of this lane's copy groups are in flight
__device__ __forceinline__ void pk_wait_n(int n) {
    if (n >= 3) pk_wait<3>();
    else if (n == 2) pk_wait<2>();
    else if (n == 1) pk_wait<1>();
    else pk_wait<0>();
}
// the sk warps of one slot meet (named barrier 1 + slot; 0 is __syncthreads')
__device__ __forceinline__ void pk_slot_sync(int slot, int sk) {
    asm volatile("bar.sync %0, %1;" :: "r"(1 + slot), "r"(32 * sk) : "memory");
}

// A warp works on a pair of weight rows at a time (with swiglu: gate row p and up row p + N/2;
// else rows 2p, 2p + 1), walked in chunks of ck items; the sk warps of a slot (sk = 1, 2, 4, 8;
// 8 / sk slots per block) split a pair's chunks between them (chunks ks, ks + sk, ...) and add
// their sums in shared memory, where warp ks = 0 applies the epilogue. `la` chunks (1 .. 3) of
// both rows are in flight per warp (cp.async into its ring of la + 1 staging buffers) while one
// is decoded. x's loads serve both rows. Blocks take groups of 8 / sk pairs, strided by the grid.
template <int QT, int MM>
__device__ __forceinline__ void pk_gemv(const void* __restrict__ x, int x32, int xvec, const T* __restrict__ nw,
                                        float eps, int pro, const u8* __restrict__ w, const T* __restrict__ bias,
                                        int act, const void* residual, int r32, void* out, int o32,
                                        int M, int N, int K, int ck, int sk, int la) {
    typedef PkFmt<QT> F;
    typedef PkGeo<QT> Gm;
    extern __shared__ __align__(16) u8 pk_smem[];
    __shared__ float red[MM];
    __shared__ float part[2][8][MM][2];             // per round parity, warp, row of x: the two sums
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarp = blockDim.x >> 5;
    const int G = K >> 4;
    const int win = pk_win<QT>(ck), cb = ck / Gm::IPB, nst = la + 1;
    uint4* xh = reinterpret_cast<uint4*>(pk_smem);
    uint4* xl = xh + M * G;
    float2* xf = reinterpret_cast<float2*>(xl + M * G);
    u8* stg = pk_smem + (size_t)M * G * 40 + (size_t)warp * nst * 2 * win;
    const int nblk = K / F::BS;
    const size_t rowbytes = (size_t)nblk * F::TS;
    const int ipr = K >> 5;                         // items per row
    const int cpr = (ipr + ck - 1) / ck;            // chunks per row (>= sk: packed.py plan)
    const int No = act ? N / 2 : N;
    const int NP = act ? No : (N + 1) / 2;          // row pairs
    const int slots = nwarp / sk, slot = warp / sk, ks = warp - slot * sk;
    const int gw = blockIdx.x * slots + slot, tw = gridDim.x * slots;
    const int nout = gw < NP ? (NP - 1 - gw) / tw + 1 : 0;       // pairs of this slot
    const int nc = ks < cpr ? (cpr - 1 - ks) / sk + 1 : 0;       // chunks of a pair for this warp
    const int njobs = nout * nc;                    // (pair, chunk) steps of this warp
    const int nfull = ipr >> 3;                     // full windows of 16 x groups

    pdl_trigger();
    if (threadIdx.x < MM) red[threadIdx.x] = 0.f;

    // (pair pn, chunk index cin) of the next job to request; the first la chunks' weights are
    // requested before x is ready
    int pn = gw, cin = 0, sn = 0;
    for (int s = 0; s < la; ++s) {
        if (s < njobs) {
            const int c = ks + cin * sk;
            const int n0 = act ? pn : 2 * pn, n1 = act ? pn + No : min(2 * pn + 1, N - 1);
            pk_issue<QT>(w, rowbytes, n0, c, cb, nblk, lane, stg + sn * 2 * win);
            pk_issue<QT>(w, rowbytes, n1, c, cb, nblk, lane, stg + sn * 2 * win + win);
            if (++cin == nc) { cin = 0; pn += tw; }
        }
        pk_commit();
        sn = sn + 1 == nst ? 0 : sn + 1;
    }
    pdl_wait();
    __syncthreads();
    // prologue: x (times nw) in fixed point per 16 values; sum of x^2 per row for the norm
    // (per thread, then per warp: one shared atomic per warp and row, not one per group)
    float ssq[MM];
#pragma unroll
    for (int m = 0; m < MM; ++m) ssq[m] = 0.f;
    for (int i = threadIdx.x; i < M * G; i += blockDim.x) {
        const int m = i / G, g = i - m * G;
        float f[16];
        pk_ld16f(x, x32, (size_t)m * K + 16 * g, xvec, f);
        if (pro) {
            float wv[16];
            pk_ld16f(nw, 0, (size_t)16 * g, xvec, wv);
            float s = 0.f;
#pragma unroll
            for (int e = 0; e < 16; ++e) { s += f[e] * f[e]; f[e] *= wv[e]; }
#pragma unroll
            for (int mm = 0; mm < MM; ++mm) if (mm == m) ssq[mm] += s;
        }
        float amax = 0.f, sum = 0.f;
        bool finite = true;
#pragma unroll
        for (int e = 0; e < 16; ++e) {
            amax = fmaxf(amax, fabsf(f[e]));
            finite = finite && fabsf(f[e]) <= 3.4e38f;
            sum += f[e];
        }
        const float inv = amax > 0.f && finite ? 32767.f / amax : 0.f;
        u32 hw[4], lw[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            // 1.5 * 2^23 + t: the low 16 bits of the float are round(t) in two's complement
            const u32 v0 = __float_as_uint(fmaf(f[4 * q + 0], inv, 12582912.f));
            const u32 v1 = __float_as_uint(fmaf(f[4 * q + 1], inv, 12582912.f));
            const u32 v2 = __float_as_uint(fmaf(f[4 * q + 2], inv, 12582912.f));
            const u32 v3 = __float_as_uint(fmaf(f[4 * q + 3], inv, 12582912.f));
            const u32 p01 = __byte_perm(v0, v1, 0x5140), p23 = __byte_perm(v2, v3, 0x5140);
            lw[q] = __byte_perm(p01, p23, 0x5410);
            hw[q] = __byte_perm(p01, p23, 0x7632);
        }
        const int si = m * G + pk_slot<QT>(g, nfull);
        xh[si] = make_uint4(hw[0], hw[1], hw[2], hw[3]);
        xl[si] = make_uint4(lw[0], lw[1], lw[2], lw[3]);
        xf[si] = make_float2(finite ? amax * (1.f / 32767.f) : HI_NAN, finite ? sum : HI_NAN);
    }
    if (pro) {
#pragma unroll
        for (int m = 0; m < MM; ++m) {
            const float v = warp_sum(ssq[m]);
            if (m < M && lane == 0) atomicAdd(&red[m], v);
        }
    }
    __syncthreads();

    float acc0[MM], acc1[MM];
#pragma unroll
    for (int m = 0; m < MM; ++m) { acc0[m] = 0.f; acc1[m] = 0.f; }
    int p = gw, ci = 0, sj = 0, round = 0;          // this job: pair, chunk index, stage; pairs done
    for (int job = 0; job < njobs; ++job) {
        {                                           // keep la chunks in flight
            if (job + la < njobs) {
                const int c = ks + cin * sk;
                const int n0 = act ? pn : 2 * pn, n1 = act ? pn + No : min(2 * pn + 1, N - 1);
                u8* dst = stg + sn * 2 * win;
                pk_issue<QT>(w, rowbytes, n0, c, cb, nblk, lane, dst);
                pk_issue<QT>(w, rowbytes, n1, c, cb, nblk, lane, dst + win);
                if (++cin == nc) { cin = 0; pn += tw; }
            }
            pk_commit();
            sn = sn + 1 == nst ? 0 : sn + 1;
        }
        pk_wait_n(la);                              // this job's copies (this lane's) are done
        __syncwarp();                               // ... and every lane's
        const int c = ks + ci * sk;
        const int n0 = act ? p : 2 * p, n1 = act ? p + No : min(2 * p + 1, N - 1);
        const u8* s0 = stg + sj * 2 * win;
        const u8* s1 = s0 + win;
        const int off0 = pk_win_off<QT>(w, rowbytes, n0, c, cb), off1 = pk_win_off<QT>(w, rowbytes, n1, c, cb);
        // this lane's items: g0 + 32 k. ck and 32 are multiples of 8 and of IPB, so the item
        // within its block, its place in the window and its x slots move by constants with k
        const int g0 = c * ck + lane;
        const int it = lane % Gm::IPB;
        const int bo0 = (lane / Gm::IPB) * F::TS;
        const int w0 = g0 >> 3, ga0 = (w0 << 4) + (lane & 7);
#pragma unroll
        for (int k = 0; k < Gm::CHUNK / 32; ++k) {
            const int gi = g0 + 32 * k;
            if (32 * k < ck && gi < ipr) {
                const int bo = bo0 + k * (32 / Gm::IPB) * F::TS;
                const PkItem u0 = pk_decode<QT>(pk_raw<QT, F::AL>(s0, off0 + bo, it), it);
                const PkItem u1 = pk_decode<QT>(pk_raw<QT, F::AL>(s1, off1 + bo, it), it);
                // x slots of the two units (pk_slot): every window is full for the k-quants
                const bool full = F::BS == 256 || w0 + 4 * k < nfull;
                const int blk = gi / Gm::IPB;
                const int ga = full ? ga0 + 64 * k : (blk * F::BS + u0.ea) >> 4;
                const int gb = full ? ga + 8 : (blk * F::BS + u0.eb) >> 4;
#pragma unroll
                for (int m = 0; m < MM; ++m) {
                    if (m < M) {
                        const int ia = m * G + ga, ib = m * G + gb;
                        const uint4 ha = xh[ia], la_ = xl[ia], hb = xh[ib], lb = xl[ib];
                        const float2 fa = xf[ia], fb = xf[ib];
                        const float va0 = (float)pk_dot16<F::SG>(u0.qa, ha, la_), vb0 = (float)pk_dot16<F::SG>(u0.qb, hb, lb);
                        const float va1 = (float)pk_dot16<F::SG>(u1.qa, ha, la_), vb1 = (float)pk_dot16<F::SG>(u1.qb, hb, lb);
                        float s = acc0[m], q = acc1[m];
                        s = fmaf(u0.aa, fa.x * va0, s);
                        s = fmaf(u0.ab, fb.x * vb0, s);
                        q = fmaf(u1.aa, fa.x * va1, q);
                        q = fmaf(u1.ab, fb.x * vb1, q);
                        if constexpr (QT != 0) {
                            s = fmaf(u0.ba, fa.y, s);
                            s = fmaf(u0.bb, fb.y, s);
                            q = fmaf(u1.ba, fa.y, q);
                            q = fmaf(u1.bb, fb.y, q);
                        }
                        acc0[m] = s;
                        acc1[m] = q;
                    }
                }
            }
        }
        __syncwarp();                               // the buffer is refilled la jobs later
        sj = sj + 1 == nst ? 0 : sj + 1;
        if (ci == nc - 1) {                         // this warp's part of the pair is done
            const int par = round & 1;
#pragma unroll
            for (int m = 0; m < MM; ++m) {
                if (m < M) {
                    acc0[m] = warp_sum(acc0[m]);
                    acc1[m] = warp_sum(acc1[m]);
                    if (sk > 1 && lane == 0) { part[par][warp][m][0] = acc0[m]; part[par][warp][m][1] = acc1[m]; }
                }
            }
            if (sk > 1) pk_slot_sync(slot, sk);     // the slot's parts are written (double-buffered
                                                    // by round: a part is rewritten only after the
                                                    // next round's barrier, past this read)
            if (ks == 0 && lane == 0) {
#pragma unroll
                for (int m = 0; m < MM; ++m) {
                    if (m < M) {
                        float s0v = acc0[m], s1v = acc1[m];
                        for (int j = 1; j < sk; ++j) {
                            s0v += part[par][warp + j][m][0];
                            s1v += part[par][warp + j][m][1];
                        }
                        if (pro) {
                            const float inv = rsqrtf(red[m] / (float)K + eps);
                            s0v *= inv;
                            s1v *= inv;
                        }
                        if (act) {
                            const size_t o = (size_t)m * No + p;
                            float g = s0v, u = s1v;
                            if (bias) { g += to_f32(bias[n0]); u += to_f32(bias[n1]); }
                            float v = pk_silu_mul(g, u);
                            if (residual) v += pk_ldf(residual, r32, o);
                            pk_stf(out, o32, o, v);
                        } else {
                            const size_t o = (size_t)m * N + n0;
                            float v = s0v;
                            if (bias) v += to_f32(bias[n0]);
                            if (residual) v += pk_ldf(residual, r32, o);
                            pk_stf(out, o32, o, v);
                            if (2 * p + 1 < N) {
                                v = s1v;
                                if (bias) v += to_f32(bias[n0 + 1]);
                                if (residual) v += pk_ldf(residual, r32, o + 1);
                                pk_stf(out, o32, o + 1, v);
                            }
                        }
                    }
                }
            }
#pragma unroll
            for (int m = 0; m < MM; ++m) { acc0[m] = 0.f; acc1[m] = 0.f; }
            ++round;
            ci = 0;
            p += tw;
        } else {
            ++ci;
        }
    }
    pk_wait<0>();                                   // (nothing left in flight: the last groups were empty)
}

// one row of x: at least 4 blocks (32 warps) per multiprocessor where the shared memory allows
// (<= 64 registers); more rows: 2 blocks
#define PK_GEMV(NAME, QT, MM)                                                                      \
    extern "C" __global__ void __launch_bounds__(256, MM == 1 ? 4 : 2)                             \
    NAME(const void* __restrict__ x, int x32, int xvec, const T* __restrict__ nw, float eps, int pro, \
         const void* __restrict__ w, const T* __restrict__ bias, int act, const void* residual,     \
         int r32, void* out, int o32, int M, int N, int K, int ck, int sk, int la) {                \
        pk_gemv<QT, MM>(x, x32, xvec, nw, eps, pro, reinterpret_cast<const u8*>(w), bias, act,      \
                        residual, r32, out, o32, M, N, K, ck, sk, la);                              \
    }
#define PK_GEMV_ALL(FMT, QT)                                                                       \
    PK_GEMV(gemv_##FMT##_m1, QT, 1)                                                                \
    PK_GEMV(gemv_##FMT##_m2, QT, 2)                                                                \
    PK_GEMV(gemv_##FMT##_m4, QT, 4)                                                                \
    PK_GEMV(gemv_##FMT##_m8, QT, 8)
PK_GEMV_ALL(q8_0, 0)
PK_GEMV_ALL(q4_0, 1)
PK_GEMV_ALL(q4_1, 2)
PK_GEMV_ALL(q5_0, 3)
PK_GEMV_ALL(q5_1, 4)
PK_GEMV_ALL(q4_k, 5)
PK_GEMV_ALL(q5_k, 6)
PK_GEMV_ALL(q6_k, 7)

// ---------------------------------------------------------------- dequantize (prefill)
// 16 values a q + b (q: bytes of qv, signed when SG) -> dst (16 consecutive T), 16-byte stores when vec
template <bool SG> __device__ __forceinline__ void pk_write16(T* dst, const uint4& qv, float a, float b, int vec) {
    const u32 wd[4] = {qv.x, qv.y, qv.z, qv.w};
    float f[16];
#pragma unroll
    for (int e = 0; e < 16; ++e) {
        const u32 byte = (wd[e >> 2] >> (8 * (e & 3))) & 0xffu;
        const float q = SG ? (float)(int)(signed char)byte : (float)byte;
        f[e] = fmaf(a, q, b);
    }
    if (vec) {
#pragma unroll
        for (int k = 0; k < 16; k += Vec16<T>::N) {
            Vec16<T> v;
#pragma unroll
            for (int e = 0; e < Vec16<T>::N; ++e) v.e[e] = from_f32<T>(f[k + e]);
            store16(dst + k, v);
        }
    } else {
#pragma unroll
        for (int e = 0; e < 16; ++e) dst[e] = from_f32<T>(f[e]);
    }
}

// packed (N, K) -> T (N, K); one thread per item (32 values). w 16-byte aligned.
template <int QT>
__device__ __forceinline__ void pk_dequant(const u8* __restrict__ w, T* __restrict__ out, int N, int K, int vec) {
    typedef PkFmt<QT> F;
    const int ipb = F::BS / 32;
    const int ipr = K >> 5;
    const size_t rowbytes = (size_t)(K / F::BS) * F::TS;
    const long long total = (long long)N * ipr;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const int n = (int)(i / ipr), gi = (int)(i - (long long)n * ipr);
        const int blk = gi / ipb, it = gi - blk * ipb;
        const size_t ro = (size_t)n * rowbytes;
        const u8* base = w + (ro & ~(size_t)15);
        const PkRaw raw = pk_raw<QT, 0>(base, (int)(ro & 15) + blk * F::TS, it);
        const PkItem u = pk_decode<QT>(raw, it);
        T* dst = out + (size_t)n * K + (size_t)blk * F::BS;
        pk_write16<F::SG>(dst + u.ea, u.qa, u.aa, u.ba, vec);
        pk_write16<F::SG>(dst + u.eb, u.qb, u.ab, u.bb, vec);
    }
}

#define PK_DEQUANT(FMT, QT)                                                                        \
    extern "C" __global__ void dequant_##FMT(const void* __restrict__ w, T* __restrict__ out, int N, \
                                             int K, int vec) {                                     \
        pk_dequant<QT>(reinterpret_cast<const u8*>(w), out, N, K, vec);                            \
    }
PK_DEQUANT(q8_0, 0)
PK_DEQUANT(q4_0, 1)
PK_DEQUANT(q4_1, 2)
PK_DEQUANT(q5_0, 3)
PK_DEQUANT(q5_1, 4)
PK_DEQUANT(q4_k, 5)
PK_DEQUANT(q5_k, 6)
PK_DEQUANT(q6_k, 7)

// ---------------------------------------------------------------- embedding rows (packed table)
// out[t, :] = row ids[t] of the packed (V, K) table, dequantized; an id out of range writes NaN.
// One block per token, its threads over the row's 32-value items.
template <int QT>
__device__ __forceinline__ void pk_embed(const u8* __restrict__ w, const void* __restrict__ ids, int ids64,
                                         T* __restrict__ out, int V, int K, int vec) {
    typedef PkFmt<QT> F;
    const int ipb = F::BS / 32;
    const int ipr = K >> 5;
    const size_t rowbytes = (size_t)(K / F::BS) * F::TS;
    const int t = blockIdx.x;
    const i64 id = load_index(ids, ids64, t);
    T* row = out + (size_t)t * K;
    if (id < 0 || id >= V) {
        for (int d = threadIdx.x; d < K; d += blockDim.x) row[d] = from_f32<T>(HI_NAN);
        return;
    }
    const size_t ro = (size_t)id * rowbytes;
    const u8* base = w + (ro & ~(size_t)15);
    for (int gi = threadIdx.x; gi < ipr; gi += blockDim.x) {
        const int blk = gi / ipb, it = gi - blk * ipb;
        const PkRaw raw = pk_raw<QT, 0>(base, (int)(ro & 15) + blk * F::TS, it);
        const PkItem u = pk_decode<QT>(raw, it);
        T* dst = row + (size_t)blk * F::BS;
        pk_write16<F::SG>(dst + u.ea, u.qa, u.aa, u.ba, vec);
        pk_write16<F::SG>(dst + u.eb, u.qb, u.ab, u.bb, vec);
    }
}

#define PK_EMBED(FMT, QT)                                                                          \
    extern "C" __global__ void embed_##FMT(const void* __restrict__ w, const void* __restrict__ ids, \
                                           int ids64, T* __restrict__ out, int V, int K, int vec) {  \
        pk_embed<QT>(reinterpret_cast<const u8*>(w), ids, ids64, out, V, K, vec);                  \
    }
PK_EMBED(q8_0, 0)
PK_EMBED(q4_0, 1)
PK_EMBED(q4_1, 2)
PK_EMBED(q5_0, 3)
PK_EMBED(q5_1, 4)
PK_EMBED(q4_k, 5)
PK_EMBED(q5_k, 6)
PK_EMBED(q6_k, 7)
