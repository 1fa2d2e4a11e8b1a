// GroupNorm (+ optional SiLU) on raw pointers.
//
// Each direction is a reduction pass, then an elementwise pass:
//   forward:  group_on_chip_kernel where a group fits in registers and shared memory, else
//             stats_kernel (per-group shifted sums) [-> combine_kernel] -> normalize_kernel
//   backward: backward_sums_kernel (per-(n, c) sums) [-> combine_kernel] -> backward_dx_kernel
// A group can hold a million elements while there are only a few dozen groups, so a reduction
// splits its lines into chunks over grid x. The chunks' float2 partial sums go to the front of
// the output tensor (y or dx), which the elementwise pass overwrites afterwards; combine_kernel
// adds them in a fixed order, so results are deterministic and nothing is allocated.
//
// Both layouts are walked as "lines" of vectors of V elements:
//   channels-first: a line is one (n, c) row of S elements, or for the statistics one whole
//     group (contiguous too); a line's consecutive vectors are adjacent in memory.
//   channels-last: a line is the column of one (n, run of V channels), S vectors C elements
//     apart; consecutive lines are adjacent in memory.
// Thread x runs along the adjacent direction in both, so a warp reads whole cache lines, and
// per-channel parameters are loaded once per line rather than once per element.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "norm.h"

namespace genfast::cuda {
namespace {

constexpr int kThreads = 256;
// Vectors a thread loads before using any: at the occupancy these kernels reach, a few 16-byte
// loads in flight per thread cover HBM latency. The backward kernels load two tensors.
constexpr int kUnrollForward = 4;
constexpr int kUnrollBackward = 2;
// Blocks wanted per SM: about two waves at full occupancy, so the tail wave stays short.
constexpr int kBlocksPerSm = 16;
// group_on_chip_kernel: two blocks per SM, each holding a group (an fp32 group of 160 KB: 64 KB
// in registers, 96 KB in shared memory), so one block's loads overlap the other's stores.
// Measured on an H100 at (8, 320, 64, 64), the L2 flushed before each run: fp32 33.3 us, bf16
// 22.2 us. Variants tried (benchmarks/experiments): one 1024-thread block per SM with the whole
// group in shared memory, 36.4 and 25.0 us; a cluster of two blocks per group, each holding half
// in registers and meeting through distributed shared memory, 34.8 and 23.0 us; a cudaMemcpy of
// the same bytes, 32.8 us.
constexpr int kOnChipThreads = 512;
// Vectors a thread holds in registers: about the most that keep two blocks per SM (64 registers)
// without spilling; 16-bit types need more registers for their conversions.
template <typename T>
constexpr int kRegisterVectors = sizeof(T) == 4 ? 8 : 5;
constexpr int64_t kMaxGridY = 65535;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(v);
  else return v;
}

__device__ __forceinline__ uint32_t bits(float v) { return __float_as_uint(v); }
__device__ __forceinline__ uint32_t bits(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint32_t bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

// V elements moved by one load or store instruction (up to 16 bytes).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T>
constexpr int kMaxVec = 16 / sizeof(T);

template <typename T, int V>
struct PackPair {
  Pack<T, V> x, dy;
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

// Goes through 32-bit words and __stwb because nvcc 13 splits a Pack of 16-bit values, and even
// a plain uint4 built from it, into 4-byte stores.
template <typename T, int V>
__device__ __forceinline__ void store(T* p, const Pack<T, V>& v) {
  constexpr int kBytes = sizeof(T) * V, kPerWord = 4 / sizeof(T);
  if constexpr (kBytes < 4) {
    __stwb(reinterpret_cast<unsigned short*>(p), static_cast<unsigned short>(bits(v.v[0])));
  } else {
    uint32_t w[kBytes / 4];
#pragma unroll
    for (int i = 0; i < kBytes / 4; ++i) {
      w[i] = 0;
#pragma unroll
      for (int k = 0; k < kPerWord; ++k) w[i] |= bits(v.v[i * kPerWord + k]) << (16 * k);
    }
    if constexpr (kBytes == 4) __stwb(reinterpret_cast<unsigned int*>(p), w[0]);
    else if constexpr (kBytes == 8) __stwb(reinterpret_cast<uint2*>(p), make_uint2(w[0], w[1]));
    else __stwb(reinterpret_cast<uint4*>(p), make_uint4(w[0], w[1], w[2], w[3]));
  }
}

// Visits vectors begin, begin + step, ... < end, loading kUnroll of them before using any: use()
// may store, and the compiler does not move a load above a store it cannot prove disjoint.
template <int kUnroll, typename Load, typename Use>
__device__ __forceinline__ void for_vectors(int64_t begin, int64_t end, int64_t step, Load load_at,
                                            Use use) {
  for (int64_t i = begin; i < end; i += kUnroll * step) {
    decltype(load_at(i)) v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (i + u * step < end) v[u] = load_at(i + u * step);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (i + u * step < end) use(i + u * step, v[u]);
  }
}

// Copies 16 bytes from global to shared memory without passing through registers (cp.async,
// sm_80 on); wait_async_copies makes a thread's own copies visible to it.
__device__ __forceinline__ void copy_async_16(void* shared_dst, const void* global_src) {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(unsigned(__cvta_generic_to_shared(shared_dst))),
               "l"(global_src)
               : "memory");
#else
  *static_cast<uint4*>(shared_dst) = *static_cast<const uint4*>(global_src);
#endif
}

__device__ __forceinline__ void wait_async_copies() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}

// n / divisor for 0 <= n < 2^31 by a multiply-high and a shift (Granlund and Montgomery): an
// integer division is a few dozen instructions, and the on-chip forward needs one per vector.
struct Divider {
  uint32_t divisor, magic, shift;
  explicit Divider(uint32_t d) : divisor(d), shift(0) {
    while ((uint64_t(1) << shift) < d) ++shift;
    magic = uint32_t(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1);
  }
  __device__ __forceinline__ int div(int n) const {
    return int((__umulhi(uint32_t(n), magic) + uint32_t(n)) >> shift);
  }
};

__device__ __forceinline__ float2 add(float2 a, float2 b) {
  return make_float2(a.x + b.x, a.y + b.y);
}

// Butterfly sum over aligned runs of `width` lanes (a power of two <= 32). Addition commutes
// exactly, so every lane of a run ends with the same bits.
__device__ __forceinline__ float2 run_sum(float2 v, int width) {
  for (int off = width / 2; off > 0; off /= 2) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, off);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, off);
  }
  return v;
}

