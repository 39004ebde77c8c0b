#pragma once
// The one c10 CUDA header a CPU wheel of torch does not ship (CMake generates it in a CUDA
// build, where it says the c10_cuda library is shared). Only `make nvcc-check` puts this
// directory on the include path, to compile the host wrappers against a CPU torch.
#define C10_CUDA_BUILD_SHARED_LIBS
