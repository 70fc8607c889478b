// A CPU stand-in for the parts of CUDA the kernels use, so that the very
// same sources (compiled as C++ with -DRESFUSE_CUDA_EMULATION) run on CPU
// tensors where there is no GPU: tests/cuda_emulation/ builds them this way
// and compares them with the composite backend. It checks the kernels' index
// math, reductions, synchronisation and host logic; not speed, and not the
// GPU's memory model.
//
// Execution: a launch runs the grid's blocks one after another; the threads
// of a block are fibers (ucontext) on the calling thread, switched at every
// barrier, so __syncthreads is a barrier, __shared__ variables are function
// statics (one block runs at a time) and __shfl_down_sync exchanges through
// a per-warp buffer between two barriers. Fibers, not OS threads: 256 OS
// threads meeting at every barrier on two cores spent 40 s a soak seed in
// the kernel's scheduler; a fiber switch costs tens of nanoseconds.
#pragma once

#include <c10/core/Device.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
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

#if !defined(__x86_64__)
#error "the CUDA emulation's fibers switch stacks in x86-64 assembly"
#endif

// resfuse_emu_switch(&from_sp, to_sp): saves the callee-saved registers on
// the current stack, stores its stack pointer in from_sp and resumes the
// fiber whose stack pointer is to_sp (a plain function call for the
// compiler, so it saves everything else itself). Weak: every translation
// unit that includes this header defines it.
extern "C" void resfuse_emu_switch(void** from_sp, void* to_sp);
asm(R"(
  .text
  .weak resfuse_emu_switch
  .type resfuse_emu_switch, @function
resfuse_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size resfuse_emu_switch, .-resfuse_emu_switch
)");

namespace resfuse_emu {

// The fibers of the running block: each runs until it waits at a barrier
// (or returns), then hands back to the scheduler (`launch`), which resumes
// them in turn.
struct Fibers {
  static constexpr size_t kStack = 128 * 1024;
  void* scheduler = nullptr;
  std::vector<void*> sp;
  std::vector<bool> done;
  std::function<void()> body;
  int current = 0;  // the running fiber: its thread's linear index in the block
  void yield() { resfuse_emu_switch(&sp[current], scheduler); }
};
inline thread_local Fibers* fibers = nullptr;

// Fiber stacks, kept from launch to launch (uninitialised: pages are mapped
// as a fiber first touches them).
inline std::vector<std::unique_ptr<char[]>>& stacks(size_t count) {
  static thread_local std::vector<std::unique_ptr<char[]>> pool;
  while (pool.size() < count) pool.emplace_back(new char[Fibers::kStack]);
  return pool;
}

// A fiber's first code: the kernel body, then back to the scheduler for good.
inline void fiber_main() {
  Fibers& f = *fibers;
  f.body();
  f.done[f.current] = true;
  void* unused;
  resfuse_emu_switch(&unused, f.scheduler);
}

// The stack pointer of a fiber that starts in fiber_main: six zero registers
// for resfuse_emu_switch to pop, then fiber_main's address for its `ret`,
// placed so that fiber_main starts with the ABI's alignment (rsp = 8 mod 16).
inline void* fresh_stack(char* stack) {
  auto top = reinterpret_cast<uintptr_t>(stack + Fibers::kStack) & ~uintptr_t(15);
  auto* slots = reinterpret_cast<void**>(top) - 8;  // [6 registers][fiber_main][pad]
  for (int i = 0; i < 6; ++i) slots[i] = nullptr;
  slots[6] = reinterpret_cast<void*>(&fiber_main);
  slots[7] = nullptr;
  return slots;
}

// Reusable barrier for a fixed number of fibers of the running block.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    const unsigned long generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      return;
    }
    while (generation == generation_) fibers->yield();
  }

 private:
  int count_, arrived_ = 0;
  unsigned long generation_ = 0;
};

// The running block: its barrier and one exchange buffer + barrier per warp.
struct Block {
  explicit Block(int threads)
      : barrier(threads), warps((threads + 31) / 32, Barrier(32)), exchange(threads) {}
  Barrier barrier;
  std::vector<Barrier> warps;
  std::vector<uint64_t> exchange;  // one slot per thread
};
inline thread_local Block* block = nullptr;

}  // namespace resfuse_emu

inline void __syncthreads() { resfuse_emu::block->barrier.wait(); }

template <typename T>
T __shfl_down_sync(unsigned /*mask: all lanes*/, T value, int offset) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a scalar");
  auto& b = *resfuse_emu::block;
  const int tid = resfuse_emu::fibers->current, lane = tid % 32;
  resfuse_emu::Barrier& warp = b.warps[tid / 32];
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

// Runs kernel over the grid: one fiber per thread of a block, the blocks
// one after another (the statics that stand for __shared__ memory serve one
// block at a time).
template <typename... P, typename... Args>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t, Args&&... args) {
  const std::tuple<std::decay_t<P>...> params(std::forward<Args>(args)...);
  gridDim = grid;
  blockDim = block;
  const int threads = static_cast<int>(block.x * block.y * block.z);
  resfuse_emu::Fibers state;
  state.sp.resize(threads);
  state.body = [&] { std::apply(kernel, params); };
  auto& stacks = resfuse_emu::stacks(threads);
  resfuse_emu::Block shared(threads);
  resfuse_emu::fibers = &state;
  resfuse_emu::block = &shared;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        state.done.assign(threads, false);
        for (int t = 0; t < threads; ++t) state.sp[t] = resfuse_emu::fresh_stack(stacks[t].get());
        for (int left = threads; left > 0;) {
          for (int t = 0; t < threads; ++t) {
            if (state.done[t]) continue;
            state.current = t;
            threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            resfuse_emu_switch(&state.scheduler, state.sp[t]);
            if (state.done[t]) --left;
          }
        }
      }
  resfuse_emu::fibers = nullptr;
  resfuse_emu::block = nullptr;
}

// The tensors live on the CPU here.
inline bool on_device(const at::Tensor& t) { return t.is_cpu(); }

struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

}  // namespace resfuse_cuda