// Sum over a block of kBlock threads, valid in thread 0; kBlock is a multiple of 32.
template <int kBlock = kThreads>
__device__ __forceinline__ float2 block_sum(float2 v) {
  __shared__ float2 warp_totals[kBlock / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = run_sum(v, 32);
  if (lane == 0) warp_totals[warp] = v;
  __syncthreads();
  if (warp == 0) v = run_sum(lane < int(blockDim.x / 32) ? warp_totals[lane] : float2{}, 32);
  __syncthreads();  // warp_totals is reused for the block's next group
  return v;
}

// __fdividef's approximate reciprocal: within 2 ulp, and cheaper than __frcp_rn's exact rounding,
// which cost the on-chip forward 1.3 us of 37.7 on an H100. Past z = -87 it returns 0 where the
// true value is under 1e-36.
__device__ __forceinline__ float sigmoid(float z) { return __fdividef(1.f, 1.f + __expf(-z)); }

// Sums of d = x - pivot rather than of x keep E[d^2] - E[d]^2 from cancelling when |mean| >> std.
// Finished in double, once per group, as the C++ and Triton kernels: a float square of a mean near
// 1e20 would overflow to inf - inf = NaN where the variance is merely huge (rstd 0).
__device__ __forceinline__ void write_stats(float2 sums, float pivot, float inv_count, float eps,
                                            float* mean, float* rstd) {
  const double shifted_mean = double(sums.x) * inv_count;
  double var = double(sums.y) * inv_count - shifted_mean * shifted_mean;
  if (var < 0.0) var = 0.0;  // rounding can dip below 0; a NaN passes through
  *mean = float(pivot + shifted_mean);
  *rstd = float(1.0 / sqrt(var + eps));
}

// A pass's walk over lines; see the file comment.
struct Geo {
  int64_t C, S, groups, cpg;
  int64_t lines;      // lines walked
  int64_t inner;      // vectors per line
  int64_t chunk = 0;  // vectors of a line per block (grid x); these three are set by plan()
  int tx = 0;         // threads along the adjacent direction
  int splits = 0;     // chunks per line (gridDim.x)
};

struct ThreadMap {
  int tout, nout;  // this thread's place across lines, and how many places there are
  int tin, nin;    // this thread's place along a line, and how many places there are
  bool active;     // false for the spare threads when tx does not divide kThreads
};

template <bool kCL>
__device__ __forceinline__ ThreadMap map_thread(int tx) {
  const int x = threadIdx.x % tx, y = threadIdx.x / tx, ny = kThreads / tx;
  return kCL ? ThreadMap{x, tx, y, ny, y < ny} : ThreadMap{y, ny, x, tx, y < ny};
}

struct LineInfo {
  int64_t offset;  // element offset of the line's first vector
  int64_t n, c0;   // its sample and first channel (meaningless for a group line)
};

template <bool kCL, int V>
__device__ __forceinline__ LineInfo line_info(const Geo& g, int64_t o) {
  if constexpr (kCL) {
    const int64_t per_sample = g.C / V, n = o / per_sample, c0 = (o - n * per_sample) * V;
    return {n * g.S * g.C + c0, n, c0};
  } else {
    const int64_t n = o / g.C;
    return {o * g.inner * V, n, o - n * g.C};
  }
}

template <bool kCL, int V>
__device__ __forceinline__ int64_t vector_stride(const Geo& g) {
  return kCL ? g.C : V;
}

// Adds each thread's per-channel accumulators over the threads of its line; the thread with
// tin == 0 ends with the line's totals. Every thread of the block must call it.
template <bool kCL, int VC>
__device__ __forceinline__ void sum_along_line(float2 (&acc)[VC], const ThreadMap& m,
                                               float2* smem) {
  if constexpr (!kCL) {
    // tx is a power of two, so a line owns aligned runs of lanes, or whole warps.
    acc[0] = run_sum(acc[0], min(m.nin, 32));
    if (m.nin <= 32) return;
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) smem[warp] = acc[0];
    __syncthreads();
    if (m.tin == 0)
      for (int w = 1; w < m.nin / 32; ++w) acc[0] = add(acc[0], smem[warp + w]);
  } else {
    // A line's threads form a column of the block (same x, every y).
#pragma unroll
    for (int k = 0; k < VC; ++k) smem[k * kThreads + threadIdx.x] = acc[k];
    __syncthreads();
    if (m.active && m.tin == 0)
      for (int y = 1; y < m.nin; ++y)
#pragma unroll
        for (int k = 0; k < VC; ++k) acc[k] = add(acc[k], smem[k * kThreads + y * m.nout + m.tout]);
  }
  __syncthreads();  // smem is reused for the block's next tile
}

