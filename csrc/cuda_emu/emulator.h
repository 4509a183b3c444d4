// A small CPU emulator for torchfast's CUDA kernels (tests only; see csrc/cuda/runtime.cuh).
//
// Each CUDA thread of a block runs as a fiber (ucontext) on the calling OS thread; blocks run one
// after another. A fiber runs until it reaches a barrier (__syncthreads, or the warp exchange of a
// shuffle) and then yields; the scheduler then resumes the first runnable fiber in its order
// (g_schedule), so threads interleave only at barriers, in orders a real GPU may also choose. What it checks that a compile cannot:
//   - indexing, grid-stride loops, tails, vector paths: results are compared with the reference;
//   - __syncthreads reached by some threads of a block and not others: reported as a deadlock;
//   - a missing __syncthreads between shared-memory writes and reads by other threads: the tests run
//     every kernel with the lowest, the highest and random fibers first (g_schedule), released
//     fibers running ahead, and require bitwise-identical results, which exposes racy code;
//   - a shuffle reading a lane that did not take part: reported;
//   - launch configurations CUDA would refuse (block > 1024 threads, grid.y/z > 65535, empty grid).
// Not modelled: memory coalescing, timing, warp-synchronous code without barriers (there is none).
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <tuple>
#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>
#include <map>
#include <set>
#include <tuple>
#include <unordered_set>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};

inline uint3 threadIdx{0, 0, 0};
inline uint3 blockIdx{0, 0, 0};
inline dim3 blockDim;
inline dim3 gridDim;

template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }

namespace tfemu {

constexpr size_t kStackBytes = 256 * 1024;

enum class State { kRunnable, kBlockBarrier, kWarpBarrier, kDone };

struct Fiber {
  ucontext_t ctx;
  State state;
  uint3 idx;
  int warp;
  uint64_t slot;      // this thread's value offered to a shuffle
  uint64_t slot_gen;  // the warp barrier generation it was offered in
  uint64_t mem_seq;   // this thread's global memory accesses so far (the traffic model's request index)
};

struct BlockRun {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0;
  int live = 0;
  int block_arrived = 0;
  std::vector<int> warp_live, warp_arrived;
  std::vector<uint64_t> warp_gen;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  std::exception_ptr error;
};

inline BlockRun* g_run = nullptr;

// Which runnable fiber is resumed next: 0 the lowest-numbered, 1 the highest, 2 the first from a
// random position. A kernel whose result depends on this has a race; the tests run the kernels
// under all three and require bitwise-identical results (our kernels promise determinism).
inline int g_schedule = 0;
// Kernel launches so far (the tests count the launches of each op).
inline int64_t g_launches = 0;

// ---- The memory system, as far as a CPU can tell (on only while g_traffic is set) ----------------
// Every global access the kernels make through runtime.cuh's accessors (load_vec, store_vec, ld, st)
// is recorded. The k-th access of each thread of a warp is taken as one warp-level request (the
// threads of a warp run the same instruction stream); a request costs the distinct 32-byte sectors
// its threads touch. Per launch: requests, sectors, useful bytes (what the threads asked for), and
// the distinct sectors read and written, i.e. the DRAM traffic if nothing a launch touched twice had
// to be fetched twice.
struct LaunchTraffic {
  uint64_t requests = 0, sectors = 0, useful_bytes = 0, read_bytes = 0, write_bytes = 0;
};
inline bool g_traffic = false;
inline std::vector<LaunchTraffic> g_traffic_log;
struct TrafficRun {
  std::map<std::tuple<uint64_t, int, uint64_t, bool>, std::pair<std::set<uint64_t>, uint64_t>> requests;
  std::unordered_set<uint64_t> read, written;
};
inline TrafficRun g_traffic_run;

inline std::vector<char*>& stacks() {
  static std::vector<char*> s;
  return s;
}

inline void release_block_barrier(BlockRun& r) {
  for (auto& f : r.fibers)
    if (f.state == State::kBlockBarrier) f.state = State::kRunnable;
  r.block_arrived = 0;
}

inline void release_warp_barrier(BlockRun& r, int w) {
  for (auto& f : r.fibers)
    if (f.warp == w && f.state == State::kWarpBarrier) f.state = State::kRunnable;
  r.warp_arrived[w] = 0;
  r.warp_gen[w] += 1;
}

inline void yield_to_scheduler() {
  BlockRun& r = *g_run;
  swapcontext(&r.fibers[r.current].ctx, &r.scheduler);
}

inline void block_barrier() {
  BlockRun& r = *g_run;
  r.fibers[r.current].state = State::kBlockBarrier;
  if (++r.block_arrived == r.live) release_block_barrier(r);
  yield_to_scheduler();
}

inline void warp_barrier() {
  BlockRun& r = *g_run;
  Fiber& f = r.fibers[r.current];
  f.state = State::kWarpBarrier;
  if (++r.warp_arrived[f.warp] == r.warp_live[f.warp]) release_warp_barrier(r, f.warp);
  yield_to_scheduler();
}

inline void fiber_entry() {
  BlockRun& r = *g_run;
  try {
    r.body(r.body_arg);
  } catch (...) {
    if (!r.error) r.error = std::current_exception();
  }
  Fiber& f = r.fibers[r.current];
  f.state = State::kDone;
  r.live -= 1;
  r.warp_live[f.warp] -= 1;
  // A thread that exits no longer holds up a barrier (as on a GPU since Volta).
  if (r.block_arrived > 0 && r.block_arrived == r.live) release_block_barrier(r);
  if (r.warp_arrived[f.warp] > 0 && r.warp_arrived[f.warp] == r.warp_live[f.warp]) release_warp_barrier(r, f.warp);
  // returning resumes uc_link, the scheduler
}

inline std::string dims(const dim3& d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

// Runs body(arg) as every thread of every block of the grid.
inline void run_grid(dim3 grid, dim3 block, void (*body)(void*), void* arg) {
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || block.z > 64)
    throw std::runtime_error("emulated launch: invalid block " + dims(block) + " (CUDA allows 1..1024 threads)");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u)
    throw std::runtime_error("emulated launch: invalid grid " + dims(grid));
  if (g_run != nullptr) throw std::runtime_error("emulated launch: nested launches are not supported");
  auto& st = stacks();
  while (st.size() < nthreads) {
    char* p = static_cast<char*>(std::malloc(kStackBytes));
    if (!p) throw std::bad_alloc();
    st.push_back(p);
  }
  const int nwarps = static_cast<int>((nthreads + 31) / 32);
  BlockRun r;
  r.body = body;
  r.body_arg = arg;
  r.fibers.resize(nthreads);
  g_run = &r;
  blockDim = block;
  gridDim = grid;
  try {
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          blockIdx = uint3{bx, by, bz};
          r.live = static_cast<int>(nthreads);
          r.block_arrived = 0;
          r.warp_live.assign(nwarps, 0);
          r.warp_arrived.assign(nwarps, 0);
          r.warp_gen.assign(nwarps, 0);
          for (uint64_t t = 0; t < nthreads; ++t) {
            Fiber& f = r.fibers[t];
            f.idx = uint3{static_cast<unsigned>(t % block.x), static_cast<unsigned>((t / block.x) % block.y),
                          static_cast<unsigned>(t / (uint64_t(block.x) * block.y))};
            f.warp = static_cast<int>(t / 32);
            f.state = State::kRunnable;
            f.slot_gen = ~uint64_t(0);
            f.mem_seq = 0;
            r.warp_live[f.warp] += 1;
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = st[t];
            f.ctx.uc_stack.ss_size = kStackBytes;
            f.ctx.uc_link = &r.scheduler;
            makecontext(&f.ctx, fiber_entry, 0);
          }
          uint64_t mix = 0x9E3779B97F4A7C15ull ^ (uint64_t(bx) << 32) ^ (uint64_t(by) << 16) ^ bz;
          while (r.live > 0) {
            // Greedy: after every yield, resume the first runnable fiber in the schedule's order, so
            // fibers released by a barrier run ahead as far as they can before the others move.
            int64_t pick = -1;
            const int64_t n = static_cast<int64_t>(nthreads);
            int64_t first = 0, step = 1;
            if (g_schedule == 1) {
              first = n - 1;
              step = -1;
            } else if (g_schedule == 2) {
              mix ^= mix << 13;
              mix ^= mix >> 7;
              mix ^= mix << 17;
              first = static_cast<int64_t>(mix % nthreads);
            }
            for (int64_t k = 0; k < n; ++k) {
              const int64_t t = ((first + step * k) % n + n) % n;
              if (r.fibers[t].state == State::kRunnable) {
                pick = t;
                break;
              }
            }
            if (pick < 0) {
              int at_block = 0, at_warp = 0;
              for (auto& f : r.fibers) {
                at_block += f.state == State::kBlockBarrier;
                at_warp += f.state == State::kWarpBarrier;
              }
              throw std::runtime_error(
                  "emulated kernel deadlock in block " + dims(dim3(bx, by, bz)) + ": " + std::to_string(at_block) +
                  " threads wait at __syncthreads and " + std::to_string(at_warp) +
                  " at a warp shuffle that the other threads never reach");
            }
            r.current = static_cast<int>(pick);
            threadIdx = r.fibers[pick].idx;
            swapcontext(&r.scheduler, &r.fibers[pick].ctx);
            if (r.error) std::rethrow_exception(r.error);
          }
        }
  } catch (...) {
    g_run = nullptr;
    g_traffic_run = TrafficRun();
    throw;
  }
  g_run = nullptr;
  if (g_traffic) {
    LaunchTraffic t;
    for (const auto& kv : g_traffic_run.requests) {
      t.requests += 1;
      t.sectors += kv.second.first.size();
      t.useful_bytes += kv.second.second;
    }
    t.read_bytes = 32 * g_traffic_run.read.size();
    t.write_bytes = 32 * g_traffic_run.written.size();
    g_traffic_log.push_back(t);
    g_traffic_run = TrafficRun();
  }
}

