# Native FIITED ops (sources in cuda/, included by the top-level Makefile).
#   ext         installs the package in editable mode with `pip install --no-build-isolation -e .`:
#               setup.py (the same build as a user's `pip install .`) compiles torchrec_fiited/_C*.so
#               in place, the CPU kernels plus the CUDA ones when the installed torch is a CUDA
#               build and a CUDA toolkit is found. About 40-60 s on 2 cores, and only when a
#               source changed or the library is missing.
#   wheel       builds dist/torchrec_fiited-*.whl (native ops and configs inside) with the same setup.py.
#   nvcc-check  compiles the CUDA kernels (cuda/fiited_cuda.cu, cuda/fiited_hash_cuda.cu, torch-free)
#               to object files with nvcc alone, so they cannot rot on CPU-only machines; then
#               builds the torch host wrappers (setup.py's CUDA_SOURCES) against the installed
#               CPU torch, links them with --no-undefined and loads them, so every CUDA kernel
#               registers against its op's schema (cuda/host_check/check.py). Skipped when nvcc
#               is absent. C++20 throughout, as torch's BuildExtension compiles.
.PHONY: ext wheel nvcc-check FORCE

EXT_SOURCES := $(wildcard cuda/*.cpp cuda/*.h cuda/*.cu) setup.py
EXT_LIBRARY := $(wildcard torchrec_fiited/_C*.so)
NVCC ?= nvcc
NVCC_ARCH ?= sm_80
NVCC_OBJECTS := build/nvcc-check/fiited_cuda.o build/nvcc-check/fiited_hash_cuda.o

ext: $(EXT_STAMP)

# Rebuilt when a source changes, when the stack is reinstalled, or when the library is missing.
# PYTHONWARNINGS mutes setuptools' 10-line notice that an editable install is editable.
$(EXT_STAMP): $(STAMP) $(EXT_SOURCES) $(if $(EXT_LIBRARY),,FORCE)
	PYTHONWARNINGS="ignore:Editable installation" $(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# A portable wheel (FIITED_EXT_MARCH= drops -march=native); `python -m build --wheel --no-isolation`
# builds the same one where the `build` package is installed.
wheel: venv
	FIITED_EXT_MARCH= $(VPY) -m pip wheel -q --no-deps --no-build-isolation -w dist .

HOST_CHECK := build/nvcc-check/host/.checked

nvcc-check: $(NVCC_OBJECTS) $(HOST_CHECK)

# Needs the stack (torch's headers and libraries) and the native CPU ops (the schemas).
$(HOST_CHECK): $(EXT_STAMP) $(wildcard cuda/*.h cuda/*.cu cuda/*.cpp cuda/host_check/*.py cuda/host_check/*.cpp)
	@if command -v $(NVCC) >/dev/null 2>&1; then \
	    $(VPY) cuda/host_check/check.py $(dir $@) --nvcc $(NVCC) --arch $(NVCC_ARCH) && touch $@; \
	else \
	    echo "nvcc-check: $(NVCC) not found; CUDA host wrapper check skipped"; \
	fi

build/nvcc-check/fiited_cuda.o: cuda/fiited_cuda.cu cuda/fiited_cuda.h
build/nvcc-check/fiited_hash_cuda.o: cuda/fiited_hash_cuda.cu cuda/fiited_hash_cuda.h cuda/fiited_hash.h

build/nvcc-check/%.o:
	@if command -v $(NVCC) >/dev/null 2>&1; then \
	    mkdir -p $(dir $@) && \
	    $(NVCC) -std=c++20 -O3 -arch=$(NVCC_ARCH) -Xcompiler -Wall,-Werror -c $< -o $@ && \
	    echo "nvcc-check: $< compiles ($(NVCC_ARCH))"; \
	else \
	    echo "nvcc-check: $(NVCC) not found; CUDA compile check skipped"; \
	fi

FORCE:
