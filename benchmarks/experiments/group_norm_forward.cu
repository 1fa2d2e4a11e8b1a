// GroupNorm+SiLU forward variants on one GPU, timed like the harness (L2 flushed before each
// run, CUDA events around the kernel alone), each checked against a float64 host reference.
// Shape: (8, 320, 64, 64), 32 groups, channels-first: 256 groups of 40960 elements.
//   nvcc -O3 -std=c++17 -arch=sm_90 -o gnf group_norm_forward.cu
// Variants (results in NOTES.md):
//   on_chip   one 1024-thread block per group, the group staged in shared memory
//   cluster   a cluster of K blocks per group, each holding its share in registers; the blocks'
//             partial sums meet through distributed shared memory
//   library   genfast::cuda::group_norm_forward (csrc/cuda/norm.cu): one 512-thread block per
//             group, two per SM, part of the group in registers and the rest copied into shared
//             memory by cp.async
#include <cooperative_groups.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../../csrc/cuda/norm.cu"

namespace cg = cooperative_groups;

// Its own namespace: the library's kernels, included above, have helpers of the same names.
namespace experiment {

#define CHECK(call)                                                                   \
  do {                                                                                \
    cudaError_t e_ = (call);                                                          \
    if (e_ != cudaSuccess) {                                                          \
      std::printf("%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

constexpr int N = 8, C = 320, S = 64 * 64, G = 32, CPG = C / G, COUNT = CPG * S;
constexpr float EPS = 1e-5f;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(v);
  else return v;
}

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <bool kFast>
__device__ __forceinline__ float silu(float z) {
  if constexpr (kFast) return __fdividef(z, 1.f + __expf(-z));
  else return z * __frcp_rn(1.f + __expf(-z));
}

__device__ __forceinline__ float2 warp_sum(float2 v) {
  for (int off = 16; off > 0; off /= 2) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, off);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, off);
  }
  return v;
}

// Block sum, valid in every thread.
template <int kBlock>
__device__ __forceinline__ float2 block_sum(float2 v) {
  __shared__ float2 warps[kBlock / 32];
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = v;
  __syncthreads();
  float2 t{};
#pragma unroll
  for (int w = 0; w < kBlock / 32; ++w) t = make_float2(t.x + warps[w].x, t.y + warps[w].y);
  return t;
}

template <typename T, int V, bool kFast>
__global__ void __launch_bounds__(1024)
    on_chip(const T* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
            T* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd) {
  extern __shared__ __align__(16) unsigned char shared[];
  constexpr int vectors = COUNT / V, per_channel = S / V;
  auto* tile = reinterpret_cast<Pack<T, V>*>(shared);
  const int grp = blockIdx.x, c0 = grp % G * CPG;
  const auto* xg = reinterpret_cast<const Pack<T, V>*>(x + int64_t(grp) * COUNT);
  auto* yg = reinterpret_cast<Pack<T, V>*>(y + int64_t(grp) * COUNT);
  const float pivot = to_float(x[int64_t(grp) * COUNT]);
  float2 acc{};
  for (int i0 = threadIdx.x; i0 < vectors; i0 += 4 * 1024) {
    Pack<T, V> p[4];
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (i0 + u * 1024 < vectors) p[u] = xg[i0 + u * 1024];
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (i0 + u * 1024 < vectors) {
        tile[i0 + u * 1024] = p[u];
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const float d = to_float(p[u].v[k]) - pivot;
          acc.x += d;
          acc.y = fmaf(d, d, acc.y);
        }
      }
  }
  acc = block_sum<1024>(acc);
  const float m = pivot + acc.x / COUNT;
  const float r = rsqrtf(fmaxf(acc.y / COUNT - (acc.x / COUNT) * (acc.x / COUNT), 0.f) + EPS);
  if (threadIdx.x == 0) mean[grp] = m, rstd[grp] = r;
  for (int i = threadIdx.x; i < vectors; i += 1024) {
    const int c = c0 + i / per_channel;
    const float scale = r * w[c], shift = fmaf(-m, scale, b[c]);
    const Pack<T, V> p = tile[i];
    Pack<T, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) o.v[k] = from_float<T>(silu<kFast>(fmaf(to_float(p.v[k]), scale, shift)));
    yg[i] = o;
  }
}

