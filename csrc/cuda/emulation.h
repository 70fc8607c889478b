// A CPU stand-in for the parts of CUDA the kernels use, so that the very
// same sources (compiled as C++ with -DRESFUSE_CUDA_EMULATION) run on CPU
// tensors where there is no GPU: tests/cuda_emulation/ builds them this way
// and compares them with the composite backend. It checks the kernels' index
// math, reductions, synchronisation and host logic; not speed, and not the
// GPU's memory model.
//
// Execution: a launch runs the grid's blocks one after another; the threads
// of a block are real threads, so __syncthreads is a barrier, __shared__
// variables are function statics (one block runs at a time) and
// __shfl_down_sync exchanges through a per-warp buffer between two barriers.
#pragma once

#include <c10/core/Device.h>

#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline void __stwb(uint4* p, uint4 v) { *p = v; }

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

using cudaStream_t = void*;

namespace resfuse_emu {

// Reusable barrier for a fixed number of threads.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const unsigned long generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation != generation_; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_, arrived_ = 0;
  unsigned long generation_ = 0;
};

// The running block: its barrier and one exchange buffer + barrier per warp.
struct Block {
  explicit Block(int threads) : barrier(threads), exchange(threads) {
    for (int w = 0; w < (threads + 31) / 32; ++w) warps.emplace_back(new Barrier(32));
  }
  Barrier barrier;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<uint64_t> exchange;  // one slot per thread
};
inline Block* block = nullptr;

inline int linear_thread() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

}  // namespace resfuse_emu

inline void __syncthreads() { resfuse_emu::block->barrier.wait(); }

template <typename T>
T __shfl_down_sync(unsigned /*mask: all lanes*/, T value, int offset) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a scalar");
  auto& b = *resfuse_emu::block;
  const int tid = resfuse_emu::linear_thread(), lane = tid % 32;
  resfuse_emu::Barrier& warp = *b.warps[tid / 32];
  std::memcpy(&b.exchange[tid], &value, sizeof(T));
  warp.wait();
  T result = value;
  if (lane + offset < 32) std::memcpy(&result, &b.exchange[tid + offset], sizeof(T));
  warp.wait();  // everyone has read before the slots are reused
  return result;
}

namespace resfuse_cuda {

// Enough "SMs" that even the tests' small tensors split into several partials.
inline int sm_count() { return 4; }
inline cudaStream_t current_stream() { return nullptr; }

// Runs kernel over the grid: one real thread per thread of a block, which
// walk the blocks in turn (a barrier between blocks, so the statics that
// stand for __shared__ memory serve one block at a time).
template <typename... P, typename... Args>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t, Args&&... args) {
  const std::tuple<std::decay_t<P>...> params(std::forward<Args>(args)...);
  gridDim = grid;
  blockDim = block;
  const int threads = static_cast<int>(block.x * block.y * block.z);
  resfuse_emu::Block state(threads);
  resfuse_emu::block = &state;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
          for (unsigned bx = 0; bx < grid.x; ++bx) {
            blockIdx = dim3(bx, by, bz);
            std::apply(kernel, params);
            state.barrier.wait();  // the block is done before the next one starts
          }
    });
  for (auto& t : pool) t.join();
  resfuse_emu::block = nullptr;
}

// The tensors live on the CPU here.
inline bool on_device(const at::Tensor& t) { return t.is_cpu(); }

struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

}  // namespace resfuse_cuda