// Forward reduction: per group, sums d = x - pivot and d^2 over one chunk of the group's lines,
// pivot being the group's first element. Reads x. With one split it writes mean and rstd
// (N, groups) itself; otherwise it writes the float2 sums to part[group * splits + split], and
// split 0 parks the pivot in mean for combine_kernel.
// Grid: x = chunk, y = group (strided).
template <typename T, int V, bool kCL>
__global__ void __launch_bounds__(kThreads)
    stats_kernel(const T* __restrict__ x, float* __restrict__ mean, float* __restrict__ rstd,
                 float2* __restrict__ part, Geo g, int64_t lines_per_group, float inv_count,
                 float eps) {
  const ThreadMap m = map_thread<kCL>(g.tx);
  const int64_t stride = vector_stride<kCL, V>(g);
  const int64_t begin = blockIdx.x * g.chunk, end = min(begin + g.chunk, g.inner);
  for (int64_t grp = blockIdx.y; grp < g.lines / lines_per_group; grp += gridDim.y) {
    const int64_t first = grp * lines_per_group;
    const float pivot = to_float(x[line_info<kCL, V>(g, first).offset]);
    float2 acc{};
    for (int64_t o = first + m.tout; m.active && o < first + lines_per_group; o += m.nout) {
      const T* line = x + line_info<kCL, V>(g, o).offset;
      for_vectors<kUnrollForward>(
          begin + m.tin, end, m.nin, [&](int64_t i) { return load<T, V>(line + i * stride); },
          [&](int64_t, const Pack<T, V>& p) {
#pragma unroll
            for (int k = 0; k < V; ++k) {
              const float d = to_float(p.v[k]) - pivot;
              acc.x += d;
              acc.y = fmaf(d, d, acc.y);
            }
          });
    }
    acc = block_sum(acc);
    if (threadIdx.x != 0) continue;
    if (g.splits == 1) {
      write_stats(acc, pivot, inv_count, eps, mean + grp, rstd + grp);
    } else {
      part[grp * g.splits + blockIdx.x] = acc;
      if (blockIdx.x == 0) mean[grp] = pivot;
    }
  }
}

// Adds the chunks' partial sums of each item in a fixed order, one warp per item. Reads part.
// Forward (kStats): items are groups; reads the pivot parked in out0 and writes mean to out0 and
// rstd to out1. Backward: items are (n, c); writes sum_dz to out0 and sum_dz_xhat to out1.
template <bool kStats>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(const float2* __restrict__ part, int splits, int64_t items,
                   float* __restrict__ out0, float* __restrict__ out1, float inv_count, float eps) {
  const int64_t item = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (item >= items) return;  // the whole warp leaves together
  float2 acc{};
  for (int k = lane; k < splits; k += 32) acc = add(acc, part[item * splits + k]);
  acc = run_sum(acc, 32);
  if (lane != 0) return;
  if constexpr (kStats) {
    write_stats(acc, out0[item], inv_count, eps, out0 + item, out1 + item);
  } else {
    out0[item] = acc.x;
    out1[item] = acc.y;
  }
}

// Forward elementwise pass, fusing normalisation, affine and activation:
// y = act((x - mean) * (rstd * weight) + bias). Reads x, mean, rstd, weight, bias; writes y.
// Blocks run in the reverse order of stats_kernel's so the first reads find what it left in L2.
// Grid: x = chunk, y = tile of m.nout lines (strided).
template <typename T, int V, bool kCL, bool kSiLU>
__global__ void __launch_bounds__(kThreads)
    normalize_kernel(const T* __restrict__ x, const float* __restrict__ weight,
                     const float* __restrict__ bias, const float* __restrict__ mean,
                     const float* __restrict__ rstd, T* __restrict__ y, Geo g) {
  constexpr int VC = kCL ? V : 1;  // channels per vector
  const ThreadMap m = map_thread<kCL>(g.tx);
  const int64_t stride = vector_stride<kCL, V>(g);
  const int64_t begin = (gridDim.x - 1 - blockIdx.x) * g.chunk, end = min(begin + g.chunk, g.inner);
  const int64_t tiles = (g.lines + m.nout - 1) / m.nout;
  for (int64_t t = blockIdx.y; t < tiles; t += gridDim.y) {
    const int64_t o = (tiles - 1 - t) * m.nout + m.tout;
    if (!m.active || o >= g.lines) continue;
    const LineInfo line = line_info<kCL, V>(g, o);
    float mu[VC], scale[VC], shift[VC];
#pragma unroll
    for (int k = 0; k < VC; ++k) {
      const int64_t c = line.c0 + k, grp = line.n * g.groups + c / g.cpg;
      mu[k] = mean[grp];
      scale[k] = rstd[grp] * weight[c];
      shift[k] = bias[c];
    }
    const T* xl = x + line.offset;
    T* yl = y + line.offset;
    for_vectors<kUnrollForward>(
        begin + m.tin, end, m.nin, [&](int64_t i) { return load<T, V>(xl + i * stride); },
        [&](int64_t i, const Pack<T, V>& p) {
          Pack<T, V> out;
#pragma unroll
          for (int k = 0; k < V; ++k) {
            const int q = kCL ? k : 0;
            const float z = fmaf(to_float(p.v[k]) - mu[q], scale[q], shift[q]);
            out.v[k] = from_float<T>(kSiLU ? z * sigmoid(z) : z);
          }
          store(yl + i * stride, out);
        });
  }
}

