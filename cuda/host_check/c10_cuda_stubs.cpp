// Definitions of the c10_cuda symbols fiited_cuda_host.cpp references, for the load check of
// `make nvcc-check` only: a CPU torch has no libc10_cuda, and without these the host wrappers
// could be compiled but not loaded, so a wrapper whose C++ signature disagrees with its op's
// schema would surface only on a GPU machine. Loading registers the CUDA kernels (the
// dispatcher checks each signature then); nothing here may run, so every stub aborts.

#include <cstdio>
#include <cstdlib>

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

namespace {
[[noreturn]] void called(const char* what) {
  std::fprintf(stderr, "[torchrec_fiited] host check stub %s called: no CUDA here\n", what);
  std::abort();
}
}  // namespace

namespace c10::cuda {
DeviceIndex device_count() noexcept { called("device_count"); }
cudaError_t GetDevice(DeviceIndex*) { called("GetDevice"); }
cudaError_t SetDevice(DeviceIndex, const bool) { called("SetDevice"); }
cudaError_t MaybeSetDevice(DeviceIndex) { called("MaybeSetDevice"); }
DeviceIndex ExchangeDevice(DeviceIndex) { called("ExchangeDevice"); }
CUDAStream getStreamFromPool(const bool, DeviceIndex) { called("getStreamFromPool"); }
CUDAStream getStreamFromPool(const int, DeviceIndex) { called("getStreamFromPool"); }
CUDAStream getDefaultCUDAStream(DeviceIndex) { called("getDefaultCUDAStream"); }
CUDAStream getCurrentCUDAStream(DeviceIndex) { called("getCurrentCUDAStream"); }
void setCurrentCUDAStream(CUDAStream) { called("setCurrentCUDAStream"); }
bool CUDAStream::query() const { called("CUDAStream::query"); }
void CUDAStream::synchronize() const { called("CUDAStream::synchronize"); }
cudaStream_t CUDAStream::stream() const { called("CUDAStream::stream"); }
void c10_cuda_check_implementation(const int32_t, const char*, const char*, const uint32_t,
                                   const bool) {
  called("c10_cuda_check_implementation");
}
namespace CUDACachingAllocator {
std::atomic<CUDAAllocator*> allocator{nullptr};
}  // namespace CUDACachingAllocator
}  // namespace c10::cuda