// One global access of `bytes` at p by the running thread. Vector accesses must be aligned to their
// size, as on a GPU (where a misaligned one faults).
inline void record_access(const void* p, uint64_t bytes, uint64_t align, bool write) {
  const uint64_t a = reinterpret_cast<uintptr_t>(p);
  if (align > 1 && a % align != 0)
    throw std::runtime_error("emulated misaligned " + std::to_string(align) + "-byte " +
                             (write ? "store" : "load") + " at address " + std::to_string(a) +
                             " (a GPU faults: misaligned address)");
  if (!g_traffic || g_run == nullptr) return;
  Fiber& f = g_run->fibers[g_run->current];
  const uint64_t block = (uint64_t(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  auto& req = g_traffic_run.requests[std::make_tuple(block, f.warp, f.mem_seq++, write)];
  req.second += bytes;
  auto& unique = write ? g_traffic_run.written : g_traffic_run.read;
  for (uint64_t sct = a / 32; sct <= (a + bytes - 1) / 32; ++sct) {
    req.first.insert(sct);
    unique.insert(sct);
  }
}

// Launch(grid, block, kernel)(args...): converts the arguments to the kernel's parameter types once
// (as a real launch copies them into the parameter buffer) and runs the grid.
template <typename... P>
struct Launch {
  dim3 grid, block;
  void (*kernel)(P...);
  Launch(dim3 g, dim3 b, void (*k)(P...)) : grid(g), block(b), kernel(k) {}
  template <typename... A>
  void operator()(A&&... args) const {
    ++g_launches;
    struct Call {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> params;
    } call{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    run_grid(
        grid, block,
        [](void* p) {
          auto* c = static_cast<Call*>(p);
          std::apply(c->kernel, c->params);
        },
        &call);
  }
};
template <typename... P>
Launch(dim3, dim3, void (*)(P...)) -> Launch<P...>;

}  // namespace tfemu

inline void __syncthreads() { tfemu::block_barrier(); }

// __shfl_down_sync over a full warp: lane l receives lane l + delta's value (its own when
// l + delta >= 32). Every lane named by the mask must call it; reading a lane that did not is an
// error here (undefined on a GPU).
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "emulated shuffle of a type wider than 8 bytes");
  if (mask != 0xffffffffu || width != 32) throw std::runtime_error("emulated shuffle: only full-warp shuffles");
  tfemu::BlockRun& r = *tfemu::g_run;
  const int t = r.current;
  tfemu::Fiber& me = r.fibers[t];
  const int lane = t % 32;
  std::memcpy(&me.slot, &v, sizeof(T));
  me.slot_gen = r.warp_gen[me.warp];
  tfemu::warp_barrier();
  T out = v;
  const int src = lane + static_cast<int>(delta);
  if (src < 32) {
    const int st = t - lane + src;
    if (st >= static_cast<int>(r.fibers.size()) || r.fibers[st].slot_gen != r.warp_gen[me.warp] - 1)
      throw std::runtime_error("emulated shuffle: lane " + std::to_string(lane) + " reads lane " +
                               std::to_string(src) + ", which did not take part");
    std::memcpy(&out, &r.fibers[st].slot, sizeof(T));
  }
  tfemu::warp_barrier();  // nobody offers the next value before every lane has read this one
  return out;
}