// Forward reading x from memory once, for groups that fit on chip: one block per group holds
// the group, its first kOnChipThreads * R vectors in registers and the rest in shared memory,
// while summing; then it normalises from there, fusing affine and activation. Reads x, weight,
// bias; writes y, mean, rstd. The two-pass path reads x twice, and its second read misses L2
// for all but the last tens of MB.
// Vector i of a group: channels-first, elements i * V ... of the contiguous group, in channel
// i / (S / V); channels-last, row i / (cpg / V) and channels (i % (cpg / V)) * V ... of the group.
// `per` divides by S / V channels-first, by cpg / V channels-last.
// Grid: x = group (n * groups + g); dynamic shared memory: the vectors past the registers' (each
// thread's own), then 2 * cpg floats.
template <typename T, int V, bool kCL, bool kSiLU>
__global__ void __launch_bounds__(kOnChipThreads, 2)
    group_on_chip_kernel(const T* __restrict__ x, const float* __restrict__ weight,
                         const float* __restrict__ bias, T* __restrict__ y, float* __restrict__ mean,
                         float* __restrict__ rstd, int64_t C, int S, int cpg, int groups,
                         Divider per, float inv_count, float eps) {
  constexpr int R = kRegisterVectors<T>, kInRegisters = kOnChipThreads * R;
  const int vectors = cpg * S / V;
  extern __shared__ __align__(16) unsigned char shared[];
  auto* tile = reinterpret_cast<Pack<T, V>*>(shared);  // vector i at tile[i - kInRegisters]
  float* scale = reinterpret_cast<float*>(tile + max(vectors - kInRegisters, 0));
  float* affine_bias = scale + cpg;
  __shared__ float2 stats;

  const int64_t grp = blockIdx.x, n = grp / groups, c0 = grp % groups * cpg;
  const int64_t base = kCL ? n * S * C + c0 : (n * C + c0) * S;
  const T* xg = x + base;
  T* yg = y + base;
  // Element offset of vector i from the group's first element.
  auto offset = [&](int i) {
    if constexpr (kCL) {
      const int row = per.div(i);
      return int64_t(row) * C + (i - row * int(per.divisor)) * V;
    } else {
      return i * V;
    }
  };

  // The shared-memory part first: its copies need no registers, so all of them are in flight
  // before the register loads queue behind them.
  for (int i = kInRegisters + threadIdx.x; i < vectors; i += kOnChipThreads)
    copy_async_16(tile + i - kInRegisters, xg + offset(i));
  const float pivot = to_float(xg[0]);
  Pack<T, V> held[R];
#pragma unroll
  for (int r = 0; r < R; ++r)
    if (int i = threadIdx.x + r * kOnChipThreads; i < vectors) held[r] = load<T, V>(xg + offset(i));
  float2 acc{};
  auto accumulate = [&](const Pack<T, V>& p) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float d = to_float(p.v[k]) - pivot;
      acc.x += d;
      acc.y = fmaf(d, d, acc.y);
    }
  };
#pragma unroll
  for (int r = 0; r < R; ++r)
    if (threadIdx.x + r * kOnChipThreads < vectors) accumulate(held[r]);
  wait_async_copies();  // a thread reads back only its own copies, so no barrier
  for (int i = kInRegisters + threadIdx.x; i < vectors; i += kOnChipThreads) accumulate(tile[i - kInRegisters]);
  acc = block_sum<kOnChipThreads>(acc);
  if (threadIdx.x == 0) {
    write_stats(acc, pivot, inv_count, eps, &stats.x, &stats.y);
    mean[grp] = stats.x;
    rstd[grp] = stats.y;
  }
  __syncthreads();
  // Centred before scaling, as the two-pass path: a folded shift, bias - mean * scale, would round
  // at |mean| * scale, which rstd (up to 1/sqrt(eps)) can make dwarf a near-constant group's output.
  const float centre = stats.x;
  for (int c = threadIdx.x; c < cpg; c += kOnChipThreads) {
    scale[c] = stats.y * weight[c0 + c];
    affine_bias[c] = bias[c0 + c];
  }
  __syncthreads();

  auto normalize = [&](int i, const Pack<T, V>& p) {
    const int first = kCL ? (i - per.div(i) * int(per.divisor)) * V : per.div(i);
    Pack<T, V> out;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int c = kCL ? first + k : first;
      const float z = fmaf(to_float(p.v[k]) - centre, scale[c], affine_bias[c]);
      out.v[k] = from_float<T>(kSiLU ? z * sigmoid(z) : z);
    }
    store(yg + offset(i), out);
  };