// A cluster of K blocks per group; block `rank` holds vectors [rank * share, (rank + 1) * share)
// of the group in registers, R per thread.
template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_hint(const Pack<T, V>* p, int hint) {
  uint4 u = hint == 1 ? __ldcs(reinterpret_cast<const uint4*>(p))
            : hint == 2 ? __ldlu(reinterpret_cast<const uint4*>(p))
                        : *reinterpret_cast<const uint4*>(p);
  return reinterpret_cast<Pack<T, V>&>(u);
}
template <typename T, int V>
__device__ __forceinline__ void store_hint(Pack<T, V>* p, const Pack<T, V>& v, int hint) {
  const uint4 u = reinterpret_cast<const uint4&>(v);
  if (hint == 1) __stcs(reinterpret_cast<uint4*>(p), u);
  else if (hint == 2) __stcg(reinterpret_cast<uint4*>(p), u);
  else *reinterpret_cast<uint4*>(p) = u;
}

template <typename T, int V, int K, int kBlock, int R, bool kFast, int kLoadHint = 0, int kStoreHint = 0>
__global__ void __launch_bounds__(kBlock)
    cluster_regs(const T* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                 T* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd) {
  constexpr int vectors = COUNT / V, share = (vectors + K - 1) / K, per_channel = S / V;
  static_assert(share <= kBlock * R, "a block's share must fit its registers");
  __shared__ float2 partial;
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = int(cluster.block_rank()), grp = blockIdx.x / K, c0 = grp % G * CPG;
  const auto* xg = reinterpret_cast<const Pack<T, V>*>(x + int64_t(grp) * COUNT);
  auto* yg = reinterpret_cast<Pack<T, V>*>(y + int64_t(grp) * COUNT);
  const int begin = rank * share, end = min(begin + share, vectors);
  const float pivot = to_float(x[int64_t(grp) * COUNT]);
  Pack<T, V> p[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = begin + threadIdx.x + r * kBlock;
    if (i < end) p[r] = load_hint(xg + i, kLoadHint);
  }
  float2 acc{};
#pragma unroll
  for (int r = 0; r < R; ++r)
    if (begin + int(threadIdx.x) + r * kBlock < end)
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float d = to_float(p[r].v[k]) - pivot;
        acc.x += d;
        acc.y = fmaf(d, d, acc.y);
      }
  acc = block_sum<kBlock>(acc);
  if (threadIdx.x == 0) partial = acc;
  cluster.sync();
  float2 total{};
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const float2 q = *cluster.map_shared_rank(&partial, k);
    total = make_float2(total.x + q.x, total.y + q.y);
  }
  // Done reading the other blocks' shared memory; each waits for all before it exits.
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
  const float m = pivot + total.x / COUNT;
  const float rs = rsqrtf(fmaxf(total.y / COUNT - (total.x / COUNT) * (total.x / COUNT), 0.f) + EPS);
  if (rank == 0 && threadIdx.x == 0) mean[grp] = m, rstd[grp] = rs;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = begin + threadIdx.x + r * kBlock;
    if (i >= end) continue;
    const int c = c0 + i / per_channel;
    const float scale = rs * w[c], shift = fmaf(-m, scale, b[c]);
    Pack<T, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) o.v[k] = from_float<T>(silu<kFast>(fmaf(to_float(p[r].v[k]), scale, shift)));
    store_hint(yg + i, o, kStoreHint);
  }
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}

__global__ void copy_kernel(const float4* __restrict__ src, float4* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = src[i];
}

struct Timer {
  void* flush;
  size_t flush_bytes = 256u << 20;
  cudaEvent_t start, stop;
  Timer() {
    CHECK(cudaMalloc(&flush, flush_bytes));
    CHECK(cudaEventCreate(&start));
    CHECK(cudaEventCreate(&stop));
  }
  template <typename F>
  float median_us(F launch, int runs = 300) {
    for (int i = 0; i < 20; ++i) launch();
    std::vector<float> t;
    for (int i = 0; i < runs; ++i) {
      CHECK(cudaMemsetAsync(flush, i, flush_bytes));
      CHECK(cudaEventRecord(start));
      launch();
      CHECK(cudaEventRecord(stop));
      CHECK(cudaEventSynchronize(stop));
      float ms;
      CHECK(cudaEventElapsedTime(&ms, start, stop));
      t.push_back(ms * 1000);
    }
    CHECK(cudaGetLastError());
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  }
};

float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T>
struct Problem {
  std::vector<float> hx, hw, hb;  // x as the kernel sees it (rounded to T)
  std::vector<double> ref;
  T *x, *y;
  float *w, *b, *mean, *rstd;
  size_t n = size_t(N) * C * S;
  Problem() {
    srand(1);
    std::vector<T> tx(n);
    hx.resize(n);
    for (size_t i = 0; i < n; ++i) {
      const float v = 3.f * (rand() / float(RAND_MAX)) - 1.f + float(i / COUNT % 7);
      if constexpr (std::is_same_v<T, float>) tx[i] = v;
      else tx[i] = __float2bfloat16(v);
      hx[i] = std::is_same_v<T, float> ? v : bf16_to_float(reinterpret_cast<uint16_t&>(tx[i]));
    }
    for (int c = 0; c < C; ++c) hw.push_back(0.5f + c % 5 * 0.25f), hb.push_back(0.1f * (c % 3) - 0.1f);
    ref.resize(n);
    for (int g = 0; g < N * G; ++g) {
      double s = 0, s2 = 0;
      for (int i = 0; i < COUNT; ++i) s += hx[size_t(g) * COUNT + i];
      const double m = s / COUNT;
      for (int i = 0; i < COUNT; ++i) s2 += (hx[size_t(g) * COUNT + i] - m) * (hx[size_t(g) * COUNT + i] - m);
      const double r = 1 / std::sqrt(s2 / COUNT + EPS);
      for (int i = 0; i < COUNT; ++i) {
        const int c = g % G * CPG + i / S;
        const double z = (hx[size_t(g) * COUNT + i] - m) * r * hw[c] + hb[c];
        ref[size_t(g) * COUNT + i] = z / (1 + std::exp(-z));
      }
    }
    CHECK(cudaMalloc(&x, n * sizeof(T)));
    CHECK(cudaMalloc(&y, n * sizeof(T)));
    CHECK(cudaMalloc(&w, C * 4));
    CHECK(cudaMalloc(&b, C * 4));
    CHECK(cudaMalloc(&mean, N * G * 4));
    CHECK(cudaMalloc(&rstd, N * G * 4));
    CHECK(cudaMemcpy(x, tx.data(), n * sizeof(T), cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(w, hw.data(), C * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(b, hb.data(), C * 4, cudaMemcpyHostToDevice));
  }
  // Max |y - ref| over all elements, after poisoning y with NaN.
  template <typename F>
  double error(F launch) {
    CHECK(cudaMemset(y, 0xff, n * sizeof(T)));
    launch();
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    std::vector<T> out(n);
    CHECK(cudaMemcpy(out.data(), y, n * sizeof(T), cudaMemcpyDeviceToHost));
    double worst = 0;
    for (size_t i = 0; i < n; ++i) {
      const double v = std::is_same_v<T, float> ? double(reinterpret_cast<float&>(out[i]))
                                                : double(bf16_to_float(reinterpret_cast<uint16_t&>(out[i])));
      const double e = std::fabs(v - ref[i]);
      if (!(e <= worst)) worst = e;  // NaN sticks
    }
    return worst;
  }
};

template <typename T, int V, bool kFast>
void run_on_chip(Problem<T>& p, Timer& timer, const char* name) {
  auto kernel = on_chip<T, V, kFast>;
  const int smem = COUNT * sizeof(T);
  CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  auto launch = [&] { kernel<<<N * G, 1024, smem>>>(p.x, p.w, p.b, p.y, p.mean, p.rstd); };
  const double err = p.error(launch);
  std::printf("%-40s %8.2f us  max err %.2e\n", name, timer.median_us(launch), err);
}

template <typename T, int V, int K, int kBlock, int R, bool kFast, int kLoadHint = 0, int kStoreHint = 0>
void run_cluster(Problem<T>& p, Timer& timer) {
  auto kernel = cluster_regs<T, V, K, kBlock, R, kFast, kLoadHint, kStoreHint>;
  cudaLaunchConfig_t cfg{};
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = K;
  attr.val.clusterDim.y = attr.val.clusterDim.z = 1;
  cfg.gridDim = dim3(N * G * K);
  cfg.blockDim = dim3(kBlock);
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  if (K > 8) CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  cudaFuncAttributes fa;
  CHECK(cudaFuncGetAttributes(&fa, kernel));
  auto launch = [&] { CHECK(cudaLaunchKernelEx(&cfg, kernel, p.x, p.w, p.b, p.y, p.mean, p.rstd)); };
  const double err = p.error(launch);
  char name[128];
  std::snprintf(name, sizeof name, "cluster K=%d block=%d R=%d %s ld%d st%d regs=%d", K, kBlock, R,
                kFast ? "fast" : "exact", kLoadHint, kStoreHint, fa.numRegs);
  std::printf("%-40s %8.2f us  max err %.2e\n", name, timer.median_us(launch), err);
}

}  // namespace experiment

using namespace experiment;

// The library's own entry point (csrc/cuda/norm.cu), under the same conditions.
template <typename T>
void run_library(Problem<T>& p, Timer& timer, const char* name) {
  const genfast::cuda::GroupNormShape shape{N, C, S, G, false};
  const auto dtype = std::is_same_v<T, float> ? genfast::cuda::DType::kFloat32 : genfast::cuda::DType::kBFloat16;
  auto launch = [&] {
    CHECK(genfast::cuda::group_norm_forward(p.x, p.w, p.b, p.y, p.mean, p.rstd, shape, EPS, true, dtype, 0));
  };
  const double err = p.error(launch);
  std::printf("%-40s %8.2f us  max err %.2e\n", name, timer.median_us(launch), err);
}

int main() {
  Timer timer;
  {
    const int64_t n4 = int64_t(N) * C * S / 4;
    float4 *a, *b;
    CHECK(cudaMalloc(&a, n4 * 16));
    CHECK(cudaMalloc(&b, n4 * 16));
    CHECK(cudaMemset(a, 1, n4 * 16));
    const double bytes = 2.0 * n4 * 16;
    float t = timer.median_us([&] { CHECK(cudaMemcpyAsync(b, a, n4 * 16, cudaMemcpyDeviceToDevice)); });
    std::printf("%-40s %8.2f us  %.0f GB/s (84 MB read+written)\n", "cudaMemcpy fp32-size", t, bytes / t / 1e3);
    t = timer.median_us([&] { copy_kernel<<<132 * 16, 256>>>(a, b, n4); });
    std::printf("%-40s %8.2f us  %.0f GB/s\n", "copy_kernel float4", t, bytes / t / 1e3);
    CHECK(cudaFree(a));
    CHECK(cudaFree(b));
  }
  std::printf("-- fp32 (floor at 3000 GB/s: 27.96 us)\n");
  {
    Problem<float> p;
    run_on_chip<float, 4, false>(p, timer, "on_chip exact");
    run_on_chip<float, 4, true>(p, timer, "on_chip fast");
    run_cluster<float, 4, 2, 512, 10, true>(p, timer);
    run_cluster<float, 4, 4, 512, 5, true>(p, timer);
    run_library(p, timer, "library");
  }
  std::printf("-- bf16 (floor: 13.98 us)\n");
  {
    Problem<__nv_bfloat16> p;
    run_on_chip<__nv_bfloat16, 8, true>(p, timer, "on_chip fast");
    run_cluster<__nv_bfloat16, 8, 2, 512, 5, true>(p, timer);
    run_library(p, timer, "library");
  }
  return 0;
}
