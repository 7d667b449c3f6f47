// CPU emulation harness for the MSDA kernels (no GPU needed).
//
// Compiles msda_kernels.cuh as host code (MASKDINO_MSDA_EMULATION) and runs the per-group kernel bodies: the forward
// lane by lane, the backward with one thread per lane so that `group_sum` (a warp shuffle reduction on the GPU) can
// be emulated with a barrier. Atomic adds become std::atomic_ref adds. Used by tests/test_kernel_build.py:
//
//   emulate_msda <f32|f64|f16|bf16> B S M D L Q P <directory>
//
// reads value.bin, shapes.bin (int64), starts.bin (int64), loc.bin, attn.bin, grad_out.bin from <directory> and
// writes out.bin, grad_value.bin (float, or double for f64), grad_loc.bin, grad_attn.bin there.

#define MASKDINO_MSDA_EMULATION 1

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace maskdino_msda {

// State shared by the lanes of the group being emulated.
struct GroupContext {
  explicit GroupContext(int lanes) : barrier(lanes), values(lanes, 0.0) {}
  std::barrier<> barrier;
  std::vector<double> values;
};
thread_local GroupContext* current_group = nullptr;
thread_local int current_lane = 0;

template <int G, typename T>
T group_sum(T v) {
  GroupContext& group = *current_group;
  group.values[current_lane] = static_cast<double>(v);
  group.barrier.arrive_and_wait();
  T total = 0;
  for (int lane = 0; lane < G; ++lane) total += static_cast<T>(group.values[lane]);
  group.barrier.arrive_and_wait();  // nobody overwrites `values` before every lane has read them
  return total;
}

inline void atomic_accumulate(float* p, float v) { std::atomic_ref<float>(*p).fetch_add(v); }
inline void atomic_accumulate(double* p, double v) { std::atomic_ref<double>(*p).fetch_add(v); }

}  // namespace maskdino_msda

#include "msda_kernels.cuh"

namespace {

template <typename T>
std::vector<T> read_file(const std::string& path, size_t count) {
  std::vector<T> data(count);
  std::ifstream file(path, std::ios::binary);
  if (!file.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(count * sizeof(T)))) {
    std::fprintf(stderr, "cannot read %zu elements from %s\n", count, path.c_str());
    std::exit(2);
  }
  return data;
}

template <typename T>
void write_file(const std::string& path, const std::vector<T>& data) {
  std::ofstream file(path, std::ios::binary);
  file.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size() * sizeof(T)));
}

struct Dims {
  int batch, spatial, heads, channels, levels, queries, points;
};

template <typename scalar_t, int G>
void run(const Dims& d, const std::string& dir) {
  using acc_t = typename maskdino_msda::AccType<scalar_t>::type;
  const size_t value_n = size_t(d.batch) * d.spatial * d.heads * d.channels;
  const size_t point_n = size_t(d.batch) * d.queries * d.heads * d.levels * d.points;
  const size_t out_n = size_t(d.batch) * d.queries * d.heads * d.channels;
  const auto value = read_file<scalar_t>(dir + "/value.bin", value_n);
  const auto shapes = read_file<int64_t>(dir + "/shapes.bin", size_t(d.levels) * 2);
  const auto starts = read_file<int64_t>(dir + "/starts.bin", d.levels);
  const auto loc = read_file<scalar_t>(dir + "/loc.bin", point_n * 2);
  const auto attn = read_file<scalar_t>(dir + "/attn.bin", point_n);
  const auto grad_out = read_file<scalar_t>(dir + "/grad_out.bin", out_n);
  const int64_t groups = int64_t(d.batch) * d.queries * d.heads;

  std::vector<scalar_t> out(out_n);
  for (int64_t group = 0; group < groups; ++group) {
    for (int lane = 0; lane < G; ++lane) {
      maskdino_msda::msda_forward_group<scalar_t, G>(value.data(), shapes.data(), starts.data(), loc.data(),
                                                     attn.data(), out.data(), d.spatial, d.heads, d.channels,
                                                     d.levels, d.queries, d.points, group, lane);
    }
  }

  std::vector<acc_t> grad_value(value_n, acc_t(0));
  // Sentinels: every point must be written exactly by its group's lane 0, and never by an inactive group.
  std::vector<scalar_t> grad_loc(point_n * 2, scalar_t(12345.0f));
  std::vector<scalar_t> grad_attn(point_n, scalar_t(12345.0f));
  for (int64_t group = 0; group <= groups; ++group) {  // the extra group is an inactive one past the end
    const bool active = group < groups;
    maskdino_msda::GroupContext context(G);
    std::vector<std::thread> lanes;
    for (int lane = 0; lane < G; ++lane) {
      lanes.emplace_back([&, lane] {
        maskdino_msda::current_group = &context;
        maskdino_msda::current_lane = lane;
        maskdino_msda::msda_backward_group<scalar_t, G>(
            value.data(), shapes.data(), starts.data(), loc.data(), attn.data(), grad_out.data(), grad_value.data(),
            grad_loc.data(), grad_attn.data(), d.spatial, d.heads, d.channels, d.levels, d.queries, d.points,
            active ? group : 0, lane, active);
      });
    }
    for (auto& lane : lanes) lane.join();
  }

  write_file(dir + "/out.bin", out);
  write_file(dir + "/grad_value.bin", grad_value);
  write_file(dir + "/grad_loc.bin", grad_loc);
  write_file(dir + "/grad_attn.bin", grad_attn);
}

template <typename scalar_t>
void dispatch(const Dims& d, const std::string& dir) {
  switch (maskdino_msda::lane_group_size(d.channels)) {
    case 1: return run<scalar_t, 1>(d, dir);
    case 2: return run<scalar_t, 2>(d, dir);
    case 4: return run<scalar_t, 4>(d, dir);
    case 8: return run<scalar_t, 8>(d, dir);
    case 16: return run<scalar_t, 16>(d, dir);
    default: return run<scalar_t, 32>(d, dir);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 10) {
    std::fprintf(stderr, "usage: %s <f32|f64|f16|bf16> B S M D L Q P <directory>\n", argv[0]);
    return 1;
  }
  const std::string dtype = argv[1];
  const Dims d{std::atoi(argv[2]), std::atoi(argv[3]), std::atoi(argv[4]), std::atoi(argv[5]),
               std::atoi(argv[6]), std::atoi(argv[7]), std::atoi(argv[8])};
  const std::string dir = argv[9];
  if (dtype == "f32") dispatch<float>(d, dir);
  else if (dtype == "f64") dispatch<double>(d, dir);
  else if (dtype == "f16") dispatch<__half>(d, dir);
  else if (dtype == "bf16") dispatch<__nv_bfloat16>(d, dir);
  else {
    std::fprintf(stderr, "unknown dtype %s\n", dtype.c_str());
    return 1;
  }
  return 0;
}