#pragma unroll
  for (int r = 0; r < R; ++r)
    if (int i = threadIdx.x + r * kOnChipThreads; i < vectors) normalize(i, held[r]);
  for (int i = kInRegisters + threadIdx.x; i < vectors; i += kOnChipThreads) normalize(i, tile[i - kInRegisters]);
}

// The per-channel parameters of a line that both backward passes use.
template <int VC>
struct BackwardParams {
  float mu[VC], rs[VC], w[VC], b[VC];
};

template <int VC, bool kSiLU>
__device__ __forceinline__ BackwardParams<VC> backward_params(const Geo& g, const LineInfo& line,
                                                              const float* weight,
                                                              const float* bias, const float* mean,
                                                              const float* rstd) {
  BackwardParams<VC> p;
#pragma unroll
  for (int k = 0; k < VC; ++k) {
    const int64_t c = line.c0 + k, grp = line.n * g.groups + c / g.cpg;
    p.mu[k] = mean[grp];
    p.rs[k] = rstd[grp];
    p.w[k] = weight[c];
    p.b[k] = kSiLU ? bias[c] : 0.f;
  }
  return p;
}

// dz = dy * act'(z) with z = xhat * w + b; silu'(z) = s * (1 + z * (1 - s)), s = sigmoid(z).
template <bool kSiLU>
__device__ __forceinline__ float grad_z(float dy, float xhat, float w, float b) {
  if constexpr (!kSiLU) return dy;
  const float z = fmaf(xhat, w, b), s = sigmoid(z);
  return dy * s * fmaf(z, 1.f - s, 1.f);
}

// Backward reduction: per (n, c), sums dz and dz * xhat over one chunk of s, xhat being
// (x - mean) * rstd. Reads dy, x, mean, rstd, weight, bias. With one split it writes sum_dz and
// sum_dz_xhat (N, C) itself, otherwise float2 partials to part[(n * C + c) * splits + split].
// Grid: x = chunk, y = tile of m.nout lines (strided).
template <typename T, int V, bool kCL, bool kSiLU>
__global__ void __launch_bounds__(kThreads)
    backward_sums_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                         const float* __restrict__ weight, const float* __restrict__ bias,
                         const float* __restrict__ mean, const float* __restrict__ rstd,
                         float* __restrict__ sum_dz, float* __restrict__ sum_dz_xhat,
                         float2* __restrict__ part, Geo g) {
  constexpr int VC = kCL ? V : 1;
  __shared__ float2 smem[VC * kThreads];
  const ThreadMap m = map_thread<kCL>(g.tx);
  const int64_t stride = vector_stride<kCL, V>(g);
  const int64_t begin = blockIdx.x * g.chunk, end = min(begin + g.chunk, g.inner);
  const int64_t tiles = (g.lines + m.nout - 1) / m.nout;
  for (int64_t t = blockIdx.y; t < tiles; t += gridDim.y) {
    const int64_t o = t * m.nout + m.tout;
    const bool valid = m.active && o < g.lines;
    float2 acc[VC] = {};
    LineInfo line{};
    if (valid) {
      line = line_info<kCL, V>(g, o);
      const auto p = backward_params<VC, kSiLU>(g, line, weight, bias, mean, rstd);
      const T* xl = x + line.offset;
      const T* dyl = dy + line.offset;
      for_vectors<kUnrollBackward>(
          begin + m.tin, end, m.nin,
          [&](int64_t i) {
            return PackPair<T, V>{load<T, V>(xl + i * stride), load<T, V>(dyl + i * stride)};
          },
          [&](int64_t, const PackPair<T, V>& v) {
#pragma unroll
            for (int k = 0; k < V; ++k) {
              const int q = kCL ? k : 0;
              const float xhat = (to_float(v.x.v[k]) - p.mu[q]) * p.rs[q];
              const float dz = grad_z<kSiLU>(to_float(v.dy.v[k]), xhat, p.w[q], p.b[q]);
              acc[q].x += dz;
              acc[q].y = fmaf(dz, xhat, acc[q].y);
            }
          });
    }
    sum_along_line<kCL, VC>(acc, m, smem);
    if (!valid || m.tin != 0) continue;
#pragma unroll
    for (int k = 0; k < VC; ++k) {
      const int64_t item = line.n * g.C + line.c0 + k;
      if (g.splits > 1) {
        part[item * g.splits + blockIdx.x] = acc[k];
      } else {
        sum_dz[item] = acc[k].x;
        sum_dz_xhat[item] = acc[k].y;
      }
    }
  }
}

// Backward elementwise pass: dx = rstd * (w * dz - A - xhat * B), with A the group's mean of
// w * dz and B its mean of w * dz * xhat, formed per line from sum_dz and sum_dz_xhat, so no
// (N, groups) buffer is needed. Reads dy, x, mean, rstd, weight, bias, sum_dz, sum_dz_xhat;
// writes dx. Reverse block order, as in normalize_kernel.
// Grid: x = chunk, y = tile of m.nout lines (strided).
template <typename T, int V, bool kCL, bool kSiLU>
__global__ void __launch_bounds__(kThreads)
    backward_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                       const float* __restrict__ weight, const float* __restrict__ bias,
                       const float* __restrict__ mean, const float* __restrict__ rstd,
                       const float* __restrict__ sum_dz, const float* __restrict__ sum_dz_xhat,
                       T* __restrict__ dx, Geo g, float inv_count) {
  constexpr int VC = kCL ? V : 1;
  const ThreadMap m = map_thread<kCL>(g.tx);
  const int64_t stride = vector_stride<kCL, V>(g);
  const int64_t begin = (gridDim.x - 1 - blockIdx.x) * g.chunk, end = min(begin + g.chunk, g.inner);
  const int64_t tiles = (g.lines + m.nout - 1) / m.nout;
  // w[c] * (sum_dz, sum_dz_xhat)[n, c]; the group's sum of these, times inv_count, is (A, B).
  auto term = [&](int64_t n, int64_t c) {
    return make_float2(weight[c] * sum_dz[n * g.C + c], weight[c] * sum_dz_xhat[n * g.C + c]);
  };
  for (int64_t t = blockIdx.y; t < tiles; t += gridDim.y) {
    const int64_t o = (tiles - 1 - t) * m.nout + m.tout;
    const bool valid = m.active && o < g.lines;
    const LineInfo line = valid ? line_info<kCL, V>(g, o) : LineInfo{};
    // A vector's channels fall in one group or a few; each group's total is formed once.
    // Channels-first, the line's lanes share out its group's cpg terms, then all hold the total.
    const int width = kCL ? 1 : min(m.nin, 32);
    float a[VC], b[VC];
    float2 s{};
    int64_t prev = -1;
#pragma unroll
    for (int k = 0; k < VC; ++k) {
      const int64_t c_first = (line.c0 + k) / g.cpg * g.cpg;
      if (c_first != prev) {
        prev = c_first;
        s = float2{};
        for (int64_t j = kCL ? 0 : m.tin % width; valid && j < g.cpg; j += width)
          s = add(s, term(line.n, c_first + j));
        if constexpr (!kCL) s = run_sum(s, width);
      }
      a[k] = s.x * inv_count;
      b[k] = s.y * inv_count;
    }
    if (!valid) continue;
    const auto p = backward_params<VC, kSiLU>(g, line, weight, bias, mean, rstd);
    const T* xl = x + line.offset;
    const T* dyl = dy + line.offset;
    T* dxl = dx + line.offset;
    for_vectors<kUnrollBackward>(
        begin + m.tin, end, m.nin,
        [&](int64_t i) {
          return PackPair<T, V>{load<T, V>(xl + i * stride), load<T, V>(dyl + i * stride)};
        },
        [&](int64_t i, const PackPair<T, V>& v) {
          Pack<T, V> out;
#pragma unroll
          for (int k = 0; k < V; ++k) {
            const int q = kCL ? k : 0;
            const float xhat = (to_float(v.x.v[k]) - p.mu[q]) * p.rs[q];
            const float dz = grad_z<kSiLU>(to_float(v.dy.v[k]), xhat, p.w[q], p.b[q]);
            out.v[k] = from_float<T>(p.rs[q] * (fmaf(p.w[q], dz, -a[q]) - xhat * b[q]));
          }
          store(dxl + i * stride, out);
        });
  }
}

// ------------------------------------------------------------------------------------ host side

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

struct Launch {
  Geo geo;
  dim3 grid, block;
};

// Shapes one pass. tx runs along the adjacent direction: channels-first along a line, as a power
// of two so a line owns aligned runs of lanes; channels-last across the x_lines lines that lie
// side by side, spread evenly over as few block rows as fit. Grid y walks `rows` (0: tiles of
// lines). Grid x cuts lines into chunks until the GPU is full, leaving each thread at least
// min_per_thread vectors so per-line setup stays amortised.
Launch plan(Geo geo, bool cl, int64_t x_lines, int64_t rows, int64_t min_per_thread, int sms) {
  int tx = 1;
  if (cl) tx = int(ceil_div(x_lines, ceil_div(x_lines, kThreads)));
  else
    while (tx < kThreads && tx < geo.inner) tx *= 2;
  const int ny = kThreads / tx, nout = cl ? tx : ny, nin = cl ? ny : tx;
  if (rows == 0) rows = ceil_div(geo.lines, nout);
  const int64_t want = ceil_div(int64_t(sms) * kBlocksPerSm, rows);
  const int64_t most = std::max<int64_t>(1, geo.inner / (nin * min_per_thread));
  geo.chunk = ceil_div(geo.inner, std::clamp<int64_t>(want, 1, most));
  geo.splits = int(ceil_div(geo.inner, geo.chunk));  // so that no chunk is empty
  geo.tx = tx;
  return {geo, dim3(geo.splits, unsigned(std::min(rows, kMaxGridY))),
          dim3(unsigned(ceil_div(int64_t(tx) * ny, 32) * 32))};
}

// The partials live in the output tensor; where they would not fit, or it is not aligned for
// float2, a single chunk per line does the whole reduction instead.
void fit_partials(Launch& l, int64_t items, const void* out, int64_t out_bytes) {
  const int64_t need = items * l.geo.splits * int64_t(sizeof(float2));
  if (l.geo.splits > 1 && (need > out_bytes || !aligned(out, sizeof(float2)))) {
    l.geo.splits = 1;
    l.geo.chunk = l.geo.inner;
    l.grid.x = 1;
  }
}

dim3 combine_grid(int64_t items) { return dim3(unsigned(ceil_div(items, kThreads / 32))); }

cudaError_t sm_count(int* sms) {
  int device = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
}

bool valid_shape(const GroupNormShape& s) {
  return s.N > 0 && s.C > 0 && s.S > 0 && s.groups > 0 && s.C % s.groups == 0;
}

// Full-width vectors where the layout and every pointer allow them, else single elements; the
// widths in between are left out to halve the instantiations.
template <typename T, typename F>
cudaError_t with_vec(bool wide, F&& f) {
  return wide ? f(std::integral_constant<int, kMaxVec<T>>{}) : f(std::integral_constant<int, 1>{});
}

// The walk of the elementwise passes and the backward reduction: lines as in the file comment.
template <bool kCL, int V>
Geo line_geo(const GroupNormShape& s) {
  return {s.C, s.S, s.groups, s.C / s.groups, kCL ? s.N * s.C / V : s.N * s.C, kCL ? s.S : s.S / V};
}

// Launches group_on_chip_kernel and returns true when a group fits on chip, vectorises, and there
// are enough groups to give every SM a block; else returns false and launches nothing (its error,
// if any, in *err).
template <typename T, bool kCL, bool kSiLU>
bool forward_on_chip(const T* x, const float* weight, const float* bias, T* y, float* mean,
                     float* rstd, const GroupNormShape& s, float eps, int sms, cudaStream_t stream,
                     cudaError_t* err) {
  constexpr int V = kMaxVec<T>;
  const int64_t cpg = s.C / s.groups, count = cpg * s.S, num_groups = s.N * s.groups;
  const bool wide = (kCL ? cpg : s.S) % V == 0 && aligned(x, 16) && aligned(y, 16);
  if (!wide || num_groups < sms) return false;
  int device = 0, max_shared = 0;
  if ((*err = cudaGetDevice(&device)) != cudaSuccess ||
      (*err = cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device)) != cudaSuccess)
    return false;
  const int64_t in_shared = std::max<int64_t>(0, count / V - kOnChipThreads * kRegisterVectors<T>);
  const int64_t shared_bytes = in_shared * 16 + 2 * cpg * int64_t(sizeof(float));
  // The limit covers the kernel's static shared memory too: block_sum's and stats, under 1 KB.
  if (shared_bytes + 1024 > max_shared) return false;
  auto* kernel = group_on_chip_kernel<T, V, kCL, kSiLU>;
  if ((*err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared_bytes))) ==
      cudaSuccess) {
    const Divider per(uint32_t(kCL ? cpg / V : s.S / V));
    kernel<<<unsigned(num_groups), kOnChipThreads, shared_bytes, stream>>>(
        x, weight, bias, y, mean, rstd, s.C, int(s.S), int(cpg), int(s.groups), per,
        float(1.0 / double(count)), eps);
    *err = cudaGetLastError();
  }
  return true;
}

template <typename T, bool kCL, bool kSiLU>
cudaError_t forward(const T* x, const float* weight, const float* bias, T* y, float* mean,
                    float* rstd, const GroupNormShape& s, float eps, cudaStream_t stream) {
  int sms = 0;
  if (cudaError_t err = sm_count(&sms); err != cudaSuccess) return err;
  if (cudaError_t err = cudaSuccess;
      forward_on_chip<T, kCL, kSiLU>(x, weight, bias, y, mean, rstd, s, eps, sms, stream, &err) ||
      err != cudaSuccess)
    return err;
  const int64_t cpg = s.C / s.groups, count = cpg * s.S, num_groups = s.N * s.groups;
  const float inv_count = float(1.0 / double(count));
  constexpr int64_t kWide = kMaxVec<T>, kWideBytes = 16;

  // The statistics walk one line per group channels-first (a group is contiguous), cpg / V lines
  // channels-last, where a vector must then not straddle two groups.
  const bool stats_wide = (kCL ? cpg : count) % kWide == 0 && aligned(x, kWideBytes);
  cudaError_t err = with_vec<T>(stats_wide, [&](auto vec) {
    constexpr int V = decltype(vec)::value;
    const int64_t lines_per_group = kCL ? cpg / V : 1;
    const Geo geo{s.C, s.S, s.groups, cpg, num_groups * lines_per_group, kCL ? s.S : count / V};
    Launch l = plan(geo, kCL, lines_per_group, num_groups, 4, sms);
    fit_partials(l, num_groups, y, s.N * s.C * s.S * int64_t(sizeof(T)));
    auto* part = reinterpret_cast<float2*>(y);
    stats_kernel<T, V, kCL><<<l.grid, l.block, 0, stream>>>(x, mean, rstd, part, l.geo,
                                                            lines_per_group, inv_count, eps);
    if (l.geo.splits > 1)
      combine_kernel<true><<<combine_grid(num_groups), kThreads, 0, stream>>>(
          part, l.geo.splits, num_groups, mean, rstd, inv_count, eps);
    return cudaGetLastError();
  });
  if (err != cudaSuccess) return err;

  const bool wide =
      (kCL ? s.C : s.S) % kWide == 0 && aligned(x, kWideBytes) && aligned(y, kWideBytes);
  return with_vec<T>(wide, [&](auto vec) {
    constexpr int V = decltype(vec)::value;
    const Launch l = plan(line_geo<kCL, V>(s), kCL, s.C / V, 0, 8, sms);
    normalize_kernel<T, V, kCL, kSiLU>
        <<<l.grid, l.block, 0, stream>>>(x, weight, bias, mean, rstd, y, l.geo);
    return cudaGetLastError();
  });
}

template <typename T, bool kCL, bool kSiLU>
cudaError_t backward(const T* dy, const T* x, const float* weight, const float* bias,
                     const float* mean, const float* rstd, T* dx, float* sum_dz, float* sum_dz_xhat,
                     const GroupNormShape& s, cudaStream_t stream) {
  int sms = 0;
  if (cudaError_t err = sm_count(&sms); err != cudaSuccess) return err;
  const int64_t items = s.N * s.C;
  const float inv_count = float(1.0 / double(s.C / s.groups * s.S));
  constexpr int64_t kWide = kMaxVec<T>, kWideBytes = 16;
  const bool wide = (kCL ? s.C : s.S) % kWide == 0 && aligned(x, kWideBytes) &&
                    aligned(dy, kWideBytes) && aligned(dx, kWideBytes);
  return with_vec<T>(wide, [&](auto vec) {
    constexpr int V = decltype(vec)::value;
    const Launch d = plan(line_geo<kCL, V>(s), kCL, s.C / V, 0, 8, sms);
    Launch l = d;
    fit_partials(l, items, dx, items * s.S * int64_t(sizeof(T)));
    auto* part = reinterpret_cast<float2*>(dx);
    backward_sums_kernel<T, V, kCL, kSiLU><<<l.grid, l.block, 0, stream>>>(
        dy, x, weight, bias, mean, rstd, sum_dz, sum_dz_xhat, part, l.geo);
    if (l.geo.splits > 1)
      combine_kernel<false><<<combine_grid(items), kThreads, 0, stream>>>(
          part, l.geo.splits, items, sum_dz, sum_dz_xhat, 0.f, 0.f);
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    backward_dx_kernel<T, V, kCL, kSiLU><<<d.grid, d.block, 0, stream>>>(
        dy, x, weight, bias, mean, rstd, sum_dz, sum_dz_xhat, dx, d.geo, inv_count);
    return cudaGetLastError();
  });
}

template <typename F>
cudaError_t with_bool(bool b, F&& f) {
  return b ? f(std::true_type{}) : f(std::false_type{});
}

// Calls f(T{}, kCL, kSiLU), the runtime choices turned into types.
template <typename F>
cudaError_t dispatch(DType dtype, bool channels_last, bool silu, F&& f) {
  auto with_type = [&](auto tag) {
    return with_bool(channels_last, [&](auto cl) {
      return with_bool(silu, [&](auto act) { return f(tag, cl, act); });
    });
  };
  switch (dtype) {
    case DType::kFloat32: return with_type(float{});
    case DType::kFloat16: return with_type(__half{});
    case DType::kBFloat16: return with_type(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t group_norm_forward(const void* x, const float* weight, const float* bias, void* y,
                               float* mean, float* rstd, GroupNormShape shape, float eps, bool silu,
                               DType dtype, cudaStream_t stream) {
  if (shape.N == 0 || shape.C == 0 || shape.S == 0) return cudaSuccess;
  if (!valid_shape(shape)) return cudaErrorInvalidValue;
  return dispatch(dtype, shape.channels_last, silu, [&](auto tag, auto cl, auto act) {
    using T = decltype(tag);
    return forward<T, decltype(cl)::value, decltype(act)::value>(
        static_cast<const T*>(x), weight, bias, static_cast<T*>(y), mean, rstd, shape, eps, stream);
  });
}

cudaError_t group_norm_backward(const void* dy, const void* x, const float* weight,
                                const float* bias, const float* mean, const float* rstd, void* dx,
                                float* sum_dz, float* sum_dz_xhat, GroupNormShape shape, bool silu,
                                DType dtype, cudaStream_t stream) {
  if (shape.N == 0 || shape.C == 0 || shape.S == 0) return cudaSuccess;
  if (!valid_shape(shape)) return cudaErrorInvalidValue;
  return dispatch(dtype, shape.channels_last, silu, [&](auto tag, auto cl, auto act) {
    using T = decltype(tag);
    return backward<T, decltype(cl)::value, decltype(act)::value>(
        static_cast<const T*>(dy), static_cast<const T*>(x), weight, bias, mean, rstd,
        static_cast<T*>(dx), sum_dz, sum_dz_xhat, shape, stream);
  });
}

}  // namespace genfast::cuda
